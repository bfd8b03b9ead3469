"""A lean RESP2 pipeline client for one Redis server, on trio.

Why not coredis here: a login makes three round trips to the shared store,
and through coredis each cost ~0.5 ms of mailmoat's CPU (its command
objects, response callbacks and a reader task per connection); detection on
Redis cut IMAP logins/s by half (docs/benchmarks.md, "Detection").  The
store needs little of a general client: send a batch of commands, read as
many replies.  :class:`RespPool` does that for a plain ``redis://`` or
``unix://`` server; TLS, Sentinel and Cluster still go through coredis.

Contract:

* :meth:`RespPool.execute` writes every command of a batch in one write and
  reads their replies: one round trip.  A reply that is a Redis error comes
  back as a :class:`RespError` *value* in its place (a pipeline's other
  replies stand); the caller decides.
* A connection serves one batch at a time; an idle one the server has closed
  meanwhile (a restart) is noticed before it is used and replaced.  One whose exchange did not end
  cleanly (cancelled, timed out, failed, a malformed reply) is closed, never
  reused: a late reply can never be read as the answer to the next batch.
* Failures to reach or talk to Redis raise :class:`OSError` (a lost
  connection is a :class:`ConnectionError`, so the store catches the same
  failures as from coredis) or :class:`RespProtocolError`.
* Bulk strings are decoded as UTF-8 (invalid bytes replaced): the store keeps
  only text it wrote itself.
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Any, Final, final

import trio

from ._wire import RespError, RespProtocolError, encode_command, parse_reply

__all__ = ["RespError", "RespPool", "RespProtocolError", "encode_command"]

#: idle connections kept for the next batch
DEFAULT_MAX_IDLE: Final = 16
#: connections open at once; a batch beyond waits for one to come back
DEFAULT_MAX_CONNECTIONS: Final = 64
_RECEIVE: Final = 65536


@final
class _Connection:
    __slots__ = ("buffer", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def exchange(self, payload: bytes, count: int) -> list[Any]:
        await self.stream.send_all(payload)
        replies: list[Any] = []
        buf = self.buffer
        pos = 0
        while len(replies) < count:
            found = parse_reply(buf, pos) if pos < len(buf) else None
            if found is None:
                data = await self.stream.receive_some(_RECEIVE)
                if not data:
                    raise RespProtocolError("the server closed the connection mid-reply")
                buf += data
                continue
            value, pos = found
            replies.append(value)
        del buf[:pos]
        if buf:
            raise RespProtocolError("the server sent more replies than commands")
        return replies


@final
class RespPool:
    """Connections to one Redis server (see the module docstring).

    ``host``/``port`` for TCP, or ``path`` for a Unix socket; ``username`` /
    ``password`` for AUTH, ``db`` for SELECT, sent once per new connection.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        max_idle: int = DEFAULT_MAX_IDLE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self._hello: list[list[bytes | str | int | float]] = []
        if password is not None:
            self._hello.append(["AUTH", username, password] if username else ["AUTH", password])
        if db:
            self._hello.append(["SELECT", db])
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._slots = trio.Semaphore(max_connections)
        self._closed = False

    def __repr__(self) -> str:
        where = self.path or f"{self.host}:{self.port}"
        return f"<RespPool {where} idle={len(self._idle)}>"

    async def _open(self) -> _Connection:
        stream: trio.abc.Stream
        if self.path is not None:
            stream = await trio.open_unix_socket(self.path)
        else:
            stream = await trio.open_tcp_stream(self.host, self.port)
        conn = _Connection(stream)
        if self._hello:
            try:
                payload = b"".join(encode_command(c) for c in self._hello)
                replies = await conn.exchange(payload, len(self._hello))
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            refused = [r for r in replies if isinstance(r, RespError)]
            if refused:
                await trio.aclose_forcefully(stream)
                raise refused[0]  # a wrong password, a db out of range
        return conn

    def _reusable(self) -> _Connection | None:
        """An idle connection still open at the other end, or ``None``.

        An idle connection owes no reply, so one that is readable was closed
        by the server (a restart, a timeout, ``CLIENT KILL``) or sent junk:
        it is dropped here rather than failing the next batch.
        """
        while self._idle:
            conn = self._idle.pop()
            sock = getattr(conn.stream, "socket", None)
            if sock is None:
                return conn
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
            if not readable:
                return conn
            sock.close()
        return None

    async def execute(self, commands: Sequence[Sequence[bytes | str | int | float]]) -> list[Any]:
        """Send ``commands`` in one write, their replies in order (errors as values)."""
        if not commands:
            return []
        if self._closed:
            raise ConnectionError("the Redis pool is closed")
        payload = b"".join(encode_command(c) for c in commands)
        async with self._slots:
            conn = self._reusable() or await self._open()
            try:
                replies = await conn.exchange(payload, len(commands))
            except BaseException as exc:
                # cancelled, timed out or failed half-way: its stream is out of step
                await trio.aclose_forcefully(conn.stream)
                if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
                    raise ConnectionError(f"connection to Redis lost: {exc}") from exc
                raise
            if self._closed or len(self._idle) >= self._max_idle:
                await trio.aclose_forcefully(conn.stream)
            else:
                self._idle.append(conn)
        return replies

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)
