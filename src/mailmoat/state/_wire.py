"""The RESP2 wire format: commands out, replies in (no I/O, no trio).

:func:`encode_command` writes one command as an array of bulk strings;
:func:`parse_reply` reads one reply from a buffer, or says it is incomplete.
A Redis error reply is a :class:`RespError` *value*; bytes that are not RESP2
raise :class:`RespProtocolError`.  Used by the lean client (``_resp.py``) and
by ``RedisStore`` (its error types); tested alone, without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, final

__all__ = ["RespError", "RespProtocolError", "encode_command", "parse_reply"]

_CRLF: Final = b"\r\n"


@final
class RespError(Exception):
    """A Redis error reply (``-ERR ...``, ``-NOSCRIPT ...``), as a value."""

    @property
    def kind(self) -> str:
        """The error's first word: ``ERR``, ``NOSCRIPT``, ``WRONGTYPE``, ..."""
        return str(self).split(" ", 1)[0]


@final
class RespProtocolError(Exception):
    """The server's bytes are not RESP2, or it closed in the middle of a reply."""


def encode_command(args: Sequence[bytes | str | int | float]) -> bytes:
    """``*N`` then each argument as a bulk string."""
    out = bytearray(b"*%d\r\n" % len(args))
    for value in args:
        if isinstance(value, str):
            data = value.encode("utf-8")
        elif isinstance(value, bytes):
            data = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            data = str(value).encode("ascii")
        else:
            raise TypeError(f"not a Redis argument: {value!r}")
        out += b"$%d\r\n%b\r\n" % (len(data), data)
    return bytes(out)


def parse_reply(buf: bytearray, pos: int) -> tuple[Any, int] | None:
    """One reply from ``buf[pos:]``: (value, position after it), or ``None`` if incomplete."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        return None
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == 0x2B:  # + simple string
        return line.decode("utf-8", "replace"), after
    if kind == 0x2D:  # - error
        return RespError(line.decode("utf-8", "replace")), after
    try:
        number = int(line)
    except ValueError:
        raise RespProtocolError(f"not a RESP2 reply: {bytes(buf[pos : end + 2])[:80]!r}") from None
    if kind == 0x3A:  # : integer
        return number, after
    if kind == 0x24:  # $ bulk string
        if number < 0:
            return None, after
        stop = after + number
        if len(buf) < stop + 2:
            return None
        if buf[stop : stop + 2] != _CRLF:
            raise RespProtocolError("a bulk string does not end in CRLF")
        return bytes(buf[after:stop]).decode("utf-8", "replace"), stop + 2
    if kind == 0x2A:  # * array
        if number < 0:
            return None, after
        items: list[Any] = []
        for _ in range(number):
            found = parse_reply(buf, after)
            if found is None:
                return None
            item, after = found
            items.append(item)
        return items, after
    raise RespProtocolError(f"not a RESP2 reply type: {bytes([kind])!r}")
