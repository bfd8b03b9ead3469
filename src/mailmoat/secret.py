"""A wrapper for credentials so that they cannot reach a log by accident."""

from __future__ import annotations

from typing import final


@final
class Secret:
    """Holds bytes that must never be logged (SASL blobs, passwords).

    ``repr`` and ``str`` print ``Secret(***)``; the value is only reachable
    through :meth:`reveal`, which makes every use greppable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __len__(self) -> int:
        return len(self._value)
