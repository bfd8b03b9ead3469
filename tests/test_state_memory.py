"""The in-memory ban store: TTL, canonical addresses, bounded size."""

from __future__ import annotations

from pathlib import Path

from mailmoat.state import MemoryStore, normalize_ip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_ban_expires_and_ipv4_mapped_matches() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.ban("::ffff:198.51.100.7", 60, "test", "MM-X")
    ban = await store.banned("198.51.100.7")
    assert ban is not None
    assert ban.rule_id == "MM-X"
    assert store.remaining(ban) == 60
    clock.now += 61
    assert await store.banned("198.51.100.7") is None
    assert await store.bans() == []


async def test_longer_ban_wins_and_unban() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.ban("2001:db8::1", 600, "long")
    await store.ban("2001:0db8::0001", 10, "short")
    ban = await store.banned("2001:db8::1")
    assert ban is not None
    assert ban.reason == "long"
    assert await store.unban("2001:db8:0::1") is True
    assert await store.banned("2001:db8::1") is None
    assert await store.unban("2001:db8::1") is False


async def test_bounded_size_drops_soonest_expiry() -> None:
    clock = Clock()
    store = MemoryStore(max_bans=3, clock=clock)
    for i, ttl in enumerate((30, 10, 20)):
        await store.ban(f"192.0.2.{i}", ttl, "x")
    await store.ban("192.0.2.99", 100, "x")
    ips = [b.ip for b in await store.bans()]
    assert ips == ["192.0.2.2", "192.0.2.0", "192.0.2.99"]  # the 10 s ban went first


def test_normalize_ip() -> None:
    assert normalize_ip("::ffff:10.0.0.1") == "10.0.0.1"
    assert normalize_ip("2001:DB8::1") == "2001:db8::1"
    assert normalize_ip("not-an-ip") == "not-an-ip"


async def test_snapshot_survives_a_restart(tmp_path: Path) -> None:
    """[state] snapshot: counters, profiles and bans outlive the process (msgpack file)."""
    from mailmoat.app import restore_snapshot, save_snapshot
    from mailmoat.events import Emitter, MemorySink
    from mailmoat.state import Count, GetProfile, PutProfile

    sink = MemorySink()
    emitter = Emitter("t", [sink])
    first = MemoryStore()
    await first.run([Count("login:f:ip:192.0.2.1", 600), PutProfile("u:alice", {"n": 3}, 3600)])
    await first.ban("192.0.2.66", 3600, "rule X", "X")
    path = tmp_path / "data" / "state.msgpack"
    save_snapshot(first, path, emitter)
    second = MemoryStore()
    restore_snapshot(second, path, emitter)
    assert await second.run([Count("login:f:ip:192.0.2.1", 600), GetProfile("u:alice")]) == [
        2,
        {"n": 3},
    ]
    ban = await second.banned("192.0.2.66")
    assert ban is not None
    assert ban.rule_id == "X"
    assert 3590 < second.remaining(ban) <= 3600
    path.write_bytes(b"\xc1 not msgpack")
    restore_snapshot(MemoryStore(), path, emitter)
    assert sink.find("state.restore", event__outcome="failure")
