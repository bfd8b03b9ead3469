"""Atheris harness for the sans-IO IMAP codec.

    PYTHONPATH=src python fuzz/fuzz_imap.py -max_total_time=60 /tmp/corpus-copy fuzz/corpus/imap

(libFuzzer writes new inputs into the *first* directory: give it a scratch
copy so that only the curated seeds live in the repository.)

An input is a raw byte stream, read both as what a client sends and as what
a server sends.  :func:`check_input` is the single entry point; pytest
replays the seed corpus through it (tests/test_fuzz_corpus_imap.py), so the
oracle runs in CI without atheris.  It asserts:

* ``CommandReader`` never raises on peer bytes, whatever the split into
  pieces, the session's literal decisions (accept / reject), AUTHENTICATE
  exchanges, and the LITERAL+/LITERAL-/none setting;
* the same stream whole, byte by byte and in random pieces yields the same
  events, ``discarded`` count and ``buffered`` rest;
* every input octet is accounted for: event frames + discarded + buffered
  = input length, and ``buffered`` is the input's tail;
* every command re-parses to itself from its frames, every ``Command`` is
  CRLF-framed with no CR or NUL inside a line, literals obey the limits,
  redaction hides credentials, ``to_non_sync`` and ``format_id`` round-trip;
* only ``RemoteProtocolError`` escapes ``ResponseReader``, which then stays
  failed; responses are the same in every split and round-trip through
  their raw bytes and a no-op capability rewrite.
"""

from __future__ import annotations

import random
import sys
import zlib
from collections.abc import Sequence

from mailmoat.errors import LocalProtocolError, RemoteProtocolError
from mailmoat.protocols.imap import (
    LITERAL_MINUS_MAX,
    NEED_DATA,
    Authenticate,
    AuthenticateResponse,
    BadCommand,
    ClientClosed,
    ClientEvent,
    Command,
    CommandReader,
    ContinuationRequest,
    Id,
    ImapLimits,
    LineTooLong,
    LiteralRefused,
    Login,
    NeedContinuation,
    NonSyncLiterals,
    ReaderMode,
    ResponseReader,
    ServerClosed,
    ServerEvent,
    Tagged,
    Untagged,
    format_id,
    parse_command,
    rewrite_capabilities,
    to_non_sync,
)

DEFAULT_LIMITS = ImapLimits()
TINY_LIMITS = ImapLimits(
    max_line=64,
    max_auth_line=64,
    max_literal=16,
    max_command=128,
    max_response_line=64,
    max_response_literal=32,
    max_response=160,
)
BIG_LIMITS = ImapLimits(max_literal=1 << 20, max_command=1 << 21)


def split(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        pieces.append(data[pos : pos + size])
        pos += size
        i += 1
    return pieces


Outcome = tuple[list[ClientEvent], int, bytes]


def drive_client(
    pieces: Sequence[bytes], limits: ImapLimits, non_sync: NonSyncLiterals, choices: Sequence[int]
) -> Outcome:
    """Feed ``pieces`` then EOF, acting as a session: ``choices`` decide
    whether each synchronizing literal is accepted (0, 1) or rejected (2),
    and how many AUTHENTICATE continuation lines to expect (0-2)."""
    reader = CommandReader(limits, non_sync=non_sync)
    events: list[ClientEvent] = []
    index = 0
    auth_left = 0
    for piece in [*pieces, b""]:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)
            choice = choices[index % len(choices)]
            index += 1
            if isinstance(event, ClientClosed):
                assert reader.mode is ReaderMode.CLOSED
                assert isinstance(reader.next_event(), ClientClosed)
                return events, reader.discarded, reader.buffered
            if isinstance(event, NeedContinuation):
                assert reader.mode is ReaderMode.CONTINUATION
                check_pending(reader)
                if choice == 2:
                    reader.reject_literal()
                else:
                    reader.accept_literal()
                continue
            if isinstance(event, Authenticate):
                auth_left = choice
            elif isinstance(event, AuthenticateResponse):
                auth_left = 0 if event.is_cancel else auth_left - 1
            else:
                auth_left = 0
            if auth_left > 0 and reader.mode is ReaderMode.COMMAND:
                try:
                    reader.expect_auth_response()
                except LocalProtocolError:
                    auth_left = 0  # a skip in progress: not at a line start
    raise AssertionError("no ClientClosed after EOF")


def check_pending(reader: CommandReader) -> None:
    """While a literal decision is pending, nothing else is allowed."""
    for call in (reader.next_event, reader.expect_auth_response):
        try:
            call()
        except LocalProtocolError:
            pass
        else:
            raise AssertionError(f"{call.__name__}() allowed while a decision is pending")


def frames_of(event: ClientEvent) -> tuple[bytes, ...]:
    if isinstance(event, Command | BadCommand):
        return event.frames
    if isinstance(event, AuthenticateResponse):
        return (event.raw,)
    return ()


def check_client(
    data: bytes, outcome: Outcome, limits: ImapLimits, non_sync: NonSyncLiterals
) -> None:
    events, discarded, buffered = outcome
    consumed = sum(len(frame) for event in events for frame in frames_of(event))
    assert consumed + discarded + len(buffered) == len(data), (consumed, discarded, buffered)
    assert data.endswith(buffered)
    for event in events:
        if isinstance(event, Command | BadCommand):
            assert parse_command(event.frames) == event
            assert len(b"".join(event.frames)) <= limits.max_command
            for line in event.frames[::2]:
                assert len(line) <= limits.max_line
            for literal in event.frames[1::2]:
                assert len(literal) <= limits.max_literal
        if isinstance(event, Command):
            check_command(event, non_sync)
        elif isinstance(event, LiteralRefused):
            assert event.limit is None or event.size > event.limit
        elif isinstance(event, LineTooLong):
            assert event.limit >= 0
        elif isinstance(event, NeedContinuation):
            assert event.tag is not None
            assert event.size <= limits.max_literal
        elif isinstance(event, AuthenticateResponse):
            assert event.raw.endswith(b"\n")
            assert event.redacted() in (b"*", b"***")


def check_command(event: Command, non_sync: NonSyncLiterals) -> None:
    for line in event.frames[::2]:
        assert line.endswith(b"\r\n")
        assert b"\r" not in line[:-2]
        assert b"\x00" not in line
    for index, literal in enumerate(event.frames[1::2]):
        marker_line = event.frames[2 * index]
        if marker_line.endswith(b"+}\r\n"):
            assert non_sync is not NonSyncLiterals.NONE
            if non_sync is NonSyncLiterals.LITERAL_MINUS:
                assert len(literal) <= LITERAL_MINUS_MAX
    redacted = event.redacted()
    assert b"\n" not in redacted
    if isinstance(event, Login):
        assert redacted.endswith(b" ***")
        assert redacted.count(b"***") == 1 or b"***" in event.user
    if isinstance(event, Authenticate) and event.initial_response is not None:
        assert redacted.endswith(b" ***")
    # Relaying to a LITERAL+ backend in one write frames to the same command.
    again = CommandReader(BIG_LIMITS, non_sync=NonSyncLiterals.LITERAL_PLUS)
    again.receive_data(to_non_sync(event))
    other = again.next_event()
    assert isinstance(other, Command), other
    assert (other.tag, other.name, other.literal_count) == (
        event.tag,
        event.name,
        event.literal_count,
    )
    assert again.buffered == b""
    if isinstance(event, Id):
        try:
            wire = format_id(event.tag, event.params)
        except LocalProtocolError:
            return  # a literal value with CR/LF/NUL cannot be quoted
        again = CommandReader(BIG_LIMITS)
        again.receive_data(wire)
        reparsed = again.next_event()
        assert isinstance(reparsed, Id), reparsed
        assert reparsed.params == event.params


def drive_server(pieces: Sequence[bytes], limits: ImapLimits) -> tuple[list[ServerEvent], str]:
    reader = ResponseReader(limits)
    events: list[ServerEvent] = []
    try:
        for piece in [*pieces, b""]:
            reader.receive_data(piece)
            while (event := reader.next_event()) is not NEED_DATA:
                if isinstance(event, ServerClosed):
                    return events, "closed:" + reader.buffered.hex()
                events.append(event)
    except RemoteProtocolError as exc:
        hint = exc.reply_hint
        try:
            reader.next_event()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("ResponseReader recovered after an error") from exc
        assert hint is None
        return events, "error"
    raise AssertionError("no ServerClosed after EOF")


def check_response(event: ServerEvent) -> None:
    assert isinstance(event, Untagged | Tagged | ContinuationRequest)
    again = ResponseReader(ImapLimits(max_response_literal=1 << 20, max_response=1 << 21))
    again.receive_data(event.raw)
    assert again.next_event() == event
    assert again.buffered == b""
    if isinstance(event, Untagged | Tagged) and event.capabilities is not None:
        try:
            wire = rewrite_capabilities(event)
        except LocalProtocolError:
            return  # e.g. an empty capability list
        again = ResponseReader(ImapLimits(max_response_line=1 << 20, max_response=1 << 21))
        again.receive_data(wire)
        rewritten = again.next_event()
        assert isinstance(rewritten, Untagged | Tagged)
        assert rewritten.capabilities == event.capabilities


def check_input(data: bytes) -> None:
    """The fuzz target: see the module docstring for what it asserts."""
    rng = random.Random(zlib.crc32(data))
    choices = [rng.choice((0, 0, 1, 1, 2)) for _ in range(31)]
    splits = [
        [data],
        split(data, [1]) if len(data) <= 512 else split(data, [rng.randint(1, 16)]),
        split(data, [rng.randint(1, 300) for _ in range(17)]),
    ]
    for limits in (DEFAULT_LIMITS, TINY_LIMITS):
        for non_sync in NonSyncLiterals:
            for decisions in ([0], choices):
                results = [drive_client(p, limits, non_sync, decisions) for p in splits]
                for other in results[1:]:
                    assert other == results[0], (results[0], other)
                check_client(data, results[0], limits, non_sync)
        server = [drive_server(pieces, limits) for pieces in splits]
        for other_server in server[1:]:
            assert other_server == server[0]
        for event in server[0][0]:
            check_response(event)


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
