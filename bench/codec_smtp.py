"""Throughput of the SMTP codec's DATA path (not a test).

Feeds a realistic 1 MB body (76-octet lines, as base64 MIME parts have) in
64 KiB pieces through ``CommandReader`` and prints MB/s, next to the cost of
merely copying the same pieces, so the codec's own overhead is visible.

    PYTHONPATH=src python bench/codec_smtp.py
"""

from __future__ import annotations

import timeit

from mailmoat.protocols.smtp import NEED_DATA, CommandReader, DataChunk, EndOfData

MB = 1024 * 1024
PIECE = 64 * 1024


def make_body(size: int = MB) -> bytes:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return body[: body.rfind(b"\r\n") + 2]


def run(pieces: list[bytes]) -> int:
    reader = CommandReader()
    reader.receive_data(b"DATA\r\n")
    reader.next_event()
    reader.expect_data()
    total = 0
    for piece in pieces:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            if isinstance(event, DataChunk):
                total += len(event.data)
            elif isinstance(event, EndOfData):
                return total
    raise AssertionError("no EndOfData")


def copy_only(pieces: list[bytes]) -> int:
    buf = bytearray()
    total = 0
    for piece in pieces:
        buf += piece
        total += len(bytes(buf))
        buf.clear()
    return total


def main() -> None:
    body = make_body() + b".\r\n"
    pieces = [body[i : i + PIECE] for i in range(0, len(body), PIECE)]
    assert run(pieces) == len(body) - 3
    rounds = 200
    codec = min(timeit.repeat(lambda: run(pieces), number=rounds, repeat=5)) / rounds
    copy = min(timeit.repeat(lambda: copy_only(pieces), number=rounds, repeat=5)) / rounds
    size_mb = len(body) / MB
    print(f"body {size_mb:.2f} MB in {PIECE // 1024} KiB pieces")
    print(f"codec:      {codec * 1e3:.3f} ms/MB  ({size_mb / codec:,.0f} MB/s)")
    print(f"copy only:  {copy * 1e3:.3f} ms/MB  ({size_mb / copy:,.0f} MB/s)")
    print(f"overhead:   {(codec - copy) * 1e3 / size_mb:.3f} ms/MB on top of the memcpy")


if __name__ == "__main__":
    main()
