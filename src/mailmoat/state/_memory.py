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
from collections.abc import Callable
from dataclasses import dataclass
from typing import final


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
class MemoryStore:
    """Bans with TTL, bounded in size."""

    def __init__(
        self, *, max_bans: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._bans: dict[str, Ban] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (until, ip), lazily cleaned
        self._clock = clock
        self.max_bans = max_bans

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
