"""SMTP events, limits and the ``NEED_DATA`` sentinel.

Contract: every class here is an immutable value.  Constructors validate what
they can check cheaply and raise :class:`~mailmoat.errors.LocalProtocolError`
when *we* build something the protocol does not allow; the readers only ever
construct valid events from peer bytes, so a peer can never trigger these
checks (the fuzz harness holds us to that).

Bytes stay bytes: only verbs, mechanism names, HELO names and ESMTP parameter
keywords are decoded.  Every client event that maps to bytes on the wire keeps
those bytes *exactly as received* in ``line`` / ``data`` so that a proxy can
forward them unchanged; ``repr`` never shows them (they may hold credentials).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final, final

from mailmoat.errors import LocalProtocolError
from mailmoat.secret import Secret


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel (one member, so ``is`` narrows)."""

    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` when more bytes are needed before the next event.
NEED_DATA: Final = NeedData.NEED_DATA

# A verb is an ASCII word; the longest registered SMTP verb is 8 letters
# (STARTTLS), 16 leaves room for private extensions.
MAX_VERB_LENGTH: Final = 16

# Every limit on a line must leave room for the longest verb, a space and CRLF,
# so that the verb (and hence the limit that applies) is known before a line
# can exceed any limit.
_MIN_LINE_LIMIT: Final = 32

_VERB_RE: Final = re.compile(rf"[A-Z]{{1,{MAX_VERB_LENGTH}}}")


@final
@dataclass(frozen=True, slots=True)
class SmtpLimits:
    """Size bounds for both SMTP readers.  Defaults are the RFC minimums.

    ``max_text_line`` = ``None`` disables the (informational) long-text-line
    check in DATA; the other limits are hard.
    """

    #: RFC 5321 4.5.3.1.4: "The maximum total length of a command line
    #: including the command word and the <CRLF> is 512 octets."
    max_command_line: int = 512
    #: RFC 5321 4.5.3.1.4: "SMTP extensions may be used to increase this
    #: limit" -- MAIL/RCPT carry ESMTP parameters (RFC 1869, RFC 3461).
    max_param_line: int = 1024
    #: RFC 4954 section 4: "the AUTH command [...] be permitted to exceed
    #: the 512-octet limit"; 12288 is what RFC 4954 suggests in practice.
    max_auth_line: int = 12288
    #: RFC 5321 4.5.3.1.6: "The maximum total length of a text line including
    #: the <CRLF> is 1000 octets (not counting the leading dot duplicated for
    #: transparency)."  We count the stuffed dot; it only makes us stricter.
    max_text_line: int | None = 1000
    #: RFC 5321 4.5.3.1.5: replies are limited to 512 octets; servers exceed
    #: it in EHLO greetings, so we allow more.
    max_reply_line: int = 2048
    max_reply_lines: int = 128

    def __post_init__(self) -> None:
        for name in ("max_command_line", "max_param_line", "max_auth_line", "max_reply_line"):
            value = getattr(self, name)
            if type(value) is not int or value < _MIN_LINE_LIMIT:
                raise ValueError(f"{name} must be an int >= {_MIN_LINE_LIMIT}, got {value!r}")
        if type(self.max_reply_lines) is not int or self.max_reply_lines < 1:
            raise ValueError(f"max_reply_lines must be an int >= 1, got {self.max_reply_lines!r}")
        text = self.max_text_line
        if text is not None and (type(text) is not int or text < 1):
            raise ValueError(f"max_text_line must be None or an int >= 1, got {text!r}")

    @property
    def max_any_command_line(self) -> int:
        """The largest limit a command line can be subject to."""
        return max(self.max_command_line, self.max_param_line, self.max_auth_line)


def _check_line(line: bytes) -> None:
    if not line.endswith(b"\n"):
        raise LocalProtocolError("a line must end in LF (CRLF or bare LF)")


# --------------------------------------------------------------------------
# Client side (what a client sends)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One client command line.

    ``verb`` is the upper-cased first word if it is 1-16 ASCII letters, else
    ``""`` (then ``args`` is the whole line without its line ending).
    ``args`` is what follows the verb and one space, without the line ending.
    ``line`` is the raw line as received, line ending included: what a proxy
    forwards.  ``bare_lf`` is true when the line ended in LF without CR.

    This is the base of :class:`Hello`, :class:`MailFrom`, :class:`RcptTo` and
    :class:`Auth`; a MAIL/RCPT/AUTH/HELO line that does not parse is a plain
    ``Command`` with that verb (the session answers 501).
    """

    verb: str
    args: bytes
    line: bytes = field(repr=False)
    bare_lf: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.verb and not _VERB_RE.fullmatch(self.verb):
            raise LocalProtocolError(f"invalid verb {self.verb!r}")
        _check_line(self.line)

    def __repr__(self) -> str:
        # Hand-written (dataclass keeps it) so that a malformed AUTH line's
        # arguments, which may hold a credential, never reach a log.
        args = "***" if self.verb == "AUTH" else repr(self.args)
        return f"Command(verb={self.verb!r}, args={args}, bare_lf={self.bare_lf!r})"

    def redacted(self) -> bytes:
        """``line`` in a form fit for logs: an AUTH line loses its arguments."""
        if self.verb == "AUTH":
            # A malformed AUTH line may still hold a credential.
            return b"AUTH ***"
        return self.line


@final
@dataclass(frozen=True, slots=True)
class Hello(Command):
    """HELO or EHLO.  ``name`` is the first word of the argument ("" if none),
    decoded as UTF-8 with undecodable bytes backslash-escaped."""

    name: str
    extended: bool

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.verb not in ("HELO", "EHLO") or self.extended != (self.verb == "EHLO"):
            raise LocalProtocolError("Hello needs verb HELO (extended=False) or EHLO (True)")


EsmtpParams = tuple[tuple[str, bytes | None], ...]


def _check_params(params: EsmtpParams) -> None:
    for key, _value in params:
        if not key or key != key.upper():
            raise LocalProtocolError(f"ESMTP parameter keyword {key!r} must be upper-case")


@final
@dataclass(frozen=True, slots=True)
class MailFrom(Command):
    """``MAIL FROM:<address> params``.  ``address`` is without the angle
    brackets, ``b""`` for the null reverse-path; ``params`` are ESMTP
    parameters as (upper-cased keyword, value or None) in order received."""

    address: bytes
    params: EsmtpParams = ()

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.verb != "MAIL":
            raise LocalProtocolError("MailFrom needs verb MAIL")
        _check_params(self.params)


@final
@dataclass(frozen=True, slots=True)
class RcptTo(Command):
    """``RCPT TO:<address> params``; ``address`` is never empty."""

    address: bytes
    params: EsmtpParams = ()

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.verb != "RCPT":
            raise LocalProtocolError("RcptTo needs verb RCPT")
        if not self.address:
            raise LocalProtocolError("RCPT needs a non-empty forward-path")
        _check_params(self.params)


@final
@dataclass(frozen=True, slots=True)
class Auth(Command):
    """``AUTH mechanism [initial-response]`` (RFC 4954).

    ``initial_response`` is the raw base64 text as sent, not decoded, wrapped
    in a :class:`Secret`; RFC 4954 section 4 spells an empty initial response
    as ``"="``, and we keep it as ``Secret(b"=")`` so that the bytes forwarded
    and the bytes inspected are the same.
    """

    mechanism: str
    initial_response: Secret | None = None

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.verb != "AUTH":
            raise LocalProtocolError("Auth needs verb AUTH")
        if not self.mechanism or self.mechanism != self.mechanism.upper():
            raise LocalProtocolError("Auth mechanism must be non-empty and upper-case")

    def __repr__(self) -> str:
        # ``args`` holds the initial response: keep it out of logs.
        return (
            f"Auth(mechanism={self.mechanism!r}, initial_response={self.initial_response!r}, "
            f"bare_lf={self.bare_lf!r})"
        )

    def redacted(self) -> bytes:
        """``b"AUTH PLAIN ***"`` (with an initial response) or ``b"AUTH PLAIN"``."""
        head = b"AUTH " + self.mechanism.encode("ascii")
        return head if self.initial_response is None else head + b" ***"


@final
@dataclass(frozen=True, slots=True)
class AuthResponse:
    """One SASL response line sent after a 334 (RFC 4954 section 4).

    ``data`` is the line without its line ending, base64 text as sent (or
    ``*`` to cancel); ``line`` is the raw line to forward.
    """

    data: Secret
    line: bytes = field(repr=False)
    bare_lf: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_line(self.line)

    @property
    def is_cancel(self) -> bool:
        # RFC 4954 section 4: "If the client wishes to cancel the
        # authentication exchange, it issues a line with a single '*'."
        return self.data.reveal() == b"*"

    def redacted(self) -> bytes:
        return b"*" if self.is_cancel else b"***"


@final
@dataclass(frozen=True, slots=True)
class DataChunk:
    """A piece of the message body, dot-stuffed, exactly as received.

    Concatenating all chunks of one message gives the body bytes between the
    CRLF that ended the DATA line and the ``.`` CRLF terminator line: the
    CRLF before the dot belongs to the body.  A chunk never holds any part of
    the terminator line.

    ``bare_lf`` / ``bare_cr`` count LF not preceded by CR and CR not followed
    by LF in this chunk (bytes across chunk boundaries are accounted once).
    ``long_line`` is true if a text line became longer than
    ``max_text_line`` within this chunk (each such line is flagged in
    exactly one chunk).
    """

    data: bytes = field(repr=False)
    bare_lf: int = 0
    bare_cr: int = 0
    long_line: bool = False

    def __post_init__(self) -> None:
        if self.bare_lf < 0 or self.bare_cr < 0:
            raise LocalProtocolError("counters cannot be negative")


@final
@dataclass(frozen=True, slots=True)
class EndOfData:
    """The end-of-data indication CRLF ``.`` CRLF was seen.

    Totals over the whole body (all chunks): ``size`` in octets as received,
    bare LF / CR counts, number of over-long text lines.  ``line`` is the
    terminator's dot line, to forward after the last chunk.
    """

    size: int
    bare_lf: int = 0
    bare_cr: int = 0
    long_lines: int = 0
    line: bytes = field(default=b".\r\n", repr=False)

    def __post_init__(self) -> None:
        if min(self.size, self.bare_lf, self.bare_cr, self.long_lines) < 0:
            raise LocalProtocolError("counters cannot be negative")


@final
@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A command line or SASL response line was longer than ``limit``.

    The reader discarded the whole line, up to and including its LF, and
    resumes with the next line; ``length`` counts the discarded octets.  If
    the client closed before the LF, ``length`` is what arrived.
    """

    limit: int
    length: int

    def __post_init__(self) -> None:
        if self.length <= self.limit:
            raise LocalProtocolError("LineTooLong needs length > limit")


@final
@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client closed its sending side; bytes of an unfinished line stay
    in ``CommandReader.buffered``."""


# --------------------------------------------------------------------------
# Server side (what a server sends)
# --------------------------------------------------------------------------

_ENHANCED_RE: Final = re.compile(rb"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")


@final
@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: a code and one or more lines of text.

    ``lines`` hold the text after ``ddd-`` / ``ddd `` without the line ending;
    there is at least one (it may be ``b""``).
    """

    code: int
    lines: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if type(self.code) is not int or not 200 <= self.code <= 599:
            raise LocalProtocolError(f"reply code {self.code!r} not in 200..599")
        if not self.lines:
            raise LocalProtocolError("a reply has at least one line")
        for text in self.lines:
            if b"\r" in text or b"\n" in text:
                raise LocalProtocolError("reply text cannot contain CR or LF")

    def to_bytes(self) -> bytes:
        # RFC 5321 4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
        #                            Reply-code [ SP textstring ] CRLF
        code = b"%d" % self.code
        out = [code + b"-" + text + b"\r\n" for text in self.lines[:-1]]
        last = self.lines[-1]
        out.append(code + (b" " + last if last else b"") + b"\r\n")
        return b"".join(out)

    @property
    def is_positive_completion(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code opening the first line, if any."""
        match = _ENHANCED_RE.match(self.lines[0])
        return None if match is None else match.group(0).rstrip(b" ").decode("ascii")


@final
@dataclass(frozen=True, slots=True)
class ServerClosed:
    """The server closed its sending side; an unfinished reply stays in
    ``ReplyReader.buffered``."""


ClientEvent = Command | AuthResponse | DataChunk | EndOfData | LineTooLong | ClientClosed
ServerEvent = Reply | ServerClosed
