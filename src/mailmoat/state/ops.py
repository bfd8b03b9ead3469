"""What a detector needs of the shared state, without the stores themselves.

Tier-2 code (``mailmoat.detect``, through it ``mailmoat.session``) describes
its reads and writes as operations and never talks to a store; importing
them from here, not from ``mailmoat.state``, keeps the store implementations
(trio, coredis, sockets) out of its import graph, as the tier contracts in
pyproject.toml require.
"""

from ._memory import normalize_ip
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
    Store,
    StoreUnavailable,
)

__all__ = [
    "MAX_DISTINCT",
    "SLOTS",
    "Ban",
    "Count",
    "Distinct",
    "DistinctPeek",
    "GetBan",
    "GetProfile",
    "Op",
    "Peek",
    "PutProfile",
    "Store",
    "StoreUnavailable",
    "normalize_ip",
]
