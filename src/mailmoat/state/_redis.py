"""The shared state store of several edge nodes, on Redis (DESIGN.md §7).

Contract: :class:`RedisStore` is a :class:`~mailmoat.state.Store` with the
semantics of :class:`~mailmoat.state.MemoryStore` (sliding windows of
:data:`SLOTS` slots, distinct counts, profiles and bans with a time to live),
shared by every node that uses the same Redis and key prefix.

* :meth:`RedisStore.run` sends all operations of one call in **one** pipeline
  (one round trip; on a cluster, one per node, in parallel).
* Every failure of Redis (refused, reset, protocol or server error, no answer
  within ``timeout``) raises :class:`StoreUnavailable` and sets
  :attr:`RedisStore.healthy` to false; the next call simply tries again on a
  fresh connection, so the store recovers without a restart when Redis is back.
* Time: slot boundaries of the windows come from the node's wall clock
  (``time.time``, injectable), so nodes must be NTP-synced (a skew of a
  fraction of a slot only shifts counts between neighbouring slots).  Bans and
  profiles expire by Redis TTL (the server's clock); a ban read back carries
  ``until = local clock + PTTL``, so :meth:`RedisStore.remaining` is right on
  every node whatever its skew.

Key layout (``P`` is the prefix, ``mm:`` by default)::

    P c:{KEY}:W:N     string  counter of window W s, slot N = floor(t / (W/10))
    P d:{KEY}:W:N     HLL     distinct members of that slot (PFCOUNT of 10 = union)
    P p:KEY           string  profile, JSON, PX ttl
    P ban:IP          string  {"reason": ..., "rule_id": ...}, PX ban length

Slot keys expire W seconds after their last write.  The braces are a Redis
Cluster hash tag: the ten slot keys of one counter live in one hash slot, so
MGET / PFCOUNT over them work on a cluster too.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final, final
from urllib.parse import parse_qs, unquote, urlsplit

from ._memory import normalize_ip
from ._ops import (
    SLOTS,
    Ban,
    Count,
    Distinct,
    DistinctPeek,
    GetBan,
    GetProfile,
    Op,
    Peek,
    PutProfile,
    StoreUnavailable,
)
from ._resp import RespPool
from ._wire import RespError, RespProtocolError

__all__ = ["RedisStore", "StoreUnavailable", "redis_client"]


def _failures() -> tuple[type[BaseException], ...]:
    """The failures of the client library and of the transport (imported when first needed).

    coredis and anyio are imported lazily: ``mailmoat.state`` is imported by
    every node (and the CLI), most of which never talk to Redis.
    """
    import anyio
    from coredis.exceptions import RedisError

    return (
        RedisError,
        RespError,
        RespProtocolError,
        OSError,  # refused, reset, TimeoutError (ours: anyio.fail_after; coredis's stream timeout)
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
        anyio.EndOfStream,
    )


# Longer ban wins, atomically: keep the key when its TTL is already at least ours.
# (_BAN_SHA, its SHA1 for EVALSHA, follows the script.)
_BAN_SCRIPT: Final = """
local ttl = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[2])
if ttl == -1 or ttl >= want then
  return {redis.call('GET', KEYS[1]), ttl}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', want)
return {ARGV[1], want}
"""

_BAN_SHA: Final = hashlib.sha1(_BAN_SCRIPT.encode(), usedforsecurity=False).hexdigest()

_SSL_OPTIONS: Final = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_check_hostname",
)


def _wall_clock() -> float:
    # shared by every node (NTP): slot numbers must agree across the edge
    return time.time()  # noqa: TID251 - the shared clock of several nodes


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _hosts(netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``user:pass@h1:p1,[::1]:p2`` -> (user, password, locations)."""
    user = password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, _, pw = auth.partition(":")
        user = unquote(user) or None
        password = unquote(pw) or None
    found: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in netloc.split(","))):
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif part.count(":") == 1:
            host, port = part.split(":")
        else:
            host, port = part, ""
        found.append((host, int(port) if port else default_port))
    if not found:
        found.append(("127.0.0.1", default_port))
    return user, password, found


@asynccontextmanager
async def redis_client(url: str, *, timeout: float = 0.5) -> AsyncIterator[Any]:
    """The entered coredis client (decoding to ``str``) for a mailmoat Redis URL.

    ``redis://`` / ``rediss://`` / ``unix://``: one server (``?cluster=true``
    makes the host a cluster seed instead).  ``redis+cluster://h1:p1,h2:p2``
    (``rediss+cluster``): Redis Cluster from these seeds.
    ``redis+sentinel://[user:pass@]s1:26379,s2:26379/SERVICE[/DB]``
    (``?sentinel_password=``, ``?ssl=true``): the primary of SERVICE as told by
    the sentinels.
    """
    import coredis
    from coredis.connection import TCPLocation

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query).items() if v}
    cluster = _truthy(query.pop("cluster", "")) or scheme.endswith("+cluster")
    common: dict[str, Any] = {
        "decode_responses": True,
        "stream_timeout": timeout,
        "connect_timeout": timeout,
    }
    async with AsyncExitStack() as stack:
        client: Any
        if scheme.endswith("+sentinel"):
            user, password, sentinels = _hosts(parts.netloc, 26379)
            path = [p for p in parts.path.split("/") if p]
            service = unquote(path[0]) if path else "mymaster"
            db = int(path[1]) if len(path) > 1 else int(query.get("db", "0"))
            sentinel_kwargs: dict[str, Any] = {"connect_timeout": timeout}
            if "sentinel_password" in query:
                sentinel_kwargs["password"] = query["sentinel_password"]
            if "sentinel_username" in query:
                sentinel_kwargs["username"] = query["sentinel_username"]
            ssl = scheme.startswith("rediss") or _truthy(query.get("ssl", ""))
            sentinel = coredis.Sentinel(
                [TCPLocation(h, p) for h, p in sentinels],
                sentinel_kwargs=sentinel_kwargs,
                decode_responses=True,
            )
            await stack.enter_async_context(sentinel)
            primary: dict[str, Any] = {"db": db, "username": user, "password": password}
            if ssl:
                primary["ssl"] = True
            client = sentinel.primary_for(
                service, stream_timeout=timeout, connect_timeout=timeout, **primary
            )
        elif cluster:
            user, password, seeds = _hosts(parts.netloc, 6379)
            ssl = scheme.startswith("rediss") or _truthy(query.get("ssl", ""))
            extra: dict[str, Any] = {k: query[k] for k in _SSL_OPTIONS if k in query}
            if "ssl_check_hostname" in extra:
                extra["ssl_check_hostname"] = _truthy(extra["ssl_check_hostname"])
            extra.update(
                common,
                startup_nodes=[TCPLocation(h, p) for h, p in seeds],
                username=user,
                password=password,
                ssl=ssl,
            )
            client = coredis.RedisCluster(**extra)
        elif scheme in ("redis", "rediss", "unix"):
            clean = parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()
            client = coredis.Redis.from_url(clean, **common)
        else:
            raise ValueError(f"not a Redis URL: {url!r}")
        _close_buffers_on_exit(client.connection_pool)
        await stack.enter_async_context(client)
        yield client


def lean_pool(url: str) -> RespPool | None:
    """mailmoat's own pipeline client for a plain single server (``redis://``
    without options but ``db``, or ``unix://``); ``None``: coredis's turn."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query).items() if v}
    if scheme not in ("redis", "unix") or set(query) - {"db"}:
        return None
    try:
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if scheme == "unix":
            db = int(query.get("db", "0"))
            return RespPool(path=unquote(parts.path), username=user, password=password, db=db)
        path = parts.path.strip("/")
        db = int(path or query.get("db", "0"))
        host = parts.hostname or "127.0.0.1"
        return RespPool(host=host, port=parts.port or 6379, username=user, password=password, db=db)
    except ValueError:
        return None  # coredis explains what is wrong with it


@final
class _Reply:
    """A queued command's reply, awaitable like coredis's (a Redis error raises)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        yield from ()
        if isinstance(self.value, RespError):
            raise self.value
        return self.value


@final
class _LeanPipe:
    """The pipeline methods the store uses, queued for :class:`RespPool`."""

    __slots__ = ("commands", "replies")

    def __init__(self) -> None:
        self.commands: list[list[Any]] = []
        self.replies: list[_Reply] = []

    def _queue(self, *args: Any) -> _Reply:
        reply = _Reply()
        self.commands.append(list(args))
        self.replies.append(reply)
        return reply

    def incrby(self, key: str, amount: int) -> _Reply:
        return self._queue("INCRBY", key, amount)

    def pexpire(self, key: str, ms: int) -> _Reply:
        return self._queue("PEXPIRE", key, ms)

    def mget(self, keys: Sequence[str]) -> _Reply:
        return self._queue("MGET", *keys)

    def pfadd(self, key: str, member: str) -> _Reply:
        return self._queue("PFADD", key, member)

    def pfcount(self, keys: Sequence[str]) -> _Reply:
        return self._queue("PFCOUNT", *keys)

    def get(self, key: str) -> _Reply:
        return self._queue("GET", key)

    def pttl(self, key: str) -> _Reply:
        return self._queue("PTTL", key)

    def set(self, key: str, value: str, *, px: int) -> _Reply:
        return self._queue("SET", key, value, "PX", px)

    async def execute(self, pool: RespPool) -> None:
        for reply, value in zip(self.replies, await pool.execute(self.commands), strict=True):
            reply.value = value


def _close_buffers_on_exit(pool: Any) -> None:
    """Make the pool's connections close their in-memory buffers when they end.

    coredis 6.9 leaves them open when connecting fails (Redis down), so each
    attempt leaks until the garbage collector finds them, with a
    ResourceWarning.  Closing an already closed buffer is a no-op.
    """
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    buffers = (MemoryObjectSendStream, MemoryObjectReceiveStream)
    base = pool.connection_class
    if getattr(base, "_mailmoat_closing", False):
        return

    async def run(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await base.run(self, *args, **kwargs)
        finally:
            for value in list(vars(self).values()):
                if isinstance(value, buffers):
                    value.close()

    pool.connection_class = type(base.__name__, (base,), {"run": run, "_mailmoat_closing": True})


@final
class RedisStore:
    """See the module docstring.  Make one with :meth:`connect`."""

    kind = "redis"

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "mm:",
        timeout: float = 0.5,
        clock: Callable[[], float] = _wall_clock,
    ) -> None:
        self._client = client
        #: mailmoat's own client (a plain server), or ``None``: coredis
        self._lean: RespPool | None = client if isinstance(client, RespPool) else None
        self.prefix = prefix
        self.timeout = timeout
        self._clock = clock
        #: false after a failed call, true again after the next one that succeeds
        self.healthy = True
        #: the last failure, for alerts
        self.last_error: str = ""
        self._ban_script = None if self._lean else client.register_script(_BAN_SCRIPT)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "mm:",
        timeout: float = 0.5,
        clock: Callable[[], float] = _wall_clock,
    ) -> AsyncIterator[RedisStore]:
        """``async with RedisStore.connect("redis://127.0.0.1:6379/0") as store: ...``

        A standalone or Sentinel store opens connections lazily: entering works
        while Redis is down (calls raise :class:`StoreUnavailable` until it is
        back).  A cluster store reads the cluster layout on entry; failing that
        raises :class:`StoreUnavailable`.
        """
        lean = lean_pool(url)
        if lean is not None:
            try:
                yield cls(lean, prefix=prefix, timeout=timeout, clock=clock)
            finally:
                await lean.aclose()
            return
        entered = False
        mine: BaseException | None = None  # raised by the caller's block
        sole: BaseException | None = None
        try:
            async with redis_client(url, timeout=timeout) as client:
                entered = True
                try:
                    yield cls(client, prefix=prefix, timeout=timeout, clock=clock)
                except BaseException as exc:
                    mine = exc
                    raise
        except _failures() as exc:
            if entered:
                raise
            raise StoreUnavailable(f"redis {_redact(url)}: {_describe(exc)}") from exc
        except BaseExceptionGroup as group:
            # the client's task group wraps what the caller's block raised: unwrap it
            leaves = _leaves(group)
            if mine is not None and leaves == [mine]:
                sole = mine
            elif not entered and leaves and all(isinstance(e, _failures()) for e in leaves):
                raise StoreUnavailable(f"redis {_redact(url)}: {_describe(leaves[0])}") from group
            else:
                raise
        if sole is not None:
            raise sole  # outside the handler: its own cause and context stay

    # ------------------------------------------------------------------ plumbing

    async def _call(self, what: Callable[[], Awaitable[Any]]) -> Any:
        import anyio

        try:
            with anyio.fail_after(self.timeout):
                result = await what()
        except _failures() as exc:
            self.healthy = False
            self.last_error = _describe(exc)
            if isinstance(exc, TimeoutError) and self._lean is None:
                # a reply may still be on its way: start over on fresh connections
                # (the lean pool closed the connection the timeout cut short)
                self._client.connection_pool.disconnect()
            raise StoreUnavailable(f"redis: {self.last_error}") from exc
        self.healthy = True
        return result

    def _slot_keys(self, kind: str, key: str, window: float, now: float) -> list[str]:
        size = window / SLOTS
        current = math.floor(now / size)
        base = f"{self.prefix}{kind}:{{{key or '-'}}}:{window:g}:"
        return [f"{base}{n}" for n in range(current - SLOTS + 1, current + 1)]

    def _ban_key(self, ip: str) -> str:
        return f"{self.prefix}ban:{ip}"

    # ------------------------------------------------------------------ Store.run

    async def run(self, ops: Sequence[Op]) -> list[Any]:
        if not ops:
            return []
        now = self._clock()

        raw = await self._call(
            lambda: self._batch(lambda pipe: [self._queue(pipe, op, now) for op in ops])
        )
        now = self._clock()
        return [_result(op, reply, now) for op, reply in zip(ops, raw, strict=True)]

    async def _batch(self, fill: Callable[[Any], list[Any]]) -> list[Any]:
        """The commands ``fill(pipe)`` queues, sent in one round trip; its replies awaited."""
        if self._lean is not None:
            lean = _LeanPipe()
            replies = fill(lean)
            await lean.execute(self._lean)
        else:
            async with self._client.pipeline(transaction=False) as pipe:
                replies = fill(pipe)
        return [await _awaited(reply) for reply in replies]

    def _queue(self, pipe: Any, op: Op, now: float) -> Any:
        """Queue the commands of ``op``; the request whose reply is its result."""
        match op:
            case Count(key, window, amount):
                keys = self._slot_keys("c", key, window, now)
                pipe.incrby(keys[-1], amount)
                pipe.pexpire(keys[-1], _ms(window))
                return pipe.mget(keys)
            case Peek(key, window):
                return pipe.mget(self._slot_keys("c", key, window, now))
            case Distinct(key, member, window):
                keys = self._slot_keys("d", key, window, now)
                pipe.pfadd(keys[-1], member)
                pipe.pexpire(keys[-1], _ms(window))
                return pipe.pfcount(keys)
            case DistinctPeek(key, window):
                return pipe.pfcount(self._slot_keys("d", key, window, now))
            case GetProfile(key):
                return pipe.get(f"{self.prefix}p:{key}")
            case PutProfile(key, profile, ttl):
                text = json.dumps(dict(profile), separators=(",", ":"), sort_keys=True)
                pipe.set(f"{self.prefix}p:{key}", text, px=_ms(ttl))
                return None
            case GetBan(ip):
                key = self._ban_key(normalize_ip(ip))
                return (pipe.get(key), pipe.pttl(key))
            case _ as unreachable:  # pragma: no cover - Op is closed
                raise TypeError(f"unknown state operation {unreachable!r}")

    # ------------------------------------------------------------------ bans

    async def ban(self, ip: str, seconds: float, reason: str, rule_id: str | None = None) -> Ban:
        key = normalize_ip(ip)
        value = json.dumps({"reason": reason, "rule_id": rule_id}, separators=(",", ":"))
        reply = await self._call(lambda: self._run_ban_script(self._ban_key(key), value, seconds))
        stored, ttl = reply[0], int(reply[1])
        return _ban(key, stored, ttl, self._clock()) or Ban(
            key, self._clock() + seconds, reason, rule_id
        )

    async def _run_ban_script(self, key: str, value: str, seconds: float) -> Any:
        if self._lean is None:
            assert self._ban_script is not None
            return await self._ban_script(keys=[key], args=[value, _ms(seconds)])
        args: list[str | int] = [1, key, value, _ms(seconds)]
        (reply,) = await self._lean.execute([["EVALSHA", _BAN_SHA, *args]])
        if isinstance(reply, RespError) and reply.kind == "NOSCRIPT":
            (reply,) = await self._lean.execute([["EVAL", _BAN_SCRIPT, *args]])
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def banned(self, ip: str) -> Ban | None:
        key = normalize_ip(ip)
        found = await self._bans_of([key])
        return found[0] if found else None

    async def unban(self, ip: str) -> bool:
        key = self._ban_key(normalize_ip(ip))
        if self._lean is not None:
            lean = self._lean
            return int(await self._call(lambda: _one(lean, ["DEL", key]))) > 0
        return int(await self._call(lambda: self._client.delete([key]))) > 0

    async def bans(self) -> list[Ban]:
        pattern = _glob_escape(f"{self.prefix}ban:") + "*"

        async def scan() -> list[str]:
            if self._lean is None:
                return [key async for key in self._client.scan_iter(match=pattern, count=1000)]
            found: list[str] = []
            cursor = "0"
            while True:
                reply = await _one(self._lean, ["SCAN", cursor, "MATCH", pattern, "COUNT", 1000])
                cursor, keys = reply[0], reply[1]
                found.extend(keys)
                if cursor == "0":
                    return found

        keys = await self._call(scan)
        start = len(self.prefix) + len("ban:")
        ips = sorted({key[start:] for key in keys})
        found: list[Ban] = []
        for i in range(0, len(ips), 1000):
            found.extend(await self._bans_of(ips[i : i + 1000]))
        return sorted(found, key=lambda b: b.until)

    async def _bans_of(self, ips: list[str]) -> list[Ban]:
        def fill(pipe: Any) -> list[Any]:
            return [(pipe.get(k), pipe.pttl(k)) for k in map(self._ban_key, ips)]

        replies = await self._call(lambda: self._batch(fill))
        now = self._clock()
        found = [_ban(ip, v, int(ttl), now) for ip, (v, ttl) in zip(ips, replies, strict=True)]
        return [b for b in found if b is not None]

    def remaining(self, ban: Ban) -> float:
        return max(0.0, ban.until - self._clock())


# ---------------------------------------------------------------------- helpers


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


async def _one(pool: RespPool, command: list[Any]) -> Any:
    (reply,) = await pool.execute([command])
    if isinstance(reply, RespError):
        raise reply
    return reply


async def _awaited(reply: Any) -> Any:
    """A queued request's reply: ``None``, one awaitable, or a tuple of them."""
    if reply is None:
        return None
    if isinstance(reply, tuple):
        return tuple([await part for part in reply])
    return await reply


def _result(op: Op, reply: Any, now: float) -> Any:
    match op:
        case Count() | Peek():
            return sum(int(v) for v in reply if v is not None)
        case Distinct() | DistinctPeek():
            return int(reply)
        case GetProfile():
            if reply is None:
                return None
            try:
                profile = json.loads(reply)
            except ValueError:
                return None
            return profile if isinstance(profile, dict) else None
        case GetBan(ip):
            value, ttl = reply
            return _ban(normalize_ip(ip), value, int(ttl), now)
        case _:
            return None


def _ban(ip: str, value: Any, ttl_ms: int, now: float) -> Ban | None:
    if value is None or ttl_ms == -2:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    rule_id = data.get("rule_id")
    until = math.inf if ttl_ms == -1 else now + ttl_ms / 1000
    return Ban(
        ip,
        until,
        str(data.get("reason", "")),
        str(rule_id) if rule_id is not None else None,
    )


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()
