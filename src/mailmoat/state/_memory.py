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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, final

from ._ops import (
    MAX_DISTINCT,
    SLOTS,
    Ban,
    Count,
    Distinct,
    DistinctPeek,
    GetBan,
    GetProfile,
    Op,
    Peek,
    PutProfile,
)

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
class MemoryStore:
    """Bans with TTL, windowed counters, distinct counts and profiles, bounded in size.

    ``max_keys`` bounds the counters, distinct sets and profiles together:
    the least recently used key goes first (an attack with millions of source
    addresses evicts old keys instead of growing the process).
    """

    kind = "memory"

    def __init__(
        self,
        *,
        max_bans: int = 100_000,
        max_keys: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bans: dict[str, Ban] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (until, ip), lazily cleaned
        self._clock = clock
        self.max_bans = max_bans
        # address -> (time, user, ok); user -> failure times; least recently used first
        self.max_keys = max_keys
        # (kind, key) -> value, least recently used first
        self._keys: OrderedDict[tuple[str, str], Any] = OrderedDict()

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

    # ------------------------------------------------------------------ Store.run

    def __len__(self) -> int:
        """Counters, distinct sets and profiles held (bans not included)."""
        return len(self._keys)

    async def run(self, ops: Sequence[Op]) -> list[Any]:
        now = self._clock()
        return [self._one(op, now) for op in ops]

    def _touch(self, kind: str, key: str, new: Callable[[], V]) -> V:
        slot = (kind, key)
        table = self._keys
        value = table.get(slot)
        if value is None:
            while len(table) >= self.max_keys:
                table.popitem(last=False)
            value = table[slot] = new()
        else:
            table.move_to_end(slot)
        return value

    def _one(self, op: Op, now: float) -> Any:
        match op:
            case Count(key, window, amount):
                slots: deque[list[Any]] = self._touch("c", key, deque)
                _advance(slots, now, window)
                start = _slot_start(now, window)
                if slots and slots[-1][0] == start:
                    slots[-1][1] += amount
                else:
                    slots.append([start, amount])
                return sum(n for _, n in slots)
            case Peek(key, window):
                found = self._keys.get(("c", key))
                if found is None:
                    return 0
                _advance(found, now, window)
                return sum(n for _, n in found)
            case Distinct(key, member, window):
                sets: deque[list[Any]] = self._touch("d", key, deque)
                _advance(sets, now, window)
                start = _slot_start(now, window)
                if not sets or sets[-1][0] != start:
                    sets.append([start, set()])
                members: set[str] = sets[-1][1]
                if len(members) < MAX_DISTINCT:
                    members.add(member)
                return _distinct(sets)
            case DistinctPeek(key, window):
                found = self._keys.get(("d", key))
                if found is None:
                    return 0
                _advance(found, now, window)
                return _distinct(found)
            case GetProfile(key):
                entry = self._keys.get(("p", key))
                if entry is None:
                    return None
                expires, profile = entry
                if expires <= now:
                    del self._keys[("p", key)]
                    return None
                self._keys.move_to_end(("p", key))
                return dict(profile)
            case PutProfile(key, profile, ttl):
                self._touch("p", key, lambda: (0.0, {}))
                self._keys[("p", key)] = (now + ttl, dict(profile))
                return None
            case GetBan(ip):
                ban = self._bans.get(normalize_ip(ip))
                return ban if ban is not None and ban.until > now else None
            case _ as unreachable:  # pragma: no cover - Op is closed
                raise TypeError(f"unknown state operation {unreachable!r}")

    def snapshot(self) -> dict[str, Any]:
        """A picklable copy of the state, times relative to now (see :meth:`restore`)."""
        now = self._clock()
        return {
            "keys": [
                [kind, key, _relative(kind, value, now)]
                for (kind, key), value in self._keys.items()
            ],
            "bans": [[b.ip, b.until - now, b.reason, b.rule_id] for b in self._bans.values()],
        }

    def restore(self, data: Mapping[str, Any]) -> int:
        """Load what :meth:`snapshot` gave (of another process); the number of keys restored."""
        now = self._clock()
        n = 0
        for kind, name, value in data.get("keys", []):
            key = str(name)
            if kind in ("c", "d"):
                slots = deque([now + start, set(v) if kind == "d" else v] for start, v in value)
                self._touch(kind, key, deque)
                self._keys[(kind, key)] = slots
            elif kind == "p":
                expires, profile = value
                if expires > 0:
                    self._touch("p", key, lambda: (0.0, {}))
                    self._keys[("p", key)] = (now + expires, dict(profile))
            n += 1
        for ip, left, reason, rule_id in data.get("bans", []):
            if left > 0:
                self._bans[ip] = Ban(ip, now + left, reason, rule_id)
                heapq.heappush(self._expiry, (now + left, ip))
        return n


def _slot_start(now: float, window: float) -> float:
    size = window / SLOTS
    return (now // size) * size


def _advance(slots: deque[list[Any]], now: float, window: float) -> None:
    horizon = now - window
    while slots and slots[0][0] <= horizon:
        slots.popleft()


def _distinct(sets: deque[list[Any]]) -> int:
    if len(sets) == 1:
        return len(sets[0][1])
    union: set[str] = set()
    for _, members in sets:
        union |= members
    return min(len(union), MAX_DISTINCT * SLOTS)


def _relative(kind: str, value: Any, now: float) -> Any:
    if kind == "c":
        return [[start - now, n] for start, n in value]
    if kind == "d":
        return [[start - now, sorted(members)] for start, members in value]
    expires, profile = value
    return [expires - now, profile]
