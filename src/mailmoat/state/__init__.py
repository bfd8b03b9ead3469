"""Shared state: bans now; counters, profiles and Redis come with the detection release."""

from ._memory import Ban as Ban
from ._memory import MemoryStore as MemoryStore
from ._memory import normalize_ip as normalize_ip

__all__ = ["Ban", "MemoryStore", "normalize_ip"]
