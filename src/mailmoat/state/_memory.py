"""The in-memory state store of a single node.

Contract: bans have a time to live and are keyed by the client address in
canonical form (IPv4-mapped IPv6 addresses are stored as IPv4), so a ban
taken on a dual-stack listener holds on an IPv4 one and vice versa.  The
store outlives rule reloads: it belongs to the node, not to a rule set.  It
is bounded (``max_bans``); when full, the ban closest to expiry is dropped
first, so an attack with millions of sources cannot exhaust memory.
"""

from __future__ import annotations

import heapq
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar, final

V = TypeVar("V")


def normalize_ip(ip: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 becomes IPv4. Non-IPs pass unchanged."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@final
@dataclass(frozen=True, slots=True)
class Ban:
    ip: str
    until: float  # on the store's clock
    reason: str
    rule_id: str | None


@final
@dataclass(frozen=True, slots=True)
class LoginStats:
    """Recent logins as the ``login.*`` rule fields see them (the current one included)."""

    failures_ip: int
    failures_user: int
    distinct_users_ip: int


#: how many recent attempts are kept per address and per user
_PER_KEY: Final = 512


@final
class MemoryStore:
    """Bans with TTL and recent login attempts, bounded in size."""

    def __init__(
        self,
        *,
        max_bans: int = 100_000,
        max_login_keys: int = 100_000,
        login_window: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bans: dict[str, Ban] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (until, ip), lazily cleaned
        self._clock = clock
        self.max_bans = max_bans
        self.max_login_keys = max_login_keys
        self.login_window = login_window
        # address -> (time, user, ok); user -> failure times; least recently used first
        self._by_ip: OrderedDict[str, deque[tuple[float, str, bool]]] = OrderedDict()
        self._fail_user: OrderedDict[str, deque[float]] = OrderedDict()

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, ip = heapq.heappop(self._expiry)
            ban = self._bans.get(ip)
            if ban is not None and ban.until <= now:
                del self._bans[ip]

    async def ban(self, ip: str, seconds: float, reason: str, rule_id: str | None = None) -> Ban:
        self._expire()
        key = normalize_ip(ip)
        until = self._clock() + seconds
        old = self._bans.get(key)
        if old is not None and old.until >= until:
            return old
        while len(self._bans) >= self.max_bans and key not in self._bans and self._expiry:
            _, victim = heapq.heappop(self._expiry)
            self._bans.pop(victim, None)
        ban = Ban(key, until, reason, rule_id)
        self._bans[key] = ban
        heapq.heappush(self._expiry, (until, key))
        return ban

    async def banned(self, ip: str) -> Ban | None:
        ban = self._bans.get(normalize_ip(ip))
        if ban is None:
            return None
        if ban.until <= self._clock():
            self._expire()
            return None
        return ban

    async def unban(self, ip: str) -> bool:
        return self._bans.pop(normalize_ip(ip), None) is not None

    async def bans(self) -> list[Ban]:
        self._expire()
        return sorted(self._bans.values(), key=lambda b: b.until)

    def remaining(self, ban: Ban) -> float:
        return max(0.0, ban.until - self._clock())

    async def record_login(self, ip: str, user: str, success: bool) -> LoginStats:
        """Record one login attempt; return the counts of the last ``login_window`` seconds."""
        now = self._clock()
        horizon = now - self.login_window
        key = normalize_ip(ip)
        user_key = user.casefold()
        attempts = _touch(self._by_ip, key, self.max_login_keys)
        attempts.append((now, user_key, success))
        while attempts and attempts[0][0] <= horizon:
            attempts.popleft()
        failures_user = 0
        if user_key:
            fails = self._fail_user.get(user_key)
            if not success:
                fails = _touch(self._fail_user, user_key, self.max_login_keys)
                fails.append(now)
            if fails is not None:
                while fails and fails[0] <= horizon:
                    fails.popleft()
                failures_user = len(fails)
        return LoginStats(
            failures_ip=sum(1 for _, _, ok in attempts if not ok),
            failures_user=failures_user,
            distinct_users_ip=len({u for _, u, _ in attempts if u}),
        )


def _touch(table: OrderedDict[str, deque[V]], key: str, limit: int) -> deque[V]:
    """The bounded history of ``key``, made most recently used; evicts the least used."""
    entry = table.get(key)
    if entry is None:
        while len(table) >= limit:
            table.popitem(last=False)
        entry = table[key] = deque(maxlen=_PER_KEY)
    else:
        table.move_to_end(key)
    return entry
