"""Atheris harness for the sans-IO SMTP codec.

    PYTHONPATH=src python fuzz/fuzz_smtp.py -max_total_time=60 /tmp/corpus-copy fuzz/corpus/smtp

(libFuzzer writes new inputs into the *first* directory: give it a scratch
copy so that only the curated seeds live in the repository.)

An input is a raw client->server byte stream, the way a session would see
it.  :func:`check_input` is the single entry point; pytest replays the seed
corpus through it (tests/test_fuzz_corpus_smtp.py), so the oracle runs in CI
without atheris.  It asserts:

* only ``RemoteProtocolError`` escapes the readers, whatever the bytes, the
  split into pieces, and extra ``expect_data()`` / ``expect_auth_response()``
  calls; a wrong-mode call raises ``LocalProtocolError`` and changes nothing;
* the same stream whole, byte by byte and in random pieces yields the same
  events (consecutive ``DataChunk`` merged, since chunking differs);
* every input byte is accounted for, in order: event lines, chunk data,
  discarded over-long lines, then what is left in ``buffered``;
* body counters equal a naive recount, no chunk holds the terminator;
* the same bytes through ``ReplyReader`` behave alike in every split, and
  every reply and EHLO list round-trips through its formatter.
"""

from __future__ import annotations

import random
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from mailmoat.errors import LocalProtocolError, RemoteProtocolError
from mailmoat.protocols.smtp import (
    NEED_DATA,
    AuthResponse,
    ClientClosed,
    Command,
    CommandReader,
    DataChunk,
    EndOfData,
    LineTooLong,
    ReaderMode,
    Reply,
    ReplyReader,
    ServerClosed,
    SmtpLimits,
    format_ehlo,
    parse_command,
    parse_ehlo,
)

DEFAULT_LIMITS = SmtpLimits()
TINY_LIMITS = SmtpLimits(
    max_command_line=32,
    max_param_line=48,
    max_auth_line=40,
    max_text_line=8,
    max_reply_line=32,
    max_reply_lines=4,
)

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclass(frozen=True)
class Body:
    """Consecutive DataChunks merged; ``long_line`` is any chunk's flag."""

    data: bytes
    bare_lf: int
    bare_cr: int
    long_line: bool


Normalized = Command | AuthResponse | EndOfData | LineTooLong | ClientClosed | Body


def split(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        pieces.append(data[pos : pos + size])
        pos += size
        i += 1
    return pieces


def drive_client(
    pieces: Sequence[bytes], limits: SmtpLimits, rogue: Sequence[int]
) -> tuple[list[Normalized], bytes]:
    """Feed ``pieces`` then EOF, reacting like a session that always gets 354/334.

    ``rogue[i]`` (1: expect_data, 2: expect_auth_response) adds a call after
    the i-th non-chunk event when the reader is in COMMAND mode.
    """
    reader = CommandReader(limits)
    events: list[Normalized] = []
    index = 0
    login_left = 0
    for piece in [*pieces, b""]:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            if isinstance(event, DataChunk):
                assert event.data
                last = events[-1] if events else None
                if isinstance(last, Body):
                    events[-1] = Body(
                        last.data + event.data,
                        last.bare_lf + event.bare_lf,
                        last.bare_cr + event.bare_cr,
                        last.long_line or event.long_line,
                    )
                else:
                    events.append(Body(event.data, event.bare_lf, event.bare_cr, event.long_line))
                continue
            events.append(event)
            if isinstance(event, ClientClosed):
                assert reader.mode is ReaderMode.CLOSED
                assert isinstance(reader.next_event(), ClientClosed)
                check_wrong_mode(reader)
                return events, reader.buffered
            if isinstance(event, Command):
                assert parse_command(event.line) == event
                assert reader.mode is ReaderMode.COMMAND
                if event.verb == "DATA":
                    reader.expect_data()
                elif event.verb == "AUTH":
                    reader.expect_auth_response()
                    mechanism = getattr(event, "mechanism", "")
                    login_left = 1 if mechanism == "LOGIN" else 0
            elif isinstance(event, AuthResponse) and login_left and not event.is_cancel:
                login_left -= 1
                reader.expect_auth_response()
            if reader.mode is ReaderMode.COMMAND:
                action = rogue[index % len(rogue)]
                if action == 1:
                    reader.expect_data()
                elif action == 2:
                    reader.expect_auth_response()
            else:
                check_wrong_mode(reader)
            index += 1
    raise AssertionError("no ClientClosed after EOF")


def check_wrong_mode(reader: CommandReader) -> None:
    mode, buffered = reader.mode, reader.buffered
    for call in (reader.expect_data, reader.expect_auth_response):
        try:
            call()
        except LocalProtocolError:
            pass
        else:
            raise AssertionError(f"{call.__name__}() accepted in mode {mode}")
        assert reader.mode is mode
        assert reader.buffered == buffered


def check_accounting(
    data: bytes, events: list[Normalized], leftover: bytes, limits: SmtpLimits
) -> None:
    pos = 0
    body_start = True
    last_body = Body(b"", 0, 0, False)
    for event in events:
        match event:
            case Body():
                segment = event.data
                # The body is preceded by the CRLF of the DATA line.
                assert _TERMINATOR not in b"\r\n" + segment
                assert _BARE_LF.subn(b"", segment)[1] == event.bare_lf
                assert _BARE_CR.subn(b"", segment)[1] == event.bare_cr
                body_start = False
                last_body = event
            case EndOfData():
                segment = event.line
                assert segment == b".\r\n"
                body = b"" if body_start else last_body.data
                assert event.size == len(body)
                assert event.bare_lf == (0 if body_start else last_body.bare_lf)
                assert event.bare_cr == (0 if body_start else last_body.bare_cr)
                text = limits.max_text_line
                expected = 0 if text is None else sum(len(x) >= text for x in body.split(b"\n"))
                assert event.long_lines == expected
                assert (event.long_lines > 0) == (not body_start and last_body.long_line)
                body_start = True
            case LineTooLong():
                assert event.length > event.limit
                segment = data[pos : pos + event.length]
                assert segment.endswith(b"\n") or pos + event.length == len(data)
                assert b"\n" not in segment[:-1]
            case ClientClosed():
                segment = b""
            case _:
                segment = event.line
                assert segment.endswith(b"\n")
                assert b"\n" not in segment[:-1]
                body_start = True
        assert data[pos : pos + len(segment)] == segment, (pos, event)
        pos += len(segment)
    assert data[pos:] == leftover


_TERMINATOR = b"\r\n.\r\n"


def drive_server(pieces: Sequence[bytes], limits: SmtpLimits) -> tuple[list[Reply], str]:
    reader = ReplyReader(limits)
    replies: list[Reply] = []
    try:
        for piece in [*pieces, b""]:
            reader.receive_data(piece)
            while (event := reader.next_event()) is not NEED_DATA:
                if isinstance(event, ServerClosed):
                    return replies, "closed:" + reader.buffered.hex()
                replies.append(event)
    except RemoteProtocolError as exc:
        try:
            reader.next_event()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("ReplyReader recovered after an error") from exc
        return replies, "error"
    raise AssertionError("no ServerClosed after EOF")


def check_reply(event: Reply, limits: SmtpLimits) -> None:
    again = ReplyReader(SmtpLimits(max_reply_line=1 << 20, max_reply_lines=1 << 20))
    again.receive_data(event.to_bytes())
    assert again.next_event() == event
    assert again.buffered == b""
    if event.code == 250:
        greeting, extensions = parse_ehlo(event)
        assert parse_ehlo(format_ehlo(greeting, extensions)) == (greeting, extensions)


def check_input(data: bytes) -> None:
    """The fuzz target: see the module docstring for what it asserts."""
    rng = random.Random(zlib.crc32(data))
    rogue = [rng.choice((0, 0, 0, 0, 0, 0, 0, 0, 1, 2)) for _ in range(31)]
    calm = [0]
    splits = [
        [data],
        split(data, [1]) if len(data) <= 256 else split(data, [rng.randint(1, 16)]),
        split(data, [rng.randint(1, 300) for _ in range(17)]),
    ]
    for limits in (DEFAULT_LIMITS, TINY_LIMITS):
        for actions in (calm, rogue):
            results = [drive_client(pieces, limits, actions) for pieces in splits]
            first = results[0]
            for other in results[1:]:
                assert other == first, (first, other)
            check_accounting(data, first[0], first[1], limits)
        server = [drive_server(pieces, limits) for pieces in splits]
        for other_server in server[1:]:
            assert other_server == server[0]
        for event in server[0][0]:
            check_reply(event, limits)


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
