"""The journal's on-disk format: frames, segment names, segment indexes.

Contract: a segment file is :data:`MAGIC` followed by frames, each
``length (u32 BE) + crc32 of the payload (u32 BE) + payload``, the payload
one msgpack map (an event).  :class:`FrameScan` walks the frames of a buffer,
skips a frame whose CRC fails by resyncing on the next valid frame (counted
in ``corrupt``) and stops where no valid frame follows (``stop``; what lies
beyond is a torn tail, or, in a segment still being written, a record not
yet complete).  :class:`IndexBuilder` collects a segment's sidecar index as
records are written or scanned; :func:`read_index` returns it, or ``None``
for an index that is missing, damaged or does not describe the segment as it
is now (then a reader scans the segment).  No trio and no clock here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, final

import msgpack

from mailmoat.errors import MailmoatError

from . import reasons

#: first bytes of every segment: name, format version, and the PNG trick
#: (CR LF, ^Z, LF) so that a text-mode copy or an ASCII transfer shows
MAGIC: Final = b"MMJ1\r\n\x1a\n"
HEADER_SIZE: Final = len(MAGIC)
#: first bytes of an index file; an index is one frame after them
INDEX_MAGIC: Final = b"MMI1\r\n\x1a\n"
INDEX_VERSION: Final = 1

FRAME: Final = struct.Struct(">II")
FRAME_SIZE: Final = FRAME.size
#: the largest payload a frame may carry.  Keeping it below 2**24 means the
#: first byte of every length is 0, which makes resyncing cheap.
MAX_RECORD: Final = 1 << 20

SEGMENT_SUFFIX: Final = ".mmj"
INDEX_SUFFIX: Final = ".idx"
_SEGMENT_NAME: Final = re.compile(r"^(\d{8,})-(\d+)\.mmj$")
_NONZERO: Final = re.compile(rb"[^\x00]")

#: ``verdict.action`` values that refused something
BLOCKING_ACTIONS: Final = frozenset({"deny", "reject", "ban", "tarpit"})
#: ``session.close_reason`` values that say mailmoat refused the session
#: (:data:`mailmoat.events.reasons.BLOCKING`: the refusals that lower a
#: source's reputation plus ``banned``, ``message_rejected``, the message size
#: limits and ``state_unavailable``)
BLOCKING_CLOSE_REASONS: Final = reasons.BLOCKING
#: what "blocked" meant when an index was written: a segment index counts its
#: blocked events, so an index written under other sets is stale and rescanned
BLOCKING_KEY: Final = hashlib.sha256(
    " ".join([*sorted(BLOCKING_ACTIONS), "/", *sorted(BLOCKING_CLOSE_REASONS)]).encode()
).hexdigest()[:12]


class JournalError(MailmoatError):
    """The journal cannot be used (its directory cannot be opened, or another writer holds it)."""


# --------------------------------------------------------------------------- records


def frame(payload: bytes) -> bytes:
    """One record as it is written: header and payload."""
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def pack_event(event: Mapping[str, Any]) -> bytes:
    """The msgpack payload of an event; values msgpack does not know become ``str``.

    Raises ``TypeError``, ``ValueError`` or ``OverflowError`` for what cannot
    be encoded even so (e.g. an integer beyond 64 bits, a lone surrogate).
    """
    return msgpack.packb(event if isinstance(event, dict) else dict(event), default=str)  # type: ignore[no-any-return]


def unpack_event(payload: bytes | memoryview) -> dict[str, Any] | None:
    """The event in a payload whose CRC held; ``None`` if it is not a msgpack map."""
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


@lru_cache(maxsize=4096)
def parse_timestamp(text: str) -> float | None:
    """An ISO-8601 ``@timestamp`` as seconds since the epoch (naive means UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def event_time(event: Mapping[str, Any]) -> float | None:
    value = event.get("@timestamp")
    if isinstance(value, str):
        return parse_timestamp(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def is_blocked(event: Mapping[str, Any]) -> bool:
    """Did this event record mailmoat refusing something?

    A verdict (``event.kind == "verdict"``: ``rule.match``,
    ``risk.threshold``, ``client.banned``) whose ``verdict.action`` is one of
    :data:`BLOCKING_ACTIONS`, or a ``session.close`` whose
    ``session.close_reason`` is one of :data:`BLOCKING_CLOSE_REASONS`.
    ``client.ban`` is not: the ``rule.match`` that decided the ban is.
    """
    if event.get("event.kind") == "verdict":
        return event.get("verdict.action") in BLOCKING_ACTIONS
    return (
        event.get("event.action") == "session.close"
        and event.get("session.close_reason") in BLOCKING_CLOSE_REASONS
    )


def ascii_lower(value: str) -> str:
    """Lower case in ASCII letters only (what user matching folds)."""
    return value.lower() if value.isascii() else value.encode().lower().decode()


def ascii_upper(value: str) -> str:
    return value.upper() if value.isascii() else value.encode().upper().decode()


def normalize_ip(text: str) -> str:
    """Canonical text of an address, IPv4-mapped IPv6 as IPv4; raises ``ValueError``."""
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# --------------------------------------------------------------------------- frames


def _resync(buf: bytes, view: memoryview, pos: int, end: int) -> int | None:
    """The first offset >= ``pos`` where a whole, valid frame starts, or ``None``."""
    last = end - FRAME_SIZE
    unpack, crc32 = FRAME.unpack_from, zlib.crc32
    while pos <= last:
        # every valid length is < 2**24, so a frame can only start at a zero byte
        pos = buf.find(b"\x00", pos, last + 1)
        if pos < 0:
            return None
        length, crc = unpack(buf, pos)
        if length == 0:
            # inside a run of zeros (a preallocated or unwritten tail): jump
            # to where a nonzero length could begin
            nonzero = _NONZERO.search(buf, pos, end)
            pos = max(pos + 1, (nonzero.start() if nonzero else end) - 3)
            continue
        stop = pos + FRAME_SIZE + length
        if length <= MAX_RECORD and stop <= end and crc32(view[pos + FRAME_SIZE : stop]) == crc:
            return pos
        pos += 1
    return None


@final
class FrameScan:
    """Walks the frames of ``buf[start:end]``; iterate for ``(frame_offset, payload_end)``.

    A frame is valid when its length is in ``1..MAX_RECORD``, it lies wholly
    before ``end`` and its CRC holds.  At an invalid frame the scan looks,
    byte by byte, for the next valid one: found, the bytes in between count
    as one ``corrupt`` record; not found, the scan stops there.  With
    ``wait_incomplete`` (a segment still being written) a frame whose length
    is sane but which runs past ``end`` also stops the scan: it is a record
    not yet complete, not damage.  After the iteration, ``stop`` is where
    unread bytes begin and ``tail`` how many there are.

    Resyncing means trusting a CRC at an arbitrary offset; the chance that
    bytes inside a damaged record pass for a frame is about 2**-32 per
    candidate offset.
    """

    __slots__ = ("buf", "corrupt", "corrupt_bytes", "end", "start", "stop", "view", "wait")

    def __init__(
        self, buf: bytes, start: int, end: int | None = None, *, wait_incomplete: bool = False
    ) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.start = start
        self.end = len(buf) if end is None else end
        self.wait = wait_incomplete
        self.corrupt = 0
        self.corrupt_bytes = 0
        self.stop = start

    @property
    def tail(self) -> int:
        return self.end - self.stop

    def __iter__(self) -> Iterator[tuple[int, int]]:
        buf, view, end = self.buf, self.view, self.end
        unpack, crc32 = FRAME.unpack_from, zlib.crc32
        pos = self.start
        while end - pos >= FRAME_SIZE:
            length, crc = unpack(buf, pos)
            stop = pos + FRAME_SIZE + length
            if 0 < length <= MAX_RECORD:
                if stop <= end:
                    if crc32(view[pos + FRAME_SIZE : stop]) == crc:
                        self.stop = stop
                        yield pos, stop
                        pos = stop
                        continue
                elif self.wait:
                    break
            found = _resync(buf, view, pos + 1, end)
            if found is None:
                break
            self.corrupt += 1
            self.corrupt_bytes += found - pos
            pos = found
        self.stop = pos


# --------------------------------------------------------------------------- segment files


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """A segment as its name describes it: ``<seq:08d>-<unix start>.mmj``."""

    seq: int
    start: int
    path: Path

    @property
    def index_path(self) -> Path:
        return self.path.with_suffix(INDEX_SUFFIX)


def segment_name(seq: int, start: float) -> str:
    return f"{seq:08d}-{max(0, int(start))}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[SegmentFile]:
    """The segments in ``directory``, oldest (lowest sequence number) first."""
    out: list[SegmentFile] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        m = _SEGMENT_NAME.match(name)
        if m is not None:
            out.append(SegmentFile(int(m[1]), int(m[2]), directory / name))
    out.sort(key=lambda s: s.seq)
    return out


# --------------------------------------------------------------------------- indexes


def _ident(value: str) -> str:
    return value


#: indexed fields, and how values are folded before they are stored or compared
INDEXED_FIELDS: Final = (
    ("session.id", _ident),
    ("client.ip", _ident),
    ("auth.user", ascii_lower),
    ("rule.id", _ident),
    ("session.protocol", _ident),
    ("client.geo.country", ascii_upper),
    ("event.kind", _ident),
    ("event.action", _ident),
)
BLOOM_HASHES: Final = 4


def _bloom_positions(value: str, mask: int) -> list[int]:
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little") | 1
    return [(h1 + i * h2) & mask for i in range(BLOOM_HASHES)]


def bloom_bits_for(segment_size: int) -> int:
    """Bloom filter size for a segment: one bit per 32 bytes, a power of two in 2**13..2**24."""
    bits = 1 << 13
    while bits < segment_size // 32 and bits < 1 << 24:
        bits <<= 1
    return bits


#: distinct values per field an index builder keeps in memory before it
#: switches that field to a Bloom filter (bounds its memory on a flood)
MEMORY_CAP: Final = 65536


@final
class ValueSet:
    """The distinct values of one field in one segment, while it is written.

    A set in memory (adding is one set insertion) up to :data:`MEMORY_CAP`
    values, then a Bloom filter of ``bits`` bits.  :meth:`wire` stores the
    values exactly if there are at most ``exact_cap`` of them, else the Bloom
    filter: with one bit per 32 bytes of segment and 4 hashes, a segment of
    200-byte events each with a different value answers "maybe" for an
    absent value about 1 % of the time, a realistic one far less.
    """

    __slots__ = ("bits", "bloom", "values")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.values: set[str] | None = set()
        self.bloom: bytearray | None = None

    def add(self, value: str) -> None:
        if self.values is not None:
            self.values.add(value)
        else:
            self._set(value)

    def compact(self) -> None:
        """Switch to the Bloom filter if the set outgrew :data:`MEMORY_CAP`."""
        values = self.values
        if values is not None and len(values) > MEMORY_CAP:
            self.bloom = bytearray(self.bits // 8)
            self.values = None
            for v in values:
                self._set(v)

    def _set(self, value: str) -> None:
        bloom = self.bloom
        assert bloom is not None
        for pos in _bloom_positions(value, self.bits - 1):
            bloom[pos >> 3] |= 1 << (pos & 7)

    def wire(self, exact_cap: int) -> list[str] | bytes:
        values = self.values
        if values is not None:
            if len(values) <= exact_cap:
                return sorted(values)
            self.bloom = bytearray(self.bits // 8)
            for v in values:
                self._set(v)
        assert self.bloom is not None
        return bytes(self.bloom)


@final
@dataclass(frozen=True, slots=True)
class ValueFilter:
    """A :class:`ValueSet` as read back: exact values, or a Bloom filter."""

    exact: frozenset[str] | None
    bloom: bytes | None

    def may_contain(self, value: str) -> bool:
        if self.exact is not None:
            return value in self.exact
        bloom = self.bloom
        assert bloom is not None
        mask = len(bloom) * 8 - 1
        return all(bloom[p >> 3] & (1 << (p & 7)) for p in _bloom_positions(value, mask))

    @classmethod
    def from_wire(cls, value: object) -> ValueFilter:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return cls(frozenset(value), None)
        if isinstance(value, bytes) and value and len(value) & (len(value) - 1) == 0:
            return cls(None, value)
        raise ValueError("bad value set")


@dataclass(frozen=True, slots=True)
class Block:
    """Every Nth record starts a block: where it starts, and its records' time range."""

    offset: int
    count: int
    t_min: float | None
    t_max: float | None


@dataclass(frozen=True, slots=True)
class SegmentIndex:
    """A sealed segment's sidecar index, as read back."""

    size: int
    count: int
    corrupt: int
    blocked: int
    t_min: float | None
    t_max: float | None
    fields: dict[str, ValueFilter]
    blocks: tuple[Block, ...]

    def block_end(self, i: int) -> int:
        return self.blocks[i + 1].offset if i + 1 < len(self.blocks) else self.size


def _opt_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError("bad time")


@final
class IndexBuilder:
    """Collects the index of one segment, one record at a time."""

    __slots__ = (
        "_adders",
        "_block",
        "block_records",
        "blocked",
        "blocks",
        "corrupt",
        "count",
        "exact_cap",
        "fields",
    )

    def __init__(
        self, *, block_records: int = 1024, exact_cap: int = 4096, bloom_bits: int
    ) -> None:
        self.block_records = block_records
        self.exact_cap = exact_cap
        self.count = 0
        self.corrupt = 0
        self.blocked = 0
        self.fields = {name: ValueSet(bloom_bits) for name, _ in INDEXED_FIELDS}
        self._adders = self._make_adders()
        #: blocks as [offset, count, t_min, t_max]; the last one grows
        self.blocks: list[list[Any]] = []
        self._block: list[Any] = [0, block_records, None, None]

    def _make_adders(self) -> list[tuple[str, Callable[[str], str] | None, Callable[[str], None]]]:
        out: list[tuple[str, Callable[[str], str] | None, Callable[[str], None]]] = []
        for name, fold in INDEXED_FIELDS:
            vs = self.fields[name]
            add = vs.values.add if vs.values is not None else vs.add
            out.append((name, None if fold is _ident else fold, add))
        return out

    def add(self, event: Mapping[str, Any], offset: int) -> None:
        """Note one record, written at ``offset`` (the start of its frame)."""
        block = self._block
        if block[1] >= self.block_records:
            for vs in self.fields.values():
                vs.compact()
            self._adders = self._make_adders()
            block = self._block = [offset, 0, None, None]
            self.blocks.append(block)
        block[1] += 1
        self.count += 1
        t = event_time(event)
        if t is not None:
            if block[2] is None or t < block[2]:
                block[2] = t
            if block[3] is None or t > block[3]:
                block[3] = t
        get = event.get
        for name, fold, add in self._adders:
            value = get(name)
            if value.__class__ is str:
                add(value if fold is None else fold(value))
        if is_blocked(event):
            self.blocked += 1

    @property
    def t_min(self) -> float | None:
        times = [b[2] for b in self.blocks if b[2] is not None]
        return min(times) if times else None

    @property
    def t_max(self) -> float | None:
        times = [b[3] for b in self.blocks if b[3] is not None]
        return max(times) if times else None

    def wire(self, size: int) -> dict[str, Any]:
        return {
            "v": INDEX_VERSION,
            "blocked_key": BLOCKING_KEY,
            "size": size,
            "count": self.count,
            "corrupt": self.corrupt,
            "blocked": self.blocked,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "fields": {name: vs.wire(self.exact_cap) for name, vs in self.fields.items()},
            "blocks": self.blocks,
        }

    def encode(self, size: int) -> bytes:
        """The index file's bytes for a segment of ``size`` bytes."""
        return INDEX_MAGIC + frame(msgpack.packb(self.wire(size)))


def decode_index(data: bytes) -> SegmentIndex:
    """Parse an index file; ``ValueError`` if it is damaged or of another version."""
    if not data.startswith(INDEX_MAGIC):
        raise ValueError("not a journal index")
    scan = FrameScan(data, len(INDEX_MAGIC))
    frames = list(scan)
    if len(frames) != 1 or scan.corrupt or scan.tail:
        raise ValueError("damaged index")
    offset, stop = frames[0]
    wire = unpack_event(data[offset + FRAME_SIZE : stop])
    if wire is None or wire.get("v") != INDEX_VERSION:
        raise ValueError("unknown index version")
    if wire.get("blocked_key") != BLOCKING_KEY:
        raise ValueError("index counted blocked events under other rules")
    try:
        blocks = tuple(
            Block(int(b[0]), int(b[1]), _opt_float(b[2]), _opt_float(b[3])) for b in wire["blocks"]
        )
        return SegmentIndex(
            size=int(wire["size"]),
            count=int(wire["count"]),
            corrupt=int(wire["corrupt"]),
            blocked=int(wire["blocked"]),
            t_min=_opt_float(wire["t_min"]),
            t_max=_opt_float(wire["t_max"]),
            fields={str(k): ValueFilter.from_wire(v) for k, v in wire["fields"].items()},
            blocks=blocks,
        )
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError("malformed index") from exc


def read_index(segment: SegmentFile) -> SegmentIndex | None:
    """The segment's index if it is readable and describes the segment as it is now."""
    try:
        data = segment.index_path.read_bytes()
        size = segment.path.stat().st_size
        index = decode_index(data)
    except (OSError, ValueError):
        return None
    return index if index.size == size else None


def scan_index(
    path: Path, *, block_records: int = 1024, exact_cap: int = 4096, bloom_bits: int
) -> tuple[IndexBuilder, int]:
    """Build a segment's index by reading it (a segment a crash left without one).

    Returns the builder and the segment's size.
    """
    data = path.read_bytes()
    builder = IndexBuilder(block_records=block_records, exact_cap=exact_cap, bloom_bits=bloom_bits)
    scan = FrameScan(data, HEADER_SIZE)
    for offset, stop in scan:
        event = unpack_event(data[offset + FRAME_SIZE : stop])
        if event is None:
            builder.corrupt += 1
            continue
        builder.add(event, offset)
    builder.corrupt += scan.corrupt
    return builder, len(data)
