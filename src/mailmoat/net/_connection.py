"""What the SMTP and IMAP connection drivers share.

Contract: a driver subclasses :class:`ConnectionBase`, sets ``protocol``,
builds its session in ``__init__`` and implements ``run``, ``execute`` and
``emit_close``.  The base class owns the two streams and their byte counts,
stamps events, runs the TLS handshakes, answers the state-store commands
(``BanClient``, ``CheckLogin``) and reads the facts a session starts with
(ban, reputation, GeoIP).  :func:`serve_connection` is the per-connection
error boundary both protocols use: the one broad ``except``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import trio

from mailmoat.config import Address, ListenerConfig
from mailmoat.detect import LoginDetector, LoginFacts
from mailmoat.detect.geo import GeoInfo, GeoIP
from mailmoat.detect.reputation import Reputation
from mailmoat.detect.tls import assess_downgrade, remember_tls, shared_ja4, shared_ja4_ops
from mailmoat.detect.travel import LoginProfile, assess
from mailmoat.events import Emitter, new_session_id, reasons, wall_clock
from mailmoat.policy import RuleHolder
from mailmoat.protocols.tls import HelloError, fingerprint, parse_client_hello
from mailmoat.session.commands import BanClient, CheckLogin, ClientHelloFacts, Emit
from mailmoat.state import GetBan, GetProfile, Op, PutProfile, Store, StoreUnavailable

from .tls import CertStore, TlsError, TlsStream
from .upstream import BackendPool

BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, TlsError)
RECEIVE_SIZE = 65536
#: a tarpit never holds a session longer than this per command
MAX_TARPIT = 60.0
#: how a session ended that lowers its source's reputation
REFUSAL_REASONS: Final = reasons.REFUSALS


class Session(Protocol):
    """The calls a driver makes on a protocol session (SmtpSession, ImapSession)."""

    close_reason: str | None

    @property
    def closed(self) -> bool: ...

    def client_gone(self) -> None: ...
    def upstream_failed(self, reason: str) -> list[Any]: ...
    def timed_out(self, side: Any) -> list[Any]: ...
    def shutdown(self) -> list[Any]: ...
    def finish(self) -> list[Any]: ...
    def client_tls_started(
        self,
        version: str,
        cipher: str,
        sni: str | None,
        hello: ClientHelloFacts | None = None,
        *,
        handshake_ms: float | None = None,
    ) -> list[Any]: ...
    def client_tls_failed(
        self,
        reason: str,
        hello: ClientHelloFacts | None = None,
        *,
        handshake_ms: float | None = None,
    ) -> list[Any]: ...
    def upstream_tls_started(
        self, version: str, cipher: str, *, handshake_ms: float | None = None
    ) -> list[Any]: ...
    def upstream_tls_failed(self, reason: str) -> list[Any]: ...
    def login_checked(
        self,
        facts: LoginFacts,
        travel: Mapping[str, Any] | None = None,
        *,
        blind: bool = False,
        tls: Mapping[str, Any] | None = None,
    ) -> list[Any]: ...


@dataclass
class ServiceBase:
    """What the sessions of one listener share, whatever the protocol.

    SmtpService, ImapService and HttpService add their own session config.
    """

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
    active: set[trio.CancelScope] = field(default_factory=set)


def as_bytes(data: bytes | bytearray) -> bytes:
    # streams return bytes in practice; copy only if one ever hands us a bytearray
    return data if isinstance(data, bytes) else bytes(data)


def peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return ("unknown", 0)
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[7:]  # an IPv4 client on a dual-stack socket
    return host, int(addr[1])


#: login profiles outlive a quiet half year
PROFILE_TTL = 180 * 86400.0


def _profile(stored: object) -> LoginProfile | None:
    try:
        return LoginProfile.from_dict(stored) if isinstance(stored, dict) else None
    except ValueError:
        return None  # an old or damaged profile starts afresh


def hello_facts(record: bytes) -> ClientHelloFacts | None:
    """Fingerprints of a captured ClientHello; ``None`` if the client sent none."""
    if not record:
        return None
    try:
        hello = parse_client_hello(record)
    except HelloError as exc:
        return ClientHelloFacts(error=str(exc)[:200])
    fp = fingerprint(hello)
    return ClientHelloFacts(
        ja3=fp.ja3,
        ja4=fp.ja4,
        ja4_r=fp.ja4_r,
        fallback_scsv=hello.fallback_scsv,
        max_version=hello.max_version,
        alpn=tuple(hello.alpn),
    )


def _ms_since(started: float) -> float:
    return round((trio.current_time() - started) * 1000, 2)


class ConnectionBase:
    """State of one proxied connection (tier 3 half of the session)."""

    protocol = ""
    session: Session

    def __init__(self, service: ServiceBase, client: trio.SocketStream) -> None:
        self.base_service = service
        self.client: trio.abc.Stream = client
        self.socket = client.socket
        self.upstream: trio.abc.Stream | None = None
        self.id = new_session_id()
        self.ip, self.port = peer(client)
        self.started = trio.current_time()
        self.client_in = self.client_out = self.up_in = self.up_out = 0
        self.backend_address = ""
        self.backend: Address | None = None
        #: milliseconds the first backend connection took (TCP, PROXY header,
        #: implicit TLS): ``backend.connect_ms`` of ``session.close``
        self.backend_connect_ms: float | None = None
        self.geo: GeoInfo = GeoInfo()
        #: the client's ClientHello, once a handshake ran
        self.hello: ClientHelloFacts | None = None
        #: seconds left of the client's ban when it connected (0: none)
        self.ban_remaining = 0.0

    def elapsed(self) -> float:
        """Seconds since the connection was accepted (the session transcript's clock)."""
        return trio.current_time() - self.started

    # ------------------------------------------------------------------ events

    def emit(self, cmd: Emit) -> None:
        fields: dict[str, Any] = {
            "session.protocol": self.protocol,
            "session.listener": self.base_service.listener.name,
            "client.ip": self.ip,
            "client.port": self.port,
        }
        fields.update(cmd.fields)
        self.base_service.emitter.emit(
            cmd.action, fields, kind=cmd.kind, outcome=cmd.outcome, session_id=self.id
        )

    def store_alert(self, exc: StoreUnavailable) -> None:
        self.emit(
            Emit("state.unavailable", {"error.message": str(exc)}, kind="alert", outcome="failure")
        )

    def ended(self) -> bool:
        return self.session.closed

    # ------------------------------------------------------------------ state store

    async def connect_facts(self, geoip_lookup: Callable[[str], GeoInfo]) -> tuple[bool, int]:
        """Is the client banned, its reputation; and its place (``self.geo``).

        A ban's seconds left are kept in ``self.ban_remaining`` (HTTP's Retry-After).
        """
        service = self.base_service
        store = service.store
        banned, reputation = False, 0
        if store is not None:
            try:
                # the ban and the reputation in one round trip to a shared store
                rep = service.reputation if service.detector is not None else None
                ops: list[Op] = [GetBan(self.ip)]
                if rep is not None:
                    ops += rep.ops_for(self.ip)
                results = await store.run(ops)
                ban = results[0]
                banned = ban is not None
                if ban is not None:
                    self.ban_remaining = store.remaining(ban)
                if rep is not None:
                    reputation = rep.score(self.ip, results[1:])
            except StoreUnavailable as exc:
                self.store_alert(exc)
        self.geo = geoip_lookup(self.ip)
        return banned, reputation

    async def ban(self, cmd: BanClient) -> None:
        store = self.base_service.store
        if store is None:
            return
        ban = await store.ban(self.ip, cmd.seconds, cmd.reason, cmd.rule_id)
        await store.run(self.base_service.reputation.note(self.ip, "ban"))
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

    async def check_login(self, cmd: CheckLogin) -> list[Any]:
        """Count a login and read the user's history in one round trip; the findings."""
        service = self.base_service
        detector = service.detector
        if detector is None:
            return self.session.login_checked(LoginFacts())
        fingerprint = None
        if cmd.fingerprint is not None and not cmd.success and service.salt:
            fingerprint = cmd.fingerprint(service.salt)
        ops = detector.ops(self.ip, cmd.user, cmd.success, fingerprint)
        if not cmd.success:
            ops += service.reputation.note(self.ip, "failure")
        profile_key = f"login:profile:{cmd.user.casefold()}"
        profile_at = ja4_at = -1
        if cmd.user:
            profile_at = len(ops)
            ops.append(GetProfile(profile_key))
        ja4 = self.hello.ja4 if self.hello is not None else ""
        if ja4:
            ja4_at = len(ops)
            ops += shared_ja4_ops(ja4, cmd.user, not cmd.success, detector.window)
        travel: dict[str, Any] | None = None
        tls: dict[str, Any] = {}
        try:
            results = await detector.store.run(ops)
            facts = detector.facts(results)
            if ja4_at >= 0:
                tls.update(shared_ja4(ja4, results[ja4_at], detector.shared_ja4_users).fields())
            if profile_at >= 0:
                profile = _profile(results[profile_at])
                version = self.client_tls_version()
                history = profile.tls if profile is not None else ()
                downgrade = assess_downgrade(
                    history, self.protocol, version, min_logins=detector.downgrade_min_logins
                )
                tls.update(downgrade.fields())
                if cmd.success:
                    # a downgraded login never teaches the history: otherwise the
                    # first stripped login would make the next one look normal
                    learn = None if downgrade.downgrade else version
                    travel = await self.remember_login(profile_key, profile, learn, ja4)
        except StoreUnavailable as exc:
            self.store_alert(exc)
            facts = LoginFacts()
        blind = bool(getattr(detector.store, "blind", False))
        return self.session.login_checked(facts, travel, blind=blind, tls=tls)

    def client_tls_version(self) -> str:
        """The client leg's TLS version, ``""`` while it is plaintext."""
        client = self.client
        return client.version or "" if isinstance(client, TlsStream) else ""

    async def remember_login(
        self, key: str, profile: LoginProfile | None, version: str | None, ja4: str
    ) -> dict[str, Any]:
        """A successful login: travel and first-seen facts, and the history that includes it.

        ``version``: the TLS version to remember (``""`` plaintext), ``None`` for none.
        """
        store = self.base_service.store
        assert store is not None
        assessment, updated = assess(profile, self.geo, ja4, self.base_service.wall_clock())
        if version is not None:
            updated = replace(updated, tls=remember_tls(updated.tls, self.protocol, version))
        await store.run([PutProfile(key, updated.to_dict(), PROFILE_TTL)])
        return assessment.fields()

    async def note_refusal(self) -> None:
        """A session refused for cause lowers its source's reputation."""
        service = self.base_service
        store = service.store
        if (
            store is None
            or service.detector is None
            or self.session.close_reason not in REFUSAL_REASONS
        ):
            return
        with contextlib.suppress(StoreUnavailable):
            await store.run(service.reputation.note(self.ip, "refusal"))

    # ------------------------------------------------------------------ streams

    async def send_client(self, data: bytes) -> None:
        try:
            await self.client.send_all(data)
            self.client_out += len(data)
        except BROKEN:
            self.session.client_gone()

    async def send_upstream(self, data: bytes) -> list[Any]:
        assert self.upstream is not None
        try:
            with trio.fail_after(self.base_service.pool.config.command_timeout):
                await self.upstream.send_all(data)
        except BROKEN:
            return self.session.upstream_failed("backend_closed")
        except trio.TooSlowError:
            return self.session.timed_out("upstream")
        self.up_out += len(data)
        return []

    async def connect_backend(self, prefix: bytes = b"") -> tuple[trio.abc.Stream, Address]:
        """A connection to the listener's backend (see :class:`BackendPool`), timed."""
        started = trio.current_time()
        stream, address = await self.base_service.pool.connect(prefix)
        if self.backend_connect_ms is None:
            self.backend_connect_ms = _ms_since(started)
        return stream, address

    async def client_handshake(self) -> list[Any]:
        certs = self.base_service.certs
        assert certs is not None
        tls = TlsStream(self.client, certs.context, server_side=True)
        reason = ""
        started = trio.current_time()
        try:
            with trio.fail_after(self.base_service.listener.tls_handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            reason = "handshake timeout"
        except TlsError as exc:
            reason = exc.reason
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "connection closed during handshake"
        took = _ms_since(started)
        self.hello = hello_facts(tls.client_hello)
        if reason:
            return self.session.client_tls_failed(reason, self.hello, handshake_ms=took)
        self.client = tls
        return self.session.client_tls_started(
            tls.version or "", tls.cipher or "", tls.server_name, self.hello, handshake_ms=took
        )

    async def upstream_handshake(self) -> list[Any]:
        assert self.upstream is not None
        started = trio.current_time()
        try:
            assert self.backend is not None
            tls = await self.base_service.pool.start_tls(self.upstream, self.backend)
        except TlsError as exc:
            return self.session.upstream_tls_failed(exc.reason)
        except trio.BrokenResourceError:
            return self.session.upstream_tls_failed("connection closed during handshake")
        self.upstream = tls
        return self.session.upstream_tls_started(
            tls.version or "", tls.cipher or "", handshake_ms=_ms_since(started)
        )

    async def copy_both_ways(
        self, upstream: trio.abc.Stream, idle_timeout: float, receive_size: int
    ) -> str:
        """Copy bytes both ways until one side closes or both stay silent for
        ``idle_timeout``; why it ended (``client_closed``, ``backend_closed``,
        ``client_gone``, ``idle_timeout``).  The byte counters follow."""
        reason = ["client_closed"]
        last = [trio.current_time()]

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, from_client: bool) -> None:
            while True:
                try:
                    data = await src.receive_some(receive_size)
                except BROKEN:
                    data = b""
                if not data:
                    reason[0] = "client_closed" if from_client else "backend_closed"
                    return
                last[0] = trio.current_time()
                try:
                    await dst.send_all(data)
                except BROKEN:
                    reason[0] = "backend_closed" if from_client else "client_gone"
                    return
                if from_client:
                    self.client_in += len(data)
                    self.up_out += len(data)
                else:
                    self.up_in += len(data)
                    self.client_out += len(data)

        async def first_done(src: trio.abc.Stream, dst: trio.abc.Stream, side: bool) -> None:
            await pump(src, dst, side)
            nursery.cancel_scope.cancel()

        async def watchdog() -> None:
            while True:
                idle_for = trio.current_time() - last[0]
                if idle_for >= idle_timeout:
                    reason[0] = "idle_timeout"
                    nursery.cancel_scope.cancel()
                    return
                await trio.sleep(idle_timeout - idle_for)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_done, self.client, upstream, True)
            nursery.start_soon(first_done, upstream, self.client, False)
            nursery.start_soon(watchdog)
        return reason[0]

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for stream in (self.upstream, self.client):
                if stream is not None:
                    with contextlib.suppress(*BROKEN):
                        await stream.aclose()

    # ------------------------------------------------------------------ per protocol

    async def run(self) -> None:
        raise NotImplementedError

    async def execute(self, commands: list[Any]) -> None:
        raise NotImplementedError

    async def on_drain_deadline(self) -> None:
        """The drain deadline passed with the session still open: say goodbye if we can."""
        await self.execute(self.session.shutdown())

    #: close reasons that count as a normal end of session
    CLEAN_CLOSES: frozenset[str] = frozenset({"client_closed"})

    def close_fields(self) -> dict[str, Any]:
        """The protocol's own fields of the ``session.close`` event."""
        return {}

    def emit_close(self) -> None:
        reason = self.session.close_reason
        fields: dict[str, Any] = {
            "session.close_reason": reason or "unknown",
            "session.duration_ms": round((trio.current_time() - self.started) * 1000, 1),
            "client.bytes": self.client_in,
            "server.bytes": self.client_out,
            "backend.address": self.backend_address,
            "backend.bytes_sent": self.up_out,
            "backend.bytes_received": self.up_in,
        }
        if self.backend_connect_ms is not None:
            fields["backend.connect_ms"] = self.backend_connect_ms
        fields.update(self.close_fields())
        outcome = "success" if reason in self.CLEAN_CLOSES else "failure"
        self.emit(Emit("session.close", fields, outcome=outcome))


async def serve_connection(conn: ConnectionBase, unavailable: bytes) -> None:
    """Run one connection from accept to close: the per-connection error boundary.

    The one broad ``except``: it logs with the session id, emits
    ``internal_error`` and closes; it never echoes exception text to the peer
    (``unavailable`` is the protocol's fixed "service not available" line).
    """
    service = conn.base_service
    scope = trio.CancelScope()
    service.active.add(scope)
    try:
        with scope:
            await conn.run()
        if scope.cancelled_caught and not conn.session.closed:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.on_drain_deadline()
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
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(*BROKEN):
            await conn.client.send_all(unavailable)
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
