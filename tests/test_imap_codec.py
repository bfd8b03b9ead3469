"""Tests for the sans-IO IMAP codec (mailmoat.protocols.imap)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailmoat.errors import LocalProtocolError, RemoteProtocolError
from mailmoat.protocols.imap import (
    NEED_DATA,
    NIL,
    Atom,
    Authenticate,
    AuthenticateResponse,
    BadCommand,
    ClientClosed,
    ClientEvent,
    Command,
    CommandReader,
    ContinuationRequest,
    Enable,
    Id,
    ImapLimits,
    LineTooLong,
    Literal,
    LiteralRefused,
    Login,
    NeedContinuation,
    NonSyncLiterals,
    ParenList,
    Quoted,
    ReaderMode,
    ResponseCode,
    ResponseReader,
    ServerClosed,
    ServerEvent,
    Tagged,
    Untagged,
    edit_capabilities,
    format_command,
    format_id,
    rewrite_capabilities,
    to_non_sync,
)
from mailmoat.secret import Secret

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def feed(
    data: bytes | Sequence[bytes],
    *,
    limits: ImapLimits = ImapLimits(),  # noqa: B008
    non_sync: NonSyncLiterals = NonSyncLiterals.LITERAL_PLUS,
    accept: bool = True,
    eof: bool = True,
) -> tuple[list[ClientEvent], CommandReader]:
    """Drive a reader like a session that answers every {n} with + (or NO)."""
    reader = CommandReader(limits, non_sync=non_sync)
    pieces = [data] if isinstance(data, bytes) else list(data)
    if eof:
        pieces.append(b"")
    events: list[ClientEvent] = []
    for piece in pieces:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, NeedContinuation):
                if accept:
                    reader.accept_literal()
                else:
                    reader.reject_literal()
            if isinstance(event, ClientClosed):
                return events, reader
    return events, reader


def mode_of(reader: CommandReader) -> ReaderMode:
    # A call, so that mypy does not keep a narrowed property across calls.
    return reader.mode


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def responses(
    data: bytes | Sequence[bytes],
    limits: ImapLimits = ImapLimits(),  # noqa: B008
) -> list[ServerEvent]:
    reader = ResponseReader(limits)
    out: list[ServerEvent] = []
    for piece in [data] if isinstance(data, bytes) else data:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            out.append(event)
    return out


LOGIN_SYNC = b"a1 LOGIN {5}\r\nalice {8}\r\np@ss\r\nw!\r\n"
LOGIN_PLUS = b"a1 LOGIN {5+}\r\nalice {8+}\r\np@ss\r\nw!\r\n"


# ---------------------------------------------------------------------------
# commands: simple, quoted, atoms
# ---------------------------------------------------------------------------


def test_simple_commands_and_case() -> None:
    events, reader = feed(b"a1 capability\r\nA2 Noop\r\nx LOGOUT\r\n3 STARTTLS\r\n")
    assert [(e.tag, e.name, e.args) for e in events if isinstance(e, Command)] == [
        (b"a1", "CAPABILITY", ()),
        (b"A2", "NOOP", ()),
        (b"x", "LOGOUT", ()),
        (b"3", "STARTTLS", ()),
    ]
    assert isinstance(events[-1], ClientClosed)
    assert reader.buffered == b""
    assert reader.discarded == 0


def test_login_atoms_and_quoted_escapes() -> None:
    events, _ = feed(b'a1 LOGIN alice secret\r\na2 LOGIN "al\\"ice" "p\\\\w \\"x\\""\r\n')
    first, second = events[0], events[1]
    assert isinstance(first, Login)
    assert (first.user, first.password) == (b"alice", Secret(b"secret"))
    assert isinstance(second, Login)
    assert second.user == b'al"ice'
    assert second.password.reveal() == b'p\\w "x"'
    assert second.args == (Quoted(b'al"ice'), Quoted(b'p\\w "x"'))
    assert second.raw == b'a2 LOGIN "al\\"ice" "p\\\\w \\"x\\""\r\n'


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'a1 LOGIN "a\\x" b\r\n', "unexpected character"),  # only \" and \\ escape
        (b'a1 LOGIN "a\rb" c\r\n', "CR or NUL inside a line"),
        (b'a1 LOGIN "a\x00b" c\r\n', "CR or NUL inside a line"),
        (b'a1 LOGIN "unterminated c\r\n', "unterminated quoted string"),
        (b'a1 LOGIN "\xff\xfe" c\r\n', "invalid UTF-8 in quoted string"),
        (b"a1 LOGIN alice\r\n", "LOGIN takes a user and a password"),
        (b"a1 LOGIN  alice pw\r\n", "unexpected space"),
        (b"a1 LOGIN alice pw \r\n", "trailing space"),
        (b"a1 LOGIN (alice) pw\r\n", "LOGIN arguments must be strings"),
        (b"a1 NOOP x\r\n", "NOOP takes no arguments"),
        (b"a1 NOOP\n", "line does not end in CRLF"),
        (b'a1 ID ("a"\r\n', "unclosed '('"),
        (b'a1 ID ("a")\r\n', "ID takes a list of field/value pairs or NIL"),
        (b"a1 ID (a b)\r\n", "ID fields are strings, values strings or NIL"),
        (b"a1 ENABLE\r\n", "ENABLE takes capability atoms"),
        (b"a1 AUTHENTICATE PLAIN a*b\r\n", "unexpected character"),
        (b"a1 AUTHENTICATE PLAIN abc\r\n", "initial response is not base64"),
        (b'a1 AUTHENTICATE "PLAIN"\r\n', "invalid SASL mechanism"),
    ],
)
def test_malformed_commands_are_clean_bad_events(line: bytes, reason: str) -> None:
    events, reader = feed(line + b"a2 NOOP\r\n")
    bad = events[0]
    assert isinstance(bad, BadCommand)
    assert (bad.tag, bad.reason) == (b"a1", reason)
    assert bad.raw == line
    # the next command is read normally: no desync
    assert isinstance(events[1], Command)
    assert events[1].tag == b"a2"
    assert reader.buffered == b""


@pytest.mark.parametrize(
    "line", [b"\r\n", b"*\r\n", b"+a NOOP\r\n", b"a(b NOOP\r\n", b'"a" NOOP\r\n']
)
def test_no_valid_tag(line: bytes) -> None:
    events, _ = feed(line)
    assert isinstance(events[0], BadCommand)
    assert events[0].tag is None
    assert events[0].redacted() == b"* ? ***"


def test_utf8_in_quoted_string() -> None:
    events, _ = feed('a1 LOGIN "jürgen@exämple.org" "pässwörd"\r\n'.encode())
    login = events[0]
    assert isinstance(login, Login)
    assert login.user.decode() == "jürgen@exämple.org"
    assert login.password.reveal().decode() == "pässwörd"


def test_unknown_commands_are_kept_raw() -> None:
    raw = b"a1 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM)])\r\n"
    events, _ = feed(raw)
    command = events[0]
    assert type(command) is Command
    assert (command.name, command.args, command.raw) == ("UID", None, raw)


# ---------------------------------------------------------------------------
# literals
# ---------------------------------------------------------------------------


def test_sync_literal_waits_for_the_session() -> None:
    reader = CommandReader()
    reader.receive_data(b"a1 LOGIN {5}\r\n")
    assert reader.next_event() == NeedContinuation(b"a1", "LOGIN", 5)
    assert reader.mode is ReaderMode.CONTINUATION
    with pytest.raises(LocalProtocolError):
        reader.next_event()
    reader.accept_literal()
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"alice {8}\r\n")
    assert reader.next_event() == NeedContinuation(b"a1", "LOGIN", 8)
    reader.accept_literal()
    reader.receive_data(b"p@ss\r\nw!\r\n")
    login = reader.next_event()
    assert isinstance(login, Login)
    assert (login.user, login.password.reveal()) == (b"alice", b"p@ss\r\nw!")
    assert login.frames == (b"a1 LOGIN {5}\r\n", b"alice", b" {8}\r\n", b"p@ss\r\nw!", b"\r\n")
    assert login.raw == LOGIN_SYNC
    assert login.args == (Literal(b"alice", True), Literal(b"p@ss\r\nw!", True))


def test_rejected_sync_literal_drops_the_command() -> None:
    # The client does not send the octets after a NO; its next line is a command.
    events, reader = feed([b"a1 LOGIN {5}\r\n", b"a2 NOOP\r\n"], accept=False)
    assert events[0] == NeedContinuation(b"a1", "LOGIN", 5)
    assert isinstance(events[1], Command)
    assert events[1].tag == b"a2"
    assert reader.discarded == len(b"a1 LOGIN {5}\r\n")


def test_accept_reject_only_when_pending() -> None:
    reader = CommandReader()
    with pytest.raises(LocalProtocolError):
        reader.accept_literal()
    with pytest.raises(LocalProtocolError):
        reader.reject_literal()


def test_non_sync_literals_need_no_continuation() -> None:
    events, _ = feed(LOGIN_PLUS)
    login = events[0]
    assert isinstance(login, Login)
    assert login.password.reveal() == b"p@ss\r\nw!"
    assert login.args == (Literal(b"alice", False), Literal(b"p@ss\r\nw!", False))
    assert login.raw == LOGIN_PLUS


@pytest.mark.parametrize(
    "data", [LOGIN_SYNC, LOGIN_PLUS, b'a1 ID ("k" {4+}\r\na\r\nb "v" NIL)\r\n']
)
def test_every_split_gives_the_same_events(data: bytes) -> None:
    whole, _ = feed(data)
    assert isinstance(whole[-2], Login | Id)
    assert whole[-2].raw == data
    for cut in range(1, len(data)):
        events, reader = feed([data[:cut], data[cut:]])
        assert events == whole, cut
    events, reader = feed(bytewise(data))
    assert events == whole
    assert reader.buffered == b""


def test_literal_of_zero_octets_and_literal8_marker() -> None:
    events, _ = feed(b"a1 LOGIN {0+}\r\n {0}\r\n\r\n")
    login = events[-2]
    assert isinstance(login, Login)
    assert (login.user, login.password.reveal()) == (b"", b"")


def test_marker_inside_quoted_string_is_not_a_literal() -> None:
    events, _ = feed(b'a1 LOGIN "x {5}" pw\r\na2 NOOP\r\n')
    assert isinstance(events[0], Login)
    assert events[0].user == b"x {5}"


@pytest.mark.parametrize("line", [b"a1 LOGIN x{5}\r\n", b"a1 SEARCH TEXT x{5}\r\n"])
def test_marker_glued_to_an_atom_is_refused(line: bytes) -> None:
    # Dovecot and we could frame "x{5}" differently: never relay it.
    events, _ = feed(line + b"a2 NOOP\r\n")
    assert isinstance(events[0], BadCommand)
    assert events[0].tag == b"a1"
    assert isinstance(events[1], Command)


def test_to_non_sync_for_a_literal_plus_backend() -> None:
    events, _ = feed(LOGIN_SYNC)
    assert isinstance(events[2], Login)
    assert to_non_sync(events[2]) == LOGIN_PLUS


# ---------------------------------------------------------------------------
# limits and resynchronisation
# ---------------------------------------------------------------------------

SMALL = ImapLimits(max_line=64, max_auth_line=64, max_literal=16, max_command=100)


def test_line_too_long_is_reported_early_and_skipped() -> None:
    reader = CommandReader(SMALL)
    reader.receive_data(b"a1 NOOP " + b"x" * 100)
    assert reader.next_event() == LineTooLong(b"a1", 64)
    assert reader.next_event() is NEED_DATA  # still skipping to the LF
    reader.receive_data(b"y" * 1000 + b"\r\na2 NOOP\r\n")
    command = reader.next_event()
    assert isinstance(command, Command)
    assert command.tag == b"a2"
    assert reader.discarded == 108 + 1002


def test_over_long_line_announcing_a_non_sync_literal_skips_it() -> None:
    data = b"a1 X " + b"x" * 80 + b" {10+}\r\n0123456789 more\r\na2 NOOP\r\n"
    events, reader = feed(data, limits=SMALL)
    assert events[0] == LineTooLong(b"a1", 64)
    assert isinstance(events[1], Command)
    assert events[1].tag == b"a2"
    assert reader.discarded == len(data) - len(b"a2 NOOP\r\n")


def test_over_long_line_announcing_a_sync_literal_ends_the_command() -> None:
    # The client waits for "+", gets BAD instead and sends no octets.
    data = b"a1 X " + b"x" * 80 + b" {10}\r\na2 NOOP\r\n"
    events, _ = feed(data, limits=SMALL)
    assert events[0] == LineTooLong(b"a1", 64)
    assert isinstance(events[1], Command)
    assert events[1].tag == b"a2"


@pytest.mark.parametrize(
    ("non_sync", "size", "limit"),
    [
        (NonSyncLiterals.NONE, 3, None),
        (NonSyncLiterals.LITERAL_MINUS, 4097, 4096),
        (NonSyncLiterals.LITERAL_PLUS, 70000, 65536),
    ],
)
def test_refused_non_sync_literal_is_skipped(
    non_sync: NonSyncLiterals, size: int, limit: int | None
) -> None:
    # the literal looks like commands: they must be skipped, not run
    literal = (b"z\r\nq9 LOGIN user pw\r\n" * (size // 20 + 1))[:size]
    data = b"a1 LOGIN {%d+}\r\n" % size + literal + b" pw\r\na2 NOOP\r\n"
    events, reader = feed(data, non_sync=non_sync)
    assert len(events) == 3
    assert events[0] == LiteralRefused(b"a1", "LOGIN", size, limit, synchronizing=False)
    assert isinstance(events[1], Command)
    assert events[1].tag == b"a2"
    assert reader.discarded == len(data) - len(b"a2 NOOP\r\n")


def test_literal_minus_allows_small_non_sync_literals() -> None:
    data = b"a1 LOGIN {4096+}\r\n" + b"u" * 4096 + b" pw\r\n"
    events, _ = feed(data, non_sync=NonSyncLiterals.LITERAL_MINUS)
    assert isinstance(events[0], Login)
    assert len(events[0].user) == 4096


def test_refused_sync_literal_sends_no_octets() -> None:
    events, reader = feed(b"a1 LOGIN {99999999999}\r\na2 NOOP\r\n")
    assert events[0] == LiteralRefused(b"a1", "LOGIN", 99999999999, 65536, synchronizing=True)
    assert isinstance(events[1], Command)
    assert reader.discarded == len(b"a1 LOGIN {99999999999}\r\n")


def test_command_budget_covers_all_literals() -> None:
    # each literal is fine alone; together they exceed max_command (100):
    # 86 octets are in when the 4th literal comes, so 14 are left for it
    data = b"a1 ID (" + b" ".join([b"{16+}\r\n" + b"v" * 16] * 4) + b")\r\na2 NOOP\r\n"
    events, reader = feed(data, limits=SMALL)
    assert events[0] == LiteralRefused(b"a1", "ID", 16, 14, synchronizing=False)
    assert isinstance(events[1], Command)
    assert events[1].tag == b"a2"
    assert reader.discarded + len(b"a2 NOOP\r\n") == len(data)


def test_refusals_resync_at_every_split() -> None:
    data = (
        b"a1 LOGIN {70000+}\r\n" + b"z" * 70000 + b"\r\n"
        b"a2 NOOP " + b"x" * 9000 + b" {5+}\r\nhello\r\n"
        b"a3 LOGIN {5}\r\nalice pw\r\n"
    )
    whole, _ = feed(data)
    assert [type(e) for e in whole] == [
        LiteralRefused,
        LineTooLong,
        NeedContinuation,
        Login,
        ClientClosed,
    ]
    for size in (1, 7, 4096):
        pieces = [data[i : i + size] for i in range(0, len(data), size)]
        events, reader = feed(pieces)
        assert events == whole
        assert reader.buffered == b""


# ---------------------------------------------------------------------------
# AUTHENTICATE
# ---------------------------------------------------------------------------


def test_authenticate_with_sasl_ir() -> None:
    events, _ = feed(b"a1 AUTHENTICATE plain AGFsaWNlAHNlY3JldA==\r\na2 AUTHENTICATE PLAIN =\r\n")
    first, second = events[0], events[1]
    assert isinstance(first, Authenticate)
    assert first.mechanism == "PLAIN"
    assert first.initial_response == Secret(b"AGFsaWNlAHNlY3JldA==")
    assert isinstance(second, Authenticate)
    assert second.initial_response == Secret(b"=")


def test_authenticate_exchange_and_cancel() -> None:
    reader = CommandReader()
    reader.receive_data(b"a1 AUTHENTICATE LOGIN\r\nYWxpY2U=\r\n*\r\na2 NOOP\r\n")
    auth = reader.next_event()
    assert isinstance(auth, Authenticate)
    assert auth.initial_response is None
    reader.expect_auth_response()  # the backend sent "+ VXNlcm5hbWU6"
    assert mode_of(reader) is ReaderMode.AUTH_RESPONSE
    user = reader.next_event()
    assert user == AuthenticateResponse(Secret(b"YWxpY2U="), b"YWxpY2U=\r\n")
    assert isinstance(user, AuthenticateResponse)
    assert not user.is_cancel
    assert user.redacted() == b"***"
    reader.expect_auth_response()
    cancel = reader.next_event()
    assert isinstance(cancel, AuthenticateResponse)
    assert cancel.is_cancel
    assert mode_of(reader) is ReaderMode.COMMAND
    noop = reader.next_event()
    assert isinstance(noop, Command)
    assert noop.name == "NOOP"


def test_without_expect_a_sasl_line_is_a_bad_command() -> None:
    events, _ = feed(b"a1 AUTHENTICATE LOGIN\r\nYWxpY2U=\r\n")
    assert isinstance(events[1], BadCommand)
    assert events[1].tag is None


def test_over_long_auth_line() -> None:
    reader = CommandReader(SMALL)
    reader.receive_data(b"a1 AUTHENTICATE GSSAPI\r\n")
    assert isinstance(reader.next_event(), Authenticate)
    reader.expect_auth_response()
    reader.receive_data(b"A" * 100 + b"{5+}\r\na2 NOOP\r\n")
    assert reader.next_event() == LineTooLong(None, 64)
    command = reader.next_event()  # a marker in a SASL line announces nothing
    assert isinstance(command, Command)
    assert command.tag == b"a2"


def test_expect_auth_response_only_between_commands() -> None:
    reader = CommandReader()
    reader.receive_data(b"a1 LOGIN {5}\r\n")
    assert isinstance(reader.next_event(), NeedContinuation)
    with pytest.raises(LocalProtocolError):
        reader.expect_auth_response()


# ---------------------------------------------------------------------------
# ID, ENABLE, formatting, redaction
# ---------------------------------------------------------------------------


def test_id_parse_and_reserialize() -> None:
    events, _ = feed(
        b'a1 ID ("name" "Thunderbird" "version" {4+}\r\n115. "os" NIL)\r\na2 ID nil\r\n'
    )
    first, second = events[0], events[1]
    assert isinstance(first, Id)
    assert first.params == ((b"name", b"Thunderbird"), (b"version", b"115."), (b"os", None))
    assert isinstance(second, Id)
    assert second.params is None
    assert first.params is not None
    params = (*first.params, (b"x-originating-ip", b"192.0.2.7"), (b'q"\\', b"v"))
    wire = format_id(b"p1", params)
    assert wire == (
        b'p1 ID ("name" "Thunderbird" "version" "115." "os" NIL '
        b'"x-originating-ip" "192.0.2.7" "q\\"\\\\" "v")\r\n'
    )
    again, _ = feed(wire)
    assert isinstance(again[0], Id)
    assert again[0].params == params
    assert format_id(b"p2", None) == b"p2 ID NIL\r\n"
    with pytest.raises(LocalProtocolError):
        format_id(b"p3", ((b"k", b"line\r\nbreak"),))


def test_enable() -> None:
    events, _ = feed(b"a1 ENABLE utf8=accept CONDSTORE\r\n")
    assert isinstance(events[0], Enable)
    assert events[0].capabilities == ("UTF8=ACCEPT", "CONDSTORE")


def test_format_command() -> None:
    args = (Atom(b"INBOX"), ParenList((Quoted(b"a b"), NIL)), Literal(b"xy", synchronizing=False))
    assert format_command(b"t1", "select", args) == b't1 SELECT INBOX ("a b" NIL) {2+}\r\nxy\r\n'
    with pytest.raises(LocalProtocolError):
        format_command(b"t 1", "NOOP")
    with pytest.raises(LocalProtocolError):
        format_command(b"t1", "APPEND", (Literal(b"x"),))
    with pytest.raises(LocalProtocolError):
        format_command(b"t1", "X", (Atom(b"a b"),))


def test_redaction_never_shows_credentials() -> None:
    data = (
        b'a1 LOGIN alice "s3cr3t-pw"\r\n'
        b"a2 AUTHENTICATE PLAIN AGFsaWNlAHMzY3IzdC1wdw==\r\n"
        b'a3 LOGIN "s3cr3t-pw"\r\n'  # malformed: one argument
        b"a4 LOGIN {9+}\r\ns3cr3t-pw\r\n"  # malformed, password in a literal
    )
    events, _ = feed(data)
    redacted = [e.redacted() for e in events if isinstance(e, Command | BadCommand)]
    assert redacted == [
        b'a1 LOGIN "alice" ***',
        b"a2 AUTHENTICATE PLAIN ***",
        b"a3 LOGIN ***",
        b"a4 LOGIN ***",
    ]
    for event in events:
        assert b"s3cr3t" not in repr(event).encode()
        assert "AGFsaWNl" not in repr(event)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_line"):
        ImapLimits(max_line=10)
    with pytest.raises(ValueError, match="max_command"):
        ImapLimits(max_line=1000, max_command=500)


def test_eof_keeps_unfinished_command_buffered() -> None:
    events, reader = feed(b"a1 LOGIN {5+}\r\nali")
    assert events == [ClientClosed()]
    assert reader.buffered == b"a1 LOGIN {5+}\r\nali"
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"x")


# ---------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------

GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
    b"STARTTLS AUTH=PLAIN AUTH=LOGIN] Dovecot ready.\r\n"
)


def test_status_and_continuation_responses() -> None:
    data = (
        GREETING + b"+ UmVhZHk=\r\n+\r\n* BYE\r\n"
        b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\na2 bad oops {5}\r\n"
    )
    events = responses(data)
    greeting = events[0]
    assert isinstance(greeting, Untagged)
    assert greeting.is_status
    assert greeting.code == ResponseCode(
        "CAPABILITY",
        b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN",
    )
    assert greeting.text == b"Dovecot ready."
    assert events[1] == ContinuationRequest(b"UmVhZHk=", (b"+ UmVhZHk=\r\n",))
    assert events[2] == ContinuationRequest(b"", (b"+\r\n",))
    assert events[3] == Untagged("BYE", None, None, b"", (b"* BYE\r\n",))
    failed = events[4]
    assert isinstance(failed, Tagged)
    assert (failed.tag, failed.status, failed.code) == (
        b"a1",
        "NO",
        ResponseCode("AUTHENTICATIONFAILED"),
    )
    # free text of a status response is never a literal
    last = events[5]
    assert isinstance(last, Tagged)
    assert (last.status, last.text) == ("BAD", b"oops {5}")


FETCH = (
    b"* 1 FETCH (UID 7 BODY[] {12}\r\nHello\r\n)\r\n\r\n FLAGS (\\Seen))\r\n"
    b'* 2 FETCH (ENVELOPE ("subj {3}" NIL) BODY[TEXT] ~{3}\r\nabc BODY[1] {0}\r\n)\r\n'
    b"a3 OK Fetch completed.\r\n"
)


def test_fetch_literals_frame_whole_responses() -> None:
    events = responses(FETCH)
    assert len(events) == 3
    first = events[0]
    assert isinstance(first, Untagged)
    assert (first.name, first.number) == ("FETCH", 1)
    assert first.frames == (
        b"* 1 FETCH (UID 7 BODY[] {12}\r\n",
        b"Hello\r\n)\r\n\r\n",
        b" FLAGS (\\Seen))\r\n",
    )
    second = events[1]
    assert isinstance(second, Untagged)
    assert second.frames[1::2] == (b"abc", b"")
    assert b"".join(e.raw for e in events if not isinstance(e, ServerClosed)) == FETCH
    for cut in range(1, len(FETCH)):
        assert responses([FETCH[:cut], FETCH[cut:]]) == events, cut
    assert responses(bytewise(FETCH)) == events


def test_response_errors_are_remote_protocol_errors_and_sticky() -> None:
    for bad in (b"garbage\r\n", b"a1 MAYBE x\r\n", b"* \r\n", b"+x\r\n", b"* OK [oops\r\n"):
        reader = ResponseReader()
        reader.receive_data(bad)
        with pytest.raises(RemoteProtocolError) as info:
            reader.next_event()
        assert info.value.reply_hint is None
        with pytest.raises(RemoteProtocolError):
            reader.next_event()


def test_response_limits() -> None:
    limits = ImapLimits(max_response_line=64, max_response_literal=10, max_response=100)
    reader = ResponseReader(limits)
    reader.receive_data(b"* 1 FETCH (BODY[] {11}\r\n")
    with pytest.raises(RemoteProtocolError, match="literal too large"):
        reader.next_event()
    reader = ResponseReader(limits)
    reader.receive_data(b"* OK " + b"x" * 100)
    with pytest.raises(RemoteProtocolError, match="line too long"):
        reader.next_event()


def test_server_closed_keeps_unfinished_response() -> None:
    reader = ResponseReader()
    reader.receive_data(b"* 1 FETCH (BODY[] {5}\r\nhel")
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    assert reader.next_event() == ServerClosed()
    assert reader.buffered == b"* 1 FETCH (BODY[] {5}\r\nhel"


# ---------------------------------------------------------------------------
# CAPABILITY rewrite
# ---------------------------------------------------------------------------


def test_capability_rewrite_in_all_three_places() -> None:
    data = (
        GREETING
        + b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n"
        + b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    )
    greeting, untagged, tagged = responses(data)
    assert isinstance(greeting, Untagged)
    assert isinstance(untagged, Untagged)
    assert isinstance(tagged, Tagged)
    assert untagged.capabilities == ("IMAP4rev1", "STARTTLS", "AUTH=PLAIN")
    assert tagged.capabilities == ("IMAP4rev1", "IDLE")
    remove, add = ["auth=", "starttls", "literal+"], ["LOGINDISABLED", "LITERAL-"]
    assert rewrite_capabilities(greeting, remove=remove, add=add) == (
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LOGINDISABLED "
        b"LITERAL-] Dovecot ready.\r\n"
    )
    assert rewrite_capabilities(untagged, remove=remove, add=add) == (
        b"* CAPABILITY IMAP4rev1 LOGINDISABLED LITERAL-\r\n"
    )
    assert rewrite_capabilities(tagged, add=["ID", "idle"]) == (
        b"a1 OK [CAPABILITY IMAP4rev1 IDLE ID] Logged in\r\n"
    )
    assert rewrite_capabilities(greeting) == GREETING  # no-op keeps the bytes
    no_caps = responses(b"a2 OK done\r\n")[0]
    assert isinstance(no_caps, Tagged)
    with pytest.raises(LocalProtocolError):
        rewrite_capabilities(no_caps)


def test_edit_capabilities() -> None:
    caps = ("IMAP4rev1", "AUTH=PLAIN", "AUTH=LOGIN", "LITERAL+")
    assert edit_capabilities(caps, remove=["AUTH="]) == ("IMAP4rev1", "LITERAL+")
    assert edit_capabilities(caps, remove=["auth=plain"], add=["literal+"]) == (
        "IMAP4rev1",
        "AUTH=LOGIN",
        "LITERAL+",
    )


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------

_FRAGMENTS = st.sampled_from(
    [
        b"a1 NOOP\r\n",
        b"a2 LOGIN {5}\r\nalice pw\r\n",
        b"a3 LOGIN {3+}\r\nbob {4+}\r\nx\r\ny\r\n",
        b'a4 ID ("k" "v")\r\n',
        b"a5 APPEND INBOX {100+}\r\n" + b"m" * 100 + b"\r\n",
        b"a6 X " + b"l" * 70 + b"\r\n",
        b"a7 LOGIN {999}\r\n",
        b"\r\n",
        b"a8 AUTHENTICATE PLAIN =\r\n",
        b'a9 LOGIN "q\\"x" y\r\n',
        b"garbage \x00\r",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=8), st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_any_split_same_events_and_all_octets_accounted(
    fragments: list[bytes], sizes: list[int]
) -> None:
    data = b"".join(fragments)
    whole, reader = feed(data, limits=SMALL)
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        pieces.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    events, other = feed(pieces, limits=SMALL)
    assert events == whole
    assert (other.discarded, other.buffered) == (reader.discarded, reader.buffered)
    used = sum(
        len(e.raw) for e in events if isinstance(e, Command | BadCommand | AuthenticateResponse)
    )
    assert used + reader.discarded + len(reader.buffered) == len(data)
    assert data.endswith(reader.buffered)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=6))
def test_quoted_round_trip(values: list[bytes]) -> None:
    clean = [v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"") for v in values]
    clean = [v for v in clean if v.isascii()]
    wire = format_command(b"t", "X", [Quoted(v) for v in clean])
    command = CommandReader()
    command.receive_data(wire)
    event = command.next_event()
    assert isinstance(event, Command)
    assert event.raw == wire
    if len(clean) == 2:
        login = format_command(b"t", "LOGIN", [Quoted(v) for v in clean])
        reader = CommandReader()
        reader.receive_data(login)
        parsed = reader.next_event()
        assert isinstance(parsed, Login)
        assert (parsed.user, parsed.password.reveal()) == (clean[0], clean[1])
