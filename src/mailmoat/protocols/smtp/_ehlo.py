"""EHLO replies: the server's greeting line and its list of extensions.

Contract: :func:`parse_ehlo` reads any 250 reply without failing on odd
extension lines (it must accept what real servers send, e.g. Postfix's
``AUTH=LOGIN PLAIN`` for old Outlook clients); :func:`format_ehlo` builds
the reply a proxy sends after filtering the list.  Keywords are upper-cased
ASCII; non-ASCII bytes are kept backslash-escaped so that nothing is lost
silently and nothing fails to decode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, final

from mailmoat.errors import LocalProtocolError

from ._events import Reply

# The separators bytes.split() uses, so that a parsed token never holds one.
_WHITESPACE: Final = frozenset(" \t\n\r\x0b\x0c")


def _check_token(token: str, what: str) -> None:
    if not token or not token.isascii() or any(c in _WHITESPACE for c in token):
        raise LocalProtocolError(f"EHLO {what} {token!r} must be non-empty ASCII without spaces")


@final
@dataclass(frozen=True, slots=True)
class Extension:
    """One EHLO extension line, e.g. ``Extension("SIZE", ("10240000",))``.

    RFC 5321 4.1.1.1: ehlo-line = ehlo-keyword *( SP ehlo-param ).
    """

    keyword: str
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_token(self.keyword, "keyword")
        if self.keyword != self.keyword.upper():
            raise LocalProtocolError("EHLO keyword must be upper-case")
        for param in self.params:
            _check_token(param, "parameter")

    def to_bytes(self) -> bytes:
        return " ".join((self.keyword, *self.params)).encode("ascii")


def _decode(token: bytes) -> str:
    return token.decode("ascii", "backslashreplace")


def parse_ehlo(reply: Reply) -> tuple[bytes, tuple[Extension, ...]]:
    """Split a 250 EHLO reply into (first line text, extensions).

    Empty extension lines are skipped.  Raises :class:`LocalProtocolError`
    for a reply that is not 250: the session must only parse a success.
    """
    if reply.code != 250:
        raise LocalProtocolError(f"parse_ehlo() on a {reply.code} reply")
    extensions = []
    for line in reply.lines[1:]:
        words = line.split()
        if words:
            extensions.append(
                Extension(_decode(words[0]).upper(), tuple(_decode(w) for w in words[1:]))
            )
    return reply.lines[0], tuple(extensions)


def format_ehlo(greeting: bytes, extensions: Iterable[Extension]) -> Reply:
    """The 250 reply announcing ``extensions`` after the ``greeting`` line."""
    return Reply(250, (greeting, *(ext.to_bytes() for ext in extensions)))
