"""mailmoat's own RESP2 pipeline client (state/_resp.py), alone and under RedisStore."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mailmoat.state import Count, GetBan, Peek, RedisStore, StoreUnavailable
from mailmoat.state._redis import lean_pool
from mailmoat.state._resp import RespPool
from mailmoat.state._wire import RespError, RespProtocolError, encode_command
from mailmoat.state._wire import parse_reply as _parse
from test_state_store import RedisServer


@contextlib.contextmanager
def redis_server(tmp_path: Path, *extra: str) -> Iterator[RedisServer]:
    """A redis-server of this test alone (the test may kill and restart it)."""
    server = RedisServer(tmp_path / "redis", extra=list(extra))
    server.start()
    try:
        yield server
    finally:
        server.kill()


# ---------------------------------------------------------------------- the wire format


def test_encode_command() -> None:
    assert encode_command(["SET", "k", "vé", "PX", 5]) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\xc3\xa9\r\n$2\r\nPX\r\n$1\r\n5\r\n"
    )
    assert encode_command([b"\r\n", 1.5]) == b"*2\r\n$2\r\n\r\n\r\n$3\r\n1.5\r\n"
    with pytest.raises(TypeError):
        encode_command(["SET", True])
    with pytest.raises(TypeError):
        encode_command(["SET", None])  # type: ignore[list-item]


REPLIES: list[tuple[bytes, object]] = [
    (b"+OK\r\n", "OK"),
    (b":-12\r\n", -12),
    (b"$5\r\nh\r\nl\xff\r\n", "h\r\nl\ufffd"),  # CRLF inside a bulk string; bad UTF-8 replaced
    (b"$0\r\n\r\n", ""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n+x\r\n", ["a", [1, None], "x"]),
]


@pytest.mark.parametrize(("wire", "value"), REPLIES)
def test_parse_every_reply_type_and_every_split(wire: bytes, value: object) -> None:
    assert _parse(bytearray(wire + b":7\r\n"), 0) == (value, len(wire))
    for cut in range(len(wire)):  # a reply arriving in pieces is never misread
        assert _parse(bytearray(wire[:cut]), 0) is None


def test_an_error_reply_is_a_value() -> None:
    found = _parse(bytearray(b"-NOSCRIPT No matching script\r\n"), 0)
    assert found is not None
    error, _ = found
    assert isinstance(error, RespError)
    assert error.kind == "NOSCRIPT"


@pytest.mark.parametrize(
    "junk", [b"?what\r\n", b":12x\r\n", b"$3\r\nabcde\r\n", b"HTTP/1.1 400\r\n"]
)
def test_junk_is_a_protocol_error(junk: bytes) -> None:
    with pytest.raises(RespProtocolError):
        _parse(bytearray(junk), 0)


def test_which_urls_get_the_lean_client() -> None:
    pool = lean_pool("redis://:p%40ss@10.0.0.5:6380/3")
    assert isinstance(pool, RespPool)
    assert (pool.host, pool.port, pool.path) == ("10.0.0.5", 6380, None)
    assert pool._hello == [["AUTH", "p@ss"], ["SELECT", 3]]
    pool = lean_pool("redis://bob:pw@[::1]/0")
    assert pool is not None
    assert (pool.host, pool.port, pool._hello) == ("::1", 6379, [["AUTH", "bob", "pw"]])
    pool = lean_pool("unix:///run/redis/redis.sock?db=2")
    assert pool is not None
    assert (pool.path, pool._hello) == ("/run/redis/redis.sock", [["SELECT", 2]])
    # TLS, Cluster, Sentinel and options of coredis's own stay with coredis
    for url in (
        "rediss://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?cluster=true",
        "redis+cluster://a:1,b:2",
        "redis+sentinel://s1:26379/mymaster",
        "redis://127.0.0.1:6379/0?socket_keepalive=true",
        "redis://127.0.0.1:6379/notanumber",
    ):
        assert lean_pool(url) is None, url


# ---------------------------------------------------------------------- against redis-server


async def test_password_and_database(tmp_path: Path) -> None:
    with redis_server(tmp_path, "--requirepass", "s3cret-pw") as server:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/3"
        async with RedisStore.connect(url) as store:
            assert await store.run([Count("k", 60), Count("k", 60)]) == [1, 2]
            assert store._lean is not None
            (dbs,) = await store._lean.execute([["INFO", "keyspace"]])
            assert "db3:keys=" in dbs  # SELECT 3 took
            assert "db0:" not in dbs
        wrong = f"redis://:wrong-pw@127.0.0.1:{server.port}/0"
        async with RedisStore.connect(wrong) as store:
            with pytest.raises(StoreUnavailable) as caught:
                await store.run([Peek("k", 60)])
            assert "WRONGPASS" in str(caught.value) or "invalid" in str(caught.value)
            assert "wrong-pw" not in str(caught.value)
            assert store.healthy is False


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    with redis_server(tmp_path, "--unixsocket", str(sock)):
        async with RedisStore.connect(f"unix://{sock}?db=1") as store:
            await store.ban("192.0.2.7", 60, "unix")
            ban, count = await store.run([GetBan("192.0.2.7"), Count("u", 60)])
            assert (ban.ip, ban.reason, count) == ("192.0.2.7", "unix", 1)


async def test_a_restarted_server_costs_no_failed_call(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        async with RedisStore.connect(server.url) as store:
            assert await store.run([Count("k", 60)]) == [1]  # leaves an idle connection
            server.kill()
            server.start()
            # the idle connection the restart closed is noticed and replaced, not used
            assert await store.run([Count("k", 60)]) == [1]
            assert store.healthy is True


async def test_a_server_speaking_nonsense_is_unavailable_not_a_crash() -> None:
    async def nonsense(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, nonsense, 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        async with RedisStore.connect(f"redis://127.0.0.1:{port}/0") as store:
            with pytest.raises(StoreUnavailable, match="RespProtocolError"):
                await store.run([Count("k", 60)])
            with pytest.raises(StoreUnavailable, match="RespProtocolError"):
                await store.banned("192.0.2.1")
        nursery.cancel_scope.cancel()


async def test_a_cancelled_batch_never_shifts_the_replies(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        pool = RespPool(port=server.port)
        try:
            assert await pool.execute([["SET", "a", "1"], ["SET", "b", "2"]]) == ["OK", "OK"]
            (paused,) = await pool.execute([["CLIENT", "PAUSE", 300]])
            assert paused == "OK"
            with trio.move_on_after(0.1):
                await pool.execute([["GET", "a"]])  # its reply arrives after we gave up
            await trio.sleep(0.35)
            assert await pool.execute([["GET", "b"], ["GET", "a"]]) == ["2", "1"]
        finally:
            await pool.aclose()
        with pytest.raises(ConnectionError, match="closed"):
            await pool.execute([["PING"]])
