"""Shared state: bans, windowed counters, distinct counts and profiles (DESIGN.md §7).

``MemoryStore`` serves one node; ``RedisStore`` serves several.  Both implement
:class:`Store`; detectors speak to it in lists of operations (:class:`Count`,
:class:`Distinct`, ...) so that a Redis store answers a phase in one round trip.
"""

from ._failover import FailoverStore as FailoverStore
from ._memory import MemoryStore as MemoryStore
from ._memory import normalize_ip as normalize_ip
from ._ops import MAX_DISTINCT as MAX_DISTINCT
from ._ops import SLOTS as SLOTS
from ._ops import Ban as Ban
from ._ops import Count as Count
from ._ops import Distinct as Distinct
from ._ops import DistinctPeek as DistinctPeek
from ._ops import GetBan as GetBan
from ._ops import GetProfile as GetProfile
from ._ops import Op as Op
from ._ops import Peek as Peek
from ._ops import PutProfile as PutProfile
from ._ops import Store as Store
from ._ops import StoreUnavailable as StoreUnavailable
from ._redis import RedisStore as RedisStore

__all__ = [
    "MAX_DISTINCT",
    "SLOTS",
    "Ban",
    "Count",
    "Distinct",
    "DistinctPeek",
    "FailoverStore",
    "GetBan",
    "GetProfile",
    "MemoryStore",
    "Op",
    "Peek",
    "PutProfile",
    "RedisStore",
    "Store",
    "StoreUnavailable",
    "normalize_ip",
]
