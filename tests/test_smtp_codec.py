"""Tests for the sans-IO SMTP codec (mailmoat.protocols.smtp)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailmoat.errors import LocalProtocolError, RemoteProtocolError
from mailmoat.protocols.smtp import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ClientClosed,
    ClientEvent,
    Command,
    CommandReader,
    DataChunk,
    EndOfData,
    Extension,
    Hello,
    LineTooLong,
    MailFrom,
    RcptTo,
    ReaderMode,
    Reply,
    ReplyReader,
    ServerClosed,
    ServerEvent,
    SmtpLimits,
    format_command,
    format_ehlo,
    parse_ehlo,
    reply,
)
from mailmoat.secret import Secret

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

DEFAULT = SmtpLimits()


def mode_of(reader: CommandReader) -> ReaderMode:
    # A call, so that mypy does not keep a narrowed property across calls.
    return reader.mode


def drain(reader: CommandReader) -> list[ClientEvent]:
    out: list[ClientEvent] = []
    while (event := reader.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, ClientClosed):
            break
    return out


def feed(data: bytes, *, mode: str = "command", limits: SmtpLimits = DEFAULT) -> CommandReader:
    reader = CommandReader(limits)
    if mode == "data":
        reader.expect_data()
    elif mode == "auth":
        reader.expect_auth_response()
    if data:  # b"" would mean EOF
        reader.receive_data(data)
    return reader


def events_of(data: bytes, **kwargs: object) -> list[ClientEvent]:
    return drain(feed(data, **kwargs))  # type: ignore[arg-type]


def run_session(pieces: Iterable[bytes], limits: SmtpLimits = DEFAULT) -> list[object]:
    """Feed pieces then EOF like a session whose server accepts DATA and AUTH.

    Consecutive DataChunks are merged into one (data, bare_lf, bare_cr, any
    long_line) tuple, since chunking differs by design.
    """
    reader = CommandReader(limits)
    out: list[object] = []
    for piece in [*pieces, b""]:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            if isinstance(event, DataChunk):
                if out and isinstance(out[-1], tuple):
                    data, lf, cr, long_ = out[-1]
                    out[-1] = (
                        data + event.data,
                        lf + event.bare_lf,
                        cr + event.bare_cr,
                        long_ or event.long_line,
                    )
                else:
                    out.append((event.data, event.bare_lf, event.bare_cr, event.long_line))
                continue
            out.append(event)
            if isinstance(event, ClientClosed):
                out.append(("leftover", reader.buffered))
                return out
            if isinstance(event, Command) and event.verb == "DATA":
                reader.expect_data()
            elif isinstance(event, Command) and event.verb == "AUTH":
                reader.expect_auth_response()
    raise AssertionError("no ClientClosed")


def pieces_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def body_events(body: bytes, limits: SmtpLimits = DEFAULT) -> list[ClientEvent]:
    return events_of(body, mode="data", limits=limits)


SESSION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<a@example.org> SIZE=42\r\n"
    b"RCPT TO:<b@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: t\r\n\r\n..dot\r\nbare\nlf\r\nbare\rcr\r\n.\r\n"
    b"AUTH PLAIN\r\n"
    b"AGFAYg==\r\n"
    b"QUIT\r\n"
)

# ---------------------------------------------------------------------------
# limits and event construction
# ---------------------------------------------------------------------------


def test_limits_defaults_are_rfc_minimums() -> None:
    limits = SmtpLimits()
    assert (limits.max_command_line, limits.max_param_line, limits.max_auth_line) == (
        512,
        1024,
        12288,
    )
    assert limits.max_text_line == 1000
    assert limits.max_any_command_line == 12288


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_command_line": 31},
        {"max_param_line": 0},
        {"max_auth_line": -1},
        {"max_reply_line": 10},
        {"max_reply_lines": 0},
        {"max_text_line": 0},
    ],
)
def test_limits_reject_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SmtpLimits(**kwargs)


def test_events_validate() -> None:
    with pytest.raises(LocalProtocolError):
        Command("NOOP", b"", b"NOOP")  # no line ending
    with pytest.raises(LocalProtocolError):
        Command("noop", b"", b"noop\r\n")  # verbs are upper-case
    with pytest.raises(LocalProtocolError):
        Hello("HELO", b"x", b"HELO x\r\n", "x", True)
    with pytest.raises(LocalProtocolError):
        RcptTo("RCPT", b"TO:<>", b"RCPT TO:<>\r\n", b"")
    with pytest.raises(LocalProtocolError):
        MailFrom("MAIL", b"", b"MAIL\r\n", b"", (("size", b"1"),))
    with pytest.raises(LocalProtocolError):
        Auth("AUTH", b"plain", b"AUTH plain\r\n", "plain")
    with pytest.raises(LocalProtocolError):
        LineTooLong(10, 10)
    with pytest.raises(LocalProtocolError):
        DataChunk(b"x", bare_lf=-1)
    with pytest.raises(LocalProtocolError):
        Reply(199, (b"",))
    with pytest.raises(LocalProtocolError):
        Reply(250, ())
    with pytest.raises(LocalProtocolError):
        Reply(250, (b"a\r\n250 injected",))


def test_need_data_is_a_unique_sentinel() -> None:
    reader = CommandReader()
    assert reader.next_event() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"


def test_secrets_do_not_reach_repr() -> None:
    [auth] = events_of(b"AUTH PLAIN AGFAYg==\r\n")
    assert isinstance(auth, Auth)
    assert "AGFAYg" not in repr(auth)
    assert auth.redacted() == b"AUTH PLAIN ***"
    reader = feed(b"c2VjcmV0\r\n", mode="auth")
    [response] = drain(reader)
    assert isinstance(response, AuthResponse)
    assert "c2VjcmV0" not in repr(response)
    assert response.redacted() == b"***"


# ---------------------------------------------------------------------------
# command parsing
# ---------------------------------------------------------------------------


def test_command_fields() -> None:
    [noop, rset, weird, empty] = events_of(b"noop hello  world\r\nRSET\nN0OP x\r\n\r\n")
    assert noop == Command("NOOP", b"hello  world", b"noop hello  world\r\n")
    assert noop.redacted() == b"noop hello  world\r\n"
    assert rset == Command("RSET", b"", b"RSET\n", bare_lf=True)
    assert weird == Command("", b"N0OP x", b"N0OP x\r\n")
    assert empty == Command("", b"", b"\r\n")


def test_verb_is_at_most_16_letters() -> None:
    [ok, too_long] = events_of(b"ABCDEFGHIJKLMNOP x\r\nABCDEFGHIJKLMNOPQ x\r\n")
    assert isinstance(ok, Command)
    assert isinstance(too_long, Command)
    assert ok.verb == "ABCDEFGHIJKLMNOP"
    assert too_long.verb == ""
    assert isinstance(too_long, Command)
    assert too_long.args == b"ABCDEFGHIJKLMNOPQ x"


def test_non_ascii_verb() -> None:
    [event] = events_of("NÖOP\r\n".encode())
    assert isinstance(event, Command)
    assert event.verb == ""


@pytest.mark.parametrize(
    ("line", "name", "extended"),
    [
        (b"EHLO mx.example.org\r\n", "mx.example.org", True),
        (b"helo [192.0.2.1]\r\n", "[192.0.2.1]", False),
        (b"EHLO\r\n", "", True),
        (b"EHLO   spaced.example  junk\r\n", "spaced.example", True),
        (b"EHLO \xff.example\r\n", "\\xff.example", True),
    ],
)
def test_hello(line: bytes, name: str, extended: bool) -> None:
    [event] = events_of(line)
    assert isinstance(event, Hello)
    assert (event.name, event.extended, event.line) == (name, extended, line)


@pytest.mark.parametrize(
    ("line", "address", "params"),
    [
        (b"MAIL FROM:<a@example.org>\r\n", b"a@example.org", ()),
        (b"MAIL FROM: <a@example.org>\r\n", b"a@example.org", ()),
        (b"mail from:<a@example.org>\r\n", b"a@example.org", ()),
        (b"MAIL FROM:<>\r\n", b"", ()),
        (b"MAIL FROM:a@example.org\r\n", b"a@example.org", ()),
        (
            b"MAIL FROM:<a@example.org> size=10 BODY=8BITMIME SMTPUTF8\r\n",
            b"a@example.org",
            (("SIZE", b"10"), ("BODY", b"8BITMIME"), ("SMTPUTF8", None)),
        ),
        (b"MAIL FROM:<a@example.org> \r\n", b"a@example.org", ()),
        (b'MAIL FROM:<"john doe>"@example.org>\r\n', b'"john doe>"@example.org', ()),
        (b"MAIL FROM:<@r1.example:a@example.org>\r\n", b"@r1.example:a@example.org", ()),
        ("MAIL FROM:<jörg@bücher.example>\r\n".encode(), "jörg@bücher.example".encode(), ()),
    ],
)
def test_mail_from(
    line: bytes, address: bytes, params: tuple[tuple[str, bytes | None], ...]
) -> None:
    [event] = events_of(line)
    assert isinstance(event, MailFrom)
    assert (event.address, event.params, event.line) == (address, params, line)


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL\r\n",
        b"MAIL FROM\r\n",
        b"MAIL TO:<a@b>\r\n",
        b"MAIL FROM:<a@b\r\n",
        b"MAIL FROM:<a@b>x\r\n",
        b"MAIL FROM:<a@b> SIZE=\r\n",
        b"MAIL FROM:<a@b> =1\r\n",
        b"MAIL FROM:<a<b>\r\n",
        b'MAIL FROM:<"a@b>\r\n',
        b"MAIL  FROM:<a@b>\r\n",
        b"MAIL FROM:<a b@c>\r\n",
    ],
)
def test_mail_from_unparsable_is_plain_command(line: bytes) -> None:
    [event] = events_of(line)
    assert type(event) is Command
    assert event.verb == "MAIL"


def test_rcpt_to() -> None:
    line = b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net\r\n"
    [event, null, bare] = events_of(line + b"RCPT TO:<>\r\nrcpt to: <Postmaster>\n")
    assert isinstance(event, RcptTo)
    assert event.address == b"b@example.net"
    assert event.params == (("NOTIFY", b"SUCCESS,FAILURE"), ("ORCPT", b"rfc822;b@example.net"))
    # RFC 5321: RCPT needs a forward-path; <> is not one.
    assert type(null) is Command
    assert null.verb == "RCPT"
    assert isinstance(bare, RcptTo)
    assert (bare.address, bare.bare_lf) == (b"Postmaster", True)


def test_auth() -> None:
    events = events_of(
        b"AUTH PLAIN AGFAYg==\r\nauth login\r\nAUTH PLAIN =\r\nAUTH\r\nAUTH PLAIN a b\r\n"
    )
    assert [type(e) for e in events] == [Auth, Auth, Auth, Command, Command]
    first, login, empty, bare, extra = events
    assert isinstance(first, Auth)
    assert isinstance(login, Auth)
    assert isinstance(empty, Auth)
    assert isinstance(bare, Command)
    assert isinstance(extra, Command)
    assert (first.mechanism, first.initial_response) == ("PLAIN", Secret(b"AGFAYg=="))
    assert (login.mechanism, login.initial_response) == ("LOGIN", None)
    assert login.redacted() == b"AUTH LOGIN"
    assert empty.initial_response == Secret(b"=")
    # Unparsable AUTH lines may still hold secrets.
    assert bare.redacted() == b"AUTH ***"
    assert extra.redacted() == b"AUTH ***"


def test_auth_responses_then_back_to_commands() -> None:
    reader = feed(b"AUTH LOGIN\r\n")
    [auth] = drain(reader)
    assert isinstance(auth, Auth)
    reader.expect_auth_response()
    assert reader.mode is ReaderMode.AUTH_RESPONSE
    reader.receive_data(b"dXNlcg==\r\n")
    [user] = drain(reader)
    assert user == AuthResponse(Secret(b"dXNlcg=="), b"dXNlcg==\r\n")
    assert mode_of(reader) is ReaderMode.COMMAND
    reader.expect_auth_response()
    reader.receive_data(b"*\nNOOP\r\n")
    [cancel, noop] = drain(reader)
    assert isinstance(cancel, AuthResponse)
    assert cancel.is_cancel
    assert cancel.bare_lf
    assert cancel.redacted() == b"*"
    assert noop == Command("NOOP", b"", b"NOOP\r\n")


def test_format_command() -> None:
    assert format_command("mail", b"FROM:<a@b>") == b"MAIL FROM:<a@b>\r\n"
    assert format_command("QUIT") == b"QUIT\r\n"
    with pytest.raises(LocalProtocolError):
        format_command("RCPT", b"TO:<a@b>\r\nRCPT TO:<c@d>")
    with pytest.raises(LocalProtocolError):
        format_command("NO OP")
    with pytest.raises(LocalProtocolError):
        format_command("")


# ---------------------------------------------------------------------------
# line limits
# ---------------------------------------------------------------------------


def test_line_limit_boundaries() -> None:
    ok = b"NOOP " + b"x" * 505 + b"\r\n"
    assert len(ok) == 512
    [event, too_long, quit_] = events_of(ok + b"NOOP " + b"x" * 506 + b"\r\nQUIT\r\n")
    assert isinstance(event, Command)
    assert event.line == ok
    assert too_long == LineTooLong(512, 513)
    assert quit_ == Command("QUIT", b"", b"QUIT\r\n")


def test_line_limit_depends_on_verb() -> None:
    mail = b"MAIL FROM:<" + b"a" * 1000 + b"@b>\r\n"
    assert 512 < len(mail) <= 1024
    auth = b"AUTH PLAIN " + b"A" * 12000 + b"\r\n"
    events = events_of(mail + auth + b"NOOP " + b"x" * 600 + b"\r\n")
    assert [type(e) for e in events] == [MailFrom, Auth, LineTooLong]
    assert events[2] == LineTooLong(512, 607)


def test_line_too_long_discards_until_lf_across_receives() -> None:
    reader = feed(b"NOOP " + b"x" * 600)
    assert drain(reader) == []
    assert reader.buffered == b""  # nothing of an over-long line is kept
    reader.receive_data(b"y" * 100_000)
    assert drain(reader) == []
    assert reader.buffered == b""
    reader.receive_data(b"z\r\nRSET\r\n")
    assert drain(reader) == [LineTooLong(512, 100_608), Command("RSET", b"", b"RSET\r\n")]


def test_line_too_long_at_eof() -> None:
    reader = feed(b"x" * 700)
    reader.receive_data(b"")
    assert drain(reader) == [LineTooLong(512, 700), ClientClosed()]


def test_auth_response_limit_then_command_mode() -> None:
    limits = SmtpLimits(max_auth_line=64)
    reader = feed(b"A" * 100 + b"\r\nNOOP\r\n", mode="auth", limits=limits)
    assert drain(reader) == [LineTooLong(64, 102), Command("NOOP", b"", b"NOOP\r\n")]
    assert reader.mode is ReaderMode.COMMAND


# ---------------------------------------------------------------------------
# pipelining, STARTTLS, EOF
# ---------------------------------------------------------------------------


def test_pipelined_commands_in_one_packet() -> None:
    events = run_session(
        [
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
            b"RCPT TO:<e@d.example>\r\nDATA\r\n",
            b"body\r\n.\r\nQUIT\r\n",
        ]
    )
    assert [type(e).__name__ for e in events] == [
        "MailFrom",
        "RcptTo",
        "RcptTo",
        "Command",
        "tuple",
        "EndOfData",
        "Command",
        "ClientClosed",
        "tuple",
    ]
    assert events[4] == (b"body\r\n", 0, 0, False)
    assert events[5] == EndOfData(6)


def test_reader_waits_for_the_session_after_data() -> None:
    reader = feed(b"DATA\r\nSubject: x\r\n")
    data = reader.next_event()
    assert isinstance(data, Command)
    assert data.verb == "DATA"
    assert reader.buffered == b"Subject: x\r\n"  # until the session saw the 354
    reader.expect_data()
    [chunk] = drain(reader)
    assert isinstance(chunk, DataChunk)
    assert chunk.data == b"Subject: x"  # the CRLF may start a terminator


def test_buffered_after_starttls() -> None:
    reader = feed(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n")
    [starttls] = drain(reader)[:1]
    assert starttls == Command("STARTTLS", b"", b"STARTTLS\r\n")
    # drain() consumed the injected commands too; do it the way a session must:
    reader = feed(b"STARTTLS\r\nRSET\r\n")
    event = reader.next_event()
    assert isinstance(event, Command)
    assert event.verb == "STARTTLS"
    assert reader.buffered == b"RSET\r\n"
    assert reader.discard_buffer() == b"RSET\r\n"
    assert reader.buffered == b""
    assert reader.next_event() is NEED_DATA


def test_eof_mid_line_leaves_the_partial_line_buffered() -> None:
    reader = feed(b"NOOP\r\nMAIL FROM:<a@b")
    reader.receive_data(b"")
    assert drain(reader) == [Command("NOOP", b"", b"NOOP\r\n"), ClientClosed()]
    assert reader.mode is ReaderMode.CLOSED
    assert reader.buffered == b"MAIL FROM:<a@b"
    assert reader.next_event() == ClientClosed()
    reader.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")


def test_eof_mid_body() -> None:
    reader = feed(b"unfinished\r\n.", mode="data")
    reader.receive_data(b"")
    [chunk, closed] = drain(reader)
    assert isinstance(chunk, DataChunk)
    assert chunk.data == b"unfinished"
    assert closed == ClientClosed()
    assert reader.buffered == b"\r\n."


def test_wrong_mode_calls() -> None:
    reader = feed(b"", mode="data")
    with pytest.raises(LocalProtocolError):
        reader.expect_data()
    with pytest.raises(LocalProtocolError):
        reader.expect_auth_response()
    assert reader.mode is ReaderMode.DATA
    reader = feed(b"", mode="auth")
    with pytest.raises(LocalProtocolError):
        reader.expect_data()
    reader = feed(b"")
    reader.receive_data(b"")
    assert drain(reader) == [ClientClosed()]
    with pytest.raises(LocalProtocolError):
        reader.expect_data()


# ---------------------------------------------------------------------------
# DATA
# ---------------------------------------------------------------------------


def test_empty_body() -> None:
    reader = feed(b".\r\nQUIT\r\n", mode="data")
    assert drain(reader) == [EndOfData(0), Command("QUIT", b"", b"QUIT\r\n")]
    assert reader.mode is ReaderMode.COMMAND


def test_body_with_an_empty_line_only() -> None:
    assert body_events(b"\r\n.\r\n") == [DataChunk(b"\r\n"), EndOfData(2)]


def test_dot_stuffed_lines_are_untouched() -> None:
    body = b"..foo\r\n...\r\n. \r\n.\r\r\n"
    events = body_events(body + b".\r\n")
    assert events == [DataChunk(body, bare_cr=1), EndOfData(len(body), bare_cr=1)]


def test_body_ending_without_crlf_before_the_dot() -> None:
    # "text." CRLF is an ordinary line, and ".\r\n" only counts after CRLF.
    reader = feed(b"text.\r\nmore\n.\r\n", mode="data")
    [chunk] = drain(reader)
    assert isinstance(chunk, DataChunk)
    assert (chunk.data, chunk.bare_lf) == (b"text.\r\nmore\n.", 1)
    assert reader.buffered == b"\r\n"
    reader.receive_data(b".\r\n")
    assert drain(reader) == [DataChunk(b"\r\n"), EndOfData(15, bare_lf=1)]


@pytest.mark.parametrize(
    "smuggled",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r\r\n", b"\r\n\x00.\r\n"],
)
def test_non_terminators_stay_in_the_body(smuggled: bytes) -> None:
    body = b"a" + smuggled + b"MAIL FROM:<x@y>\r\n"
    events = run_session([b"DATA\r\n", body, b".\r\n"])
    assert events[1][0] == body  # type: ignore[index]
    assert isinstance(events[2], EndOfData)
    assert events[2].size == len(body)
    assert events[2].bare_lf + events[2].bare_cr == len(re.findall(rb"(?<!\r)\n|\r(?!\n)", body))


def test_bare_lf_and_cr_counts() -> None:
    body = b"\nA\rB\n\r\r\nC\r\n"
    [chunk, end] = body_events(body + b".\r\n")
    # LF at 0 (after the DATA line's CRLF) and after B; CR after A and the first of "\r\r\n".
    assert chunk == DataChunk(body, bare_lf=2, bare_cr=2)
    assert end == EndOfData(len(body), bare_lf=2, bare_cr=2)


def test_cr_at_a_chunk_boundary_is_held_back() -> None:
    reader = feed(b"line\r", mode="data")
    [chunk] = drain(reader)
    assert chunk == DataChunk(b"line")
    assert reader.buffered == b"\r"
    reader.receive_data(b"\nnext\r")
    [chunk] = drain(reader)
    assert chunk == DataChunk(b"\r\nnext")  # the CRLF was not a bare CR
    reader.receive_data(b"x\r\n.\r\n")
    [chunk, end] = drain(reader)
    assert chunk == DataChunk(b"\rx\r\n", bare_cr=1)
    assert end == EndOfData(14, bare_cr=1)


@pytest.mark.parametrize("cut", range(1, 12))
def test_terminator_split_at_every_boundary(cut: int) -> None:
    data = b"abc\r\n.\r\nNOOP\r\n"
    events = run_session([b"DATA\r\n", data[:cut], data[cut:]])
    assert events[1:] == [
        (b"abc\r\n", 0, 0, False),
        EndOfData(5),
        Command("NOOP", b"", b"NOOP\r\n"),
        ClientClosed(),
        ("leftover", b""),
    ]


@pytest.mark.parametrize("cut", range(1, 3))
def test_empty_body_terminator_split(cut: int) -> None:
    reader = feed(b".\r\n"[:cut], mode="data")
    assert drain(reader) == []
    reader.receive_data(b".\r\n"[cut:])
    assert drain(reader) == [EndOfData(0)]


def test_terminator_exactly_at_a_receive_boundary() -> None:
    reader = feed(b"x" * 100, mode="data")
    assert drain(reader) == [DataChunk(b"x" * 100)]
    reader.receive_data(b"\r\n.\r\n")
    assert drain(reader) == [DataChunk(b"\r\n"), EndOfData(102)]


def test_one_chunk_per_receive() -> None:
    reader = feed(b"", mode="data")
    sizes = []
    for _ in range(10):
        reader.receive_data(b"0123456789" * 6 + b"\r\n" + b"x" * 1000)
        events = drain(reader)
        assert len(events) == 1
        assert isinstance(events[0], DataChunk)
        sizes.append(len(events[0].data))
    assert sizes == [1062] * 10


@pytest.mark.parametrize("text_limit", [10, 1000])
def test_long_lines_across_chunks(text_limit: int) -> None:
    limits = SmtpLimits(max_text_line=text_limit)
    ok = b"a" * (text_limit - 2) + b"\r\n"  # exactly the limit incl. CRLF
    long_ = b"b" * (text_limit - 1) + b"\r\n"  # one more
    body = ok + long_ + ok + long_ + long_
    reader = feed(b"", mode="data", limits=limits)
    flags = []
    for piece in pieces_at(body, range(0, len(body), 3)):
        reader.receive_data(piece)
        flags += [e.long_line for e in drain(reader) if isinstance(e, DataChunk)]
    reader.receive_data(b".\r\n")
    events = drain(reader)
    assert events[-1] == EndOfData(len(body), long_lines=3)
    flags += [e.long_line for e in events if isinstance(e, DataChunk)]
    assert flags.count(True) == 3  # each long line is flagged in exactly one chunk


def test_long_line_check_can_be_disabled() -> None:
    events = body_events(b"x" * 5000 + b"\r\n.\r\n", limits=SmtpLimits(max_text_line=None))
    assert events == [DataChunk(b"x" * 5000 + b"\r\n"), EndOfData(5002)]


def test_unterminated_long_line_is_counted_once() -> None:
    limits = SmtpLimits(max_text_line=10)
    reader = feed(b"", mode="data", limits=limits)
    flags = []
    for _ in range(5):
        reader.receive_data(b"y" * 7)
        flags += [e.long_line for e in drain(reader) if isinstance(e, DataChunk)]
    reader.receive_data(b"\r\n.\r\n")
    events = drain(reader)
    assert events[-1] == EndOfData(37, long_lines=1)
    assert flags == [False, True, False, False, False]


def test_after_end_of_data_back_to_command_mode_with_fresh_counters() -> None:
    events = run_session(
        [b"DATA\r\na\nb\r\n.\r\nDATA\r\nclean\r\n.\r\n"], limits=SmtpLimits(max_text_line=3)
    )
    assert events[1:3] == [(b"a\nb\r\n", 1, 0, False), EndOfData(5, bare_lf=1)]
    assert events[4:6] == [(b"clean\r\n", 0, 0, True), EndOfData(7, long_lines=1)]


def test_whole_session() -> None:
    events = run_session([SESSION])
    body = b"Subject: t\r\n\r\n..dot\r\nbare\nlf\r\nbare\rcr\r\n"
    assert events == [
        Hello("EHLO", b"client.example", b"EHLO client.example\r\n", "client.example", True),
        MailFrom(
            "MAIL",
            b"FROM:<a@example.org> SIZE=42",
            b"MAIL FROM:<a@example.org> SIZE=42\r\n",
            b"a@example.org",
            (("SIZE", b"42"),),
        ),
        RcptTo("RCPT", b"TO:<b@example.net>", b"RCPT TO:<b@example.net>\r\n", b"b@example.net"),
        Command("DATA", b"", b"DATA\r\n"),
        (body, 1, 1, False),
        EndOfData(len(body), bare_lf=1, bare_cr=1),
        Auth("AUTH", b"PLAIN", b"AUTH PLAIN\r\n", "PLAIN"),
        AuthResponse(Secret(b"AGFAYg=="), b"AGFAYg==\r\n"),
        Command("QUIT", b"", b"QUIT\r\n"),
        ClientClosed(),
        ("leftover", b""),
    ]


def test_whole_and_bytewise_are_the_same() -> None:
    assert run_session(bytewise(SESSION)) == run_session([SESSION])


# ---------------------------------------------------------------------------
# hypothesis: splits and state totality
# ---------------------------------------------------------------------------

TINY = SmtpLimits(
    max_command_line=32, max_param_line=40, max_auth_line=48, max_text_line=6, max_reply_line=40
)

_fragments = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b".",
        b"..",
        b"\r\n.\r\n",
        b".\r\n",
        b"DATA\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN x\r\n",
        b"MAIL FROM:<a@b> SIZE=1\r\n",
        b"RCPT TO:<c@d>\r\n",
        b"EHLO x\r\n",
        b"NOOP",
        b" ",
        b"x" * 40,
        b"250-",
        b"250 ",
        b"354 go\r\n",
    ]
)
streams = st.lists(st.one_of(_fragments, st.binary(max_size=12)), max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=streams, cuts=st.lists(st.integers(0, 400), max_size=20), tiny=st.booleans())
def test_split_invariance(data: bytes, cuts: list[int], tiny: bool) -> None:
    limits = TINY if tiny else SmtpLimits()
    whole = run_session([data], limits)
    assert run_session(pieces_at(data, cuts), limits) == whole
    assert run_session(bytewise(data), limits) == whole


@settings(max_examples=300, deadline=None)
@given(data=streams, cuts=st.lists(st.integers(0, 400), max_size=20))
def test_reply_split_invariance(data: bytes, cuts: list[int]) -> None:
    assert replies_of(pieces_at(data, cuts)) == replies_of([data])
    assert replies_of(bytewise(data)) == replies_of([data])


operations = st.lists(
    st.one_of(
        st.tuples(st.just("receive"), st.one_of(_fragments, st.binary(max_size=20))),
        st.tuples(st.just("eof"), st.just(b"")),
        st.tuples(st.just("expect_data"), st.just(b"")),
        st.tuples(st.just("expect_auth"), st.just(b"")),
        st.tuples(st.just("next"), st.just(b"")),
        st.tuples(st.just("discard"), st.just(b"")),
    ),
    max_size=40,
)

_CLIENT_EVENTS = (Command, AuthResponse, DataChunk, EndOfData, LineTooLong, ClientClosed)


@settings(max_examples=500, deadline=None)
@given(ops=operations, tiny=st.booleans())
def test_command_reader_state_totality(ops: list[tuple[str, bytes]], tiny: bool) -> None:
    reader = CommandReader(TINY if tiny else SmtpLimits())
    eof = False
    for op, arg in ops:
        mode = reader.mode
        if op == "receive" and not arg:
            reader.receive_data(b"")
            eof = True
        elif op == "receive":
            if eof:
                with pytest.raises(LocalProtocolError):
                    reader.receive_data(arg)
            else:
                reader.receive_data(arg)
        elif op == "eof":
            reader.receive_data(b"")
            eof = True
        elif op in ("expect_data", "expect_auth"):
            call = reader.expect_data if op == "expect_data" else reader.expect_auth_response
            if mode is ReaderMode.COMMAND:
                call()
                expected = ReaderMode.DATA if op == "expect_data" else ReaderMode.AUTH_RESPONSE
                assert reader.mode is expected
            else:
                with pytest.raises(LocalProtocolError):
                    call()
                assert reader.mode is mode
        elif op == "discard":
            before = reader.buffered
            assert reader.discard_buffer() == before
            assert reader.buffered == b""
        else:
            while (event := reader.next_event()) is not NEED_DATA:
                assert isinstance(event, _CLIENT_EVENTS)
                if isinstance(event, ClientClosed):
                    assert eof
                    assert reader.mode is ReaderMode.CLOSED
                    break
                if isinstance(event, DataChunk):
                    assert reader.mode is ReaderMode.DATA
                    assert event.data
                else:
                    assert reader.mode is not ReaderMode.DATA
        if not eof:
            assert reader.mode is not ReaderMode.CLOSED


@settings(max_examples=300, deadline=None)
@given(ops=operations)
def test_reply_reader_state_totality(ops: list[tuple[str, bytes]]) -> None:
    reader = ReplyReader(SmtpLimits(max_reply_line=40, max_reply_lines=3))
    eof = failed = False
    for op, arg in ops:
        if op == "receive" and not eof:
            reader.receive_data(arg)
            eof = not arg
        elif op == "eof":
            reader.receive_data(b"")
            eof = True
        elif op == "next":
            try:
                while (event := reader.next_event()) is not NEED_DATA:
                    assert not failed
                    assert isinstance(event, Reply | ServerClosed)
                    if isinstance(event, ServerClosed):
                        assert eof
                        break
                    assert len(event.lines) <= 3
            except RemoteProtocolError:
                failed = True


# ---------------------------------------------------------------------------
# replies
# ---------------------------------------------------------------------------


def replies_of(pieces: Iterable[bytes], limits: SmtpLimits = DEFAULT) -> list[object]:
    reader = ReplyReader(limits)
    out: list[object] = []
    try:
        for piece in [*pieces, b""]:
            reader.receive_data(piece)
            while (event := reader.next_event()) is not NEED_DATA:
                out.append(event)
                if isinstance(event, ServerClosed):
                    out.append(reader.buffered)
                    return out
    except RemoteProtocolError as exc:
        out.append(("error", str(exc)))
        return out
    raise AssertionError("no ServerClosed")


def test_single_and_multiline_replies() -> None:
    data = (
        b"220 mx.example ESMTP\r\n"
        b"250-mx.example\r\n250-SIZE 1000\n250 8BITMIME\r\n"
        b"354\r\n"
        b"250-\r\n250 \r\n"
    )
    assert replies_of([data]) == [
        Reply(220, (b"mx.example ESMTP",)),
        Reply(250, (b"mx.example", b"SIZE 1000", b"8BITMIME")),
        Reply(354, (b"",)),
        Reply(250, (b"", b"")),
        ServerClosed(),
        b"",
    ]


def test_reply_buffered_after_starttls() -> None:
    reader = ReplyReader()
    reader.receive_data(b"220 2.0.0 Ready to start TLS\r\n250 injected\r\n")
    event = reader.next_event()
    assert event == Reply(220, (b"2.0.0 Ready to start TLS",))
    assert reader.buffered == b"250 injected\r\n"


def test_reply_partial_multiline_stays_buffered() -> None:
    reader = ReplyReader()
    reader.receive_data(b"250-a\r\n250-b\r\n")
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == b"250-a\r\n250-b\r\n"
    reader.receive_data(b"")
    assert reader.next_event() == ServerClosed()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"250-a\r\n251 b\r\n", "code changed"),
        (b"2x0 bad\r\n", "3-digit"),
        (b"199 low\r\n", "out of range"),
        (b"600 high\r\n", "out of range"),
        (b"250\tx\r\n", "not followed"),
        (b"25\r\n", "3-digit"),
        (b"250 a\rb\r\n", "CR in reply"),
        (b"250 " + b"x" * 3000, "too long"),
        (b"250 " + b"x" * 3000 + b"\r\n", "too long"),
        (b"250-x\r\n" * 200, "too many"),
    ],
)
def test_bad_replies(data: bytes, message: str) -> None:
    out = replies_of([data])
    error = out[-1]
    assert isinstance(error, tuple)
    assert error[0] == "error"
    assert message in error[1]


def test_reply_reader_stays_failed() -> None:
    reader = ReplyReader()
    reader.receive_data(b"bad\r\n220 ok\r\n")
    with pytest.raises(RemoteProtocolError):
        reader.next_event()
    with pytest.raises(RemoteProtocolError):
        reader.next_event()


def test_reply_helpers() -> None:
    r = reply(250, "2.1.0 Ok", b"second")
    assert r == Reply(250, (b"2.1.0 Ok", b"second"))
    assert r.to_bytes() == b"250-2.1.0 Ok\r\n250 second\r\n"
    assert reply(354, "").to_bytes() == b"354\r\n"
    assert r.enhanced == "2.1.0"
    assert reply(550, "5.7.1").enhanced == "5.7.1"
    assert reply(550, "5.7.1x").enhanced is None
    assert reply(250, "Ok").enhanced is None
    flags = [
        (x.is_positive_completion, x.is_intermediate, x.is_transient, x.is_permanent)
        for x in (reply(250, ""), reply(354, ""), reply(421, ""), reply(554, ""))
    ]
    assert flags == [
        (True, False, False, False),
        (False, True, False, False),
        (False, False, True, False),
        (False, False, False, True),
    ]


def test_reply_round_trip() -> None:
    r = Reply(250, (b"mx", b"", b"SIZE 1"))
    assert replies_of([r.to_bytes()])[0] == r


# ---------------------------------------------------------------------------
# EHLO
# ---------------------------------------------------------------------------


def test_parse_ehlo() -> None:
    [event, *_] = replies_of(
        [
            b"250-mx.example Hello client\r\n250-PIPELINING\r\n250-size 10240000\r\n"
            b"250-AUTH PLAIN  LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250-\r\n250 STARTTLS\r\n"
        ]
    )
    assert isinstance(event, Reply)
    greeting, extensions = parse_ehlo(event)
    assert greeting == b"mx.example Hello client"
    assert extensions == (
        Extension("PIPELINING"),
        Extension("SIZE", ("10240000",)),
        Extension("AUTH", ("PLAIN", "LOGIN")),
        Extension("AUTH=PLAIN", ("LOGIN",)),
        Extension("STARTTLS"),
    )


def test_format_ehlo_round_trip() -> None:
    extensions = (
        Extension("SIZE", ("1000",)),
        Extension("8BITMIME"),
        Extension("AUTH", ("PLAIN",)),
    )
    formatted = format_ehlo(b"proxy.example", extensions)
    assert formatted.to_bytes() == (
        b"250-proxy.example\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 AUTH PLAIN\r\n"
    )
    assert parse_ehlo(formatted) == (b"proxy.example", extensions)
    assert format_ehlo(b"only", ()).to_bytes() == b"250 only\r\n"


def test_ehlo_validation() -> None:
    with pytest.raises(LocalProtocolError):
        parse_ehlo(reply(502, "no"))
    with pytest.raises(LocalProtocolError):
        Extension("size")
    with pytest.raises(LocalProtocolError):
        Extension("SIZE", ("1 2",))
    with pytest.raises(LocalProtocolError):
        Extension("")
    [event, *_] = replies_of([b"250-mx\r\n250-X\xff\x01 \xfe\r\n250 OK\r\n"])
    assert isinstance(event, Reply)
    _, extensions = parse_ehlo(event)
    assert extensions == (Extension("X\\XFF\x01", ("\\xfe",)), Extension("OK"))


def _server_event_types() -> tuple[type, ...]:
    return (Reply, ServerClosed)


def test_server_event_alias() -> None:
    event: ServerEvent = ServerClosed()
    assert isinstance(event, _server_event_types())


def test_malformed_auth_repr_hides_arguments() -> None:
    [event] = events_of(b"AUTH PLAIN c2VjcmV0 extra\r\n")
    assert type(event) is Command
    assert repr(event) == "Command(verb='AUTH', args=***, bare_lf=False)"
    [noop] = events_of(b"NOOP x\r\n")
    assert repr(noop) == "Command(verb='NOOP', args=b'x', bare_lf=False)"


_body_fragments = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b".", b"\r\n.", b"\r\n..\r\n", b"a" * 7, b"b" * 70, b"c" * 300, b" "]
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(_body_fragments, max_size=60),
    cuts=st.lists(st.integers(0, 20_000), max_size=12),
    text_limit=st.sampled_from([1, 8, 75, 1000]),
)
def test_body_counters_match_a_naive_count(
    parts: list[bytes], cuts: list[int], text_limit: int
) -> None:
    body = b"".join(parts) + b"\r\n"
    # Dot-stuff any terminator (the body follows the DATA line's CRLF).
    while b"\r\n.\r\n" in b"\r\n" + body:
        body = (b"\r\n" + body).replace(b"\r\n.\r\n", b"\r\n..\r\n")[2:]
    limits = SmtpLimits(max_text_line=text_limit)
    reader = feed(b"", mode="data", limits=limits)
    chunks: list[DataChunk] = []
    end: object = None
    for piece in [*pieces_at(body + b".\r\nNOOP\r\n", cuts)]:
        reader.receive_data(piece)
        for event in drain(reader):
            if isinstance(event, DataChunk):
                chunks.append(event)
            elif end is None:
                end = event
    expected = EndOfData(
        len(body),
        bare_lf=len(re.findall(rb"(?<!\r)\n", body)),
        bare_cr=len(re.findall(rb"\r(?!\n)", body)),
        long_lines=sum(len(line) >= text_limit for line in body.split(b"\n")),
    )
    assert end == expected
    assert b"".join(c.data for c in chunks) == body
    assert sum(c.bare_lf for c in chunks) == expected.bare_lf
    assert sum(c.bare_cr for c in chunks) == expected.bare_cr
    assert sum(c.long_line for c in chunks) <= expected.long_lines
    assert any(c.long_line for c in chunks) == (expected.long_lines > 0)
    for chunk in chunks:
        assert chunk.bare_cr == len(re.findall(rb"\r(?!\n)", chunk.data))
