"""Reputation of sources and the outbound burst of authenticated users."""

from __future__ import annotations

from mailmoat.detect.outbound import Outbound
from mailmoat.detect.reputation import Reputation
from mailmoat.state import MemoryStore


class Clock:
    now = 5000.0

    def __call__(self) -> float:
        return self.now


async def test_reputation_falls_with_bad_events_and_recovers() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    rep = Reputation()

    async def score(ip: str) -> int:
        return rep.score(ip, await store.run(rep.ops_for(ip)))

    assert await score("192.0.2.1") == 0
    await store.run(rep.note("192.0.2.1", "failure"))
    await store.run(rep.note("192.0.2.1", "refusal"))
    assert await score("192.0.2.1") == -4
    await store.run(rep.note("::ffff:192.0.2.1", "ban"))  # mapped counts as IPv4
    assert await score("192.0.2.1") == -24
    # the /64 remembers a sprayer hopping addresses, at half weight
    await store.run(rep.note("2001:db8:1:2::1", "ban"))
    assert await score("2001:db8:1:2::99") == -10
    assert await score("2001:db8:1:3::1") == 0
    clock.now += 86400 + 10_000  # a day later failures and refusals are forgotten
    assert await score("192.0.2.1") == -20
    clock.now += 7 * 86400  # a week later the ban too
    assert await score("192.0.2.1") == 0


async def test_outbound_burst_against_the_users_own_baseline() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    out = Outbound(learning_messages=3, min_burst=10, burst_factor=5)

    async def send(user: str, rcpts: list[str]) -> tuple[int, int, bool]:
        facts, profile = out.assess(await store.run(out.ops(user, rcpts)))
        await store.run(out.save(user, profile))
        return facts.rcpt_rate, facts.domains, facts.burst

    for _ in range(3):  # learning: a few messages to two people an hour
        assert (await send("bob", ["a@x.org", "b@y.org"]))[2] is False
        clock.now += 3600
    rate, domains, burst = await send("bob", [f"u{i}@d{i}.example" for i in range(40)])
    assert (rate, domains, burst) == (40, 40, True)
    # a user who always mails 100 people is no burst at 100
    for _ in range(4):
        await send("news", [f"u{i}@list.example" for i in range(100)])
        clock.now += 3600
    assert (await send("news", [f"u{i}@list.example" for i in range(100)]))[2] is False
