"""The server side of IMAP: bytes a server sends -> whole responses.

Contract: :class:`ResponseReader` is sans-IO like the command reader.  It
returns one :class:`Untagged`, :class:`Tagged` or
:class:`ContinuationRequest` per complete response -- a data response with
literals (``* 1 FETCH (BODY[] {12}`` CRLF octets ``)`` CRLF) is one event --
:data:`NEED_DATA` while a response is unfinished, and :class:`ServerClosed`
after EOF.  Octets of an unfinished response stay in :attr:`buffered`.

Framing: a line of a *data* response that ends in ``{n}`` (outside a quoted
string) is followed by ``n`` octets and another line.  Status responses
(``OK/NO/BAD/PREAUTH/BYE``, tagged or not) and continuation requests end at
their first line: their text is free text (RFC 9051 ``resp-text``), and a
``{5}`` at its end is just text.

Anything that is not a well-formed response within the limits raises
:class:`~mailmoat.errors.RemoteProtocolError`; the reader then stays failed
(every later ``next_event`` raises again), because a proxy cannot resync
with a server it no longer understands.  ``reply_hint`` is None: the peer
is the server, and what to tell the client is the session's decision.

Speed: one ``bytes.find`` per line from a kept offset, literals taken by
length (a 50 MB FETCH body costs one slice), consumed octets compacted once
per :meth:`~ResponseReader.receive_data`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, final

from mailmoat.errors import LocalProtocolError, RemoteProtocolError

from ._events import (
    NEED_DATA,
    STATUS_WORDS,
    ContinuationRequest,
    ImapLimits,
    NeedData,
    ResponseCode,
    ServerClosed,
    ServerEvent,
    Tagged,
    Untagged,
)
from ._syntax import TAG_RE, content_of, literal_marker, quotes_balanced

_UNTAGGED_RE: Final = re.compile(rb"\* (?:([0-9]{1,10}) )?([A-Za-z][A-Za-z0-9._-]*)(?: |$)")
_TAGGED_RE: Final = re.compile(rb"(" + TAG_RE.pattern + rb") ([A-Za-z]+)(?: |$)")
_CODE_RE: Final = re.compile(rb"\[([A-Za-z0-9._-]+)(?: ([^\]\r\n]*))?\]")


def _resp_text(text: bytes) -> tuple[ResponseCode | None, bytes]:
    """Split ``[CODE data] text`` (RFC 9051 resp-text) into code and text."""
    if not text.startswith(b"["):
        return None, text
    match = _CODE_RE.match(text)
    if match is None:
        raise RemoteProtocolError("malformed response code")
    code = ResponseCode(match.group(1).decode("ascii").upper(), match.group(2) or b"")
    rest = text[match.end() :]
    return code, rest[1:] if rest.startswith(b" ") else rest


@final
class ResponseReader:
    """Parses what an IMAP server sends.  See the module docs."""

    __slots__ = ("_buf", "_eof", "_error", "_frames", "_lit", "_scan", "_size", "_start", "limits")

    def __init__(self, limits: ImapLimits = ImapLimits()) -> None:  # noqa: B008 (frozen)
        self.limits: Final = limits
        self._buf = bytearray()
        self._start = 0
        self._scan = 0
        self._eof = False
        self._error: str | None = None
        self._frames: list[bytes] = []
        self._size = 0
        self._lit = -1  # size of the literal being read, -1 when reading a line

    @property
    def buffered(self) -> bytes:
        """Octets received but not returned in a response."""
        return b"".join(self._frames) + bytes(self._buf[self._start :])

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means the server closed."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._start:
            del self._buf[: self._start]
            self._scan -= self._start
            self._start = 0
        self._buf += data

    def next_event(self) -> ServerEvent | NeedData:
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = str(exc)
            raise

    def _next_event(self) -> ServerEvent | NeedData:
        buf = self._buf
        limits = self.limits
        while True:
            start = self._start
            if self._lit >= 0:
                end = start + self._lit
                if len(buf) < end:
                    return self._incomplete()
                self._frames.append(bytes(buf[start:end]))
                self._start = self._scan = end
                self._lit = -1
                continue
            limit = min(limits.max_response_line, limits.max_response - self._size)
            lf = buf.find(b"\n", self._scan)
            if lf < 0:
                if len(buf) - start > limit:
                    raise RemoteProtocolError("response line too long")
                self._scan = len(buf)
                return self._incomplete()
            end = lf + 1
            if end - start > limit:
                raise RemoteProtocolError("response line too long")
            line = bytes(buf[start:end])
            self._start = self._scan = end
            self._frames.append(line)
            self._size += len(line)
            content = content_of(line)
            # A CR inside a line would reach the client as a line break it
            # might act on: that is response injection, not text.
            if b"\r" in content:
                raise RemoteProtocolError("CR inside a response line")
            if len(self._frames) == 1 and not _may_have_literals(content):
                return self._finish()
            marker = literal_marker(content)
            if marker is None or not marker[1] or not quotes_balanced(content):
                # A server never sends {n+}; "{5+}" is text (caught by parsing).
                return self._finish()
            size = marker[0]
            if size > limits.max_response_literal or size > limits.max_response - self._size:
                raise RemoteProtocolError("response literal too large")
            self._size += size
            self._lit = size

    def _incomplete(self) -> ServerClosed | NeedData:
        return ServerClosed() if self._eof else NEED_DATA

    def _finish(self) -> ServerEvent:
        frames = tuple(self._frames)
        self._frames = []
        self._size = 0
        return parse_response(frames)


def _may_have_literals(first: bytes) -> bool:
    """Only untagged data responses carry literals (RFC 9051 7.2-7.5)."""
    if not first.startswith(b"* "):
        return False
    match = _UNTAGGED_RE.match(first)
    return match is None or match.group(2).upper().decode("ascii") not in STATUS_WORDS


def parse_response(frames: tuple[bytes, ...]) -> Untagged | Tagged | ContinuationRequest:
    """Parse one framed response; RemoteProtocolError if it is malformed."""
    first = content_of(frames[0])
    if first.startswith(b"+"):
        # RFC 9051: continue-req = "+" SP (resp-text / base64) CRLF; servers
        # send a bare "+" too.
        if len(first) > 1 and first[1:2] != b" ":
            raise RemoteProtocolError("malformed continuation request")
        return ContinuationRequest(first[2:], frames)
    if first.startswith(b"*"):
        match = _UNTAGGED_RE.match(first)
        if match is None:
            raise RemoteProtocolError("malformed untagged response")
        name = match.group(2).decode("ascii").upper()
        number = None if match.group(1) is None else int(match.group(1))
        text = first[match.end() :]
        if name in STATUS_WORDS:
            if number is not None:
                raise RemoteProtocolError("status response with a number")
            code, text = _resp_text(text)
            return Untagged(name, None, code, text, frames)
        return Untagged(name, number, None, text, frames)
    match = _TAGGED_RE.match(first)
    if match is None:
        raise RemoteProtocolError("malformed response")
    status = match.group(2).decode("ascii").upper()
    if status not in ("OK", "NO", "BAD"):
        raise RemoteProtocolError("tagged response is not OK, NO or BAD")
    code, text = _resp_text(first[match.end() :])
    return Tagged(match.group(1), status, code, text, frames)


# --------------------------------------------------------------------------
# CAPABILITY
# --------------------------------------------------------------------------


def format_capabilities(capabilities: Iterable[str]) -> bytes:
    """``IMAP4rev1 STARTTLS ...``; LocalProtocolError for a non-atom."""
    words = [cap.encode("latin-1") for cap in capabilities]
    for word in words:
        if not word or any(ch in word for ch in b" []\r\n\x00"):
            raise LocalProtocolError("capability is not an atom")
    return b" ".join(words)


def edit_capabilities(
    capabilities: Iterable[str], *, remove: Iterable[str] = (), add: Iterable[str] = ()
) -> tuple[str, ...]:
    """``capabilities`` without those in ``remove``, then those in ``add``.

    Matching is case-insensitive; an entry ending in ``=`` removes every
    capability with that prefix (``"AUTH="`` drops all SASL mechanisms).  An
    added capability already present is not repeated.
    """
    exact = {cap.upper() for cap in remove if not cap.endswith("=")}
    prefixes = tuple(cap.upper() for cap in remove if cap.endswith("="))
    kept = [
        cap
        for cap in capabilities
        if cap.upper() not in exact and not cap.upper().startswith(prefixes or ("\0",))
    ]
    present = {cap.upper() for cap in kept}
    for cap in add:
        if cap.upper() not in present:
            kept.append(cap)
            present.add(cap.upper())
    return tuple(kept)


def rewrite_capabilities(
    response: Untagged | Tagged, *, remove: Iterable[str] = (), add: Iterable[str] = ()
) -> bytes:
    """The wire form of ``response`` with its capability list edited.

    Works on ``* CAPABILITY ...`` and on any status response carrying a
    ``[CAPABILITY ...]`` code (greeting, ``tag OK [CAPABILITY ...]``); the
    rest of the response is kept byte for byte, the line ends in CRLF.
    LocalProtocolError if the response has no capability list.
    """
    caps = response.capabilities
    if caps is None:
        raise LocalProtocolError("response carries no capability list")
    new = format_capabilities(edit_capabilities(caps, remove=remove, add=add))
    if isinstance(response, Untagged) and response.name == "CAPABILITY":
        return b"* CAPABILITY " + new + b"\r\n"
    if isinstance(response, Untagged):
        head = b"* " + response.name.encode("ascii")
    else:
        head = response.tag + b" " + response.status.encode("ascii")
    text = b" " + response.text if response.text else b""
    return head + b" [CAPABILITY " + new + b"]" + text + b"\r\n"
