"""The shared store degrading to local memory and recovering without a restart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailmoat.state import Ban, Count, FailoverStore, MemoryStore, Op, StoreUnavailable


class Flaky:
    """A primary store (think Redis) that can be switched off."""

    kind = "redis"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.up = True
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if not self.up:
            raise StoreUnavailable("connection refused")

    async def run(self, ops: Sequence[Op]) -> list[Any]:
        self._check()
        return await self.inner.run(ops)

    async def ban(self, ip: str, seconds: float, reason: str, rule_id: str | None = None) -> Ban:
        self._check()
        return await self.inner.ban(ip, seconds, reason, rule_id)

    async def banned(self, ip: str) -> Ban | None:
        self._check()
        return await self.inner.banned(ip)

    async def unban(self, ip: str) -> bool:
        self._check()
        return await self.inner.unban(ip)

    async def bans(self) -> list[Ban]:
        self._check()
        return await self.inner.bans()

    def remaining(self, ban: Ban) -> float:
        return self.inner.remaining(ban)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_degrades_alerts_once_and_recovers() -> None:
    primary, clock = Flaky(), Clock()
    changes: list[tuple[bool, str]] = []
    store = FailoverStore(
        primary,
        retry_after=5,
        on_change=lambda down, why: changes.append((down, why)),
        clock=clock,
    )
    assert await store.run([Count("k", 60)]) == [1]
    primary.up = False
    assert await store.run([Count("k", 60)]) == [1]  # answered by local memory
    assert (store.degraded, store.blind) == (True, False)  # on_failure = "open"
    calls = primary.calls
    await store.run([Count("k", 60)])
    assert primary.calls == calls  # not retried before retry_after
    await store.ban("192.0.2.9", 3600, "rule X", "X")  # kept locally while down
    assert await store.banned("192.0.2.9") is not None
    primary.up = True
    clock.now += 6
    assert await store.run([Count("k", 60)]) == [2]  # the primary again
    assert store.degraded is False
    assert [down for down, _ in changes] == [True, False]
    assert "connection refused" in changes[0][1]
    # the ban taken while degraded was written to the shared store on recovery
    assert await primary.inner.banned("192.0.2.9") is not None


async def test_closed_mode_is_blind_while_degraded() -> None:
    primary = Flaky()
    store = FailoverStore(primary, on_failure="closed")
    primary.up = False
    await store.run([Count("k", 60)])
    assert store.blind
