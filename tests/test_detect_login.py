"""Login facts counted in a state store: failures, spraying, stuffing, stale passwords."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailmoat.detect import LoginDetector, password_fingerprint, prefix_of
from mailmoat.state import MemoryStore, Op


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(window: float = 600) -> tuple[LoginDetector, Clock]:
    clock = Clock()
    return LoginDetector(MemoryStore(clock=clock), window=window), clock


async def test_failures_per_ip_prefix_user_and_pair() -> None:
    d, _ = detector()
    await d.record("2001:db8:1:1::5", "alice", success=False)
    await d.record("2001:db8:1:1::6", "alice", success=False)  # same /64
    facts = await d.record("2001:db8:1:1::6", "Alice", success=False)  # user case-folded
    assert facts.failures_ip == 2
    assert facts.failures_prefix == 3
    assert facts.failures_user == 3
    assert facts.failures_user_ip == 2
    # a success is not a failure, but sees the counts
    ok = await d.record("2001:db8:1:1::6", "alice", success=True)
    assert (ok.failures_ip, ok.failures_user) == (2, 3)


async def test_ipv4_mapped_counts_as_ipv4() -> None:
    d, _ = detector()
    await d.record("::ffff:192.0.2.7", "bob", success=False)
    facts = await d.record("192.0.2.7", "bob", success=False)
    assert facts.failures_ip == 2
    assert prefix_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert prefix_of("2001:db8::1", 48) == "2001:db8::/48"


async def test_spraying_and_stuffing_count_failures_only() -> None:
    d, _ = detector()
    for i in range(5):
        await d.record("198.51.100.9", f"user{i}", success=False)
    # an office NAT: many successful logins do not make a sprayer
    for i in range(10):
        await d.record("198.51.100.9", f"staff{i}", success=True)
    facts = await d.record("198.51.100.9", "user0", success=False)
    assert facts.distinct_users_ip == 5
    for i in range(4):
        await d.record(f"203.0.113.{i}", "carol", success=False)
    stuffed = await d.record("203.0.113.99", "carol", success=False)
    assert stuffed.distinct_ips_user == 5


async def test_stale_password_is_told_apart_from_guessing() -> None:
    d, _ = detector()
    salt = b"s" * 16
    stale = password_fingerprint(salt, b"old-password")
    for _ in range(6):
        phone = await d.record("192.0.2.50", "dave", success=False, fingerprint=stale)
    assert phone.failures_user == 6
    assert phone.distinct_passwords_user == 1
    for guess in (b"123456", b"password", b"qwerty"):
        guesser = await d.record(
            "192.0.2.66", "erin", success=False, fingerprint=password_fingerprint(salt, guess)
        )
    assert guesser.distinct_passwords_user == 3
    assert len(stale) == 8  # 32 bits: tells passwords apart, confirms nothing


async def test_window_slides() -> None:
    d, clock = detector(window=100)
    await d.record("192.0.2.1", "frank", success=False)
    clock.now += 60
    assert (await d.record("192.0.2.1", "frank", success=False)).failures_ip == 2
    clock.now += 50  # the first failure left the window (slots of 10 s)
    assert (await d.record("192.0.2.1", "frank", success=True)).failures_ip == 1


async def test_one_round_trip_per_login() -> None:
    calls: list[int] = []
    store = MemoryStore()
    real_run = store.run

    async def counting_run(ops: Sequence[Op]) -> list[Any]:
        calls.append(len(ops))
        return await real_run(ops)

    store.run = counting_run  # type: ignore[method-assign]
    d = LoginDetector(store)
    await d.record("192.0.2.1", "gina", success=False, fingerprint="abcd1234")
    assert calls == [7]
