"""The same behaviour from MemoryStore and RedisStore (a real redis-server on loopback).

Windows run on an injected clock (``advance``: slot numbers only); what Redis
expires by TTL (bans, profiles) runs on short real times (``elapse``: the
clock and the wall).  redis-server missing is a failure, not a skip: CI
installs it (.ci/run).
"""

from __future__ import annotations

import gc
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from mailmoat.demo.postfix import find_free_port
from mailmoat.state import (
    Ban,
    Count,
    Distinct,
    DistinctPeek,
    GetBan,
    GetProfile,
    MemoryStore,
    Op,
    Peek,
    PutProfile,
    RedisStore,
    Store,
    StoreUnavailable,
)
from mailmoat.state._redis import _hosts
from mailmoat.state._resp import RespPool

# ---------------------------------------------------------------------- a real redis-server


@dataclass
class RedisServer:
    """One redis-server on 127.0.0.1, no persistence, in its own directory."""

    workdir: Path
    port: int = field(default_factory=find_free_port)
    extra: list[str] = field(default_factory=list)
    #: (host, port) of the primary this server watches as a Sentinel
    sentinel_of: tuple[str, int] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (apt-get install redis-server)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.sentinel_of is not None:
            conf = self.workdir / "sentinel.conf"  # a sentinel rewrites its config file
            host, port = self.sentinel_of
            conf.write_text(f"sentinel monitor mymaster {host} {port} 1\n")
            mode = [str(conf), "--sentinel"]
        else:
            mode = ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                binary,
                *mode,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "redis.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (with a password)
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (it may kill it)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


# ---------------------------------------------------------------------- both stores


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    store: Store
    clock: Clock
    real_time: bool  # TTLs run on the server's clock

    def advance(self, seconds: float) -> None:
        """Move the windows' clock (slot numbers) only."""
        self.clock.now += seconds

    async def elapse(self, seconds: float) -> None:
        """Let time pass for TTLs too (really, on Redis)."""
        self.clock.now += seconds
        if self.real_time:
            await trio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    clock = Clock()
    if request.param == "memory":
        yield Env(MemoryStore(clock=clock), clock, real_time=False)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    async with RedisStore.connect(server.url, prefix=prefix, clock=clock) as store:
        yield Env(store, clock, real_time=True)


async def test_counts_slide_with_the_window(env: Env) -> None:
    store = env.store
    assert await store.run([Count("k", 60), Count("k", 60), Count("k", 60, 3)]) == [1, 2, 5]
    assert await store.run([Peek("k", 60), Peek("other", 60)]) == [5, 0]
    env.advance(30)
    assert await store.run([Count("k", 60)]) == [6]
    env.advance(31)  # the first slot (t=1e6) left the window, the second (t+30) did not
    assert await store.run([Peek("k", 60)]) == [1]
    env.advance(60)
    assert await store.run([Peek("k", 60), Count("k", 60, 2)]) == [0, 2]


async def test_peek_adds_nothing(env: Env) -> None:
    assert await env.store.run([Peek("p", 10), Peek("p", 10), DistinctPeek("p", 10)]) == [0, 0, 0]
    assert await env.store.run([Count("p", 10), Peek("p", 10)]) == [1, 1]


async def test_distinct_counts_are_exact_for_small_sets(env: Env) -> None:
    store = env.store
    ops = [Distinct("d", m, 600) for m in ("a", "b", "a", "c", "b")]
    assert await store.run(ops) == [1, 2, 2, 3, 3]
    env.advance(300)  # another slot: the union still counts each member once
    assert await store.run([Distinct("d", "a", 600), Distinct("d", "z", 600)]) == [3, 4]
    assert await store.run([DistinctPeek("d", 600), DistinctPeek("none", 600)]) == [4, 0]
    env.advance(301)  # the first slot left the window: a and z remain
    assert await store.run([DistinctPeek("d", 600)]) == [2]
    env.advance(600)
    assert await store.run([DistinctPeek("d", 600)]) == [0]


async def test_results_come_in_order(env: Env) -> None:
    ops: list[Op] = [
        Count("c", 60),
        PutProfile("u", {"n": 1, "tags": ["a"]}, 60),
        Distinct("d", "x", 60),
        GetProfile("u"),
        Peek("c", 60),
        GetProfile("missing"),
        DistinctPeek("d", 60),
    ]
    assert await env.store.run(ops) == [1, None, 1, {"n": 1, "tags": ["a"]}, 1, None, 1]
    assert await env.store.run([]) == []


async def test_profiles_expire(env: Env) -> None:
    store = env.store
    await store.run([PutProfile("u", {"v": 1}, 0.3), PutProfile("w", {"v": 2}, 60)])
    await store.run([PutProfile("w", {"v": 3}, 60)])
    assert await store.run([GetProfile("u"), GetProfile("w")]) == [{"v": 1}, {"v": 3}]
    await env.elapse(0.45)
    assert await store.run([GetProfile("u"), GetProfile("w")]) == [None, {"v": 3}]


async def test_bans_ttl_and_ipv4_mapped_addresses(env: Env) -> None:
    store = env.store
    ban = await store.ban("::ffff:198.51.100.7", 60, "test", "MM-X")
    assert ban.ip == "198.51.100.7"
    found = await store.banned("198.51.100.7")
    assert found is not None
    assert (found.ip, found.reason, found.rule_id) == ("198.51.100.7", "test", "MM-X")
    assert store.remaining(found) == pytest.approx(60, abs=0.5)
    assert await store.banned("::ffff:c633:6407") is not None  # the same address, hex form
    await store.ban("2001:db8::1", 0.3, "short")
    assert await store.banned("2001:0db8:0::0001") is not None
    await env.elapse(0.45)
    assert await store.banned("2001:db8::1") is None
    assert [b.ip for b in await store.bans()] == ["198.51.100.7"]


async def test_a_ban_read_as_an_operation_shares_the_round_trip(env: Env) -> None:
    # GetBan: the connect-time ban check in the same run() as the reputation counts
    store = env.store
    await store.ban("::ffff:198.51.100.8", 60, "test", "MM-Y")
    ban, count, none = await store.run(
        [GetBan("198.51.100.8"), Count("rep", 60), GetBan("2001:db8::9")]
    )
    assert isinstance(ban, Ban)
    assert (ban.ip, ban.reason, ban.rule_id) == ("198.51.100.8", "test", "MM-Y")
    assert store.remaining(ban) == pytest.approx(60, abs=0.5)
    assert (count, none) == (1, None)
    await store.ban("2001:db8::9", 0.3, "short")
    assert isinstance((await store.run([GetBan("2001:0db8::0009")]))[0], Ban)
    await env.elapse(0.45)
    assert await store.run([GetBan("2001:db8::9")]) == [None]


async def test_longer_ban_wins_unban_and_listing(env: Env) -> None:
    store = env.store
    await store.ban("2001:db8::1", 600, "long")
    kept = await store.ban("2001:0db8::0001", 10, "short")
    assert kept.reason == "long"
    assert store.remaining(kept) == pytest.approx(600, abs=0.5)
    await store.ban("192.0.2.1", 30, "a", None)
    await store.ban("192.0.2.2", 20, "b", "MM-2")
    await store.ban("192.0.2.2", 40, "b2", "MM-2b")  # longer: replaces
    listed = await store.bans()
    assert [(b.ip, b.reason, b.rule_id) for b in listed] == [
        ("192.0.2.1", "a", None),
        ("192.0.2.2", "b2", "MM-2b"),
        ("2001:db8::1", "long", None),
    ]
    assert await store.unban("2001:db8:0::1") is True
    assert await store.unban("2001:db8::1") is False
    assert await store.banned("2001:db8::1") is None
    assert len(await store.bans()) == 2


# ---------------------------------------------------------------------- memory only


async def test_memory_store_stays_bounded_under_a_million_keys() -> None:
    store = MemoryStore(max_keys=10_000, clock=Clock())
    batch = 10_000
    for start in range(0, 1_000_000, batch):
        await store.run([Count(f"ip:{n}", 60) for n in range(start, start + batch)])
        assert len(store) <= store.max_keys
    assert len(store) == store.max_keys
    # the newest keys are the ones kept
    assert await store.run([Peek("ip:999999", 60), Peek("ip:0", 60)]) == [1, 0]


# ---------------------------------------------------------------------- Redis only


async def test_two_nodes_share_bans_and_counts(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    async with (
        RedisStore.connect(redis_server.url, prefix=prefix) as a,
        RedisStore.connect(redis_server.url, prefix=prefix) as b,
        RedisStore.connect(redis_server.url, prefix="other:") as stranger,
    ):
        await a.ban("::ffff:203.0.113.9", 120, "brute force", "MM-LOGIN-1")
        seen = await b.banned("203.0.113.9")
        assert seen is not None
        assert (seen.reason, seen.rule_id) == ("brute force", "MM-LOGIN-1")
        assert b.remaining(seen) == pytest.approx(120, abs=1)
        assert [x.ip for x in await b.bans()] == ["203.0.113.9"]
        assert await stranger.banned("203.0.113.9") is None
        assert await a.run([Count("login:f:ip:x", 600)]) == [1]
        assert await b.run([Count("login:f:ip:x", 600, 2)]) == [3]
        assert await b.run([Distinct("du", "alice", 600)]) == [1]
        assert await a.run([Distinct("du", "bob", 600), Distinct("du", "alice", 600)]) == [2, 2]
        assert await b.unban("203.0.113.9") is True
        assert await a.banned("203.0.113.9") is None


async def test_distinct_count_of_ten_thousand_is_within_two_percent(
    redis_server: RedisServer,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    async with RedisStore.connect(redis_server.url, prefix=prefix, timeout=10) as s:
        for start in range(0, 10_000, 1_000):
            await s.run([Distinct("many", f"user{n}", 600) for n in range(start, start + 1_000)])
        (count,) = await s.run([DistinctPeek("many", 600)])
        assert abs(count - 10_000) <= 200


async def test_run_is_one_round_trip(redis_server: RedisServer) -> None:
    async with RedisStore.connect(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:") as s:
        pool = s._lean
        assert isinstance(pool, RespPool)  # a plain redis:// server: mailmoat's own client
        batches: list[int] = []
        execute = pool.execute

        async def counting(commands: Any) -> list[Any]:
            batches.append(len(commands))
            return await execute(commands)

        pool.execute = counting  # type: ignore[method-assign]
        ops: list[Op] = [
            Count("a", 600),
            Peek("b", 600),
            Distinct("c", "m", 600),
            DistinctPeek("d", 600),
            PutProfile("e", {"x": 1}),
            GetProfile("e"),
            GetBan("192.0.2.1"),
        ] * 5
        results = await s.run(ops)
        assert results[:7] == [1, 0, 1, 0, None, {"x": 1}, None]
        assert batches == [5 * (3 + 1 + 3 + 1 + 1 + 1 + 2)]  # one write, every command in it
        # and on the wire: the server saw every command
        (info,) = await execute([["INFO", "commandstats"]])
        calls = dict(re.findall(r"cmdstat_(\w+):calls=(\d+)", info))
        assert int(calls["mget"]) >= 10
        assert int(calls["pfcount"]) >= 10
        assert int(calls["pttl"]) >= 5


async def test_outage_raises_store_unavailable_and_recovers(own_redis: RedisServer) -> None:
    async with RedisStore.connect(own_redis.url, timeout=0.5) as store:
        assert await store.run([Count("k", 60)]) == [1]
        own_redis.kill()
        for call in (
            store.run([Count("k", 60)]),
            store.ban("192.0.2.1", 60, "x"),
            store.banned("192.0.2.1"),
            store.bans(),
            store.unban("192.0.2.1"),
        ):
            with trio.fail_after(3), pytest.raises(StoreUnavailable):
                await call
            assert store.healthy is False
        own_redis.start()  # same port, empty (no persistence)
        with trio.fail_after(5):
            assert await store.run([Count("k", 60)]) == [1]
        assert store.healthy is True
        await store.ban("192.0.2.1", 60, "back")
        assert await store.banned("192.0.2.1") is not None


async def test_slow_redis_times_out_then_answers_correctly(own_redis: RedisServer) -> None:
    async with (
        RedisStore.connect(own_redis.url, timeout=0.2) as store,
        RedisStore.connect(own_redis.url, timeout=2) as admin,
    ):
        assert await store.run([Count("k", 60)]) == [1]
        assert admin._lean is not None
        (paused,) = await admin._lean.execute([["CLIENT", "PAUSE", 600]])
        assert paused == "OK"  # the server answers nobody for 0.6 s
        started = trio.current_time()
        with pytest.raises(StoreUnavailable, match="no answer in time"):
            await store.run([Count("k", 60)])
        assert trio.current_time() - started < 0.5
        assert store.healthy is False
        await trio.sleep(0.6)
        # the timed-out write may or may not have landed; later replies are not shifted
        (n,) = await store.run([Count("k", 60, 10)])
        assert n in (11, 12)
        assert await store.run([Peek("k", 60), GetProfile("none")]) == [n, None]
        assert store.healthy is True


async def test_unreachable_redis_at_start_does_not_stop_the_node() -> None:
    url = f"redis://127.0.0.1:{find_free_port()}/0"
    async with RedisStore.connect(url, timeout=0.3) as store:
        with pytest.raises(StoreUnavailable):
            await store.run([Count("k", 60)])
        assert store.healthy is False


async def test_errors_of_the_caller_pass_through_unwrapped(redis_server: RedisServer) -> None:
    with pytest.raises(KeyError):
        async with RedisStore.connect(redis_server.url):
            raise KeyError("mine")

    async def block_fails() -> None:
        async with RedisStore.connect(redis_server.url) as store:
            await store.run([Count("k", 60)])
            raise StoreUnavailable("from the block")

    with pytest.raises(StoreUnavailable, match=r"^from the block$"):
        await block_fails()


async def test_sentinel_url_finds_the_primary(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary")
    sentinel = RedisServer(tmp_path / "sentinel", sentinel_of=("127.0.0.1", primary.port))
    try:
        primary.start()
        sentinel.start()
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
        async with (
            RedisStore.connect(url, prefix="sn:") as via_sentinel,
            RedisStore.connect(primary.url, prefix="sn:") as direct,
        ):
            assert await via_sentinel.run([Count("k", 60), PutProfile("p", {"a": 1})]) == [1, None]
            await via_sentinel.ban("::ffff:192.0.2.5", 60, "x")
            assert await direct.run([Peek("k", 60), GetProfile("p")]) == [1, {"a": 1}]
            assert [b.ip for b in await direct.bans()] == ["192.0.2.5"]
    finally:
        sentinel.kill()
        primary.kill()


def _cluster_ok(port: int) -> bool:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "info"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    return "cluster_state:ok" in out


async def test_cluster_url_spreads_keys_and_keeps_one_pipeline(tmp_path: Path) -> None:
    nodes = [
        RedisServer(
            tmp_path / f"node{i}",
            extra=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(find_free_port()),  # not port + 10000: may pass 65535
            ],
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        with trio.fail_after(15):
            while not all(_cluster_ok(n.port) for n in nodes):
                await trio.sleep(0.1)
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in nodes[:2])
        async with (
            RedisStore.connect(f"redis+cluster://{seeds}/", prefix="cl:", timeout=2) as a,
            RedisStore.connect(f"{nodes[2].url}?cluster=true", prefix="cl:", timeout=2) as b,
        ):
            ops: list[Op] = [Count(f"k{i}", 60) for i in range(30)]
            ops += [Distinct("d", "x", 60), Distinct("d", "y", 60), PutProfile("p", {"v": 1})]
            assert await a.run(ops) == [1] * 30 + [1, 2, None]
            assert await b.run([Peek("k7", 60), DistinctPeek("d", 60), GetProfile("p")]) == [
                1,
                2,
                {"v": 1},
            ]
            for i in range(20):
                await a.ban(f"198.51.100.{i}", 60, "spread")
            assert len(await b.bans()) == 20  # SCAN over every primary
            assert await b.unban("198.51.100.3") is True
            assert await a.banned("198.51.100.3") is None
        # the keys really are spread over the nodes
        counts = [
            subprocess.run(
                ["redis-cli", "-p", str(n.port), "dbsize"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            for n in nodes
        ]
        assert all(int(c) > 0 for c in counts), counts
    finally:
        for node in nodes:
            node.kill()
        # coredis 6.9's cluster discovery leaves a few in-memory buffers of its
        # connections unclosed (freed by the collector, with a ResourceWarning):
        # collect them here rather than in some later test
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def test_url_host_lists() -> None:
    user, password, hosts = _hosts("u:p%40ss@10.0.0.1:26379,[::1]:26380,sentinel-3", 26379)
    assert (user, password) == ("u", "p@ss")
    assert hosts == [
        ("10.0.0.1", 26379),
        ("::1", 26380),
        ("sentinel-3", 26379),
    ]
    assert _hosts("", 6379)[2] == [("127.0.0.1", 6379)]
