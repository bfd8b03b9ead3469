"""Reading the journal: queries, one session, following the tail.

Contract: :meth:`Journal.query` yields the events an :class:`EventFilter`
selects, in journal order (oldest segment first, records in the order they
were written) or newest first, never raises for damaged data (a record whose
CRC fails is skipped and counted in :attr:`Journal.stats`, a torn tail is
skipped and measured), and tolerates a writer appending and retention
deleting while it reads.  A sealed segment whose index rules the filter out
is not opened at all; one without a usable index (the active segment, one a
crash left) is scanned.  :class:`Follower` and :meth:`Journal.follow` yield
records as they are appended, across rotation, and skip segments retention
removed under them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, final

import msgpack
import trio

from ._journal_format import (
    FRAME_SIZE,
    HEADER_SIZE,
    MAX_RECORD,
    FrameScan,
    SegmentFile,
    SegmentIndex,
    ascii_lower,
    ascii_upper,
    decode_index,
    event_time,
    is_blocked,
    list_segments,
    normalize_ip,
    unpack_event,
)

#: bytes a follower reads per poll at most (more than a record, so it always progresses)
FOLLOW_CHUNK: Final = 4 * 1024 * 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


_RELATIVE: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float) -> float:
    """``1h`` (ago), ``30m``, ``2d``, ``90s``, ``1w`` or an ISO 8601 time (UTC if no zone)."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use 1h, 30m, 2d (ago) or 2026-11-28T14:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a query wants; every field given must match (``None``: any).

    - ``since``/``until``: epoch seconds, ``since <= @timestamp < until``; an
      event without a readable ``@timestamp`` never matches a time bound.
    - ``protocol``: ``session.protocol``; ``user``: ``auth.user``, equal up to
      ASCII case; ``ip``: an address or CIDR, matched against ``client.ip``;
      ``rule``: ``rule.id``; ``country``: ``client.geo.country`` up to ASCII
      case; ``session``: ``session.id``; ``action``: ``event.action``;
      ``kind``: ``event.kind``.  Fields match only events that carry them:
      ``user`` finds ``auth.attempt`` and IMAP's ``session.close``, not every
      event of that user's sessions (query the session for that).
    - ``blocked``: ``True`` for events that record a refusal, ``False`` for
      the others; see :func:`mailmoat.events.journal.is_blocked`.

    An ``ip`` that is neither an address nor a network raises ``ValueError``.
    """

    since: float | None = None
    until: float | None = None
    protocol: str | None = None
    user: str | None = None
    ip: str | None = None
    rule: str | None = None
    country: str | None = None
    session: str | None = None
    blocked: bool | None = None
    action: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.ip is not None:
            _parse_ip_filter(self.ip)


def _parse_ip_filter(text: str) -> str | IPNetwork:
    """One address (canonical text) or a network of more than one."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {text!r}") from None
    if net.num_addresses == 1:
        return normalize_ip(str(net.network_address))
    return net


@final
class _Matcher:
    """An :class:`EventFilter` compiled for speed.

    ``needles`` are msgpack encodings of exact string values a matching
    record must contain: a record without them is skipped without decoding
    it (our writer always uses the shortest encoding of a string).
    """

    def __init__(self, f: EventFilter) -> None:
        self.f = f
        ip = _parse_ip_filter(f.ip) if f.ip is not None else None
        self.ip_exact = ip if isinstance(ip, str) else None
        self.ip_net = None if ip is None or isinstance(ip, str) else ip
        self.user = ascii_lower(f.user) if f.user is not None else None
        self.country = ascii_upper(f.country) if f.country is not None else None
        #: (event field, wanted value) compared as they are
        self.exact: list[tuple[str, str]] = [
            (name, value)
            for name, value in (
                ("session.id", f.session),
                ("client.ip", self.ip_exact),
                ("rule.id", f.rule),
                ("session.protocol", f.protocol),
                ("event.action", f.action),
                ("event.kind", f.kind),
            )
            if value is not None
        ]
        self.needles = [msgpack.packb(value) for _, value in self.exact]
        net = self.ip_net
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen >= 8:
            # every address of the network spells its leading whole octets alike
            octets = str(net.network_address).split(".")[: net.prefixlen // 8]
            self.needles.append(".".join(octets).encode() + b".")
        self.user_needle = msgpack.packb(self.user).lower() if self.user is not None else None
        self.timed = f.since is not None or f.until is not None
        self._ip_cache: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}

    # ------------------------------------------------------------------ whole segments

    def may_match(self, index: SegmentIndex) -> bool:
        f = self.f
        if index.count == 0:
            return False
        if f.since is not None and (index.t_max is None or index.t_max < f.since):
            return False
        if f.until is not None and (index.t_min is None or index.t_min >= f.until):
            return False
        if f.blocked is True and index.blocked == 0:
            return False
        if f.blocked is False and index.blocked >= index.count:
            return False
        fields = index.fields
        wanted = [*self.exact]
        if self.user is not None:
            wanted.append(("auth.user", self.user))
        if self.country is not None:
            wanted.append(("client.geo.country", self.country))
        for name, value in wanted:
            values = fields.get(name)
            if values is not None and not values.may_contain(value):
                return False
        net = self.ip_net
        if net is not None:
            values = fields.get("client.ip")
            if values is not None and values.exact is not None:
                return any(self._address_in(ip, net) for ip in values.exact)
        return True

    def ranges(self, index: SegmentIndex, *, merge: bool = True) -> list[tuple[int, int]]:
        """Byte ranges of the blocks whose time range meets the filter's (adjacent ones merged)."""
        f = self.f
        out: list[tuple[int, int]] = []
        for i, block in enumerate(index.blocks):
            if self.timed:
                if block.t_min is None or block.t_max is None:
                    continue
                if f.since is not None and block.t_max < f.since:
                    continue
                if f.until is not None and block.t_min >= f.until:
                    continue
            start, end = block.offset, index.block_end(i)
            if merge and out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    # ------------------------------------------------------------------ records

    def prefilter(self, buf: bytes, start: int, end: int) -> bool:
        """Can the payload ``buf[start:end]`` match at all? (No decoding.)"""
        for needle in self.needles:
            if buf.find(needle, start, end) < 0:
                return False
        if self.user_needle is not None and self.user_needle not in buf[start:end].lower():
            return False
        if self.f.blocked is True:
            return (
                buf.find(b"verdict.action", start, end) >= 0
                or buf.find(b"session.close_reason", start, end) >= 0
            )
        return True

    def matches(self, e: dict[str, Any]) -> bool:
        get = e.get
        for name, value in self.exact:
            if get(name) != value:
                return False
        f = self.f
        if self.user is not None:
            v = get("auth.user")
            if not isinstance(v, str) or ascii_lower(v) != self.user:
                return False
        if self.country is not None:
            v = get("client.geo.country")
            if not isinstance(v, str) or ascii_upper(v) != self.country:
                return False
        if self.ip_net is not None:
            v = get("client.ip")
            if not isinstance(v, str) or not self._address_in(v, self.ip_net):
                return False
        if self.timed:
            t = event_time(e)
            if t is None:
                return False
            if f.since is not None and t < f.since:
                return False
            if f.until is not None and t >= f.until:
                return False
        return f.blocked is None or is_blocked(e) == f.blocked

    def _address_in(self, text: str, net: IPNetwork) -> bool:
        cache = self._ip_cache
        addr = cache.get(text, False)
        if addr is False:
            try:
                parsed = ipaddress.ip_address(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
                parsed = parsed.ipv4_mapped
            if len(cache) >= 65536:
                cache.clear()
            addr = cache[text] = parsed
        return addr is not None and addr in net


@dataclass
class ReadStats:
    """What readers of one :class:`Journal` did; cumulative, see :meth:`Journal.reset_stats`."""

    #: segments a query or follower considered
    segments: int = 0
    #: segments skipped on their index alone (body not opened)
    skipped: int = 0
    #: segment bodies opened
    opened: int = 0
    #: of those, read without a usable index (scanned whole)
    scanned: int = 0
    #: records decoded
    decoded: int = 0
    #: damaged records skipped (CRC failed, not msgpack, resync)
    corrupt: int = 0
    #: bytes at the end of segments that are not a whole record (torn, or not yet written)
    torn_bytes: int = 0
    #: segments that vanished (retention) while being read
    vanished: int = 0


def _read_range(path: Path, start: int, end: int | None) -> bytes:
    with path.open("rb") as fh:
        fh.seek(start)
        return fh.read() if end is None else fh.read(end - start)


@final
class Journal:
    """A journal directory, read-only; see the module docstring."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.stats = ReadStats()
        self._indexes: dict[Path, tuple[tuple[int, int], SegmentIndex | None]] = {}

    def reset_stats(self) -> ReadStats:
        """The counters so far; start afresh."""
        stats, self.stats = self.stats, ReadStats()
        return stats

    def segments(self) -> list[SegmentFile]:
        return list_segments(self.directory)

    def index(self, segment: SegmentFile) -> SegmentIndex | None:
        """The segment's index if usable (cached while its file is unchanged)."""
        try:
            st = segment.index_path.stat()
            size = segment.path.stat().st_size
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._indexes.get(segment.path)
        if cached is not None and cached[0] == key:
            index = cached[1]
        else:
            try:
                index = decode_index(segment.index_path.read_bytes())
            except (OSError, ValueError):
                index = None
            if len(self._indexes) > 4096:
                self._indexes.clear()
            self._indexes[segment.path] = (key, index)
        return index if index is not None and index.size == size else None

    # ------------------------------------------------------------------ queries

    def query(
        self,
        where: EventFilter | None = None,
        *,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The events ``where`` selects; oldest first unless ``newest_first``; at most ``limit``."""
        matcher = _Matcher(where or EventFilter())
        if limit is not None and limit <= 0:
            return
        segments = self.segments()
        if newest_first:
            segments.reverse()
        left = limit
        for seg in segments:
            for event in self._segment(seg, matcher, reverse=newest_first):
                yield event
                if left is not None:
                    left -= 1
                    if left == 0:
                        return

    def session(self, session_id: str) -> list[dict[str, Any]]:
        """Every event of one session, in journal order."""
        return list(self.query(EventFilter(session=session_id)))

    def _segment(
        self, seg: SegmentFile, matcher: _Matcher, *, reverse: bool = False
    ) -> Iterator[dict[str, Any]]:
        """The matching records of one segment; ``reverse`` reads its blocks last to first."""
        stats = self.stats
        stats.segments += 1
        index = self.index(seg)
        ranges: list[tuple[int, int | None]]
        if index is not None:
            if not matcher.may_match(index):
                stats.skipped += 1
                return
            ranges = [(start, end) for start, end in matcher.ranges(index, merge=not reverse)]
            if not ranges:
                stats.skipped += 1
                return
        else:
            ranges = [(HEADER_SIZE, None)]
            stats.scanned += 1
        stats.opened += 1
        try:
            size = seg.path.stat().st_size
        except FileNotFoundError:
            stats.vanished += 1
            return
        for start, end in reversed(ranges) if reverse else ranges:
            try:
                buf = _read_range(seg.path, start, end)
            except FileNotFoundError:
                stats.vanished += 1
                return
            scan = FrameScan(buf, 0)
            if reverse:
                # frames first (two ints each), then decode from the last one
                frames = list(scan)
                for offset, stop in reversed(frames):
                    event = self._decode(buf, offset, stop, matcher)
                    if event is not None:
                        yield event
            else:
                for offset, stop in scan:
                    event = self._decode(buf, offset, stop, matcher)
                    if event is not None:
                        yield event
            stats.corrupt += scan.corrupt
            if scan.tail:
                if end is None or end >= size:
                    stats.torn_bytes += scan.tail
                else:
                    stats.corrupt += 1  # damage at the end of a block

    def _decode(
        self, buf: bytes, offset: int, stop: int, matcher: _Matcher
    ) -> dict[str, Any] | None:
        """The record framed at ``offset`` if it matches (prefiltered on its bytes first)."""
        start = offset + FRAME_SIZE
        if not matcher.prefilter(buf, start, stop):
            return None
        event = unpack_event(buf[start:stop])
        self.stats.decoded += 1
        if event is None:
            self.stats.corrupt += 1
            return None
        return event if matcher.matches(event) else None

    def _records(self, buf: bytes, scan: FrameScan, matcher: _Matcher) -> Iterator[dict[str, Any]]:
        for offset, stop in scan:
            event = self._decode(buf, offset, stop, matcher)
            if event is not None:
                yield event

    # ------------------------------------------------------------------ following

    def follower(self, where: EventFilter | None = None, *, from_end: bool = True) -> Follower:
        return Follower(self, where, from_end=from_end)

    async def follow(
        self,
        where: EventFilter | None = None,
        *,
        from_end: bool = True,
        poll_interval: float = 0.25,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield matching events as they are appended (forever; cancel or ``aclose`` to stop).

        ``from_end`` starts after the last whole record; otherwise at the
        oldest segment (with ``since``, older segments are skipped on their
        indexes).  Reading happens in a worker thread.
        """
        follower = Follower(self, where, from_end=from_end)
        while True:
            events, more = await trio.to_thread.run_sync(follower.poll_more)
            for event in events:
                yield event
            if not more:
                await trio.sleep(poll_interval)


@final
class Follower:
    """A cursor on the journal's tail: :meth:`poll` returns what was appended since.

    Synchronous (it reads files); :meth:`Journal.follow` runs it in a thread.
    At a rotation the writer finishes a segment before it creates the next,
    so once a newer segment exists, the follower reads the old one to its end
    (a torn tail there is skipped) and moves on.  If retention removed the
    segment it was reading, it goes on with the oldest one left after it.
    """

    def __init__(
        self, journal: Journal, where: EventFilter | None = None, *, from_end: bool = True
    ) -> None:
        self.journal = journal
        self.matcher = _Matcher(where or EventFilter())
        self.from_end = from_end
        self.seq: int | None = None
        self.offset = HEADER_SIZE

    def poll(self) -> list[dict[str, Any]]:
        """The matching records appended since the last poll (all of them)."""
        out: list[dict[str, Any]] = []
        for _ in range(10_000):
            events, more = self.poll_more()
            out += events
            if not more:
                break
        return out

    def poll_more(self) -> tuple[list[dict[str, Any]], bool]:
        """One step: some records, and whether more are ready to read at once."""
        segments = self.journal.segments()
        if not segments:
            return [], False
        if self.seq is None:
            if self.from_end:
                self.seq, self.offset = segments[-1].seq, self._end_of_records(segments[-1])
                return [], False
            self.seq, self.offset = segments[0].seq, HEADER_SIZE
        current = next((s for s in segments if s.seq >= self.seq), None)
        if current is None:
            return [], False
        if current.seq != self.seq:
            self.journal.stats.vanished += 1
            self.seq, self.offset = current.seq, HEADER_SIZE
        sealed = current is not segments[-1]
        if self.offset == HEADER_SIZE and sealed:
            events = self._whole(current)
            if events is not None:
                return self._advance(segments, current, events)
        try:
            buf = _read_range(current.path, self.offset, self.offset + FOLLOW_CHUNK)
        except FileNotFoundError:
            return [], True
        at_eof = len(buf) < FOLLOW_CHUNK
        stats = self.journal.stats
        scan = FrameScan(buf, 0, wait_incomplete=not (sealed and at_eof))
        events = list(self.journal._records(buf, scan, self.matcher))
        stats.corrupt += scan.corrupt
        consumed = scan.stop
        if scan.tail and not at_eof and consumed == 0:
            # a whole chunk without one valid frame: skip all of it that
            # cannot hold the start of one
            consumed = len(buf) - (MAX_RECORD + FRAME_SIZE)
            stats.corrupt += 1
        self.offset += consumed
        if sealed and at_eof:
            stats.torn_bytes += scan.tail
            return self._advance(segments, current, events)
        return events, not at_eof

    def _whole(self, seg: SegmentFile) -> list[dict[str, Any]] | None:
        """A sealed segment read from its start through its index, or ``None`` to scan."""
        journal = self.journal
        if journal.index(seg) is None:
            return None
        return list(journal._segment(seg, self.matcher))

    def _advance(
        self, segments: list[SegmentFile], current: SegmentFile, events: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], bool]:
        later = [s for s in segments if s.seq > current.seq]
        self.seq, self.offset = later[0].seq, HEADER_SIZE
        return events, True

    def _end_of_records(self, seg: SegmentFile) -> int:
        """Where the last whole record of a segment ends (a record may be half written)."""
        try:
            buf = seg.path.read_bytes()
        except FileNotFoundError:
            return HEADER_SIZE
        scan = FrameScan(buf, HEADER_SIZE, wait_incomplete=True)
        for _ in scan:
            pass
        return scan.stop
