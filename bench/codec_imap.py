"""Throughput of the IMAP codec's framing (not a test).

Two streams, fed in 64 KiB pieces:

* a FETCH-like response stream (``* n FETCH (UID n BODY[] {50000}`` +
  body + ``)``), through ``ResponseReader``: MB/s, next to the cost of merely
  copying the same pieces;
* a LOGIN-heavy command stream (``{n+}`` literals, quoted strings with
  escapes, atoms, NOOPs), through ``CommandReader``: commands/s and MB/s.

If the ``imap_codec`` bindings happen to be importable (they are not a
dependency; see docs/imap.md) the same streams go through them too, for
comparison: whole buffer, and re-decoded from the start after each piece as
their stateless API requires for incremental input.

    PYTHONPATH=src python bench/codec_imap.py
"""

from __future__ import annotations

import importlib
import timeit
from collections.abc import Callable
from typing import Any

from mailmoat.protocols.imap import NEED_DATA, Command, CommandReader, ResponseReader

MB = 1024 * 1024
PIECE = 64 * 1024


def fetch_stream(count: int = 40, size: int = 50_000) -> bytes:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    body = (line * (size // len(line) + 1))[:size]
    parts = [
        b"* %d FETCH (UID %d FLAGS (\\Seen) BODY[] {%d}\r\n" % (i, i, len(body)) + body + b")\r\n"
        for i in range(1, count + 1)
    ]
    return b"".join(parts) + b"f1 OK Fetch completed (0.001 + 0.000 secs).\r\n"


def login_stream(count: int = 20_000) -> bytes:
    out = []
    for i in range(count):
        match i % 4:
            case 0:
                out.append(b"a%d LOGIN user%d@example.org {10+}\r\npassw0rd!!\r\n" % (i, i))
            case 1:
                out.append(b'a%d LOGIN "user%d" "pa\\"ss\\\\word"\r\n' % (i, i))
            case 2:
                out.append(b"a%d LOGIN user%d s3cret\r\n" % (i, i))
            case _:
                out.append(b"a%d NOOP\r\n" % i)
    return b"".join(out)


def pieces_of(data: bytes) -> list[bytes]:
    return [data[i : i + PIECE] for i in range(0, len(data), PIECE)]


def run_responses(pieces: list[bytes]) -> int:
    reader = ResponseReader()
    count = 0
    for piece in pieces:
        reader.receive_data(piece)
        while reader.next_event() is not NEED_DATA:
            count += 1
    return count


def run_commands(pieces: list[bytes]) -> int:
    reader = CommandReader()
    count = 0
    for piece in pieces:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            assert isinstance(event, Command)
            count += 1
    return count


def copy_only(pieces: list[bytes]) -> int:
    buf = bytearray()
    total = 0
    for piece in pieces:
        buf += piece
        total += len(bytes(buf))
        buf.clear()
    return total


def best(func: Callable[[], object], rounds: int) -> float:
    return min(timeit.repeat(func, number=rounds, repeat=5)) / rounds


def imap_codec_runs(fetch: bytes, logins: bytes) -> None:
    try:
        codec: Any = importlib.import_module("imap_codec")
    except ImportError:
        print("imap_codec: not installed (optional comparison skipped)")
        return

    def whole(codec_class: Any, data: bytes) -> int:
        rest, count = data, 0
        while rest:
            rest, _ = codec_class.decode(rest)
            count += 1
        return count

    def incremental(codec_class: Any, pieces: list[bytes]) -> int:
        buf, count = b"", 0
        for piece in pieces:
            buf += piece
            while buf:
                try:
                    buf, _ = codec_class.decode(buf)
                except (codec.DecodeIncomplete, codec.DecodeLiteralFound):
                    break
                count += 1
        return count

    fetch_pieces = pieces_of(fetch)
    for label, func, size in (
        ("imap_codec FETCH whole", lambda: whole(codec.ResponseCodec, fetch), len(fetch)),
        (
            "imap_codec FETCH 64KiB",
            lambda: incremental(codec.ResponseCodec, fetch_pieces),
            len(fetch),
        ),
        ("imap_codec LOGIN whole", lambda: whole(codec.CommandCodec, logins), len(logins)),
    ):
        seconds = best(func, 1)
        print(f"{label:24} {size / MB / seconds:8,.0f} MB/s")


def main() -> None:
    fetch = fetch_stream()
    fetch_pieces = pieces_of(fetch)
    assert run_responses(fetch_pieces) == 41
    logins = login_stream()
    login_pieces = pieces_of(logins)
    commands = run_commands(login_pieces)
    assert commands == 20_000

    fetch_s = best(lambda: run_responses(fetch_pieces), 20)
    copy_s = best(lambda: copy_only(fetch_pieces), 20)
    login_s = best(lambda: run_commands(login_pieces), 3)
    fetch_mb = len(fetch) / MB
    login_mb = len(logins) / MB
    print(f"FETCH stream {fetch_mb:.2f} MB (41 responses) in {PIECE // 1024} KiB pieces")
    print(f"  ResponseReader:  {fetch_s * 1e3:7.3f} ms  ({fetch_mb / fetch_s:8,.0f} MB/s)")
    print(f"  copy only:       {copy_s * 1e3:7.3f} ms  ({fetch_mb / copy_s:8,.0f} MB/s)")
    print(f"LOGIN-heavy stream {login_mb:.2f} MB ({commands} commands)")
    print(
        f"  CommandReader:   {login_s * 1e3:7.1f} ms  ({commands / login_s:8,.0f} commands/s, "
        f"{login_mb / login_s:.1f} MB/s)"
    )
    imap_codec_runs(fetch, logins)


if __name__ == "__main__":
    main()
