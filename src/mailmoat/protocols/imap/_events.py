"""IMAP values, events, limits and the ``NEED_DATA`` sentinel.

Contract: every class here is an immutable value.  Constructors validate what
they can check cheaply and raise :class:`~mailmoat.errors.LocalProtocolError`
when *we* build something the protocol does not allow; the readers only ever
construct valid events from peer bytes.

Bytes stay bytes: only command names, status words, response-code names,
SASL mechanisms and capabilities are decoded.  Every event that maps to bytes
on the wire keeps those bytes *exactly as received* in ``frames`` (line
fragments and literal data, alternating) so that a proxy can forward them
unchanged; ``repr`` never shows them, nor argument values (they may hold
credentials).
"""

from __future__ import annotations

import enum
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

#: RFC 7888 section 4: with LITERAL- a non-synchronizing literal may carry at
#: most 4096 octets.
LITERAL_MINUS_MAX: Final = 4096

_MIN_LINE_LIMIT: Final = 64


class NonSyncLiterals(enum.Enum):
    """Which non-synchronizing literals (``{n+}``, RFC 7888) the proxy advertises."""

    #: Neither LITERAL+ nor LITERAL-: ``{n+}`` is refused whatever its size.
    NONE = enum.auto()
    #: LITERAL-: ``{n+}`` up to :data:`LITERAL_MINUS_MAX` octets.
    LITERAL_MINUS = enum.auto()
    #: LITERAL+: ``{n+}`` up to ``ImapLimits.max_literal``.
    LITERAL_PLUS = enum.auto()


@final
@dataclass(frozen=True, slots=True)
class ImapLimits:
    """Size bounds for both IMAP readers.

    Client side (:class:`CommandReader`): every limit is hard; exceeding one
    refuses the command (:class:`LineTooLong`, :class:`LiteralRefused`) and
    the reader skips the rest of it.  Server side (:class:`ResponseReader`):
    exceeding one is a :class:`~mailmoat.errors.RemoteProtocolError`.
    """

    #: One line of a command (up to CRLF, or up to a literal), CRLF included.
    #: RFC 7162 section 4: "a client should limit the length of the command
    #: lines it generates to approximately 8192 octets".
    max_line: int = 8192
    #: One AUTHENTICATE continuation line (base64 SASL data, CRLF included).
    max_auth_line: int = 16384
    #: One literal inside a command (LOGIN, ID, APPEND before login ...).
    max_literal: int = 65536
    #: A whole command: all its lines and literals.
    max_command: int = 131072
    #: One line of a response (up to CRLF, or up to a literal).
    max_response_line: int = 65536
    #: One literal inside a response (FETCH bodies).
    max_response_literal: int = 64 * 1024 * 1024
    #: A whole response: all its lines and literals.
    max_response: int = 64 * 1024 * 1024 + 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_line", "max_auth_line", "max_response_line"):
            value = getattr(self, name)
            if type(value) is not int or value < _MIN_LINE_LIMIT:
                raise ValueError(f"{name} must be an int >= {_MIN_LINE_LIMIT}, got {value!r}")
        for name in ("max_literal", "max_response_literal"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name, line in (("max_command", "max_line"), ("max_response", "max_response_line")):
            value = getattr(self, name)
            if type(value) is not int or value < getattr(self, line):
                raise ValueError(f"{name} must be an int >= {line}, got {value!r}")


# --------------------------------------------------------------------------
# Values (command arguments)
# --------------------------------------------------------------------------


class Nil(enum.Enum):
    """Type of :data:`NIL` (the IMAP ``NIL`` atom, any case)."""

    NIL = enum.auto()

    def __repr__(self) -> str:
        return "NIL"


NIL: Final = Nil.NIL


@final
@dataclass(frozen=True, slots=True)
class Atom:
    """An atom (``astring`` characters, ``]`` included), as sent."""

    value: bytes


@final
@dataclass(frozen=True, slots=True)
class Quoted:
    """A quoted string, unescaped (``\\"`` -> ``"``, ``\\\\`` -> ``\\``)."""

    value: bytes = field(repr=False)


@final
@dataclass(frozen=True, slots=True)
class Literal:
    """A literal's octets; ``synchronizing`` is False for ``{n+}``."""

    value: bytes = field(repr=False)
    synchronizing: bool = True

    def __repr__(self) -> str:
        return f"Literal(<{len(self.value)} octets>, synchronizing={self.synchronizing!r})"


@final
@dataclass(frozen=True, slots=True)
class ParenList:
    """A parenthesized list of values."""

    items: tuple[Value, ...]


Value = Atom | Quoted | Literal | Nil | ParenList

#: ID parameters (RFC 2971): (field, value or None for NIL) in order received.
IdParams = tuple[tuple[bytes, bytes | None], ...]


def quote_for_log(value: bytes) -> bytes:
    """``value`` as a quoted string for a log line: CR/LF/NUL become ``?``."""
    cleaned = value.replace(b"\r", b"?").replace(b"\n", b"?").replace(b"\x00", b"?")
    return b'"' + cleaned.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def parse_capabilities(data: bytes) -> tuple[str, ...]:
    """Capability atoms of ``IMAP4rev1 STARTTLS AUTH=PLAIN ...`` (case kept).

    Decoded as latin-1 so that :func:`format_capabilities` gives back the
    same octets.
    """
    return tuple(word.decode("latin-1") for word in data.split(b" ") if word)


def _capabilities(code: ResponseCode | None, name: str, text: bytes) -> tuple[str, ...] | None:
    if name == "CAPABILITY":
        return parse_capabilities(text)
    if code is not None and code.name == "CAPABILITY":
        return parse_capabilities(code.data)
    return None


def _check_frames(frames: tuple[bytes, ...]) -> None:
    # Line fragments and literal data alternate; there is always a last line.
    if len(frames) % 2 != 1:
        raise LocalProtocolError("frames alternate line, literal, ..., line")
    for line in frames[::2]:
        if not line.endswith(b"\n"):
            raise LocalProtocolError("every line fragment ends in LF")


# --------------------------------------------------------------------------
# Client side (what a client sends)
# --------------------------------------------------------------------------

#: Commands whose arguments are credentials: never logged.
SENSITIVE_COMMANDS: Final = frozenset({"LOGIN", "AUTHENTICATE"})


@dataclass(frozen=True, slots=True)
class Command:
    """One complete, well-formed client command.

    ``tag`` as sent; ``name`` the upper-cased command name.  ``args`` are the
    parsed arguments for the commands the reader understands (CAPABILITY,
    NOOP, LOGOUT, STARTTLS, AUTHENTICATE, LOGIN, ID, ENABLE), ``None`` for
    any other command (kept as raw bytes, to relay verbatim).  ``frames`` are
    the bytes as received: line fragment, literal data, line fragment, ...,
    last line; ``raw`` is their concatenation: what a proxy forwards.

    Subclasses: :class:`Login`, :class:`Authenticate`, :class:`Id`,
    :class:`Enable`.
    """

    tag: bytes
    name: str
    args: tuple[Value, ...] | None = field(repr=False)
    frames: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.tag or not self.name or self.name != self.name.upper():
            raise LocalProtocolError("a command needs a tag and an upper-case name")
        _check_frames(self.frames)

    @property
    def raw(self) -> bytes:
        """The command exactly as received (lines and literals)."""
        frames = self.frames
        return frames[0] if len(frames) == 1 else b"".join(frames)

    @property
    def literal_count(self) -> int:
        return len(self.frames) // 2

    def redacted(self) -> bytes:
        """A one-line form fit for logs: no credentials, no literal data."""
        head = self.tag + b" " + self.name.encode("ascii")
        if self.name in SENSITIVE_COMMANDS:
            return head + b" ***"
        first = self.frames[0].rstrip(b"\r\n")
        return first + b" ..." if len(self.frames) > 1 else first


@final
@dataclass(frozen=True, slots=True)
class Login(Command):
    """``tag LOGIN user password`` (each an atom, quoted string or literal)."""

    user: bytes
    password: Secret

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.name != "LOGIN":
            raise LocalProtocolError("Login needs name LOGIN")

    def redacted(self) -> bytes:
        return self.tag + b" LOGIN " + quote_for_log(self.user) + b" ***"


@final
@dataclass(frozen=True, slots=True)
class Authenticate(Command):
    """``tag AUTHENTICATE mechanism [initial-response]`` (RFC 9051, RFC 4959).

    ``mechanism`` upper-cased; ``initial_response`` is the base64 text as
    sent (``=`` for an empty one), not decoded, wrapped in a :class:`Secret`.
    """

    mechanism: str
    initial_response: Secret | None = None

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.name != "AUTHENTICATE":
            raise LocalProtocolError("Authenticate needs name AUTHENTICATE")
        if not self.mechanism or self.mechanism != self.mechanism.upper():
            raise LocalProtocolError("mechanism must be non-empty and upper-case")

    def redacted(self) -> bytes:
        head = self.tag + b" AUTHENTICATE " + self.mechanism.encode("ascii")
        return head if self.initial_response is None else head + b" ***"


@final
@dataclass(frozen=True, slots=True)
class Id(Command):
    """``tag ID (field value ...)`` or ``tag ID NIL`` (RFC 2971).

    ``params`` is None for NIL, else (field, value or None) pairs in order.
    """

    params: IdParams | None

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.name != "ID":
            raise LocalProtocolError("Id needs name ID")


@final
@dataclass(frozen=True, slots=True)
class Enable(Command):
    """``tag ENABLE cap ...`` (RFC 5161); capabilities upper-cased."""

    capabilities: tuple[str, ...]

    def __post_init__(self) -> None:
        Command.__post_init__(self)
        if self.name != "ENABLE" or not self.capabilities:
            raise LocalProtocolError("Enable needs name ENABLE and a capability")


@final
@dataclass(frozen=True, slots=True)
class BadCommand:
    """A complete command that is not well-formed; answer ``tag BAD`` (or
    ``* BAD`` when ``tag`` is None, i.e. no valid tag was found).

    ``reason`` is our fixed text (never peer bytes), fit for logs but not
    meant for the peer.  ``name`` is the upper-cased command name if one was
    found, else ``""``.  ``frames`` are the bytes as received: do not forward
    them.
    """

    tag: bytes | None
    name: str
    reason: str
    frames: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        _check_frames(self.frames)

    @property
    def raw(self) -> bytes:
        return b"".join(self.frames)

    def redacted(self) -> bytes:
        """``tag NAME ***``: a malformed command may still hold a credential."""
        return (self.tag or b"*") + b" " + (self.name.encode("ascii") or b"?") + b" ***"


@final
@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """The client announced a synchronizing literal ``{size}`` and waits.

    The reader is now in ``CONTINUATION`` mode: the session must call
    ``accept_literal()`` and send ``+ Ready`` (then the client sends the
    octets) or call ``reject_literal()`` and answer ``tag NO/BAD`` (then the
    client abandons the command).  ``size`` is within the limits.
    """

    tag: bytes | None
    name: str
    size: int


@final
@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A line of a command exceeded ``limit`` octets: the command is refused.

    Answer ``tag BAD`` (``* BAD``/``* BYE`` if ``tag`` is None).  The reader
    skips the rest of the command by itself (the rest of the line, then any
    non-synchronizing literal and the lines after it; a synchronizing literal
    ends the command, since the client waits for a ``+`` that never comes).
    In AUTHENTICATE mode ``tag`` is None: the session knows it.
    """

    tag: bytes | None
    limit: int


@final
@dataclass(frozen=True, slots=True)
class LiteralRefused:
    """A literal ``{size}`` / ``{size+}`` is too large (or not allowed).

    ``limit`` is the largest size allowed for this kind of literal at this
    point of the command, None when ``{n+}`` is not advertised at all.  The
    command is refused: answer ``tag BAD`` (or ``tag NO [TOOBIG]``).  A
    synchronizing literal's octets never come; a non-synchronizing one's are
    skipped by the reader, as is the rest of the command.
    """

    tag: bytes | None
    name: str
    size: int
    limit: int | None
    synchronizing: bool


@final
@dataclass(frozen=True, slots=True)
class AuthenticateResponse:
    """One client line during an AUTHENTICATE exchange (after ``+``).

    ``data`` is the line without its line ending (base64 as sent, or ``*``
    to cancel); ``raw`` the line as received, to forward.
    """

    data: Secret
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.raw.endswith(b"\n"):
            raise LocalProtocolError("a line ends in LF")

    @property
    def is_cancel(self) -> bool:
        # RFC 9051 6.2.2: "If the client wishes to cancel an authentication
        # exchange, it issues a line consisting of a single "*"."
        return self.data.reveal() == b"*"

    def redacted(self) -> bytes:
        return b"*" if self.is_cancel else b"***"


@final
@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client closed its sending side; an unfinished command's bytes stay
    in ``CommandReader.buffered``."""


# --------------------------------------------------------------------------
# Server side (what a server sends)
# --------------------------------------------------------------------------

#: Status responses (RFC 9051 7.1): their text is free text, never a literal.
STATUS_WORDS: Final = frozenset({"OK", "NO", "BAD", "PREAUTH", "BYE"})


@final
@dataclass(frozen=True, slots=True)
class ResponseCode:
    """``[NAME data]`` opening a status response's text; name upper-cased."""

    name: str
    data: bytes = b""


@final
@dataclass(frozen=True, slots=True)
class Untagged:
    """``* ...``: a status (``OK/NO/BAD/PREAUTH/BYE``) or data response.

    ``name`` is the upper-cased keyword (``OK``, ``CAPABILITY``, ``FETCH``
    ...); ``number`` the message number or count before it (``* 3 EXISTS``).
    For a status response ``code`` is its response code and ``text`` the
    text after it; for a data response ``text`` is what follows the name on
    the first line (literal data lives in ``frames``).
    """

    name: str
    number: int | None
    code: ResponseCode | None
    text: bytes
    frames: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        _check_frames(self.frames)

    @property
    def raw(self) -> bytes:
        frames = self.frames
        return frames[0] if len(frames) == 1 else b"".join(frames)

    @property
    def is_status(self) -> bool:
        return self.name in STATUS_WORDS

    @property
    def capabilities(self) -> tuple[str, ...] | None:
        """The capability list of ``* CAPABILITY`` or of a ``[CAPABILITY]`` code."""
        return _capabilities(self.code, self.name, self.text)


@final
@dataclass(frozen=True, slots=True)
class Tagged:
    """``tag OK/NO/BAD [code] text``: the end of a command."""

    tag: bytes
    status: str
    code: ResponseCode | None
    text: bytes
    frames: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if self.status not in ("OK", "NO", "BAD"):
            raise LocalProtocolError("a tagged status is OK, NO or BAD")
        _check_frames(self.frames)

    @property
    def raw(self) -> bytes:
        return b"".join(self.frames)

    @property
    def capabilities(self) -> tuple[str, ...] | None:
        """The capability list of a ``[CAPABILITY ...]`` response code."""
        return _capabilities(self.code, "", self.text)


@final
@dataclass(frozen=True, slots=True)
class ContinuationRequest:
    """``+ text``: the server waits for literal octets or a SASL response.

    ``text`` is what follows ``+`` and one space (base64 challenge during
    AUTHENTICATE), without the line ending.
    """

    text: bytes
    frames: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        _check_frames(self.frames)

    @property
    def raw(self) -> bytes:
        return b"".join(self.frames)


@final
@dataclass(frozen=True, slots=True)
class ServerClosed:
    """The server closed its sending side; an unfinished response stays in
    ``ResponseReader.buffered``."""


ClientEvent = (
    Command
    | BadCommand
    | NeedContinuation
    | LineTooLong
    | LiteralRefused
    | AuthenticateResponse
    | ClientClosed
)
ServerEvent = Untagged | Tagged | ContinuationRequest | ServerClosed
