"""The server side of SMTP: bytes a server sends -> :class:`Reply` events.

Contract: :class:`ReplyReader` is sans-IO like the command reader.  It
returns one :class:`Reply` per complete (possibly multi-line) reply,
:data:`NEED_DATA` when the reply is unfinished, :class:`ServerClosed` after
EOF.  Bytes of an unfinished reply are not consumed: :attr:`buffered` shows
every byte not yet returned in a reply, which is how a session notices a
server (or a MITM) that sends more after its 220 to STARTTLS.

Anything that is not a well-formed reply within the limits raises
:class:`~mailmoat.errors.RemoteProtocolError`; the reader then stays failed
(every later ``next_event`` raises again), because a proxy cannot resync
with a server it no longer understands.  ``reply_hint`` is None: the peer is
the server, and what to tell the client is the session's decision.
"""

from __future__ import annotations

from typing import Final, final

from mailmoat.errors import LocalProtocolError, RemoteProtocolError

from ._events import NEED_DATA, NeedData, Reply, ServerClosed, ServerEvent, SmtpLimits

_DIGITS: Final = frozenset(b"0123456789")


def reply(code: int, text: str | bytes, *more: str | bytes) -> Reply:
    """Build a :class:`Reply`; ``str`` text is encoded as UTF-8."""
    return Reply(
        code,
        tuple(t.encode("utf-8") if isinstance(t, str) else t for t in (text, *more)),
    )


@final
class ReplyReader:
    """Parses what an SMTP server sends.  See the module docs."""

    __slots__ = ("_buf", "_code", "_eof", "_error", "_lines", "_pos", "limits")

    def __init__(self, limits: SmtpLimits = SmtpLimits()) -> None:  # noqa: B008 (frozen)
        self.limits: Final = limits
        self._buf = bytearray()
        self._pos = 0  # start of the first line not yet parsed into _lines
        self._lines: list[bytes] = []
        self._code = 0  # code of the reply in progress (0: none yet)
        self._eof = False
        self._error: str | None = None

    @property
    def buffered(self) -> bytes:
        """Bytes received but not returned in a reply."""
        return bytes(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means the server closed."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

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
            end = buf.find(b"\n", self._pos)
            if end < 0:
                if len(buf) - self._pos >= limits.max_reply_line:
                    raise RemoteProtocolError("reply line too long")
                return ServerClosed() if self._eof else NEED_DATA
            length = end + 1 - self._pos
            if length > limits.max_reply_line:
                raise RemoteProtocolError("reply line too long")
            # Servers that end lines in bare LF exist; we accept them and
            # always send CRLF onwards (Reply.to_bytes).
            stop = end - 1 if end > self._pos and buf[end - 1] == 0x0D else end
            line = bytes(buf[self._pos : stop])
            self._pos = end + 1
            last = self._parse_line(line)
            if len(self._lines) > limits.max_reply_lines:
                raise RemoteProtocolError("too many reply lines")
            if last:
                event = Reply(self._code, tuple(self._lines))
                del buf[: self._pos]
                self._pos = 0
                self._lines = []
                self._code = 0
                return event

    def _parse_line(self, line: bytes) -> bool:
        """Add one line (without line ending) to the reply; True if it was the last."""
        # RFC 5321 4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
        #                            Reply-code [ SP textstring ] CRLF
        if len(line) < 3 or not (line[0] in _DIGITS and line[1] in _DIGITS and line[2] in _DIGITS):
            raise RemoteProtocolError("reply line does not start with a 3-digit code")
        code = int(line[:3])
        if not 200 <= code <= 599:
            raise RemoteProtocolError("reply code out of range 200..599")
        # RFC 5321 4.2.1: "each line of the multiline reply must use the same
        # reply code" -- a proxy must not merge two replies into one.
        if self._code and code != self._code:
            raise RemoteProtocolError("reply code changed within a multi-line reply")
        self._code = code
        sep = line[3:4]
        if sep not in (b"", b" ", b"-"):
            raise RemoteProtocolError("reply code not followed by SP, '-' or CRLF")
        text = line[4:]
        # A CR inside the text would reach the client as a line break it
        # might act on: that is reply injection, not text.
        if b"\r" in text:
            raise RemoteProtocolError("CR in reply text")
        self._lines.append(text)
        return sep != b"-"
