"""The SMTP connection driver: runs one :class:`~mailmoat.session.smtp.SmtpSession`.

It owns the two streams, the timeouts and the TLS handshakes, and does no
parsing: bytes go into the session, commands come out and are executed in
order.  Consecutive sends to the same side are written with one
``send_all``.  Every await that waits on a peer sits under a deadline.

This is the per-connection error boundary: the one broad ``except`` lives in
:func:`serve_smtp`, logs with the session id, emits ``internal_error`` and
closes -- it never echoes exception text to the peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast, final

import trio

from mailmoat.detect.outbound import Outbound, OutboundFacts
from mailmoat.detect.tls import inbound_facts, inbound_ops, sender_network
from mailmoat.protocols.proxy_protocol import ProxyHeader, encode_v2
from mailmoat.protocols.smtp import SmtpLimits
from mailmoat.session.smtp import (
    R_UNAVAILABLE,
    Awaiting,
    BanClient,
    CheckInbound,
    CheckLogin,
    CheckMessage,
    Close,
    Delay,
    Emit,
    SendToClient,
    SendToUpstream,
    SessionCommand,
    SmtpSession,
    SmtpSessionConfig,
    StartClientTls,
    StartUpstreamTls,
)
from mailmoat.state import StoreUnavailable

from ._connection import (
    MAX_TARPIT,
    RECEIVE_SIZE,
    REFUSAL_REASONS,
    ConnectionBase,
    ServiceBase,
    as_bytes,
    serve_connection,
)
from .tls import TlsError, TlsStream
from .upstream import BackendUnavailable

__all__ = ["MAX_TARPIT", "RECEIVE_SIZE", "REFUSAL_REASONS", "SmtpService", "serve_smtp"]


@final
@dataclass
class SmtpService(ServiceBase):
    """Everything the sessions of one SMTP listener share."""

    outbound: Outbound = field(default_factory=Outbound)
    session_config: SmtpSessionConfig = field(init=False)

    def __post_init__(self) -> None:
        lim = self.listener.limits
        self.session_config = SmtpSessionConfig(
            listener=self.listener.name,
            client_tls=self.listener.tls,
            require_tls=self.listener.require_tls,
            backend_tls=self.pool.config.tls,
            hostname=self.listener.hostname or "mailmoat",
            max_message_size=lim.max_message_size,
            greet_delay=self.listener.greet_delay,
            bare_newline=self.listener.bare_newline,
            max_errors=self.listener.max_errors,
            client_identity=_identity(self.pool.config.client_identity),
            limits=SmtpLimits(
                max_command_line=lim.max_command_line, max_text_line=lim.max_text_line
            ),
            inbound_tls=self.detector is not None,
        )


def _identity(value: str) -> Literal["none", "xclient", "proxy-v2"]:
    if value in ("xclient", "proxy-v2"):
        return cast(Literal["xclient", "proxy-v2"], value)
    return "none"


@final
class _Connection(ConnectionBase):
    """One SMTP connection (tier 3 half of the session)."""

    protocol = "smtp"

    def __init__(self, service: SmtpService, client: trio.SocketStream) -> None:
        super().__init__(service, client)
        self.service = service
        self.session: SmtpSession = SmtpSession(
            service.session_config,
            self.ip,
            self.port,
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
        delay = self.service.listener.greet_delay
        if delay > 0:
            await self.execute(self.session.begin_greet_delay())
            with trio.move_on_after(delay):
                try:
                    early = as_bytes(await self.client.receive_some(RECEIVE_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError, TlsError):
                    early = b""
                self.client_in += len(early)
                await self.execute(self.session.pregreet(early))
                return
        try:
            self.upstream, address = await self.connect_backend(self.proxy_header())
            self.backend_address = str(address)
            self.backend = address
            if isinstance(self.upstream, TlsStream):  # implicit TLS to the backend
                self.emit(
                    Emit(
                        "tls.handshake",
                        {
                            "tls.version": self.upstream.version,
                            "tls.cipher": self.upstream.cipher,
                            "tls.leg": "backend",
                        },
                        outcome="success",
                    )
                )
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
        while not self.session.closed:
            match self.session.awaiting:
                case Awaiting.CLIENT:
                    await self.execute(await self.read_client())
                case Awaiting.UPSTREAM:
                    await self.execute(await self.read_upstream())
                case Awaiting.NOTHING:  # pragma: no cover - handshakes run inside execute
                    raise AssertionError("session waits on nothing but is not closed")

    def proxy_header(self) -> bytes:
        """A PROXY v2 header naming the client, for backends with client_identity = proxy-v2."""
        if self.service.pool.config.client_identity != "proxy-v2":
            return b""
        sock = self.socket
        try:
            local = sock.getsockname()
        except OSError:
            local = ("0.0.0.0", 0)  # noqa: S104 - a placeholder address, never bound
        dest_host = str(local[0])
        if dest_host.startswith("::ffff:"):
            dest_host = dest_host[7:]
        return encode_v2(
            ProxyHeader(source=(self.ip, self.port), destination=(dest_host, int(local[1])))
        )

    async def read_client(self) -> list[SessionCommand]:
        try:
            with trio.move_on_after(self.service.listener.idle_timeout) as scope:
                data = as_bytes(await self.client.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, TlsError):
            data = b""
        if scope.cancelled_caught:
            return self.session.timed_out("client")
        self.client_in += len(data)
        return self.session.receive_client(data)

    async def read_upstream(self) -> list[SessionCommand]:
        assert self.upstream is not None
        cfg = self.service.pool.config
        timeout = cfg.data_timeout if self.session.in_data else cfg.command_timeout
        try:
            with trio.move_on_after(timeout) as scope:
                data = as_bytes(await self.upstream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, TlsError):
            return self.session.upstream_failed("backend_closed")
        if scope.cancelled_caught:
            return self.session.timed_out("upstream")
        self.up_in += len(data)
        return self.session.receive_upstream(data)

    async def execute(self, commands: list[SessionCommand]) -> None:
        i = 0
        while i < len(commands):
            cmd = commands[i]
            match cmd:
                case SendToClient() | SendToUpstream():
                    # coalesce a run of sends to the same side into one write
                    kind = type(cmd)
                    parts = [cmd.data]
                    while i + 1 < len(commands) and type(commands[i + 1]) is kind:
                        i += 1
                        nxt = commands[i]
                        assert isinstance(nxt, SendToClient | SendToUpstream)
                        parts.append(nxt.data)
                    data = parts[0] if len(parts) == 1 else b"".join(parts)
                    if kind is SendToClient:
                        await self.send_client(data)
                    else:
                        commands[i + 1 : i + 1] = await self.send_upstream(data)
                case Emit():
                    self.emit(cmd)
                case Close():
                    pass  # the loop ends on session.closed; streams close in serve_smtp
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
                case CheckMessage():
                    commands[i + 1 : i + 1] = await self.check_message(cmd)
                case CheckInbound():
                    commands[i + 1 : i + 1] = await self.check_inbound(cmd)
            i += 1

    async def check_message(self, cmd: CheckMessage) -> list[SessionCommand]:
        store = self.service.store
        if store is None or self.service.detector is None:
            return self.session.message_checked(OutboundFacts())
        outbound = self.service.outbound
        recipients = list(cmd.recipients)
        try:
            results = await store.run(outbound.ops(cmd.user, recipients, cmd.count))
            facts, profile = outbound.assess(results)
            await store.run(outbound.save(cmd.user, profile))
        except StoreUnavailable as exc:
            self.emit(
                Emit(
                    "state.unavailable",
                    {"error.message": str(exc)},
                    kind="alert",
                    outcome="failure",
                )
            )
            facts = OutboundFacts()
        return self.session.message_checked(facts)

    async def check_inbound(self, cmd: CheckInbound) -> list[SessionCommand]:
        """Count whether this sender used STARTTLS (per domain and network)."""
        detector = self.service.detector
        if detector is None:
            return self.session.inbound_checked({})
        tls = self.session.tls_active
        ops = inbound_ops(cmd.domain, sender_network(self.ip), tls, detector.inbound_tls_window)
        try:
            facts = inbound_facts(await detector.store.run(ops), tls)
        except StoreUnavailable as exc:
            self.store_alert(exc)
            return self.session.inbound_checked({})
        return self.session.inbound_checked(facts.fields())

    CLEAN_CLOSES = frozenset({"client_quit", "client_closed"})

    def close_fields(self) -> dict[str, Any]:
        s = self.session
        return {
            "smtp.commands": s.commands,
            "smtp.messages": s.messages,
            "tls.active": s.tls_active,
        }


async def serve_smtp(service: SmtpService, stream: trio.SocketStream) -> None:
    """Handle one client connection from accept to close."""
    await serve_connection(_Connection(service, stream), R_UNAVAILABLE)
