"""The event journal: framing, crash safety, rotation, retention, indexes, queries, follow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from mailmoat.events import _journal_format, reasons
from mailmoat.events import journal as journal_mod
from mailmoat.events._journal_format import FRAME_SIZE, HEADER_SIZE, MAGIC, FrameScan
from mailmoat.events.journal import (
    EventFilter,
    Journal,
    JournalError,
    JournalWriter,
    SegmentWriter,
    is_blocked,
)

T0 = 1_764_000_000.0
SRC = Path(__file__).resolve().parent.parent / "src"


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(n: int, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {
        "@timestamp": stamp(T0 + n),
        "event.kind": "session",
        "event.action": "auth.attempt",
        "event.outcome": "failure",
        "node.name": "edge-1",
        "session.id": f"s{n // 4:06d}",
        "session.protocol": "smtp",
        "client.ip": f"198.51.100.{n % 200}",
        "n": n,
    }
    e.update(fields or {})
    return e


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def numbers(events: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> list[int]:
    return [e["n"] for e in events]


def segment_sizes(directory: Path) -> list[int]:
    return [s.path.stat().st_size for s in Journal(directory).segments()]


async def written(writer: JournalWriter, n: int) -> None:
    with trio.fail_after(10):
        while writer.written < n:
            await trio.sleep(0.005)


# --------------------------------------------------------------------------- writer


async def test_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    writer = JournalWriter(d)
    sent = [event(i) for i in range(100)]
    sent[3]["verdict.evidence"] = {"smtp.rcpt_count": 101, "nested": [1, 2.5, None, True]}
    sent[4]["rule.tags"] = ["tls", "attack.t1557"]
    sent[5]["tls.injected_plaintext"] = "AUTH PLAIN ***\r\n"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for e in sent:
                assert writer.submit(e)
            writer.close()
    assert writer.written == 100
    assert writer.dropped == 0
    j = Journal(d)
    assert list(j.query()) == sent
    [seg] = j.segments()
    assert seg.seq == 1
    assert seg.path.name.startswith("00000001-")
    assert seg.path.read_bytes().startswith(MAGIC)
    assert seg.index_path.exists()  # sealed on close
    assert j.stats.corrupt == 0
    assert j.stats.torn_bytes == 0


async def test_cancellation_writes_everything_accepted(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, queue=1000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(500):
                assert writer.submit(event(i))
            nursery.cancel_scope.cancel()
    assert numbers(Journal(tmp_path).query()) == list(range(500))
    assert not writer.submit(event(999))  # closed
    assert writer.take_dropped() == 1


async def test_queue_full_drops_are_counted(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, queue=10)
    results = [writer.submit(event(i)) for i in range(15)]
    assert results == [True] * 10 + [False] * 5
    assert writer.dropped == 5
    assert writer.take_dropped() == 5
    assert writer.take_dropped() == 0
    # what cannot be encoded or is too big is dropped too, never raised
    assert not writer.submit({"n": 2**70})
    assert not writer.submit({"n": 1, "blob": "x" * (journal_mod.MAX_RECORD + 1)})
    assert writer.take_dropped() == 2
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.close()
    assert numbers(Journal(tmp_path).query()) == list(range(10))
    assert writer.dropped == 7


async def test_odd_values_are_stringified(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path) as w:
        w.append_events([{"n": 1, "when": datetime(2026, 1, 2, tzinfo=UTC), "set": (1, 2)}])
    [e] = Journal(tmp_path).query()
    assert e == {"n": 1, "when": "2026-01-02 00:00:00+00:00", "set": [1, 2]}


async def test_rotation_by_size(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, segment_size=4096)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(200):
                assert writer.submit(event(i))
                if i % 7 == 0:
                    await trio.sleep(0)
            writer.close()
    j = Journal(tmp_path)
    segments = j.segments()
    assert len(segments) > 5
    assert [s.seq for s in segments] == list(range(1, len(segments) + 1))
    assert all(size <= 4096 for size in segment_sizes(tmp_path))
    assert all(s.index_path.exists() for s in segments)
    assert numbers(j.query()) == list(range(200))
    assert j.stats.scanned == 0


async def test_rotation_by_age_with_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    writer = JournalWriter(tmp_path, segment_age=60, clock=clock, idle_interval=0.01)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(10):
                writer.submit(event(i))
            await written(writer, 10)
            clock.now += 61  # the next append starts a new segment
            for i in range(10, 20):
                writer.submit(event(i))
            await written(writer, 20)
            clock.now += 61  # idle: housekeeping rotates on its own
            while len(Journal(tmp_path).segments()) < 3:
                await trio.sleep(0.005)
            writer.close()
    j = Journal(tmp_path)
    segments = j.segments()
    # the empty segment started by the idle rotation is removed on close
    assert [s.start for s in segments] == [int(T0), int(T0) + 61]
    assert numbers(j.query()) == list(range(20))
    first = j.index(segments[0])
    assert first is not None
    assert first.count == 10


def test_retention_by_age(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    with SegmentWriter(tmp_path, segment_age=10, retain_age=100, clock=clock) as w:
        for k in range(4):  # segments start at 1000, 1020, 1040, 1060
            clock.now = 1000.0 + 20 * k
            w.append_events([event(k)])
        assert [s.start for s in Journal(tmp_path).segments()] == [1000, 1020, 1040, 1060]
        clock.now = 1125.0  # the 1000 segment ended at 1020 <= 1125 - 100
        w.maintain()
        starts = [s.start for s in Journal(tmp_path).segments()]
        assert starts == [1020, 1040, 1060, 1125]
        assert not list(tmp_path.glob("00000001-*"))  # its index went with it
        assert w.deleted == 1
    assert numbers(Journal(tmp_path).query()) == [1, 2, 3]


def test_retention_by_size_oldest_first_active_kept(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path, segment_size=4096, retain_size=12_000) as w:
        for i in range(300):
            w.append_events([event(i)])
            total = sum(p.stat().st_size for p in tmp_path.iterdir() if p.suffix != "")
            assert total <= 12_000 + 4096  # over only by the active segment's growth
        seqs = [s.seq for s in Journal(tmp_path).segments()]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # a contiguous tail
        assert seqs[0] > 1
        left = numbers(Journal(tmp_path).query())
        assert left == list(range(left[0], 300))
    # the active segment is never deleted, even alone over the limit
    d = tmp_path / "one"
    clock = Clock()
    with SegmentWriter(d, segment_size=1 << 20, retain_size=1, clock=clock) as w:
        w.append_events(event(i) for i in range(100))
        clock.now += 61  # retention looks again
        w.maintain()
        assert len(Journal(d).segments()) == 1
        assert w.deleted == 0


def test_a_clock_stepping_back_does_not_rotate(tmp_path: Path) -> None:
    clock = Clock()
    with SegmentWriter(tmp_path, clock=clock, segment_age=60) as w:
        w.append_events([event(0)])
        clock.now -= 3600
        for i in range(1, 10):
            w.append_events([event(i)])
        w.maintain()
        assert len(Journal(tmp_path).segments()) == 1


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path), pytest.raises(JournalError, match="another writer"):
        SegmentWriter(tmp_path).open()


async def test_io_error_drops_the_batch_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailmoat.events import _journal_writer

    real = _journal_writer._write_all
    calls = {"n": 0}

    def flaky(fd: int, data: bytes | bytearray) -> None:
        calls["n"] += 1
        if len(data) > 100 and calls["n"] == 3:
            os.write(fd, bytes(data[:50]))  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(_journal_writer, "_write_all", flaky)
    writer = JournalWriter(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)  # call 1: the segment header
            writer.submit(event(0))
            await written(writer, 1)  # call 2
            writer.submit(event(1))  # call 3 fails
            with trio.fail_after(5):
                while not writer.write_errors:
                    await trio.sleep(0.005)
            writer.submit(event(2))
            await written(writer, 2)
            writer.close()
    assert writer.take_dropped() == 1
    j = Journal(tmp_path)
    assert numbers(j.query()) == [0, 2]
    assert j.stats.corrupt == 0  # the partial write was cut off


# --------------------------------------------------------------------------- damage


def _frames(path: Path) -> list[tuple[int, int]]:
    return list(FrameScan(path.read_bytes(), HEADER_SIZE))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["payload", "length-high", "length-low", "crc"])
def test_corrupt_record_is_skipped_and_counted(tmp_path: Path, where: str) -> None:
    with SegmentWriter(tmp_path, block_records=16) as w:
        w.append_events(event(i) for i in range(50))
    [seg] = Journal(tmp_path).segments()
    offset, stop = _frames(seg.path)[25]
    at = {
        "payload": (offset + FRAME_SIZE + stop) // 2,
        "length-high": offset + 1,
        "length-low": offset + 3,
        "crc": offset + 5,
    }[where]
    _flip(seg.path, at)
    for index in (True, False):
        if not index:
            seg.index_path.unlink()
        j = Journal(tmp_path)
        got = numbers(j.query())
        assert got == [i for i in range(50) if i != 25]
        assert j.stats.corrupt == 1
        assert j.stats.torn_bytes == 0


def test_torn_tail_is_skipped(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path) as w:
        w.append_events(event(i) for i in range(50))
    [seg] = Journal(tmp_path).segments()
    offset, stop = _frames(seg.path)[-1]
    data = seg.path.read_bytes()
    for cut in (stop - 5, offset + FRAME_SIZE + 1, offset + 3):
        seg.path.write_bytes(data[:cut])
        j = Journal(tmp_path)
        assert numbers(j.query()) == list(range(49))
        assert j.stats.corrupt == 0
        assert j.stats.torn_bytes == cut - offset
        assert j.stats.scanned == 1  # the index no longer describes the file
    # a tail of zeros (what a crash can leave on some file systems)
    seg.path.write_bytes(data + bytes(4096))
    j = Journal(tmp_path)
    assert numbers(j.query()) == list(range(50))
    assert j.stats.torn_bytes == 4096
    assert j.stats.corrupt == 0


def test_garbage_in_the_middle_resyncs(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path) as w:
        w.append_events(event(i) for i in range(20))
    [seg] = Journal(tmp_path).segments()
    frames = _frames(seg.path)
    data = seg.path.read_bytes()
    # a header claiming a huge record, then noise, over records 5..9
    junk = b"\x00\x0f\xff\xff\x12\x34\x56\x78" + os.urandom(frames[10][0] - frames[5][0] - 8)
    seg.path.write_bytes(data[: frames[5][0]] + junk + data[frames[10][0] :])
    seg.index_path.unlink()
    j = Journal(tmp_path)
    assert numbers(j.query()) == [*range(5), *range(10, 20)]
    assert j.stats.corrupt == 1


CHILD = """
import sys, trio
from mailmoat.events.journal import JournalWriter

async def main():
    w = JournalWriter(sys.argv[1], segment_size=64 * 1024, fsync_interval=None, queue=100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        n = 0
        reported = -1
        while True:
            if w.accepted - w.written > 5000:  # never let the queue drop
                await trio.sleep(0.001)
                continue
            for _ in range(100):
                w.submit({"@timestamp": "2026-11-28T04:21:28.997Z", "event.kind": "session",
                          "event.action": "test", "n": n, "pad": "x" * (n % 97)})
                n += 1
            await trio.sleep(0.001)
            if w.written != reported:
                reported = w.written
                print(reported, flush=True)

trio.run(main)
"""


async def test_kill_9_loses_nothing_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    reported = 0
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(60):
            while reported < 5000:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the writer process died"
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if lines:
                    reported = int(lines[-1])
    finally:
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
    assert proc.returncode == -signal.SIGKILL
    j = Journal(tmp_path)
    got = list(j.query())
    assert len(got) >= reported
    # every record read is whole; none was lost before the last reported one
    assert numbers(got) == list(range(len(got)))
    assert all(e["pad"] == "x" * (e["n"] % 97) for e in got)
    assert len(j.segments()) > 3
    # the next writer indexes the crashed segment and starts afresh
    writer = JournalWriter(tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.submit({"n": len(got)})
            writer.close()
    j = Journal(tmp_path)
    assert numbers(j.query()) == list(range(len(got) + 1))
    assert j.stats.scanned == 0  # every segment has an index now


# --------------------------------------------------------------------------- queries


def _verdicts() -> list[dict[str, Any]]:
    v = "verdict"
    return [
        event(0, {"event.kind": v, "event.action": "rule.match", "verdict.action": "deny"}),
        event(1, {"event.kind": v, "event.action": "rule.match", "verdict.action": "log"}),
        event(2, {"event.kind": v, "event.action": "risk.threshold", "verdict.action": "reject"}),
        event(3, {"event.kind": v, "event.action": "client.banned", "verdict.action": "deny"}),
        event(4, {"event.kind": v, "event.action": "client.banned", "verdict.action": "detect"}),
        event(5, {"event.action": "session.close", "session.close_reason": "policy_deny"}),
        event(6, {"event.action": "session.close", "session.close_reason": "client_quit"}),
        event(7, {"event.kind": v, "event.action": "client.ban", "rule.id": "MM-1"}),
        event(8, {"event.kind": v, "event.action": "rule.match", "verdict.action": "tarpit"}),
        event(9, {"event.action": "session.close", "session.close_reason": "banned"}),
        event(10, {"event.action": "session.close", "session.close_reason": "http_refused"}),
        event(11, {"event.action": "session.close", "session.close_reason": "backend_closed"}),
    ]


def test_blocked(tmp_path: Path) -> None:
    events = _verdicts()
    assert [e["n"] for e in events if is_blocked(e)] == [0, 2, 3, 5, 8, 9, 10]
    with SegmentWriter(tmp_path, segment_size=4096) as w:
        w.append_events(event(100 + i) for i in range(40))  # no refusals in these
        w.append_events(events)
    j = Journal(tmp_path)
    assert numbers(j.query(EventFilter(blocked=True))) == [0, 2, 3, 5, 8, 9, 10]
    assert j.stats.skipped >= 1  # segments without refusals were not opened
    assert numbers(j.query(EventFilter(blocked=False, kind="verdict"))) == [1, 4, 7]


def test_close_reasons_have_one_list() -> None:
    # the reasons that lower reputation are blocked sessions; every one is a metric label
    assert reasons.REFUSALS <= reasons.BLOCKING <= reasons.ALL
    assert journal_mod.BLOCKING_CLOSE_REASONS is reasons.BLOCKING
    assert {"http_refused", "policy_tarpit", "banned"} <= reasons.BLOCKING
    assert reasons.kind_of("backend_closed") == "backend"
    assert reasons.kind_of("client_quit") == "ended"
    assert reasons.kind_of("nonsense") is None


def test_an_index_written_under_other_blocked_rules_is_rescanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an index counts its blocked events; when what "blocked" means changes
    # (a new refusal close reason), an old index would hide the segment
    with SegmentWriter(tmp_path, segment_size=4096) as w:
        w.append_events(event(100 + i) for i in range(40))
        w.append_events(_verdicts())
    j = Journal(tmp_path)
    assert numbers(j.query(EventFilter(blocked=True))) == [0, 2, 3, 5, 8, 9, 10]
    assert j.stats.scanned == 0
    monkeypatch.setattr(_journal_format, "BLOCKING_KEY", "another-set")
    j = Journal(tmp_path)
    assert numbers(j.query(EventFilter(blocked=True))) == [0, 2, 3, 5, 8, 9, 10]
    assert j.stats.scanned == len(j.segments())  # no old index was trusted


def test_filters(tmp_path: Path) -> None:
    events = [
        event(0, {"auth.user": "Alice@Example.org", "client.geo.country": "de"}),
        event(1, {"client.ip": "2001:db8::7", "session.protocol": "imap"}),
        event(2, {"rule.id": "MM-TLS-0001", "event.kind": "verdict"}),
        event(3, {"client.ip": "203.0.113.9", "event.action": "session.open"}),
        event(4, {"auth.user": "bob@example.org"}),
        event(5, {"@timestamp": "not a time"}),
    ]
    with SegmentWriter(tmp_path) as w:
        w.append_events(events)
    j = Journal(tmp_path)

    def q(**kw: Any) -> list[int]:
        return numbers(j.query(EventFilter(**kw)))

    assert q(user="alice@EXAMPLE.ORG") == [0]
    assert q(country="DE") == [0]
    assert q(ip="2001:db8::/32") == [1]
    assert q(ip="2001:0db8:0::7") == [1]
    assert q(ip="203.0.113.0/24") == [3]
    assert q(ip="::ffff:203.0.113.9") == [3]
    assert q(ip="198.51.100.0/24") == [0, 2, 4, 5]
    assert q(protocol="imap") == [1]
    assert q(rule="MM-TLS-0001") == [2]
    assert q(kind="verdict") == [2]
    assert q(action="session.open") == [3]
    assert q(session="s000001") == [4, 5]
    assert q(since=T0 + 1, until=T0 + 4) == [1, 2, 3]  # half-open; 5 has no time
    assert q(user="alice@example.org", country="FR") == []
    assert numbers(j.query(newest_first=True, limit=2)) == [5, 4]
    assert numbers(j.query(limit=0)) == []
    assert numbers(j.session("s000000")) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not an IP"):
        EventFilter(ip="example.org")


def test_newest_first_walks_blocks_backwards(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path, segment_size=4096, block_records=4) as w:
        w.append_events(event(i) for i in range(100))
    j = Journal(tmp_path)
    assert len(j.segments()) > 3
    assert numbers(j.query(newest_first=True)) == list(range(99, -1, -1))
    j.reset_stats()
    assert numbers(j.query(newest_first=True, limit=3)) == [99, 98, 97]
    assert j.stats.opened == 1
    since = EventFilter(since=T0 + 50)
    assert numbers(j.query(since, newest_first=True)) == list(range(99, 49, -1))
    j.segments()[-1].index_path.unlink()  # as the active segment is
    assert numbers(j.query(newest_first=True, limit=2)) == [99, 98]


def test_index_lets_queries_skip_segments(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path, segment_size=4096) as w:
        w.append_events(event(i, {"client.ip": f"192.0.2.{i // 10}"}) for i in range(200))
    j = Journal(tmp_path)
    segments = j.segments()
    assert len(segments) > 5
    assert list(j.query(EventFilter(ip="203.0.113.1"))) == []
    assert j.stats.opened == 0
    assert j.stats.skipped == len(segments)
    j.reset_stats()
    assert numbers(j.query(EventFilter(ip="192.0.2.7"))) == list(range(70, 80))
    assert j.stats.opened <= 2
    j.reset_stats()
    # without an index (or with a damaged one) a segment is scanned
    segments[0].index_path.unlink()
    segments[1].index_path.write_bytes(b"garbage")
    assert list(j.query(EventFilter(ip="203.0.113.1"))) == []
    assert j.stats.opened == j.stats.scanned == 2


def test_since_seeks_with_the_block_index(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path, block_records=10) as w:
        w.append_events(event(i) for i in range(100))
    j = Journal(tmp_path)
    assert numbers(j.query(EventFilter(since=T0 + 55))) == list(range(55, 100))
    assert j.stats.decoded == 50  # blocks 0..4 were not read
    j.reset_stats()
    assert numbers(j.query(EventFilter(until=T0 + 12))) == list(range(12))
    assert j.stats.decoded == 20


# --------------------------------------------------------------------------- follow


async def test_follow_across_rotation(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, segment_size=4096)
    j = Journal(tmp_path)
    got: list[int] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)

            async def produce() -> None:
                for i in range(300):
                    writer.submit(event(i))
                    if i % 10 == 0:
                        await trio.sleep(0.002)

            nursery.start_soon(produce)
            async with aclosing(j.follow(from_end=False, poll_interval=0.005)) as events:
                async for e in events:
                    got.append(e["n"])
                    if len(got) == 300:
                        break
            writer.close()
    assert got == list(range(300))
    assert len(j.segments()) > 5


def test_follower_from_end_with_filter_and_retention(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path, segment_size=4096) as w:
        w.append_events(event(i) for i in range(50))
        j = Journal(tmp_path)
        follower = j.follower(EventFilter(kind="verdict"))
        assert follower.poll() == []  # positions itself after the last record
        w.append_events(
            event(i, {"event.kind": "verdict" if i % 2 else "alert"}) for i in range(50, 60)
        )
        assert numbers(follower.poll()) == [51, 53, 55, 57, 59]
        assert follower.poll() == []
        # retention removes the segment under the follower: it goes on with the next
        w.append_events(event(i, {"event.kind": "verdict"}) for i in range(60, 120))
        [current] = [s for s in j.segments() if s.seq == follower.seq]
        current.path.unlink()
        current.index_path.unlink()
        left = [n for n in numbers(j.query(EventFilter(kind="verdict"))) if n >= 60]
        assert left == list(range(left[0], 120))
        assert numbers(follower.poll()) == left
        assert j.stats.vanished == 1


def test_follower_waits_for_a_half_written_record(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path) as w:
        w.append_events([event(0)])
    [seg] = Journal(tmp_path).segments()
    seg.index_path.unlink()
    data = seg.path.read_bytes()
    # a record half written: the follower must wait for it, not skip it
    with SegmentWriter(tmp_path / "x") as w2:
        w2.append_events([event(1)])
    [other] = Journal(tmp_path / "x").segments()
    record = other.path.read_bytes()[HEADER_SIZE:]
    seg.path.write_bytes(data + record[:10])
    follower = Journal(tmp_path).follower(from_end=False)
    assert numbers(follower.poll()) == [0]
    assert follower.poll() == []
    seg.path.write_bytes(data + record)
    assert numbers(follower.poll()) == [1]
    assert follower.journal.stats.corrupt == 0


# --------------------------------------------------------------------------- scale


def test_a_million_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A day of journal: generation and selective queries (figures printed, not asserted)."""
    total = 1_000_000
    step = 86400 / total
    clock = Clock()
    seconds: dict[int, str] = {}

    def ts(t: float) -> str:
        sec = int(t)
        prefix = seconds.get(sec)
        if prefix is None:
            prefix = seconds[sec] = stamp(sec)[:19]
        return f"{prefix}.{int((t - sec) * 1000):03d}Z"

    rare_ip = {i * 137_911 % total for i in range(7)}
    rare_user = {i * 199_999 % total + 3 for i in range(5)}

    def generate() -> Iterator[dict[str, Any]]:
        for i in range(total):
            t = T0 + i * step
            clock.now = t
            e: dict[str, Any] = {
                "@timestamp": ts(t),
                "event.kind": "session",
                "event.action": "auth.attempt",
                "event.outcome": "failure",
                "node.name": "edge-1",
                "session.id": f"{i // 8:020x}",
                "session.protocol": "smtp",
                "client.ip": "203.0.113.77" if i in rare_ip else f"10.0.{i % 80}.{i * 7 % 250}",
                "auth.user": "rare@example.org" if i in rare_user else f"u{i % 5000}@example.org",
            }
            if i % 100 == 0:
                e["event.kind"] = "verdict"
                e["event.action"] = "rule.match"
                e["verdict.action"] = "deny"
                e["rule.id"] = "MM-AUTH-0001"
            yield e

    started = time.perf_counter()
    with SegmentWriter(tmp_path, clock=clock) as w:
        assert w.append_events(generate()) == total
    generation = time.perf_counter() - started
    j = Journal(tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.iterdir())

    figures: list[str] = []

    def timed(name: str, where: EventFilter, want: int) -> None:
        j.reset_stats()
        t = time.perf_counter()
        n = sum(1 for _ in j.query(where))
        took = time.perf_counter() - t
        assert n == want, name
        s = j.stats
        figures.append(f"{name}: {n} in {took:.2f} s ({s.opened}/{s.segments} segments opened)")

    timed("ip (7 events)", EventFilter(ip="203.0.113.77"), 7)
    timed("absent ip", EventFilter(ip="192.0.2.1"), 0)
    assert j.stats.opened == 0
    timed("user (5 events)", EventFilter(user="rare@example.org"), 5)
    last_hour = T0 + 23 * 3600
    first = next(i for i in range(total) if T0 + i * step >= last_hour)
    timed("since (last hour)", EventFilter(since=last_hour), total - first)
    timed("session", EventFilter(session=f"{12345:020x}"), 8)
    timed("blocked", EventFilter(blocked=True), total // 100)
    with capsys.disabled():
        print(f"\njournal: {total} events, {len(j.segments())} segments, {size / 2**20:.0f} MiB")
        print(f"journal: generation (bulk writer) {generation:.1f} s")
        for line in figures:
            print(f"journal: {line}")
