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

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast, final

import trio

from mailmoat.config import ListenerConfig
from mailmoat.detect import LoginDetector, LoginFacts
from mailmoat.detect.geo import GeoInfo, GeoIP
from mailmoat.detect.outbound import Outbound, OutboundFacts
from mailmoat.detect.reputation import Reputation
from mailmoat.detect.travel import LoginProfile, assess
from mailmoat.events import Emitter, new_session_id, wall_clock
from mailmoat.policy import RuleHolder
from mailmoat.protocols.proxy_protocol import ProxyHeader, encode_v2
from mailmoat.protocols.smtp import SmtpLimits
from mailmoat.session.smtp import (
    R_UNAVAILABLE,
    Awaiting,
    BanClient,
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
from mailmoat.state import GetProfile, PutProfile, Store, StoreUnavailable

from .tls import CertStore, TlsError, TlsStream
from .upstream import BackendPool, BackendUnavailable

RECEIVE_SIZE = 65536
#: a tarpit never holds a session longer than this per command
MAX_TARPIT = 60.0
#: how a session ended that lowers its source's reputation
REFUSAL_REASONS = frozenset(
    {
        "policy_deny",
        "policy_ban",
        "pregreet",
        "non_smtp_command",
        "pipelining_violation",
        "starttls_injection",
        "message_smuggling",
        "message_bare_newline",
        "too_many_errors",
        "line_too_long",
    }
)


@final
@dataclass
class SmtpService:
    """Everything the sessions of one listener share."""

    listener: ListenerConfig
    pool: BackendPool
    certs: CertStore | None
    emitter: Emitter
    rules: RuleHolder | None = None
    store: Store | None = None
    detector: LoginDetector | None = None
    salt: bytes = b""
    reputation: Reputation = field(default_factory=Reputation)
    geoip: GeoIP = field(default_factory=GeoIP)
    #: seconds since the epoch (login profiles outlive the process); tests move it
    wall_clock: Callable[[], float] = wall_clock
    outbound: Outbound = field(default_factory=Outbound)
    active: set[trio.CancelScope] = field(default_factory=set)
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
        )


def _identity(value: str) -> Literal["none", "xclient", "proxy-v2"]:
    if value in ("xclient", "proxy-v2"):
        return cast(Literal["xclient", "proxy-v2"], value)
    return "none"


def _as_bytes(data: bytes | bytearray) -> bytes:
    # streams return bytes in practice; copy only if one ever hands us a bytearray
    return data if isinstance(data, bytes) else bytes(data)


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return ("unknown", 0)
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[7:]  # an IPv4 client on a dual-stack socket
    return host, int(addr[1])


@final
class _Connection:
    """State of one proxied connection (tier 3 half of the session)."""

    def __init__(self, service: SmtpService, client: trio.SocketStream) -> None:
        self.service = service
        self.client: trio.abc.Stream = client
        self.socket = client.socket
        self.upstream: trio.abc.Stream | None = None
        self.id = new_session_id()
        self.ip, self.port = _peer(client)
        self.session = SmtpSession(
            service.session_config, self.ip, self.port, rules=service.rules, session_id=self.id
        )
        self.started = trio.current_time()
        self.client_in = self.client_out = self.up_in = self.up_out = 0
        self.backend_address = ""
        self.geo: GeoInfo = GeoInfo()

    def emit(self, cmd: Emit) -> None:
        fields: dict[str, Any] = {
            "session.protocol": "smtp",
            "session.listener": self.service.listener.name,
            "client.ip": self.ip,
            "client.port": self.port,
        }
        fields.update(cmd.fields)
        self.service.emitter.emit(
            cmd.action, fields, kind=cmd.kind, outcome=cmd.outcome, session_id=self.id
        )

    async def run(self) -> None:
        implicit = self.service.listener.tls == "implicit"
        self.emit(Emit("session.open", {"tls.active": implicit}))
        store = self.service.store
        banned, reputation = False, 0
        if store is not None:
            try:
                banned = await store.banned(self.ip) is not None
                if self.service.detector is not None:
                    rep = self.service.reputation
                    reputation = rep.score(self.ip, await store.run(rep.ops_for(self.ip)))
            except StoreUnavailable as exc:
                self.emit(
                    Emit(
                        "state.unavailable",
                        {"error.message": str(exc)},
                        kind="alert",
                        outcome="failure",
                    )
                )
        self.geo = self.service.geoip.lookup(self.ip)
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
                    early = _as_bytes(await self.client.receive_some(RECEIVE_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError, TlsError):
                    early = b""
                self.client_in += len(early)
                await self.execute(self.session.pregreet(early))
                return
        try:
            self.upstream, address = await self.service.pool.connect(self.proxy_header())
            self.backend_address = str(address)
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

    def ended(self) -> bool:
        return self.session.closed

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
                data = _as_bytes(await self.client.receive_some(RECEIVE_SIZE))
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
                data = _as_bytes(await self.upstream.receive_some(RECEIVE_SIZE))
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
            i += 1

    async def ban(self, cmd: BanClient) -> None:
        store = self.service.store
        if store is None:
            return
        ban = await store.ban(self.ip, cmd.seconds, cmd.reason, cmd.rule_id)
        await store.run(self.service.reputation.note(self.ip, "ban"))
        self.emit(
            Emit(
                "client.ban",
                {
                    "ban.seconds": round(store.remaining(ban), 1),
                    "ban.reason": cmd.reason,
                    "rule.id": cmd.rule_id,
                },
                kind="verdict",
                outcome="success",
            )
        )

    async def check_login(self, cmd: CheckLogin) -> list[SessionCommand]:
        detector = self.service.detector
        if detector is None:
            return self.session.login_checked(LoginFacts())
        salt = self.service.salt
        fingerprint = None
        if cmd.fingerprint is not None and not cmd.success and salt:
            fingerprint = cmd.fingerprint(salt)
        ops = detector.ops(self.ip, cmd.user, cmd.success, fingerprint)
        profile_key = f"login:profile:{cmd.user.casefold()}"
        if cmd.success:
            ops.append(GetProfile(profile_key))
        else:
            ops += self.service.reputation.note(self.ip, "failure")
        travel: dict[str, Any] | None = None
        try:
            results = await detector.store.run(ops)
            facts = detector.facts(results)
            if cmd.success and cmd.user:
                travel = await self.assess_travel(profile_key, results[len(ops) - 1])
        except StoreUnavailable as exc:
            self.emit(
                Emit(
                    "state.unavailable",
                    {"error.message": str(exc)},
                    kind="alert",
                    outcome="failure",
                )
            )
            facts = LoginFacts()
        blind = bool(getattr(detector.store, "blind", False))
        return self.session.login_checked(facts, travel, blind=blind)

    async def assess_travel(self, key: str, stored: object) -> dict[str, Any]:
        """Impossible travel and new country / AS for a successful login (needs [geoip])."""
        store = self.service.store
        assert store is not None
        try:
            profile = LoginProfile.from_dict(stored) if isinstance(stored, dict) else None
        except ValueError:
            profile = None
        assessment, updated = assess(profile, self.geo, "", self.service.wall_clock())
        await store.run([PutProfile(key, updated.to_dict(), 180 * 86400.0)])
        return assessment.fields()

    async def send_client(self, data: bytes) -> None:
        try:
            await self.client.send_all(data)
            self.client_out += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, TlsError):
            self.session.client_gone()

    async def send_upstream(self, data: bytes) -> list[SessionCommand]:
        assert self.upstream is not None
        try:
            with trio.fail_after(self.service.pool.config.command_timeout):
                await self.upstream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, TlsError):
            return self.session.upstream_failed("backend_closed")
        except trio.TooSlowError:
            return self.session.timed_out("upstream")
        self.up_out += len(data)
        return []

    async def client_handshake(self) -> list[SessionCommand]:
        certs = self.service.certs
        assert certs is not None
        tls = TlsStream(self.client, certs.context, server_side=True)
        try:
            with trio.fail_after(self.service.listener.tls_handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            return self.session.client_tls_failed("handshake timeout")
        except TlsError as exc:
            return self.session.client_tls_failed(exc.reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return self.session.client_tls_failed("connection closed during handshake")
        self.client = tls
        return self.session.client_tls_started(tls.version or "", tls.cipher or "", tls.server_name)

    async def upstream_handshake(self) -> list[SessionCommand]:
        assert self.upstream is not None
        try:
            tls = await self.service.pool.start_tls(self.upstream)
        except TlsError as exc:
            return self.session.upstream_tls_failed(exc.reason)
        except trio.BrokenResourceError:
            return self.session.upstream_tls_failed("connection closed during handshake")
        self.upstream = tls
        return self.session.upstream_tls_started(tls.version or "", tls.cipher or "")

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

    async def note_refusal(self) -> None:
        """A session refused for cause lowers its source's reputation."""
        store = self.service.store
        if (
            store is None
            or self.service.detector is None
            or self.session.close_reason not in REFUSAL_REASONS
        ):
            return
        with contextlib.suppress(StoreUnavailable):
            await store.run(self.service.reputation.note(self.ip, "refusal"))

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for stream in (self.upstream, self.client):
                if stream is not None:
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, TlsError
                    ):
                        await stream.aclose()

    def emit_close(self) -> None:
        s = self.session
        self.emit(
            Emit(
                "session.close",
                {
                    "session.close_reason": s.close_reason or "unknown",
                    "session.duration_ms": round((trio.current_time() - self.started) * 1000, 1),
                    "client.bytes": self.client_in,
                    "server.bytes": self.client_out,
                    "backend.address": self.backend_address,
                    "backend.bytes_sent": self.up_out,
                    "backend.bytes_received": self.up_in,
                    "smtp.commands": s.commands,
                    "smtp.messages": s.messages,
                    "tls.active": s.tls_active,
                },
                outcome="success"
                if s.close_reason in ("client_quit", "client_closed")
                else "failure",
            )
        )


async def serve_smtp(service: SmtpService, stream: trio.SocketStream) -> None:
    """Handle one client connection from accept to close."""
    conn = _Connection(service, stream)
    scope = trio.CancelScope()
    service.active.add(scope)
    try:
        with scope:
            await conn.run()
        if scope.cancelled_caught and not conn.session.closed:
            # drain deadline passed: say goodbye politely if we can
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.execute(conn.session.shutdown())
    except Exception as exc:  # noqa: BLE001 - the per-connection error boundary
        conn.session.close_reason = "internal_error"
        conn.emit(
            Emit(
                "internal_error",
                {"error.type": type(exc).__name__, "error.message": str(exc)[:500]},
                kind="alert",
                outcome="failure",
            )
        )
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, TlsError),
        ):
            await conn.client.send_all(R_UNAVAILABLE)
    finally:
        service.active.discard(scope)
        await conn.close()
        with trio.CancelScope(shield=True):
            try:
                await conn.note_refusal()
                await conn.execute(conn.session.finish())
            except Exception as exc:  # noqa: BLE001 - same boundary, after the close
                conn.emit(
                    Emit(
                        "internal_error",
                        {"error.type": type(exc).__name__, "error.message": str(exc)[:500]},
                        kind="alert",
                        outcome="failure",
                    )
                )
        conn.emit_close()
