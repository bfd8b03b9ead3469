"""The client side of IMAP: bytes a client sends -> events.

Theory of operation
-------------------
:class:`CommandReader` is a sans-IO parser in the style of h11: feed bytes
with :meth:`~CommandReader.receive_data` (``b""`` for EOF), pull events with
:meth:`~CommandReader.next_event` until it returns :data:`NEED_DATA`.  It
never does I/O and never answers the client; the session does.

As in imap-codec, a command is first *framed*, then parsed.  Framing cuts
the stream into line fragments and literals: a fragment ends at LF; if it
ends in ``{n}`` or ``{n+}`` (outside a quoted string) the next ``n`` octets
are a literal and the command goes on with the next fragment.  Only a whole
command (every fragment and literal) is parsed, into a :class:`Command` (or
:class:`Login`, :class:`Authenticate`, :class:`Id`, :class:`Enable`) or a
:class:`BadCommand`.

A synchronizing literal ``{n}`` stops the reader: it returns
:class:`NeedContinuation` and refuses to go on (``LocalProtocolError``) until
the session calls :meth:`~CommandReader.accept_literal` (and sends ``+``) or
:meth:`~CommandReader.reject_literal` (and sends ``tag BAD``/``NO``).

Every limit is hard and refusal is deterministic, so the reader and the
client never disagree on where the next command starts:

* a fragment longer than its limit gives :class:`LineTooLong` as soon as it
  is seen; the reader drops the command and skips to the end of that line;
* a literal larger than its limit gives :class:`LiteralRefused`; the client
  sends no octets for a refused ``{n}`` (it waits for ``+``), and sends them
  anyway for ``{n+}``, so those are skipped;
* after a refusal, the rest of the command is skipped: each skipped line
  ending in ``{n+}`` is followed by ``n`` skipped octets and another line; a
  skipped line ending in ``{n}`` ends the command (the client is waiting for
  a ``+`` that will not come, and gets the BAD instead).

Skipped octets are counted in :attr:`~CommandReader.discarded`; every octet
received ends up in exactly one event's ``frames``, in ``discarded``, or in
:attr:`~CommandReader.buffered`.

Strictness: the framing is lenient (a bare LF ends a line) so that the
reader stays in step with any client, but a command that a server could
frame differently from us -- bare LF, CR or NUL inside a line, unbalanced
quotes, a literal marker glued to an atom -- is a :class:`BadCommand`, never
a :class:`Command`, so it is never relayed.

Speed: one ``bytes.find`` per line from a kept offset, literals taken by
length, and consumed bytes compacted once per :meth:`receive_data`; no
per-octet Python loop.
"""

from __future__ import annotations

import enum
from typing import Final, assert_never, final

from mailmoat.errors import LocalProtocolError
from mailmoat.secret import Secret

from ._events import (
    LITERAL_MINUS_MAX,
    NEED_DATA,
    NIL,
    Atom,
    Authenticate,
    AuthenticateResponse,
    BadCommand,
    ClientClosed,
    ClientEvent,
    Command,
    Enable,
    Id,
    IdParams,
    ImapLimits,
    LineTooLong,
    Literal,
    LiteralRefused,
    Login,
    NeedContinuation,
    NeedData,
    NonSyncLiterals,
    ParenList,
    Value,
)
from ._syntax import (
    BASE64_RE,
    SyntaxProblem,
    content_of,
    literal_marker,
    marker_at_token_start,
    parse_values,
    quotes_balanced,
    split_head,
    string_of,
    tag_of,
    tokenize,
)

_MECHANISM_CHARS: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)
_NO_ARGS: Final = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"})
#: Commands whose arguments the reader parses; any other is kept raw.
PARSED_COMMANDS: Final = _NO_ARGS | {"AUTHENTICATE", "LOGIN", "ID", "ENABLE"}
# The end of a skipped line is kept to spot a literal marker in it.
_TAIL: Final = 64


class ReaderMode(enum.Enum):
    """What the :class:`CommandReader` expects next."""

    #: Command lines (and the literals they announce).
    COMMAND = enum.auto()
    #: A :class:`NeedContinuation` was returned: waiting for the session's
    #: ``accept_literal()`` / ``reject_literal()``.
    CONTINUATION = enum.auto()
    #: The next line is an AUTHENTICATE response (``expect_auth_response()``).
    AUTH_RESPONSE = enum.auto()
    #: The client closed; ``next_event`` returns ClientClosed forever.
    CLOSED = enum.auto()


class _State(enum.Enum):
    LINE = enum.auto()
    LITERAL = enum.auto()
    DECIDE = enum.auto()
    AUTH = enum.auto()
    SKIP_LINE = enum.auto()
    SKIP_LITERAL = enum.auto()
    CLOSED = enum.auto()


def _bad(tag: bytes | None, name: str, reason: str, frames: tuple[bytes, ...]) -> BadCommand:
    return BadCommand(tag, name, reason, frames)


def parse_command(frames: tuple[bytes, ...]) -> Command | BadCommand:
    """Parse one framed command: line fragments and literal data alternating.

    Each line fragment but the last ends in its literal marker and line
    ending.  Never raises for peer bytes: a malformed command is a
    :class:`BadCommand`.
    """
    if len(frames) % 2 != 1:
        raise LocalProtocolError("frames alternate line, literal, ..., line")
    lines = frames[::2]
    first = content_of(lines[0])
    tag, name, after = split_head(first)
    if tag is None:
        return _bad(None, "", "missing or invalid tag", frames)
    if not name:
        return _bad(tag, "", "missing or invalid command name", frames)
    for line in lines:
        if not line.endswith(b"\r\n"):
            return _bad(tag, name, "line does not end in CRLF", frames)
    parts: list[bytes] = []
    literals: list[Literal] = []
    for index, line in enumerate(lines):
        content = line[:-2]
        if b"\r" in content or b"\x00" in content:
            return _bad(tag, name, "CR or NUL inside a line", frames)
        if not quotes_balanced(content):
            return _bad(tag, name, "unterminated quoted string", frames)
        if index < len(lines) - 1:
            marker = literal_marker(content)
            assert marker is not None  # the framing put a literal here
            _, sync, brace = marker
            if not marker_at_token_start(content, brace):
                return _bad(tag, name, "literal marker inside a token", frames)
            start = brace - 1 if brace and content[brace - 1] == 0x7E else brace
            parts.append(content[:start])
            literals.append(Literal(frames[2 * index + 1], sync))
        else:
            marker = literal_marker(content)
            if marker is not None:
                # Only reached when the reader refused to ask for the octets.
                return _bad(tag, name, "literal without its data", frames)
            parts.append(content)
    if name not in PARSED_COMMANDS:
        return Command(tag, name, None, frames)
    try:
        args = parse_values(tokenize(parts, literals, after))
        return _typed(tag, name, args, frames)
    except SyntaxProblem as exc:
        return _bad(tag, name, str(exc), frames)


def _typed(tag: bytes, name: str, args: tuple[Value, ...], frames: tuple[bytes, ...]) -> Command:
    """A parsed command of one of the PARSED_COMMANDS; SyntaxProblem if its
    arguments are not what its grammar says."""
    if name in _NO_ARGS:
        if args:
            raise SyntaxProblem(f"{name} takes no arguments")
        return Command(tag, name, args, frames)
    if name == "LOGIN":
        # RFC 9051: login = "LOGIN" SP userid SP password; both astring.
        if len(args) != 2:
            raise SyntaxProblem("LOGIN takes a user and a password")
        user = string_of(args[0], atom=True)
        password = string_of(args[1], atom=True)
        if user is None or password is None:
            raise SyntaxProblem("LOGIN arguments must be strings")
        return Login(tag, name, args, frames, user, Secret(password))
    if name == "AUTHENTICATE":
        # RFC 9051: authenticate = "AUTHENTICATE" SP auth-type [SP initial-resp]
        # initial-resp = (base64 / "=")   (RFC 4959)
        if not 1 <= len(args) <= 2:
            raise SyntaxProblem("AUTHENTICATE takes a mechanism and an initial response")
        mech = args[0]
        if not isinstance(mech, Atom) or not _MECHANISM_CHARS.issuperset(mech.value):
            raise SyntaxProblem("invalid SASL mechanism")
        initial: Secret | None = None
        if len(args) == 2:
            response = args[1]
            if not isinstance(response, Atom) or not (
                response.value == b"=" or BASE64_RE.fullmatch(response.value)
            ):
                raise SyntaxProblem("initial response is not base64")
            initial = Secret(response.value)
        mechanism = mech.value.decode("ascii").upper()
        return Authenticate(tag, name, args, frames, mechanism, initial)
    if name == "ID":
        if len(args) != 1:
            raise SyntaxProblem("ID takes one list or NIL")
        return Id(tag, name, args, frames, _id_params(args[0]))
    if name == "ENABLE":
        # RFC 5161: enable = "ENABLE" 1*(SP capability)
        if not args or not all(isinstance(arg, Atom) for arg in args):
            raise SyntaxProblem("ENABLE takes capability atoms")
        caps = tuple(arg.value.decode("ascii").upper() for arg in args if isinstance(arg, Atom))
        return Enable(tag, name, args, frames, caps)
    raise AssertionError(name)  # pragma: no cover


def _id_params(arg: Value) -> IdParams | None:
    # RFC 2971: id_params_list ::= "(" #(string SPACE nstring) ")" / nil
    if arg is NIL:
        return None
    if not isinstance(arg, ParenList) or len(arg.items) % 2:
        raise SyntaxProblem("ID takes a list of field/value pairs or NIL")
    params: list[tuple[bytes, bytes | None]] = []
    items = arg.items
    for index in range(0, len(items), 2):
        key = string_of(items[index], atom=False)
        value = items[index + 1]
        text = None if value is NIL else string_of(value, atom=False)
        if key is None or (text is None and value is not NIL):
            raise SyntaxProblem("ID fields are strings, values strings or NIL")
        params.append((key, text))
    return tuple(params)


def _framing_problem(line: bytes, content: bytes) -> bool:
    """Cheap checks that make a command with a literal marker a BadCommand."""
    if not line.endswith(b"\r\n") or b"\r" in content or b"\x00" in content:
        return True
    marker = literal_marker(content)
    return marker is None or not marker_at_token_start(content, marker[2])


def to_non_sync(command: Command) -> bytes:
    """``command.raw`` with every ``{n}`` turned into ``{n+}`` (RFC 7888).

    For relaying a command the proxy already collected (having answered the
    client's ``+`` itself) to a backend that advertises LITERAL+, in one write.
    """
    frames = command.frames
    if len(frames) == 1:
        return frames[0]
    out: list[bytes] = []
    for index, frame in enumerate(frames):
        if index % 2 == 0 and index < len(frames) - 1:
            content = content_of(frame)
            marker = literal_marker(content)
            assert marker is not None
            size, sync, brace = marker
            out.append(content[:brace] + b"{%d+}\r\n" % size if sync else frame)
        else:
            out.append(frame)
    return b"".join(out)


@final
class CommandReader:
    """Parses what an IMAP client sends.  See the module docs.

    ``non_sync`` says which non-synchronizing literals the proxy advertises
    (LITERAL+ / LITERAL- / neither); it can be changed between commands.
    """

    __slots__ = (
        "_buf",
        "_discarded",
        "_eof",
        "_frames",
        "_lit_size",
        "_lit_sync",
        "_name",
        "_scan",
        "_size",
        "_skip",
        "_skip_markers",
        "_start",
        "_state",
        "_tag",
        "_tail",
        "limits",
        "non_sync",
    )

    def __init__(
        self,
        limits: ImapLimits = ImapLimits(),  # noqa: B008 (frozen)
        *,
        non_sync: NonSyncLiterals = NonSyncLiterals.LITERAL_PLUS,
    ) -> None:
        self.limits: Final = limits
        self.non_sync = non_sync
        self._buf = bytearray()
        self._start = 0  # first octet not yet consumed
        self._scan = 0  # no LF in _buf[_start:_scan]
        self._eof = False
        self._state = _State.LINE
        self._discarded = 0
        self._skip = 0  # octets of a refused {n+} literal still to skip
        self._tail = b""  # end of the line being skipped
        self._skip_markers = True  # a skipped line may announce a literal
        self._reset_command()

    def _reset_command(self) -> None:
        self._frames: list[bytes] = []
        self._size = 0
        self._tag: bytes | None = None
        self._name = ""
        self._lit_size = 0
        self._lit_sync = True

    # -- public API -------------------------------------------------------

    @property
    def mode(self) -> ReaderMode:
        match self._state:
            case _State.DECIDE:
                return ReaderMode.CONTINUATION
            case _State.AUTH:
                return ReaderMode.AUTH_RESPONSE
            case _State.CLOSED:
                return ReaderMode.CLOSED
            case _State.LINE | _State.LITERAL | _State.SKIP_LINE | _State.SKIP_LITERAL:
                return ReaderMode.COMMAND
            case _:  # pragma: no cover
                assert_never(self._state)

    @property
    def buffered(self) -> bytes:
        """Octets received but neither returned in an event nor discarded
        (including the fragments of a command still being collected)."""
        pending = b"".join(self._frames)
        return pending + bytes(self._buf[self._start :])

    @property
    def discarded(self) -> int:
        """Octets dropped so far: refused commands and skipped literals."""
        return self._discarded

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._start:
            # Compact once per receive (not per event): amortized linear.
            del self._buf[: self._start]
            self._scan -= self._start
            self._start = 0
        self._buf += data

    def discard_buffer(self) -> bytes:
        """Drop and return unconsumed octets (e.g. plaintext pipelined after
        STARTTLS); a command being collected is dropped too."""
        data = self.buffered
        self._buf.clear()
        self._start = self._scan = 0
        self._reset_command()
        if self._state is not _State.CLOSED:
            self._state = _State.LINE
        return data

    def accept_literal(self) -> None:
        """After :class:`NeedContinuation`: the session sends ``+``; the
        literal's octets are read next."""
        if self._state is not _State.DECIDE:
            raise LocalProtocolError("accept_literal() without a pending literal")
        self._state = _State.LITERAL

    def reject_literal(self) -> None:
        """After :class:`NeedContinuation`: the session answers ``tag NO`` or
        ``BAD``; the command is dropped (the client will not send the literal)."""
        if self._state is not _State.DECIDE:
            raise LocalProtocolError("reject_literal() without a pending literal")
        self._drop_command()
        self._state = _State.LINE

    def expect_auth_response(self) -> None:
        """The server sent ``+`` during AUTHENTICATE: the next line is a SASL
        response (or ``*``), returned as :class:`AuthenticateResponse`."""
        if self._state is not _State.LINE or self._frames:
            raise LocalProtocolError("expect_auth_response() in the middle of a command")
        self._state = _State.AUTH

    def next_event(self) -> ClientEvent | NeedData:
        if self._state is _State.DECIDE:
            raise LocalProtocolError("accept_literal() or reject_literal() first")
        while True:
            match self._state:
                case _State.LINE | _State.AUTH:
                    event = self._line()
                case _State.LITERAL:
                    event = self._literal()
                case _State.SKIP_LINE:
                    event = self._skip_line()
                case _State.SKIP_LITERAL:
                    event = self._skip_literal()
                case _State.CLOSED:
                    return ClientClosed()
                case _State.DECIDE:  # pragma: no cover (checked above)
                    raise AssertionError
                case _:  # pragma: no cover
                    assert_never(self._state)
            if event is not None:
                return event

    # -- framing ----------------------------------------------------------

    def _closed(self) -> ClientClosed:
        self._state = _State.CLOSED
        return ClientClosed()

    def _drop_command(self) -> None:
        self._discarded += self._size
        self._reset_command()

    def _line_limit(self) -> int:
        if self._state is _State.AUTH:
            return self.limits.max_auth_line
        return min(self.limits.max_line, self.limits.max_command - self._size)

    def _line(self) -> ClientEvent | NeedData | None:
        buf = self._buf
        start = self._start
        limit = self._line_limit()
        lf = buf.find(b"\n", self._scan)
        if lf < 0:
            if len(buf) - start > limit:
                return self._line_too_long(limit, len(buf))
            if self._eof:
                return self._closed()
            self._scan = len(buf)
            return NEED_DATA
        end = lf + 1
        if end - start > limit:
            return self._line_too_long(limit, end)
        line = bytes(buf[start:end])
        self._start = self._scan = end
        if self._state is _State.AUTH:
            self._state = _State.LINE
            return AuthenticateResponse(Secret(content_of(line)), line)
        frames = self._frames
        frames.append(line)
        self._size += len(line)
        content = content_of(line)
        if len(frames) == 1:
            self._tag, self._name, _ = split_head(content)
        marker = literal_marker(content)
        if marker is not None and not quotes_balanced(content):
            marker = None  # "{5}" inside an unterminated quoted string
        if marker is None:
            return self._finish()
        size, sync, _ = marker
        budget = self.limits.max_command - self._size
        limit_or_none: int | None
        if sync:
            limit_or_none = min(self.limits.max_literal, budget)
        elif self.non_sync is NonSyncLiterals.NONE:
            limit_or_none = None
        elif self.non_sync is NonSyncLiterals.LITERAL_MINUS:
            limit_or_none = min(LITERAL_MINUS_MAX, self.limits.max_literal, budget)
        else:
            limit_or_none = min(self.limits.max_literal, budget)
        if limit_or_none is None or size > limit_or_none:
            refused = LiteralRefused(self._tag, self._name, size, limit_or_none, sync)
            self._drop_command()
            if not sync:
                # RFC 7888: the client sends a non-synchronizing literal
                # without waiting; skip it and the rest of its command.
                self._skip = size
                self._state = _State.SKIP_LITERAL
            return refused
        self._lit_size, self._lit_sync = size, sync
        if sync:
            if self._tag is None or not self._name or _framing_problem(line, content):
                # A command that is already malformed: answer it now (BAD),
                # rather than ask for octets; the client will not send them.
                return self._finish()
            self._state = _State.DECIDE
            return NeedContinuation(self._tag, self._name, size)
        self._state = _State.LITERAL
        return None

    def _line_too_long(self, limit: int, upto: int) -> LineTooLong:
        buf = self._buf
        start = self._start
        if self._state is _State.AUTH:
            tag = None
            # An over-long SASL line: skip to its end; it announces nothing.
            self._tail = b""
            self._skip_markers = False
        else:
            self._skip_markers = True
            tag = self._tag if self._frames else tag_of(bytes(buf[start : start + 256]))
            self._tail = bytes(buf[max(start, upto - _TAIL) : upto])
        complete = upto > start and buf[upto - 1] == 0x0A
        self._discarded += upto - start
        self._drop_command()
        self._start = self._scan = upto
        self._state = _State.SKIP_LINE
        if complete:
            self._end_skipped_line()
        return LineTooLong(tag, limit)

    def _end_skipped_line(self) -> None:
        """A skipped line ended (its tail is in ``_tail``): is it followed by
        a literal that the client sends anyway?"""
        marker = literal_marker(content_of(self._tail)) if self._skip_markers else None
        self._tail = b""
        self._skip_markers = True
        if marker is not None and not marker[1]:
            self._skip = marker[0]
            self._state = _State.SKIP_LITERAL
        else:
            self._state = _State.LINE

    def _skip_line(self) -> NeedData | ClientClosed | None:
        buf = self._buf
        start = self._start
        lf = buf.find(b"\n", start)
        if lf < 0:
            self._tail = (self._tail + bytes(buf[max(start, len(buf) - _TAIL) :]))[-_TAIL:]
            self._discarded += len(buf) - start
            self._start = self._scan = len(buf)
            return self._closed() if self._eof else NEED_DATA
        end = lf + 1
        self._tail = (self._tail + bytes(buf[max(start, end - _TAIL) : end]))[-_TAIL:]
        self._discarded += end - start
        self._start = self._scan = end
        self._end_skipped_line()
        return None

    def _skip_literal(self) -> NeedData | ClientClosed | None:
        take = min(len(self._buf) - self._start, self._skip)
        self._skip -= take
        self._discarded += take
        self._start = self._scan = self._start + take
        if self._skip:
            return self._closed() if self._eof else NEED_DATA
        self._tail = b""
        self._state = _State.SKIP_LINE
        return None

    def _literal(self) -> NeedData | ClientClosed | None:
        start = self._start
        end = start + self._lit_size
        if len(self._buf) < end:
            return self._closed() if self._eof else NEED_DATA
        self._frames.append(bytes(self._buf[start:end]))
        self._size += self._lit_size
        self._start = self._scan = end
        self._state = _State.LINE
        return None

    def _finish(self) -> Command | BadCommand:
        event = parse_command(tuple(self._frames))
        self._reset_command()
        self._state = _State.LINE
        return event
