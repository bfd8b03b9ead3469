"""Request screening ahead of h11: refuse what a front proxy must not pass on.

Theory of operation
-------------------
h11 is a strict parser, but it is written for servers, and accepts a few
things a *front* proxy must refuse because the server behind it may read them
differently (request smuggling): ``Content-Length`` together with
``Transfer-Encoding``, ``Transfer-Encoding`` in HTTP/1.0, bare LF line ends,
obsolete line folding, control characters in values, any ``HTTP/d.d``
version, a ``Host`` that disagrees with an absolute-form target, chunk lines
with bare CRs or trailing whitespace, a head of any size when it arrives in
one read.  :class:`HeadScreen` sits between the socket and h11: the proxy
feeds it what the client sent and hands h11 only what :meth:`HeadScreen.feed`
returns.

The screen frames the request stream itself, strictly: it buffers each
request head up to its blank line, checks it, then follows the body -- counts
``Content-Length`` octets, or parses the chunked coding (chunk-size lines,
the CRLF after each chunk, the trailer section) -- so that it knows where the
next head starts on a keep-alive connection without being told.  Bytes come
out unchanged and in order, but only once checked: a head (or a chunk-size
line, or a trailer section) is released whole, body octets as they arrive.
Whatever h11 parses has therefore been through the screen, and the screen
accepts a subset of what h11 accepts, framed the same way (the fuzz harness,
``fuzz/fuzz_http.py``, checks exactly that against h11).

A refusal raises :class:`RequestRefused`, a
:class:`~mailmoat.errors.RemoteProtocolError` carrying the HTTP status to
answer with (400, 413, 414 or 431), a short reason code (see
:data:`REFUSALS`), and a ready ``reply_hint`` (a complete response that
closes the connection).  Bytes checked earlier in the same :meth:`feed` call
are not returned: the connection is going down.  The screen stays failed;
further calls raise again.

Errors are found in byte order (the checks on a whole head, in a fixed order,
run when its blank line arrives), so feeding the same bytes whole or one at a
time gives the same outcome.  Limits apply as the bytes arrive: a 1 MiB head costs at
most ``max_head_size + 2`` buffered bytes whether it comes in one read or in
many.

After a request carrying ``Upgrade`` the screen keeps screening what follows
as HTTP; when the backend agrees (``101``), the proxy calls
:meth:`HeadScreen.switch_protocols` and the screen passes everything through
from then on.  A WebSocket client that sends frames before the ``101`` is
refused (``bad-request-line``): RFC 6455 4.1, "the client MUST wait for a
response from the server before sending any further data".  ``CONNECT`` is
refused: a reverse proxy opens no tunnels.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal, final

from mailmoat.errors import LocalProtocolError, RemoteProtocolError

from ._syntax import (
    CTL_IN_VALUE_RE,
    HOST_RE,
    TOKEN_RE,
    Target,
    canonical_authority,
    comma_tokens,
    split_target,
)

Framing = Literal["none", "content-length", "chunked"]

#: Every reason code :class:`RequestRefused` can carry, with its HTTP status.
REFUSALS: Final[Mapping[str, int]] = MappingProxyType(
    {
        # the request line
        "bad-request-line": 400,
        "bad-method": 400,
        "bad-version": 400,
        "bad-target": 400,
        "connect-method": 400,
        "uri-too-long": 414,
        "request-line-too-long": 414,
        # line ends and field syntax (head and trailers)
        "bare-lf": 400,
        "bare-cr": 400,
        "obs-fold": 400,
        "bad-header-line": 400,
        "space-before-colon": 400,
        "bad-header-name": 400,
        "bad-header-value": 400,
        "head-too-large": 431,
        "too-many-headers": 431,
        # Host
        "missing-host": 400,
        "duplicate-host": 400,
        "bad-host": 400,
        "host-mismatch": 400,
        # framing
        "cl-and-te": 400,
        "duplicate-content-length": 400,
        "bad-content-length": 400,
        "bad-transfer-encoding": 400,
        "te-in-http10": 400,
        "bad-connection": 400,
        "body-too-large": 413,
        # the chunked coding
        "bad-chunk-size": 400,
        "chunk-size-too-long": 400,
        "bad-chunk-extension": 400,
        "chunk-line-too-long": 400,
        "bad-chunk": 400,
        "bad-trailer": 400,
        "trailers-too-large": 431,
        "too-many-trailers": 431,
    }
)

#: the reasons that mean "somebody tried to smuggle a request", not a sloppy client
SMUGGLING_REASONS: Final = frozenset(
    {
        "cl-and-te",
        "duplicate-content-length",
        "bad-content-length",
        "bad-transfer-encoding",
        "te-in-http10",
        "bare-lf",
        "bare-cr",
        "obs-fold",
        "space-before-colon",
        "duplicate-host",
        "host-mismatch",
        "bad-chunk-size",
        "chunk-size-too-long",
        "bad-chunk",
        "bad-chunk-extension",
        "bad-trailer",
        "bad-connection",
    }
)

_PHRASES: Final = {
    400: b"Bad Request",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class RequestRefused(RemoteProtocolError):
    """The client sent a request mailmoat refuses to pass on.

    ``status`` is the HTTP status to answer with, ``reason`` the code from
    :data:`REFUSALS`; ``reply_hint`` is a complete response (empty body,
    ``Connection: close``) that a proxy may write as is.  Neither carries
    client bytes.
    """

    def __init__(self, reason: str) -> None:
        status = REFUSALS[reason]
        hint = b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (
            status,
            _PHRASES[status],
        )
        super().__init__(f"HTTP request refused: {status} {reason}", hint)
        self.status: int = status
        self.reason: str = reason


# A method of 54 characters still fits a target of max_target_length.
_REQUEST_LINE_SLACK: Final = 64
# More digits than this is no length we would ever accept (and keeps int() cheap).
_MAX_LENGTH_DIGITS: Final = 19
_MAX_CHUNK_DIGITS: Final = 16


@final
@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Size bounds for :class:`HeadScreen`; docs/http.md says why each default."""

    #: request line + fields + the blank line; also bounds a trailer section
    max_head_size: int = 16 * 1024
    max_header_count: int = 100
    max_target_length: int = 8 * 1024
    #: one chunk-size line with its extensions and CRLF
    max_chunk_line: int = 1024
    #: a Content-Length, or the running sum of chunk sizes
    max_body_size: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        minimums = {
            "max_head_size": 64,
            "max_header_count": 1,
            "max_target_length": 1,
            "max_chunk_line": 8,
            "max_body_size": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if type(value) is not int or value < minimum:
                raise LocalProtocolError(f"{name} must be an int >= {minimum}, not {value!r}")


@final
@dataclass(frozen=True, slots=True)
class ScreenedHead:
    """What the screen learnt from one accepted request head.

    ``content_length`` is the declared length (0 for ``"none"``), ``None``
    for chunked bodies; ``upgrade`` is true when the request proposes a
    protocol switch (a non-empty ``Upgrade``), as h11 sees it.
    """

    method: bytes
    target: bytes
    http_version: bytes
    framing: Framing
    content_length: int | None
    upgrade: bool
    head_size: int


@final
class _State(enum.Enum):
    HEAD = enum.auto()
    BODY = enum.auto()
    CHUNK_LINE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_END = enum.auto()
    TRAILERS = enum.auto()
    TUNNEL = enum.auto()
    FAILED = enum.auto()


# RFC 9112 2.2: "A sender MUST NOT generate a bare CR (a CR character not
# immediately followed by LF) within any protocol elements other than the
# content."  And although "a recipient MAY recognize a single LF as a line
# terminator", a front proxy must not: the server behind it may not.
_BAD_EOL: Final = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# The first byte that is not SP or VCHAR ends (CR, LF) or spoils a request line.
_NOT_LINE_BYTE: Final = re.compile(rb"[^\x20-\x7e]")
_HEX_RE: Final = re.compile(rb"[0-9A-Fa-f]+")
# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS
# chunk-ext-val ] ); chunk-ext-val = token / quoted-string.  Without the BWS
# ("bad" whitespace a sender must not generate, and h11 refuses before ";").
_QUOTED: Final = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_TCHAR: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHUNK_EXT_RE: Final = re.compile(
    rb"(?:;" + _TCHAR + rb"(?:=(?:" + _TCHAR + rb"|" + _QUOTED + rb"))?)+"
)
# Connection must not make a hop-by-hop stripper remove framing or routing.
_PROTECTED: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})
# RFC 9110 6.5.1: trailers must not carry framing or routing fields.
_NOT_IN_TRAILERS: Final = _PROTECTED


def _field_lines(lines: list[bytes], max_count: int, too_many: str) -> list[tuple[bytes, bytes]]:
    """``(lower-case name, value)`` for field lines already free of CR and LF."""
    if len(lines) > max_count:
        raise RequestRefused(too_many)
    fields = []
    for line in lines:
        # RFC 9112 5.2: "A server that receives an obs-fold in a request
        # message [...] MUST either reject the message by sending a 400 (Bad
        # Request) [...] or replace each received obs-fold with one or more SP
        # octets".  We reject: the server behind us might do the other.
        if line[:1] in (b" ", b"\t"):
            raise RequestRefused("obs-fold")
        name, colon, value = line.partition(b":")
        if not colon:
            raise RequestRefused("bad-header-line")
        # RFC 9112 5.1: "A server MUST reject, with a response status code of
        # 400 (Bad Request), any received request message that contains
        # whitespace between a header field name and colon."
        if name.endswith((b" ", b"\t")):
            raise RequestRefused("space-before-colon")
        if TOKEN_RE.fullmatch(name) is None:
            raise RequestRefused("bad-header-name")
        value = value.strip(b" \t")
        if CTL_IN_VALUE_RE.search(value) is not None:
            raise RequestRefused("bad-header-value")
        fields.append((name.lower(), value))
    return fields


@final
class HeadScreen:
    """Screen one client connection's bytes before h11 sees them.

    :meth:`feed` returns the bytes to give h11 (a prefix of everything fed
    so far, minus what was already returned) or raises
    :class:`RequestRefused`.  :meth:`take_heads` returns what was learnt from
    each head accepted since the last call.  One instance per connection.
    """

    __slots__ = (
        "_body_total",
        "_buf",
        "_end_at",
        "_eol_at",
        "_failure",
        "_heads",
        "_last_upgrade",
        "_line_at",
        "_remaining",
        "_request",
        "_state",
        "limits",
    )

    def __init__(self, limits: HttpLimits | None = None) -> None:
        self.limits: Final = limits if limits is not None else HttpLimits()
        self._state = _State.HEAD
        self._buf = bytearray()
        self._eol_at = 0  # _buf checked for bare CR/LF up to here
        self._end_at = 0  # _buf searched for the end of the block up to here
        self._line_at = 0  # the request line checked up to here
        self._request: tuple[bytes, bytes, bytes, Target] | None = None
        self._remaining = 0
        self._body_total = 0
        self._heads: list[ScreenedHead] = []
        self._last_upgrade = False
        self._failure: str | None = None

    def __repr__(self) -> str:
        return f"<HeadScreen {self._state.name.lower()} held={len(self._buf)}>"

    # ------------------------------------------------------------------ API

    def feed(self, data: bytes) -> bytes:
        """Screen ``data``; return the bytes h11 may now see."""
        if self._failure is not None:
            raise RequestRefused(self._failure)
        out = bytearray()
        try:
            self._run(bytes(data), out)
        except RequestRefused as exc:
            self._state = _State.FAILED
            self._failure = exc.reason
            self._buf.clear()
            raise
        return bytes(out)

    def take_heads(self) -> list[ScreenedHead]:
        """The heads accepted since the last call, oldest first."""
        heads, self._heads = self._heads, []
        return heads

    def switch_protocols(self) -> bytes:
        """The backend accepted an ``Upgrade`` (101): pass everything from now on.

        Returns the bytes held back (the start of what the screen took for
        the next head).  Only valid right after a request proposing an
        upgrade, once its body is complete.
        """
        if self._state is not _State.HEAD or not self._last_upgrade or self._request is not None:
            raise LocalProtocolError("switch_protocols() needs a completed Upgrade request")
        held = bytes(self._buf)
        self._buf.clear()
        self._state = _State.TUNNEL
        return held

    @property
    def failed(self) -> bool:
        return self._failure is not None

    # -------------------------------------------------------------- framing

    def _run(self, data: bytes, out: bytearray) -> None:
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state is _State.TUNNEL:
                out += data[pos:]
                return
            if state is _State.BODY or state is _State.CHUNK_DATA:
                take = min(self._remaining, size - pos)
                out += data[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _State.HEAD if state is _State.BODY else _State.CHUNK_END
                continue
            # A block (head, chunk-size line, chunk end, trailers) is held
            # until complete; never more than its limit + 2 bytes of it.
            before = len(self._buf)
            self._buf += data[pos : pos + self._room(state)]
            end = self._step(state)
            if end is None:
                pos += len(self._buf) - before
                continue
            out += self._buf[:end]
            pos += end - before
            self._buf.clear()
            self._eol_at = self._end_at = self._line_at = 0

    def _room(self, state: _State) -> int:
        if state is _State.CHUNK_LINE:
            limit = self.limits.max_chunk_line
        elif state is _State.CHUNK_END:
            limit = 0
        else:
            limit = self.limits.max_head_size
        return limit + 2 - len(self._buf)

    def _step(self, state: _State) -> int | None:
        """Length of the block completed in ``_buf``, or None; raises on errors."""
        limits = self.limits
        if state is _State.HEAD:
            end = self._block(limits.max_head_size, "head-too-large", state)
            if end is not None:
                self._accept_head(bytes(self._buf[:end]))
            return end
        if state is _State.CHUNK_LINE:
            end = self._block(limits.max_chunk_line, "chunk-line-too-long", state)
            if end is not None:
                self._accept_chunk_line(bytes(self._buf[: end - 2]))
            return end
        if state is _State.CHUNK_END:
            # RFC 9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
            if self._buf[:2] == b"\r\n":
                self._state = _State.CHUNK_LINE
                return 2
            if self._buf == b"\r":
                return None
            raise RequestRefused("bad-chunk")
        assert state is _State.TRAILERS
        end = self._block(limits.max_head_size, "trailers-too-large", state)
        if end is not None:
            self._accept_trailers(bytes(self._buf[:end]))
        return end

    def _block(self, limit: int, too_large: str, kind: _State) -> int | None:
        """Find the end of the block in ``_buf``; raise the earliest error in it.

        Candidate errors are ``(position, priority, reason)``: the one at the
        smallest position wins, so that the outcome does not depend on how
        the bytes were split.  At equal positions the size limit wins (a
        byte beyond the limit is never looked at in a byte-by-byte feed).
        """
        buf = self._buf
        end: int | None
        if kind is _State.TRAILERS and buf.startswith(b"\r\n"):
            end = 2
        else:
            terminator = b"\r\n" if kind is _State.CHUNK_LINE else b"\r\n\r\n"
            found = buf.find(terminator, max(0, self._end_at - len(terminator) + 1))
            end = found + len(terminator) if found >= 0 else None
        if end is None:
            self._end_at = len(buf)
        extent = len(buf) if end is None else end
        horizon = min(extent, limit + 1)
        errors: list[tuple[int, int, str]] = []
        if extent > limit:
            errors.append((limit, 0, too_large))
        bad = _BAD_EOL.search(buf, self._eol_at, horizon + 1)
        if bad is not None and bad.start() < horizon:
            at = bad.start()
            if buf[at] == 0x0A:
                errors.append((at, 1, "bare-lf"))
            elif at + 1 < len(buf):
                errors.append((at, 1, "bare-cr"))
            # else: a CR that is the last byte so far; its LF may follow
        if kind is _State.HEAD:
            errors.extend(self._request_line_errors(horizon))
        if errors:
            raise RequestRefused(min(errors)[2])
        self._eol_at = max(0, horizon - 1)
        return end

    # ----------------------------------------------------------------- head

    def _request_line_errors(self, horizon: int) -> list[tuple[int, int, str]]:
        if self._request is not None:
            return []
        buf = self._buf
        max_line = self.limits.max_target_length + _REQUEST_LINE_SLACK
        odd = _NOT_LINE_BYTE.search(buf, self._line_at, horizon)
        line_end: int | None = None
        if odd is None:
            self._line_at = horizon
        elif buf[odd.start()] in (0x0D, 0x0A):
            line_end = odd.start()
        elif odd.start() < max_line:
            # RFC 9112 3: "Recipients of an invalid request-line SHOULD
            # respond with either a 400 (Bad Request) error or a 301 (Moved
            # Permanently) redirect".  A TLS ClientHello ends here at once.
            return [(odd.start(), 1, "bad-request-line")]
        length = horizon if line_end is None else line_end
        if length > max_line:
            return [(max_line, 1, "request-line-too-long")]
        if line_end is None or line_end + 1 >= horizon or buf[line_end + 1] != 0x0A:
            return []  # incomplete, or a bare CR/LF the caller reports
        reason = self._parse_request_line(bytes(buf[:line_end]))
        return [] if reason is None else [(line_end + 1, 1, reason)]

    def _parse_request_line(self, line: bytes) -> str | None:
        # RFC 9112 3: request-line = method SP request-target SP HTTP-version
        parts = line.split(b" ")
        if len(parts) != 3 or not all(parts):
            return "bad-request-line"
        method, target, version = parts
        if TOKEN_RE.fullmatch(method) is None:
            return "bad-method"
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            return "bad-version"
        if method == b"CONNECT":
            return "connect-method"
        # RFC 9112 3: "A server that receives a request-target longer than
        # any URI it wishes to parse MUST respond with a 414 (URI Too Long)".
        if len(target) > self.limits.max_target_length:
            return "uri-too-long"
        parsed = split_target(target)
        if parsed is None or b"#" in target:
            return "bad-target"
        if parsed.form == "asterisk" and method != b"OPTIONS":
            return "bad-target"
        if parsed.form == "absolute" and (
            parsed.scheme not in (b"http", b"https") or HOST_RE.fullmatch(parsed.authority) is None
        ):
            return "bad-target"
        self._request = (method, target, version[5:], parsed)
        return None

    def _accept_head(self, head: bytes) -> None:
        assert self._request is not None  # the request line came first
        method, target, version, parsed = self._request
        fields = _field_lines(
            head[:-4].split(b"\r\n")[1:], self.limits.max_header_count, "too-many-headers"
        )

        def values(name: bytes) -> list[bytes]:
            return [value for key, value in fields if key == name]

        # RFC 9112 3.2: "A server MUST respond with a 400 (Bad Request) status
        # code to any HTTP/1.1 request message that lacks a Host header field
        # and to any request message that contains more than one Host header
        # field line or a Host header field with an invalid field value."
        hosts = values(b"host")
        if len(hosts) > 1:
            raise RequestRefused("duplicate-host")
        if not hosts and version == b"1.1":
            raise RequestRefused("missing-host")
        if hosts and hosts[0] and HOST_RE.fullmatch(hosts[0]) is None:
            raise RequestRefused("bad-host")
        # RFC 9112 3.2.2: an origin server "MUST ignore the received Host
        # header field (if any) and instead use the host information of the
        # request-target" -- a server that does not would route elsewhere.
        if (
            parsed.form == "absolute"
            and hosts
            and canonical_authority(hosts[0], parsed.scheme)
            != canonical_authority(parsed.authority, parsed.scheme)
        ):
            raise RequestRefused("host-mismatch")

        lengths = values(b"content-length")
        codings = values(b"transfer-encoding")
        # RFC 9112 6.1: "A server MAY reject a request that contains both
        # Content-Length and Transfer-Encoding or process such a request in
        # accordance with the Transfer-Encoding alone."  h11 does the latter;
        # the server behind us might not.
        if lengths and codings:
            raise RequestRefused("cl-and-te")
        if codings:
            # RFC 9112 6.1: "A server or client that receives an HTTP/1.0
            # message containing a Transfer-Encoding header field MUST treat
            # the message as if the framing is faulty".
            if version == b"1.0":
                raise RequestRefused("te-in-http10")
            # Exactly one field whose value is the token "chunked": every
            # TE.TE obfuscation ("chunked, identity", "xchunked", "chunked;")
            # is some other value.  (OWS around the value is not part of it.)
            if len(codings) != 1 or codings[0].lower() != b"chunked":
                raise RequestRefused("bad-transfer-encoding")
        content_length = 0
        if lengths:
            # RFC 9112 6.3 lets a recipient accept "1, 1" or two equal
            # fields; a front proxy must not bet that the server does too.
            if len(lengths) > 1 or b"," in lengths[0]:
                raise RequestRefused("duplicate-content-length")
            if not lengths[0].isdigit():
                raise RequestRefused("bad-content-length")
            if len(lengths[0]) > _MAX_LENGTH_DIGITS:
                raise RequestRefused("body-too-large")
            content_length = int(lengths[0])
            if content_length > self.limits.max_body_size:
                raise RequestRefused("body-too-large")
        # RFC 9110 7.6.1: an intermediary removes the fields a Connection
        # header names; naming a framing or routing field is an attack on
        # the hop-by-hop stripping of whoever is next.
        if _PROTECTED.intersection(comma_tokens(values(b"connection"))):
            raise RequestRefused("bad-connection")

        framing: Framing
        if codings:
            framing, declared = "chunked", None
            self._state = _State.CHUNK_LINE
            self._body_total = 0
        elif content_length:
            framing, declared = "content-length", content_length
            self._state = _State.BODY
            self._remaining = content_length
        else:
            framing, declared = ("content-length" if lengths else "none"), 0
            self._state = _State.HEAD
        upgrade = bool(comma_tokens(values(b"upgrade")))
        self._heads.append(
            ScreenedHead(method, target, version, framing, declared, upgrade, len(head))
        )
        self._last_upgrade = upgrade
        self._request = None

    # ------------------------------------------------------------- chunked

    def _accept_chunk_line(self, line: bytes) -> None:
        # RFC 9112 7.1: chunk-size = 1*HEXDIG.  "recipients MUST anticipate
        # potentially large hexadecimal numerals and prevent parsing errors
        # due to integer conversion overflows or precision loss".  16 hex
        # digits are 64 bits; a longer numeral (even zero-padded) is refused.
        digits = _HEX_RE.match(line)
        if digits is None:
            raise RequestRefused("bad-chunk-size")
        rest = line[digits.end() :]
        if rest and not rest.startswith(b";"):
            raise RequestRefused("bad-chunk-size")  # "0x10", "5 ", "-1", "1\t"
        if len(digits.group()) > _MAX_CHUNK_DIGITS:
            raise RequestRefused("chunk-size-too-long")
        if rest and _CHUNK_EXT_RE.fullmatch(rest) is None:
            raise RequestRefused("bad-chunk-extension")
        size = int(digits.group(), 16)
        if self._body_total + size > self.limits.max_body_size:
            raise RequestRefused("body-too-large")
        self._body_total += size
        if size == 0:
            self._state = _State.TRAILERS
        else:
            self._state = _State.CHUNK_DATA
            self._remaining = size

    def _accept_trailers(self, block: bytes) -> None:
        lines = block[:-4].split(b"\r\n") if len(block) > 2 else []
        fields = _field_lines(lines, self.limits.max_header_count, "too-many-trailers")
        if any(name in _NOT_IN_TRAILERS for name, _ in fields):
            raise RequestRefused("bad-trailer")
        self._state = _State.HEAD
