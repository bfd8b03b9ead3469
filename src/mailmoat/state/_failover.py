"""A shared store that degrades to the node's own memory when it fails.

Contract (DESIGN.md §7): Redis slow or down must never stop mail.  A
:class:`FailoverStore` sends every call to the primary store (Redis); when
it raises :class:`StoreUnavailable` the call is answered by the local
:class:`MemoryStore` instead, the store is marked *degraded*, and
``on_change`` is told once (the node emits a ``state.degraded`` alert).
While degraded, the primary is tried again at most every ``retry_after``
seconds; the first call that succeeds ends it (``state.recovered``), no
restart needed.

``on_failure = "closed"``: while degraded, :meth:`run` still answers from
memory but :attr:`blind` is true, and callers that must not decide without
the shared view (logins) refuse instead.  While the primary is up it alone
holds the bans (a local copy would outlive an unban made on another node);
bans taken while degraded are kept locally and written to the primary when
it is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, final

from ._memory import MemoryStore
from ._ops import Ban, Op, Store, StoreUnavailable


@final
class FailoverStore:
    """See the module docstring."""

    def __init__(
        self,
        primary: Store,
        *,
        fallback: MemoryStore | None = None,
        on_failure: Literal["open", "closed"] = "open",
        retry_after: float = 5.0,
        on_change: Callable[[bool, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary = primary
        self.fallback = fallback if fallback is not None else MemoryStore()
        self.on_failure = on_failure
        self.retry_after = retry_after
        self.on_change = on_change
        self._clock = clock
        self.degraded = False
        self._down_since = 0.0
        self._last_try = 0.0
        self._pending_bans: dict[str, Ban] = {}
        self.kind = primary.kind

    @property
    def blind(self) -> bool:
        """Degraded and configured to refuse decisions that need the shared view."""
        return self.degraded and self.on_failure == "closed"

    def _usable(self) -> bool:
        if not self.degraded:
            return True
        return self._clock() - self._last_try >= self.retry_after

    def _failed(self, exc: StoreUnavailable) -> None:
        self._last_try = self._clock()
        if not self.degraded:
            self.degraded = True
            self._down_since = self._last_try
            if self.on_change is not None:
                self.on_change(True, str(exc))

    async def _recovered(self) -> None:
        was = self.degraded
        self.degraded = False
        if was:
            for ban in list(self._pending_bans.values()):
                left = self.fallback.remaining(ban)
                if left > 0:
                    try:
                        await self.primary.ban(ban.ip, left, ban.reason, ban.rule_id)
                    except StoreUnavailable:
                        return
            self._pending_bans.clear()
            if self.on_change is not None:
                self.on_change(False, f"back after {self._clock() - self._down_since:.1f} s")

    async def run(self, ops: Sequence[Op]) -> list[Any]:
        if self._usable():
            try:
                result = await self.primary.run(ops)
            except StoreUnavailable as exc:
                self._failed(exc)
            else:
                await self._recovered()
                return result
        return await self.fallback.run(ops)

    async def ban(self, ip: str, seconds: float, reason: str, rule_id: str | None = None) -> Ban:
        # only the shared store holds bans while it is up: a local copy would
        # outlive an unban made on another node
        if self._usable():
            try:
                ban = await self.primary.ban(ip, seconds, reason, rule_id)
            except StoreUnavailable as exc:
                self._failed(exc)
            else:
                await self._recovered()
                return ban
        local = await self.fallback.ban(ip, seconds, reason, rule_id)
        self._pending_bans[local.ip] = local
        return local

    async def banned(self, ip: str) -> Ban | None:
        if self._usable():
            try:
                found = await self.primary.banned(ip)
            except StoreUnavailable as exc:
                self._failed(exc)
            else:
                await self._recovered()
                return found
        return await self.fallback.banned(ip)

    async def unban(self, ip: str) -> bool:
        local = await self.fallback.unban(ip)
        self._pending_bans.pop(ip, None)
        try:
            return await self.primary.unban(ip) or local
        except StoreUnavailable as exc:
            self._failed(exc)
            return local

    async def bans(self) -> list[Ban]:
        if self._usable():
            try:
                found = await self.primary.bans()
            except StoreUnavailable as exc:
                self._failed(exc)
            else:
                await self._recovered()
                return found
        return await self.fallback.bans()

    def remaining(self, ban: Ban) -> float:
        # each store counts on its own clock: ask the one that made the ban
        local = self._pending_bans.get(ban.ip)
        if local is ban or self.degraded:
            return self.fallback.remaining(ban)
        return self.primary.remaining(ban)
