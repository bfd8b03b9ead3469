"""Writing the journal: the synchronous segment writer and the trio writer task.

Contract: :class:`SegmentWriter` owns a journal directory (an exclusive
``flock`` on ``.lock``, so a second writer fails with
:class:`JournalError`), appends framed records to the active segment,
rotates it by size and age, seals a segment by writing its index, and
deletes the oldest sealed segments by age and total size -- never the active
one.  It does blocking I/O and is meant to run in a worker thread (or in a
test or a bulk import).

:class:`JournalWriter` is what the node uses: :meth:`~JournalWriter.submit`
never blocks (it encodes the event and puts it in a bounded channel, or
counts it as dropped), and :meth:`~JournalWriter.run` drains the channel in
batches, each written by one ``trio.to_thread.run_sync`` call.  An I/O error
(a full disk) drops the batch, is counted, and the writer carries on: the
journal must never stop the mail.  Closing the channel or cancelling
``run`` writes everything already accepted and seals the segment.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self, final

import trio

from mailmoat.config import JournalConfig

from ._emitter import wall_clock
from ._journal_format import (
    FRAME,
    FRAME_SIZE,
    HEADER_SIZE,
    INDEX_SUFFIX,
    MAGIC,
    MAX_RECORD,
    IndexBuilder,
    JournalError,
    SegmentFile,
    bloom_bits_for,
    list_segments,
    pack_event,
    read_index,
    scan_index,
    segment_name,
)

# the defaults are ``[journal]``'s (one place for the numbers)
_CONFIG: Final = JournalConfig()
DEFAULT_SEGMENT_SIZE: Final = _CONFIG.segment_size
DEFAULT_SEGMENT_AGE: Final = _CONFIG.segment_age
DEFAULT_RETAIN_AGE: Final = _CONFIG.retain_age
DEFAULT_RETAIN_SIZE: Final = _CONFIG.retain_size
DEFAULT_QUEUE: Final = _CONFIG.queue
DEFAULT_FSYNC_INTERVAL: Final = _CONFIG.fsync_interval
#: how often (by the writer's clock) retention looks at the directory when idle
RETAIN_CHECK_INTERVAL: Final = 60.0
#: records per block of the sparse offset index
BLOCK_RECORDS: Final = 1024
#: distinct values a segment index keeps exactly per field before it uses a Bloom filter
EXACT_CAP: Final = 4096

Record = tuple[bytes, Mapping[str, Any]]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@final
class _Active:
    """The segment being written."""

    __slots__ = ("broken", "builder", "dirty", "fd", "segment", "size")

    def __init__(self, segment: SegmentFile, fd: int, builder: IndexBuilder) -> None:
        self.segment = segment
        self.fd = fd
        self.builder = builder
        self.size = HEADER_SIZE
        self.dirty = False
        #: a failed write could not be undone: rotate before writing more
        self.broken = False


@final
class SegmentWriter:
    """Synchronous journal writer; see the module docstring.

    ``fsync_interval``: ``None`` never fsyncs (the page cache survives a
    process crash, not a power loss); ``0`` fsyncs after every append;
    otherwise after an append or in :meth:`maintain` once that many seconds
    (by ``clock``) passed since the last fsync.  Sealing a segment fsyncs it
    and its index unless ``fsync_interval`` is ``None``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        segment_age: float = DEFAULT_SEGMENT_AGE,
        retain_age: float = DEFAULT_RETAIN_AGE,
        retain_size: int = DEFAULT_RETAIN_SIZE,
        fsync_interval: float | None = DEFAULT_FSYNC_INTERVAL,
        clock: Callable[[], float] = wall_clock,
        block_records: int = BLOCK_RECORDS,
        exact_cap: int = EXACT_CAP,
    ) -> None:
        if segment_size < 4096:
            raise ValueError("segment_size must be at least 4096 bytes")
        if segment_age <= 0 or retain_age <= 0 or retain_size <= 0:
            raise ValueError("segment_age, retain_age and retain_size must be positive")
        if fsync_interval is not None and fsync_interval < 0:
            raise ValueError("fsync_interval must be >= 0 or None")
        if block_records < 1 or exact_cap < 0:
            raise ValueError("block_records must be >= 1 and exact_cap >= 0")
        self.directory = Path(directory)
        self.segment_size = segment_size
        self.segment_age = segment_age
        self.retain_age = retain_age
        self.retain_size = retain_size
        self.fsync_interval = fsync_interval
        self.clock = clock
        self.block_records = block_records
        self.exact_cap = exact_cap
        self.bloom_bits = bloom_bits_for(segment_size)
        #: records handed to ``write()`` since :meth:`open`
        self.written = 0
        #: segments removed by retention
        self.deleted = 0
        #: the last error retention or recovery met and went past
        self.last_error: str | None = None
        self._active: _Active | None = None
        self._lock_fd: int | None = None
        self._next_seq = 1
        self._last_fsync = 0.0
        self._last_retain = 0.0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def active(self) -> SegmentFile | None:
        return None if self._active is None else self._active.segment

    def open(self) -> None:
        """Lock the directory, index segments a crash left unsealed, start a segment."""
        if self._lock_fd is not None:
            raise JournalError("journal writer already open")
        directory = self.directory
        try:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise JournalError(f"{directory}: cannot open journal: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalError(f"{directory}: journal in use by another writer") from exc
            raise JournalError(f"{directory}: cannot lock journal: {exc.strerror}") from exc
        self._lock_fd = fd
        try:
            self._recover()
            now = self.clock()
            self._start(now)
            self._last_fsync = now
            self._retain(now)
        except OSError as exc:
            if self._active is not None:
                os.close(self._active.fd)
                self._active = None
            self._unlock()
            raise JournalError(f"{directory}: cannot open journal: {exc.strerror}") from exc

    def close(self) -> None:
        """Seal the active segment (or remove it if empty) and unlock. Idempotent."""
        try:
            self._seal()
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self) -> None:
        """Give a segment left without a (valid) index one; drop empty segments and debris."""
        segments = list_segments(self.directory)
        known = {s.path.stem for s in segments}
        for name in os.listdir(self.directory):
            path = self.directory / name
            if name.endswith(".tmp") or (name.endswith(INDEX_SUFFIX) and path.stem not in known):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for seg in segments:
            if read_index(seg) is not None:
                continue
            try:
                if seg.path.stat().st_size <= HEADER_SIZE:
                    seg.path.unlink()
                    continue
                builder, size = scan_index(
                    seg.path,
                    block_records=self.block_records,
                    exact_cap=self.exact_cap,
                    bloom_bits=self.bloom_bits,
                )
                self._write_index(seg, builder, size)
            except OSError as exc:
                # readers scan a segment without an index; go on
                self.last_error = f"{seg.path}: {exc.strerror}"
        if segments:
            self._next_seq = segments[-1].seq + 1

    # ------------------------------------------------------------------ writing

    def append(self, records: Iterable[Record]) -> int:
        """Write ``(payload, event)`` records (payload from :func:`pack_event`); how many.

        One ``write()`` per segment touched.  On an ``OSError`` the segment is
        cut back to its last whole record (or, failing that, retired at the
        next append) and the error propagates; records written before it, in
        an earlier segment of the same call, stay written.
        """
        before = self.written
        now = self.clock()
        active = self._require(now)
        # (a clock stepped back does not rotate: that would make a flood of segments)
        if active.broken or now - active.segment.start >= self.segment_age:
            self._rotate(now)
            active = self._require(now)
        buf = bytearray()
        pending: list[tuple[Mapping[str, Any], int]] = []
        crc32, pack_header, limit = zlib.crc32, FRAME.pack, self.segment_size
        for payload, event in records:
            if not 0 < len(payload) <= MAX_RECORD:
                raise ValueError("a record payload must be 1 byte .. MAX_RECORD")
            if (active.builder.count or pending) and (
                active.size + len(buf) + FRAME_SIZE + len(payload) > limit
            ):
                self._commit(active, buf, pending)
                buf, pending = bytearray(), []
                self._rotate(now)
                active = self._require(now)
            pending.append((event, active.size + len(buf)))
            buf += pack_header(len(payload), crc32(payload))
            buf += payload
        self._commit(active, buf, pending)
        self._maybe_fsync(active, now)
        return self.written - before

    def append_events(self, events: Iterable[Mapping[str, Any]], *, chunk: int = 4096) -> int:
        """Encode and write events, ``chunk`` per ``append`` (bulk: no channel, no trio)."""
        n = 0
        it = iter(events)
        while batch := [(pack_event(e), e) for e in itertools.islice(it, chunk)]:
            n += self.append(batch)
        return n

    def _commit(
        self, active: _Active, buf: bytearray, pending: Sequence[tuple[Mapping[str, Any], int]]
    ) -> None:
        if not buf:
            return
        try:
            _write_all(active.fd, buf)
        except OSError:
            try:
                os.ftruncate(active.fd, active.size)
                os.lseek(active.fd, active.size, os.SEEK_SET)
            except OSError:
                active.broken = True
            raise
        builder = active.builder
        for event, offset in pending:
            builder.add(event, offset)
        active.size += len(buf)
        active.dirty = True
        self.written += len(pending)

    def maintain(self) -> None:
        """Housekeeping between appends: rotation by age, due fsync, retention."""
        now = self.clock()
        active = self._require(now)
        if active.builder.count and now - active.segment.start >= self.segment_age:
            self._rotate(now)
            active = self._require(now)
        self._maybe_fsync(active, now)
        if not 0 <= now - self._last_retain < RETAIN_CHECK_INTERVAL:
            self._retain(now)

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def _require(self, now: float) -> _Active:
        """The active segment; a new one if sealing the last one failed halfway."""
        if self._lock_fd is None:
            raise JournalError("journal writer is not open")
        if self._active is None:
            self._start(now)
            assert self._active is not None
        return self._active

    def _maybe_fsync(self, active: _Active, now: float) -> None:
        interval = self.fsync_interval
        if interval is None or not active.dirty:
            return
        # a clock stepped back counts as due
        if not 0 <= now - self._last_fsync < interval:
            os.fsync(active.fd)
            active.dirty = False
            self._last_fsync = now

    # ------------------------------------------------------------------ segments

    def _start(self, now: float) -> None:
        seq = self._next_seq
        self._next_seq += 1
        segment = SegmentFile(seq, int(now), self.directory / segment_name(seq, now))
        fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, MAGIC)
            if self.fsync_interval is not None:
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        builder = IndexBuilder(
            block_records=self.block_records, exact_cap=self.exact_cap, bloom_bits=self.bloom_bits
        )
        self._active = _Active(segment, fd, builder)

    def _seal(self) -> None:
        active = self._active
        if active is None:
            return
        self._active = None
        try:
            if active.builder.count == 0:
                os.close(active.fd)
                active.fd = -1
                active.segment.path.unlink()
                return
            if self.fsync_interval is not None:
                os.fsync(active.fd)
            size = os.fstat(active.fd).st_size
            os.close(active.fd)
            active.fd = -1
            self._write_index(active.segment, active.builder, size)
        finally:
            if active.fd >= 0:
                os.close(active.fd)

    def _write_index(self, segment: SegmentFile, builder: IndexBuilder, size: int) -> None:
        path = segment.index_path
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, builder.encode(size))
            if self.fsync_interval is not None:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _rotate(self, now: float) -> None:
        try:
            self._seal()
        finally:
            self._start(now)
        self._retain(now)

    def _retain(self, now: float) -> None:
        """Delete sealed segments older than ``retain_age``, then oldest first to ``retain_size``.

        A sealed segment's age runs from its end, which is the start of the
        segment after it.  The active segment is never deleted.
        """
        self._last_retain = now
        active = self._active
        segments = list_segments(self.directory)
        sizes: dict[int, int] = {}
        for seg in segments:
            size = 0
            for path in (seg.path, seg.index_path):
                with contextlib.suppress(FileNotFoundError):
                    size += path.stat().st_size
            sizes[seg.seq] = size
        total = sum(sizes.values())
        horizon = now - self.retain_age
        for seg, after in itertools.pairwise(segments):
            if active is not None and seg.seq >= active.segment.seq:
                break
            expired = after.start <= horizon or total > self.retain_size
            if expired and self._delete(seg):
                total -= sizes[seg.seq]

    def _delete(self, seg: SegmentFile) -> bool:
        try:
            seg.path.unlink(missing_ok=True)
            seg.index_path.unlink(missing_ok=True)
        except OSError as exc:
            self.last_error = f"{seg.path}: {exc.strerror}"
            return False
        self.deleted += 1
        return True


@final
class JournalWriter:
    """The node's journal writer task; see the module docstring.

    Start :meth:`run` in a nursery (``await nursery.start(writer.run)``
    reports a directory that cannot be opened before the node serves), hand
    events to :meth:`submit` (or use :meth:`sink` as an emitter sink), and
    call :meth:`close` or cancel ``run`` to stop.  Poll
    :meth:`take_dropped` to learn of events lost since the last look.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        segment_age: float = DEFAULT_SEGMENT_AGE,
        retain_age: float = DEFAULT_RETAIN_AGE,
        retain_size: int = DEFAULT_RETAIN_SIZE,
        queue: int = DEFAULT_QUEUE,
        fsync_interval: float | None = DEFAULT_FSYNC_INTERVAL,
        clock: Callable[[], float] = wall_clock,
        max_batch: int = 1024,
        idle_interval: float = 1.0,
    ) -> None:
        if queue < 1 or max_batch < 1 or idle_interval <= 0:
            raise ValueError("queue and max_batch must be >= 1, idle_interval > 0")
        self.core = SegmentWriter(
            directory,
            segment_size=segment_size,
            segment_age=segment_age,
            retain_age=retain_age,
            retain_size=retain_size,
            fsync_interval=fsync_interval,
            clock=clock,
        )
        self.max_batch = max_batch
        self.idle_interval = idle_interval
        self._send, self._receive = trio.open_memory_channel[Record](queue)
        #: events accepted by :meth:`submit`
        self.accepted = 0
        #: batches an I/O error made us drop
        self.write_errors = 0
        self.last_error: str | None = None
        self._dropped = 0
        self._dropped_seen = 0
        self._closed = False

    @property
    def written(self) -> int:
        """Records handed to ``write()`` (they survive a crash of this process)."""
        return self.core.written

    @property
    def dropped(self) -> int:
        """Events lost in total: queue full, closed, unencodable, too big, or an I/O error."""
        return self._dropped

    def take_dropped(self) -> int:
        """Events dropped since the last call (for one alert event that says how many)."""
        n = self._dropped - self._dropped_seen
        self._dropped_seen = self._dropped
        return n

    def submit(self, event: Mapping[str, Any]) -> bool:
        """Queue an event without blocking; ``False`` (and counted as dropped) if it cannot be.

        The event is encoded here, so a later change to the mapping does not
        reach the journal's copy (the index still reads a few fields from it).
        """
        if self._closed:
            self._dropped += 1
            return False
        try:
            payload = pack_event(event)
        except (TypeError, ValueError, OverflowError):
            self._dropped += 1
            return False
        if len(payload) > MAX_RECORD:
            self._dropped += 1
            return False
        try:
            self._send.send_nowait((payload, event))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped += 1
            return False
        self.accepted += 1
        return True

    def sink(self, event: Mapping[str, Any]) -> None:
        """:meth:`submit` as an :class:`~mailmoat.events.EventSink`."""
        self.submit(event)

    def close(self) -> None:
        """Accept no more events; :meth:`run` writes what it has, seals and returns."""
        self._closed = True
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the journal, then write batches until :meth:`close` or cancellation."""
        core, receive = self.core, self._receive
        # taken from the channel, not yet written: a cancellation can strike
        # as ``to_thread.run_sync`` starts, before the thread ran
        batch: list[Record] = []
        try:
            await trio.to_thread.run_sync(core.open)
            task_status.started()
            while True:
                batch = []
                with trio.move_on_after(self.idle_interval):
                    try:
                        batch.append(await receive.receive())
                    except trio.EndOfChannel:
                        break
                if not batch:
                    await self._io(core.maintain, 0)
                    continue
                while len(batch) < self.max_batch:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._io(self._append_and_maintain, len(batch), batch)
                batch = []
        finally:
            with trio.CancelScope(shield=True):
                self.close()
                rest = batch
                while True:
                    try:
                        rest.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                receive.close()
                if core.is_open:
                    if rest:
                        await self._io(core.append, len(rest), rest)
                    await self._io(core.close, 0)
                else:
                    self._dropped += len(rest)

    def _append_and_maintain(self, batch: list[Record]) -> None:
        self.core.append(batch)
        self.core.maintain()

    async def _io(self, fn: Callable[..., object], records: int, *args: Any) -> None:
        """Blocking journal I/O in a worker thread; an ``OSError`` drops what it did not write."""
        before = self.core.written
        try:
            await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            self.write_errors += 1
            self.last_error = f"{exc.strerror or exc}"
            self._dropped += records - (self.core.written - before)
