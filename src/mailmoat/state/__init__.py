"""Shared state: bans and recent login attempts; profiles and Redis come with detection."""

from ._memory import Ban as Ban
from ._memory import LoginStats as LoginStats
from ._memory import MemoryStore as MemoryStore
from ._memory import normalize_ip as normalize_ip

__all__ = ["Ban", "LoginStats", "MemoryStore", "normalize_ip"]
