"""The operations a state store runs, and the store interface (DESIGN.md §7).

Contract: detectors describe what they need from shared state as a list of
operation values and hand the whole list to :meth:`Store.run`, which returns
one result per operation, in order.  The memory store runs them one after the
other; the Redis store sends them in one pipeline (one round trip per phase).

Windows are **sliding, in slots**: a window of W seconds is kept as
:data:`SLOTS` slots of W/SLOTS seconds; a count covers the slots that began
within the last W seconds, so it is exact to within one slot (W/10).  Every
key expires on its own once its window has passed without activity.

Distinct counts are approximate where the store must bound them: the memory
store counts exactly up to :data:`MAX_DISTINCT` members per key and window
(then saturates); Redis uses HyperLogLog (about 0.8 % standard error).
Members are opaque strings: callers hash what must not be stored (passwords).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, final, runtime_checkable

from mailmoat.errors import MailmoatError

#: slots per window
SLOTS: Final = 10
#: members kept per key and slot by the memory store before a count saturates
MAX_DISTINCT: Final = 4096


@final
@dataclass(frozen=True, slots=True)
class Count:
    """Add ``amount`` to ``key`` now; result: the total within ``window`` seconds."""

    key: str
    window: float
    amount: int = 1


@final
@dataclass(frozen=True, slots=True)
class Peek:
    """The total of ``key`` within ``window`` seconds, adding nothing."""

    key: str
    window: float


@final
@dataclass(frozen=True, slots=True)
class Distinct:
    """Add ``member`` to ``key`` now; result: distinct members within ``window``."""

    key: str
    member: str
    window: float


@final
@dataclass(frozen=True, slots=True)
class DistinctPeek:
    """Distinct members of ``key`` within ``window``, adding nothing."""

    key: str
    window: float


@final
@dataclass(frozen=True, slots=True)
class GetProfile:
    """A small JSON-able mapping stored under ``key``; result: it, or ``None``."""

    key: str


@final
@dataclass(frozen=True, slots=True)
class PutProfile:
    """Store ``profile`` under ``key`` for ``ttl`` seconds; result: ``None``."""

    key: str
    profile: Mapping[str, Any] = field(default_factory=dict)
    ttl: float = 90 * 86400.0


@final
@dataclass(frozen=True, slots=True)
class GetBan:
    """The ban of ``ip`` (:meth:`Store.banned` as an operation, so that a
    connection's ban check and its reputation share one round trip); result:
    the :class:`Ban`, or ``None``."""

    ip: str


Op = Count | Peek | Distinct | DistinctPeek | GetProfile | PutProfile | GetBan


@final
class StoreUnavailable(MailmoatError):
    """The shared store (Redis) did not answer in time or failed; callers degrade."""


@final
@dataclass(frozen=True, slots=True)
class Ban:
    ip: str
    until: float  # on the store's clock (seconds)
    reason: str
    rule_id: str | None


@runtime_checkable
class Store(Protocol):
    """Shared state of one node (memory) or of several (Redis)."""

    #: ``"memory"`` or ``"redis"``
    kind: str

    async def run(self, ops: Sequence[Op]) -> list[Any]:
        """Run ``ops`` (one round trip where the backend allows); a result per op."""
        ...

    async def ban(
        self, ip: str, seconds: float, reason: str, rule_id: str | None = None
    ) -> Ban: ...

    async def banned(self, ip: str) -> Ban | None: ...

    async def unban(self, ip: str) -> bool: ...

    async def bans(self) -> list[Ban]: ...

    def remaining(self, ban: Ban) -> float: ...
