"""The IMAP connection driver: runs one :class:`~mailmoat.session.imap.ImapSession`.

Before login it works like the SMTP driver (read the side the session waits
on, feed it, execute its commands in order, every await under a deadline).
After a successful login the session returns :class:`StartRelay` and the
driver copies bytes both ways in two tasks until either side closes or
stays silent longer than :data:`RELAY_IDLE_TIMEOUT` (IDLE included: RFC 9051
§5.4 lets a client stay idle for 30 minutes).

:func:`serve_imap` is the per-connection error boundary, as for SMTP.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast, final

import trio

from mailmoat.detect.outbound import Outbound
from mailmoat.protocols.proxy_protocol import ProxyHeader, encode_v2
from mailmoat.session.imap import (
    B_UNAVAILABLE,
    Awaiting,
    ImapCommand,
    ImapSession,
    ImapSessionConfig,
    StartRelay,
)
from mailmoat.session.smtp import (
    BanClient,
    CheckLogin,
    Close,
    Delay,
    Emit,
    SendToClient,
    SendToUpstream,
    StartClientTls,
    StartUpstreamTls,
)

from ._connection import (
    BROKEN,
    MAX_TARPIT,
    RECEIVE_SIZE,
    ConnectionBase,
    ServiceBase,
    as_bytes,
    serve_connection,
)
from .tls import TlsError
from .upstream import BackendUnavailable

#: after login: how long both directions may stay silent (RFC 9051 §5.4: >= 30 min)
RELAY_IDLE_TIMEOUT: Final = 31 * 60.0
#: after login: bytes per read; big FETCH responses move in fewer, larger writes
RELAY_RECEIVE_SIZE: Final = 256 * 1024


@final
@dataclass
class ImapService(ServiceBase):
    """Everything the sessions of one IMAP listener share."""

    outbound: Outbound = field(default_factory=Outbound)
    session_config: ImapSessionConfig = field(init=False)

    def __post_init__(self) -> None:
        identity = self.pool.config.client_identity
        self.session_config = ImapSessionConfig(
            listener=self.listener.name,
            client_tls=self.listener.tls,
            require_tls=self.listener.require_tls,
            backend_tls=self.pool.config.tls,
            client_identity=cast(Literal["none", "imap-id", "proxy-v2"], identity)
            if identity in ("imap-id", "proxy-v2")
            else "none",
            max_errors=self.listener.max_errors,
        )


@final
class _Connection(ConnectionBase):
    """One IMAP connection (tier 3 half of the session)."""

    protocol = "imap"

    def __init__(self, service: ImapService, client: trio.SocketStream) -> None:
        super().__init__(service, client)
        self.service = service
        try:
            local = client.socket.getsockname()
            self.local = (str(local[0]).removeprefix("::ffff:"), int(local[1]))
        except OSError:
            self.local = ("", 0)
        self.session: ImapSession = ImapSession(
            service.session_config,
            self.ip,
            self.port,
            local=self.local,
            rules=service.rules,
            session_id=self.id,
            clock=self.elapsed,
        )

    async def run(self) -> None:
        implicit = self.service.listener.tls == "implicit"
        self.emit(Emit("session.open", {"tls.active": implicit}))
        banned, reputation = await self.connect_facts(self.service.geoip.lookup)
        await self.execute(
            self.session.start(
                banned, greet=not implicit, reputation=reputation, geo=self.geo.fields()
            )
        )
        if self.ended():
            return
        if implicit:
            await self.execute([StartClientTls()])
            if self.ended():
                return
        try:
            self.upstream, address = await self.connect_backend(self.proxy_header())
            self.backend_address = str(address)
            self.backend = address
        except BackendUnavailable as exc:
            await self.execute(self.session.upstream_failed("backend_unavailable"))
            self.emit(Emit("backend.failure", {"error.message": str(exc)}, outcome="failure"))
            return
        except TlsError as exc:
            await self.execute(self.session.upstream_tls_failed(exc.reason))
            return
        except trio.BrokenResourceError:
            await self.execute(self.session.upstream_failed("backend_closed"))
            return
        while not self.ended():
            match self.session.awaiting:
                case Awaiting.CLIENT:
                    await self.execute(await self.read_client())
                case Awaiting.UPSTREAM:
                    await self.execute(await self.read_upstream())
                case Awaiting.NOTHING:
                    if self.session.relaying:
                        return  # the relay ran inside execute() and is over
                    raise AssertionError("session waits on nothing but is not closed")

    def proxy_header(self) -> bytes:
        if self.service.pool.config.client_identity != "proxy-v2":
            return b""
        host, port = self.local if self.local[0] else ("0.0.0.0", 0)  # noqa: S104
        return encode_v2(ProxyHeader(source=(self.ip, self.port), destination=(host, port)))

    async def read_client(self) -> list[ImapCommand]:
        try:
            with trio.move_on_after(self.service.listener.idle_timeout) as scope:
                data = as_bytes(await self.client.receive_some(RECEIVE_SIZE))
        except BROKEN:
            data = b""
        if scope.cancelled_caught:
            return self.session.timed_out("client")
        self.client_in += len(data)
        return self.session.receive_client(data)

    async def read_upstream(self) -> list[ImapCommand]:
        assert self.upstream is not None
        try:
            with trio.move_on_after(self.service.pool.config.command_timeout) as scope:
                data = as_bytes(await self.upstream.receive_some(RECEIVE_SIZE))
        except BROKEN:
            return self.session.upstream_failed("backend_closed")
        if scope.cancelled_caught:
            return self.session.timed_out("upstream")
        self.up_in += len(data)
        return self.session.receive_upstream(data)

    async def execute(self, commands: list[ImapCommand]) -> None:
        i = 0
        while i < len(commands):
            cmd = commands[i]
            match cmd:
                case SendToClient() | SendToUpstream():
                    kind = type(cmd)
                    parts = [cmd.data]
                    while i + 1 < len(commands) and type(commands[i + 1]) is kind:
                        i += 1
                        nxt = commands[i]
                        assert isinstance(nxt, SendToClient | SendToUpstream)
                        parts.append(nxt.data)
                    data = b"".join(parts)
                    if kind is SendToClient:
                        await self.send_client(data)
                    else:
                        commands[i + 1 : i + 1] = await self.send_upstream(data)
                case Emit():
                    self.emit(cmd)
                case Close():
                    pass
                case StartClientTls():
                    commands[i + 1 : i + 1] = await self.client_handshake()
                case StartUpstreamTls():
                    commands[i + 1 : i + 1] = await self.upstream_handshake()
                case Delay():
                    await trio.sleep(min(cmd.seconds, MAX_TARPIT))
                case BanClient():
                    await self.ban(cmd)
                case CheckLogin():
                    commands[i + 1 : i + 1] = await self.check_login(cmd)
                case StartRelay():
                    await self.relay(cmd)
            i += 1

    async def relay(self, cmd: StartRelay) -> None:
        """Copy bytes both ways until one side closes (authenticated session)."""
        assert self.upstream is not None
        upstream = self.upstream
        if cmd.to_upstream and (failed := await self.send_upstream(cmd.to_upstream)):
            await self.execute(failed)
            return
        if cmd.to_client:
            await self.send_client(cmd.to_client)
        reason = await self.copy_both_ways(upstream, RELAY_IDLE_TIMEOUT, RELAY_RECEIVE_SIZE)
        self.session.relay_ended(reason)

    async def on_drain_deadline(self) -> None:
        if self.session.relaying:
            with contextlib.suppress(*BROKEN):
                await self.client.send_all(b"* BYE [UNAVAILABLE] Server shutting down\r\n")
            self.session.relay_ended("shutdown")
        else:
            await self.execute(self.session.shutdown())

    CLEAN_CLOSES = frozenset({"client_logout", "client_closed"})

    def close_fields(self) -> dict[str, Any]:
        s = self.session
        return {"imap.commands": s.commands, "auth.user": s.auth_user, "tls.active": s.tls_active}


async def serve_imap(service: ImapService, stream: trio.SocketStream) -> None:
    """Handle one IMAP client connection from accept to close."""
    await serve_connection(_Connection(service, stream), B_UNAVAILABLE)
