"""The client side of SMTP: bytes a client sends to a server -> events.

Theory of operation
-------------------
:class:`CommandReader` is a sans-IO parser in the style of h11: feed bytes
with :meth:`~CommandReader.receive_data` (``b""`` for EOF), pull events with
:meth:`~CommandReader.next_event` until it returns :data:`NEED_DATA`.  It
never does I/O and never answers the client; the session does.

The reader has four modes (:class:`ReaderMode`):

``COMMAND``
    Lines up to LF.  Each becomes a :class:`Command` (or a subclass), or a
    :class:`LineTooLong` if it exceeded its limit.  Limits apply while a line
    arrives, so an endless line costs no memory: once it is too long, its
    bytes are dropped as they come until its LF.
``AUTH_RESPONSE``
    Entered by :meth:`~CommandReader.expect_auth_response` after the server
    answered 334; the next line is an :class:`AuthResponse`, then the reader
    is back in ``COMMAND``.
``DATA``
    Entered by :meth:`~CommandReader.expect_data` after the server answered
    DATA with 354.  Body bytes are returned in as few :class:`DataChunk` as
    possible (one per ``receive_data`` normally), unchanged, until the
    end-of-data line; then :class:`EndOfData` and back to ``COMMAND``.  Only
    the last few bytes that could begin the terminator are held back.  The
    scan uses ``bytes.find``/``count`` and one regex, never a Python loop
    over bytes or lines, because 50 MB bodies pass through here.
``CLOSED``
    After :class:`ClientClosed` has been returned.

The reader never switches to ``DATA`` or ``AUTH_RESPONSE`` by itself: only
the session knows whether the server accepted DATA or AUTH.  Bytes a client
pipelines after such a command stay buffered until the session decides (and
:attr:`~CommandReader.buffered` shows them, e.g. plaintext pipelined after
STARTTLS, which must be refused).

BDAT (RFC 3030) is not framed here: a session must not offer CHUNKING.

Errors
------
A client cannot make this reader fail: an unparsable line is a
``Command(verb="")``, an oversized one a ``LineTooLong``.  Only
:class:`~mailmoat.errors.LocalProtocolError` is raised, for calls the
session should not make (``expect_data()`` outside ``COMMAND`` mode, data
after EOF).  ``RemoteProtocolError`` is reserved for future checks.
"""

from __future__ import annotations

import enum
import re
from typing import Final, assert_never, final

from mailmoat.errors import LocalProtocolError
from mailmoat.secret import Secret

from ._events import (
    MAX_VERB_LENGTH,
    NEED_DATA,
    Auth,
    AuthResponse,
    ClientClosed,
    ClientEvent,
    Command,
    DataChunk,
    EndOfData,
    EsmtpParams,
    Hello,
    LineTooLong,
    MailFrom,
    NeedData,
    RcptTo,
    SmtpLimits,
)

# RFC 5321 4.1.1.4: "The mail data are terminated by a line containing only
# a period, that is, the character sequence "<CRLF>.<CRLF>", where the first
# <CRLF> is actually the terminator of the previous line".  Only this exact
# sequence ends the body; "\n.\n" and friends are body bytes (and counted as
# bare LF), which is what defeats SMTP smuggling.
_TERMINATOR: Final = b"\r\n.\r\n"
_DOT_LINE: Final = b".\r\n"
# Suffixes of the available body that might be the start of a terminator
# still on its way, longest first; these are held back.
_PARTIAL_TERMINATORS: Final = tuple(_TERMINATOR[:k] for k in range(4, 0, -1))
# The first bare LF, or the LF of a terminator (then preceded by CR): the
# alternatives share the literal "\n", which re scans for quickly.
_TERMINATOR_OR_BARE_LF: Final = re.compile(rb"\n(?:(?<!\r\n)|\.\r\n)")
_BARE_CR: Final = re.compile(rb"\r(?!\n)")


@final
class ReaderMode(enum.Enum):
    COMMAND = enum.auto()
    AUTH_RESPONSE = enum.auto()
    DATA = enum.auto()
    CLOSED = enum.auto()


# RFC 5321 4.1.2:  Mail-parameters = esmtp-param *(SP esmtp-param)
#   esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
#   esmtp-value   = 1*(%d33-60 / %d62-126)
# RFC 6531 3.3 widens esmtp-value to UTF-8, hence \x80-\xff.
_PARAM_RE: Final = re.compile(rb"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\x80-\xff]+))?")
# A path: "<" then quoted strings or any byte but <, >, ", SP and controls,
# then ">".  The source route (RFC 5321 4.1.2 A-d-l) stays in the address.
# Outside the brackets a bare address (no <>) is a token of the same bytes;
# RFC 5321 requires the brackets, but Postfix accepts the bare form by
# default (strict_rfc821_envelopes = no) and forwarding it is unambiguous.
_PATH_RE: Final = re.compile(
    rb"""(?:<((?:"(?:[^"\\\r\n]|\\[^\r\n])*"|[^<>"\x00-\x20\x7f])*)>"""
    rb"""|((?:"(?:[^"\\\r\n]|\\[^\r\n])*"|[^<>"\x00-\x20\x7f])+))"""
)
# RFC 4422 3.1: sasl-mech = 1*20mech-char; mech-char = UPPER-ALPHA / DIGIT /
# HYPHEN / UNDERSCORE.  Clients send it in any case (RFC 4954 examples do).
_MECH_RE: Final = re.compile(rb"[A-Za-z0-9_-]{1,20}")
# Initial response: base64 text or "=" (RFC 4954 section 4); we do not check
# the alphabet (the server will), only that it is one token.
_TOKEN_RE: Final = re.compile(rb"[^\x00-\x20\x7f]+")


def _split_verb(content: bytes) -> tuple[str, bytes]:
    """(verb, args) of a line without its line ending."""
    space = content.find(b" ", 0, MAX_VERB_LENGTH + 1)
    word = content if space < 0 else content[:space]
    if 0 < len(word) <= MAX_VERB_LENGTH and word.isalpha():  # bytes.isalpha: ASCII only
        return word.decode("ascii").upper(), (b"" if space < 0 else content[space + 1 :])
    return "", content


def _parse_params(rest: bytes) -> EsmtpParams | None:
    """ESMTP parameters after a path: ``(SP param)*``, trailing spaces allowed."""
    params: list[tuple[str, bytes | None]] = []
    for word in rest.split(b" "):
        if not word:  # runs of spaces and trailing spaces: lenient
            continue
        match = _PARAM_RE.fullmatch(word)
        if match is None:
            return None
        params.append((match.group(1).decode("ascii").upper(), match.group(2)))
    return tuple(params)


def _parse_path(args: bytes, keyword: bytes) -> tuple[bytes, EsmtpParams, bool] | None:
    """Parse ``FROM:<a> params`` / ``TO:<a> params``.

    Returns (address, params, bracketed) or None.  Accepted leniencies: any
    case of the keyword, spaces after the colon, a bare address.
    """
    if args[: len(keyword)].upper() != keyword:
        return None
    pos = len(keyword)
    while pos < len(args) and args[pos] == 0x20:  # "MAIL FROM: <a>" is common
        pos += 1
    match = _PATH_RE.match(args, pos)
    if match is None:
        return None
    rest = args[match.end() :]
    if rest and not rest.startswith(b" "):
        return None
    params = _parse_params(rest)
    if params is None:
        return None
    bracketed = match.group(1) is not None
    address = match.group(1) if bracketed else match.group(2)
    return address, params, bracketed


def parse_command(line: bytes) -> Command:
    """Turn one complete command line (ending in LF) into an event."""
    bare_lf = not line.endswith(b"\r\n")
    content = line[:-1] if bare_lf else line[:-2]
    verb, args = _split_verb(content)
    if verb in ("HELO", "EHLO"):
        words = args.split(b" ")
        name = next((w for w in words if w), b"")
        return Hello(
            verb,
            args,
            line,
            name.decode("utf-8", "backslashreplace"),
            verb == "EHLO",
            bare_lf=bare_lf,
        )
    if verb == "MAIL":
        parsed = _parse_path(args, b"FROM:")
        if parsed is not None:
            address, params, _ = parsed
            return MailFrom(verb, args, line, address, params, bare_lf=bare_lf)
    elif verb == "RCPT":
        parsed = _parse_path(args, b"TO:")
        # RFC 5321 4.1.1.3: RCPT TO:<forward-path>; an empty path is not one.
        if parsed is not None and parsed[0]:
            address, params, _ = parsed
            return RcptTo(verb, args, line, address, params, bare_lf=bare_lf)
    elif verb == "AUTH":
        words = args.split(b" ")
        if 1 <= len(words) <= 2 and _MECH_RE.fullmatch(words[0]):
            initial: Secret | None = None
            if len(words) == 2:
                if not _TOKEN_RE.fullmatch(words[1]):
                    return Command(verb, args, line, bare_lf=bare_lf)
                initial = Secret(words[1])
            mech = words[0].decode("ascii").upper()
            return Auth(verb, args, line, mech, initial, bare_lf=bare_lf)
    return Command(verb, args, line, bare_lf=bare_lf)


def format_command(verb: str, args: bytes = b"") -> bytes:
    """Build a command line to send to a server: ``VERB [SP args] CRLF``.

    Raises :class:`LocalProtocolError` for a verb that is not 1-16 ASCII
    letters or for CR/LF in ``args`` (that would inject a second command).
    """
    if not (0 < len(verb) <= MAX_VERB_LENGTH and verb.isascii() and verb.isalpha()):
        raise LocalProtocolError(f"invalid SMTP verb {verb!r}")
    if b"\r" in args or b"\n" in args:
        raise LocalProtocolError("CR or LF in command arguments")
    head = verb.upper().encode("ascii")
    return head + b" " + args + b"\r\n" if args else head + b"\r\n"


@final
class CommandReader:
    """Parses what a client sends to an SMTP server.  See the module docs."""

    __slots__ = (
        "_after_crlf",
        "_bare_cr",
        "_bare_lf",
        "_body_size",
        "_buf",
        "_discard_len",
        "_discard_limit",
        "_discarding",
        "_eof",
        "_line_flagged",
        "_line_len",
        "_long_lines",
        "_mode",
        "_scan",
        "limits",
    )

    def __init__(self, limits: SmtpLimits = SmtpLimits()) -> None:  # noqa: B008 (frozen)
        self.limits: Final = limits
        self._mode = ReaderMode.COMMAND
        self._buf = bytearray()
        self._eof = False
        # COMMAND / AUTH_RESPONSE framing
        self._scan = 0  # no LF in _buf[:_scan]
        self._discarding = False
        self._discard_len = 0
        self._discard_limit = 0
        self._reset_body()

    def _reset_body(self) -> None:
        # The body starts right after the CRLF of the DATA line, so an
        # immediate ".\r\n" is the terminator of an empty body.
        self._after_crlf = True
        self._body_size = 0
        self._bare_lf = 0
        self._bare_cr = 0
        self._long_lines = 0
        self._line_len = 0  # octets of the current text line so far, without LF
        self._line_flagged = False  # current text line already counted as long

    # -- public API -------------------------------------------------------

    @property
    def mode(self) -> ReaderMode:
        return self._mode

    @property
    def buffered(self) -> bytes:
        """Bytes received but not yet returned as (or discarded in) events."""
        return bytes(self._buf)

    def discard_buffer(self) -> bytes:
        """Drop and return the buffered bytes (e.g. plaintext after STARTTLS)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return data

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def expect_data(self) -> None:
        """The server answered DATA with 354: what follows is the body."""
        self._leave_command_mode("expect_data")
        self._mode = ReaderMode.DATA
        self._reset_body()

    def expect_auth_response(self) -> None:
        """The server answered 334: the next line is a SASL response."""
        self._leave_command_mode("expect_auth_response")
        self._mode = ReaderMode.AUTH_RESPONSE

    def next_event(self) -> ClientEvent | NeedData:
        match self._mode:
            case ReaderMode.COMMAND | ReaderMode.AUTH_RESPONSE:
                return self._next_line_event()
            case ReaderMode.DATA:
                return self._next_data_event()
            case ReaderMode.CLOSED:
                return ClientClosed()
            case _:  # pragma: no cover
                assert_never(self._mode)

    # -- command lines ----------------------------------------------------

    def _leave_command_mode(self, what: str) -> None:
        if self._mode is not ReaderMode.COMMAND:
            raise LocalProtocolError(f"{what}() in mode {self._mode.name}")
        # A partly discarded over-long line cannot be resumed as body or
        # response; its rest is now whatever the new mode makes of it.
        self._discarding = False
        self._scan = 0

    def _limit_for(self, head: bytes, complete: bool) -> int:
        """The length limit for a line starting with ``head``.

        While the verb is still unknown (fewer than 17 octets and no space)
        the largest limit applies; every limit is >= 32, so a line cannot
        outgrow it before its verb is known.
        """
        limits = self.limits
        if self._mode is ReaderMode.AUTH_RESPONSE:
            return limits.max_auth_line
        if not complete and head.find(b" ", 0, MAX_VERB_LENGTH + 1) < 0:
            if len(head) <= MAX_VERB_LENGTH:
                return limits.max_any_command_line
            return limits.max_command_line
        verb, _ = _split_verb(head[: MAX_VERB_LENGTH + 1])
        if verb in ("MAIL", "RCPT"):
            return limits.max_param_line
        if verb == "AUTH":
            return limits.max_auth_line
        return limits.max_command_line

    def _line_done(self) -> None:
        if self._mode is ReaderMode.AUTH_RESPONSE:
            self._mode = ReaderMode.COMMAND

    def _next_line_event(self) -> ClientEvent | NeedData:
        buf = self._buf
        if self._discarding:
            end = buf.find(b"\n")
            if end < 0:
                self._discard_len += len(buf)
                buf.clear()
                if not self._eof:
                    return NEED_DATA
                length = self._discard_len
            else:
                length = self._discard_len + end + 1
                del buf[: end + 1]
            self._discarding = False
            self._line_done()
            return LineTooLong(self._discard_limit, length)

        end = buf.find(b"\n", self._scan)
        if end < 0:
            limit = self._limit_for(bytes(buf[: MAX_VERB_LENGTH + 1]), complete=False)
            if len(buf) > limit:
                # Too long whatever follows: drop what we have and keep
                # dropping until the LF.  (At most ``limit`` octets of a
                # line are ever buffered.)
                self._discarding = True
                self._discard_len = len(buf)
                self._discard_limit = limit
                buf.clear()
                self._scan = 0
                return self._next_line_event()
            if self._eof:
                self._mode = ReaderMode.CLOSED
                return ClientClosed()
            self._scan = len(buf)
            return NEED_DATA

        self._scan = 0
        length = end + 1
        if length <= MAX_VERB_LENGTH + 2:
            head = bytes(buf[:length])
            head = head[:-2] if head.endswith(b"\r\n") else head[:-1]
        else:
            head = bytes(buf[: MAX_VERB_LENGTH + 1])
        limit = self._limit_for(head, complete=True)
        if length > limit:
            del buf[:length]
            self._line_done()
            return LineTooLong(limit, length)
        line = bytes(buf[:length])
        del buf[:length]
        if self._mode is ReaderMode.AUTH_RESPONSE:
            self._mode = ReaderMode.COMMAND
            bare_lf = not line.endswith(b"\r\n")
            content = line[:-1] if bare_lf else line[:-2]
            return AuthResponse(Secret(content), line, bare_lf=bare_lf)
        return parse_command(line)

    # -- DATA ---------------------------------------------------------------
    #
    # Speed: CPython's bytes.find/count and re scan at 2-3 GB/s, so every
    # full pass over the body costs ~0.4 ms/MB.  The common case is one regex
    # pass that finds the terminator *and* proves there is no bare LF before
    # it, one regex pass that proves there is no bare CR, and a walk over the
    # body in steps of max_text_line octets (memrchr) for long lines.  Exact
    # counting (bytes.count) only runs when an anomaly was seen.

    def _next_data_event(self) -> ClientEvent | NeedData:
        buf = self._buf
        if self._after_crlf and buf.startswith(_DOT_LINE):
            del buf[:3]
            event = EndOfData(self._body_size, self._bare_lf, self._bare_cr, self._long_lines)
            self._mode = ReaderMode.COMMAND
            self._reset_body()
            return event
        match = _TERMINATOR_OR_BARE_LF.search(buf)
        if match is None:
            end, has_bare_lf = -1, False
        elif match.end() - match.start() > 1:
            end, has_bare_lf = match.start() - 1, False
        else:
            end, has_bare_lf = buf.find(_TERMINATOR), True
        if end >= 0:
            take = end + 2  # the CRLF before the dot is the body's last line ending
        elif self._after_crlf and len(buf) < 3 and _DOT_LINE.startswith(buf):
            take = 0  # b"", b"." or b".\r" right after a CRLF
        else:
            take = len(buf)
            for partial in _PARTIAL_TERMINATORS:
                if buf.endswith(partial):
                    take -= len(partial)
                    break
        if take == 0:
            if self._eof:
                self._mode = ReaderMode.CLOSED
                return ClientClosed()
            return NEED_DATA
        if take == len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:take])
            del buf[:take]
        return self._chunk(data, found_end=end >= 0, has_bare_lf=has_bare_lf)

    def _chunk(self, data: bytes, *, found_end: bool, has_bare_lf: bool) -> DataChunk:
        # A chunk never ends in CR (a trailing CR is held back as a possible
        # terminator start) and the previous chunk did not either, so CRLF
        # pairs never straddle chunks and counting inside the chunk is exact.
        # The byte before the first chunk is the LF of the DATA line.
        crlf = -1
        bare_lf = bare_cr = 0
        if has_bare_lf:
            crlf = data.count(b"\r\n")
            bare_lf = data.count(b"\n") - crlf
        if _BARE_CR.search(data) is not None:
            if crlf < 0:
                crlf = data.count(b"\r\n")
            bare_cr = data.count(b"\r") - crlf
        long_lines = 0 if self.limits.max_text_line is None else self._long_lines_in(data)
        self._body_size += len(data)
        self._bare_lf += bare_lf
        self._bare_cr += bare_cr
        self._long_lines += long_lines
        self._after_crlf = found_end
        return DataChunk(data, bare_lf, bare_cr, long_lines > 0)

    def _long_lines_in(self, data: bytes) -> int:
        """Count text lines that become too long within ``data``.

        RFC 5321 4.5.3.1.6: "The maximum total length of a text line
        including the <CRLF> is 1000 octets".  A line is too long once it
        holds max_text_line octets besides its LF.  Rather than visiting each
        line, look at windows of the octets that would make the current line
        too long: if the window holds an LF, every line ending in it was
        short and the last LF in it starts a new line; if not, the line is
        too long.  Each step advances by about max_text_line octets.
        """
        limit = self.limits.max_text_line
        assert limit is not None
        size = len(data)
        pos = 0
        length = self._line_len  # octets of the current line before pos
        flagged = self._line_flagged
        found = 0
        find, rfind = data.find, data.rfind  # bound once: this loop is hot
        while True:
            if flagged:  # already counted: skip to its end
                lf = find(b"\n", pos)
                if lf < 0:
                    length += size - pos
                    break
                pos, length, flagged = lf + 1, 0, False
                continue
            stop = pos + limit - length
            if stop > size:
                lf = rfind(b"\n", pos)
                if lf < 0:
                    length += size - pos
                    break
                pos, length = lf + 1, 0
                continue
            lf = rfind(b"\n", pos, stop)
            if lf < 0:
                found += 1
                pos, length, flagged = stop, limit, True
            else:
                pos, length = lf + 1, 0
        self._line_len = length
        self._line_flagged = flagged
        return found
