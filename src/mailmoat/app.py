"""The composition root: one Trio nursery running a node from a :class:`Config`.

``run_node`` loads the rules, opens every listener, serves connections,
runs the admin API and the rule-file watcher when configured, and handles
signals:

* SIGHUP reloads the rules and the TLS certificates (new handshakes use the
  new certificates, sessions see the new rules from their next phase on; a
  broken file keeps the old rules or certificates and says so in an event);
* SIGTERM / SIGINT drain: stop accepting, let sessions finish for up to
  ``node.drain_timeout`` seconds, then tell the rest ``421`` and close.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import final

import msgpack
import trio

from ._files import replace_file
from .admin import AdminConfig, AdminServer
from .admin._routes import add_node_routes
from .config import Address, BackendConfig, Config
from .detect import LoginDetector
from .detect.geo import GeoIP
from .detect.reputation import Reputation
from .errors import ConfigError, MailmoatError
from .events import Emitter, EventSink, NodeMetrics, json_lines_sink
from .events.journal import JournalWriter
from .net.http import B_BUSY as H_BUSY
from .net.http import HttpService, serve_http
from .net.imap import ImapService, serve_imap
from .net.smtp import SmtpService, serve_smtp
from .net.tls import CertKeyPair, CertStore
from .net.upstream import BackendPool
from .policy import ReloadResult, RuleErrors, RuleHolder, snapshot
from .state import (
    FailoverStore,
    GetProfile,
    MemoryStore,
    PutProfile,
    Store,
    StoreUnavailable,
)

AnyService = SmtpService | ImapService | HttpService
R_BUSY = b"421 4.7.0 Too many connections, try again later\r\n"
B_BUSY = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"


@final
class ListenError(MailmoatError):
    """A listener could not bind its address."""


@final
@dataclass
class Node:
    """A running node: what tests and the demo can inspect and steer."""

    config: Config
    emitter: Emitter
    certs: CertStore | None
    rules: RuleHolder = field(default_factory=RuleHolder.empty)
    store: Store = field(default_factory=MemoryStore)
    admin_address: tuple[str, int] | None = None
    services: dict[str, AnyService] = field(default_factory=dict)
    #: the certificates of the HTTPS listeners (the same files, ALPN http/1.1)
    http_certs: CertStore | None = None
    bound: dict[str, list[Address]] = field(default_factory=dict)
    accept_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    draining: bool = False
    #: Prometheus metrics counted from every event (served on the admin /metrics)
    metrics: NodeMetrics | None = None

    def active_sessions(self) -> int:
        return sum(len(s.active) for s in self.services.values())

    def reload_certificates(self) -> bool:
        if self.certs is None:
            return True
        try:
            self.certs.reload()
            if self.http_certs is not None:
                self.http_certs.reload()
        except ConfigError as exc:
            self.emitter.emit(
                "tls.reload", {"error.message": str(exc)}, kind="audit", outcome="failure"
            )
            return False
        self.emitter.emit("tls.reload", {}, kind="audit", outcome="success")
        return True

    def reload_rules(self, trigger: str) -> ReloadResult:
        """Compile the rule files aside and swap them in; on error keep the old ones."""
        result = self.rules.reload()
        fields: dict[str, object] = {
            "rules.trigger": trigger,
            "rules.count": result.rules,
            "rules.files": result.files,
            "rules.generation": self.rules.generation,
        }
        if result.ok:
            fields.update(
                {
                    "rules.added": list(result.added),
                    "rules.removed": list(result.removed),
                    "rules.changed": list(result.changed),
                }
            )
        else:
            fields["rules.errors"] = [str(e) for e in result.errors]
            fields["error.message"] = "\n".join(str(e) for e in result.errors)
        fields["message"] = result.summary()
        self.emitter.emit(
            "rules.reload", fields, kind="audit", outcome="success" if result.ok else "failure"
        )
        return result

    def reload(self, trigger: str) -> tuple[ReloadResult, bool]:
        """What SIGHUP, the watcher and ``mailmoat reload`` do: rules, then certificates."""
        return self.reload_rules(trigger), self.reload_certificates()

    async def drain(self) -> None:
        """Stop accepting; wait for sessions up to drain_timeout; then cancel the rest."""
        if self.draining:
            return
        self.draining = True
        self.accept_scope.cancel()
        for service in self.services.values():
            if isinstance(service, HttpService):
                service.start_draining()  # idle keep-alive connections hold nothing
        self.emitter.emit(
            "node.drain",
            {"session.active": self.active_sessions()},
            kind="audit",
            outcome="unknown",
        )
        with trio.move_on_after(self.config.node.drain_timeout):
            while self.active_sessions():  # noqa: ASYNC110 - only while draining
                await trio.sleep(0.05)
        for service in self.services.values():
            for scope in list(service.active):
                scope.cancel()
        with trio.move_on_after(5):
            while self.active_sessions():  # noqa: ASYNC110 - only while draining
                await trio.sleep(0.05)


def build_certs(config: Config, *, alpn: Sequence[bytes] = ()) -> CertStore | None:
    if not config.tls.certs:
        return None
    return CertStore(
        [CertKeyPair(c.cert, c.key) for c in config.tls.certs],
        min_version=config.tls.min_version,
        alpn=alpn,
    )


async def _open(address: Address, listener: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host, backlog=1024)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another process listens there: stop it or pick another port)"
        elif exc.errno == errno.EACCES:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = " (no interface has this address)"
        raise ListenError(
            f"listener {listener!r}: cannot listen on {address}: {exc.strerror}{hint}"
        ) from exc


async def run_node(
    config: Config,
    *,
    extra_sinks: Sequence[EventSink] = (),
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    on_ready: Callable[[Node], None] | None = None,
    rules: RuleHolder | None = None,
) -> None:
    sinks: list[EventSink] = list(extra_sinks)
    close_log: Callable[[], None] = lambda: None  # noqa: E731
    if config.log.events != "none":
        sink, close_log = json_lines_sink(config.log.events)
        sinks.append(sink)
    emitter = Emitter(config.node.name, sinks)
    metrics = NodeMetrics()
    emitter.sinks.append(metrics)
    async with contextlib.AsyncExitStack() as stack:
        if config.journal.enabled:
            await _start_journal(config, emitter, stack)
        holder = rules if rules is not None else load_rule_holder(config)
        memory = MemoryStore(max_bans=config.state.max_bans, max_keys=config.state.max_keys)
        snapshot_path = config.node.data_dir / "state.msgpack"
        if config.state.snapshot:
            restore_snapshot(memory, snapshot_path, emitter)
        store = await open_store(config, memory, emitter, stack)
        node = Node(config, emitter, build_certs(config), rules=holder, store=store)
        node.metrics = metrics
        detector: LoginDetector | None = LoginDetector(
            store,
            window=config.state.login_window,
            v6_prefix=config.state.v6_prefix,
            shared_ja4_users=config.state.shared_ja4_users,
            inbound_tls_window=config.state.inbound_tls_window,
            downgrade_min_logins=config.state.downgrade_min_logins,
        )
        if not config.state.detection:
            detector = None
        # fingerprints of wrong passwords (distinct passwords per user): a salt
        # shared by the nodes of one store, never logged
        salt = await shared_salt(store)
        geoip = stack.enter_context(open_geoip(config, emitter))
        emitter.emit(
            "rules.reload",
            {
                "rules.trigger": "start",
                "rules.count": len(holder.current.rules),
                "rules.files": len(holder.current.files),
                "rules.generation": holder.generation,
                "node.mode": config.node.mode,
            },
            kind="audit",
            outcome="success",
        )
        all_listeners: list[trio.SocketListener] = []
        try:
            sockets: list[tuple[AnyService, list[trio.SocketListener]]] = []
            pools = {name: BackendPool(b) for name, b in config.backends.items()}
            if any(lc.protocol == "http" for lc in config.listeners):
                node.http_certs = build_certs(config, alpn=(b"http/1.1",))
            for lc in config.listeners:
                service: AnyService
                # a redirect-only http listener has no backend
                pool = pools.get(lc.backend) or BackendPool(BackendConfig("(none)", ()))
                if lc.protocol == "http":
                    service = HttpService(
                        lc, pool, node.http_certs, emitter, holder, store, detector, salt
                    )
                    service.observe_request = metrics.observe_http_request
                else:
                    args = (lc, pool, node.certs, emitter, holder, store, detector, salt)
                    service = ImapService(*args) if lc.protocol == "imap" else SmtpService(*args)
                service.geoip = geoip
                service.reputation = Reputation(config.state.v6_prefix)
                node.services[lc.name] = service
                opened: list[trio.SocketListener] = []
                for address in lc.listen:
                    got = await _open(address, lc.name)
                    all_listeners.extend(got)
                    opened.extend(got)
                sockets.append((service, opened))
                node.bound[lc.name] = [
                    Address(str(s.socket.getsockname()[0]), int(s.socket.getsockname()[1]))
                    for s in opened
                ]
                emitter.emit(
                    "listener.start",
                    {
                        "session.listener": lc.name,
                        "session.protocol": lc.protocol,
                        "listener.addresses": [str(a) for a in node.bound[lc.name]],
                        "listener.tls": lc.tls,
                        "backend.name": lc.backend,
                    },
                    kind="audit",
                    outcome="success",
                )
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(_signals, node, nursery.cancel_scope)
                if config.rules.watch and config.rules.paths:
                    nursery.start_soon(_watch_rules, node)
                if config.admin is not None:
                    admin = build_admin(node)
                    node.admin_address = await nursery.start(admin.serve)
                with node.accept_scope:
                    async with trio.open_nursery() as accept:
                        for service, listeners in sockets:
                            for sl in listeners:
                                accept.start_soon(_accept_loop, service, sl, nursery)
                        task_status.started(node)
                        if on_ready is not None:
                            on_ready(node)
                # accepting stopped (drain); sessions still run in `nursery`
                for sl in all_listeners:
                    sl.socket.close()
        finally:
            for sl in all_listeners:
                sl.socket.close()
            if config.state.snapshot:
                save_snapshot(memory, snapshot_path, emitter)
            emitter.emit("node.stop", {}, kind="audit", outcome="success")
            close_log()


async def _start_journal(
    config: Config, emitter: Emitter, stack: contextlib.AsyncExitStack
) -> None:
    """The journal writer (and its drop alarm) for the node's lifetime.

    It lives in a nursery of its own entered first, so it takes every event
    from ``rules.reload`` at start to ``node.stop``; closing the stack closes
    the writer, which writes what it accepted and seals its segment.
    """
    jc = config.journal
    writer = JournalWriter(
        config.journal_dir,
        segment_size=jc.segment_size,
        segment_age=jc.segment_age,
        retain_age=jc.retain_age,
        retain_size=jc.retain_size,
        queue=jc.queue,
        fsync_interval=jc.fsync_interval,
    )
    nursery = await stack.enter_async_context(trio.open_nursery())
    await nursery.start(writer.run)
    emitter.sinks.append(writer.sink)
    alarm = trio.CancelScope()

    async def drop_alarm() -> None:
        with alarm:
            while True:
                await trio.sleep(5)
                if dropped := writer.take_dropped():
                    emitter.emit(
                        "journal.dropped",
                        {
                            "journal.dropped": dropped,
                            "message": "the journal could not keep up; events were dropped "
                            "(they still went to [log] events)",
                        },
                        kind="alert",
                        outcome="failure",
                    )

    nursery.start_soon(drop_alarm)
    stack.callback(writer.close)
    stack.callback(alarm.cancel)


async def _accept_loop(
    service: AnyService, listener: trio.SocketListener, sessions: trio.Nursery
) -> None:
    """Accept forever; each connection runs in the node's session nursery."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # out of descriptors: back off instead of spinning
                service.emitter.emit(
                    "listener.accept_error", {"error.message": exc.strerror}, kind="alert"
                )
                await trio.sleep(0.1)
                continue
            raise
        if len(service.active) >= service.listener.max_sessions:
            busy = (
                R_BUSY
                if isinstance(service, SmtpService)
                else H_BUSY
                if isinstance(service, HttpService)
                else B_BUSY
            )
            sessions.start_soon(_refuse_busy, stream, busy)
            continue
        if isinstance(service, HttpService):
            sessions.start_soon(serve_http, service, stream)
        elif isinstance(service, ImapService):
            sessions.start_soon(serve_imap, service, stream)
        else:
            sessions.start_soon(serve_smtp, service, stream)


async def _refuse_busy(stream: trio.SocketStream, message: bytes) -> None:
    with trio.move_on_after(2):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(message)
    await trio.aclose_forcefully(stream)


def open_geoip(config: Config, emitter: Emitter) -> GeoIP:
    """The MaxMind databases of ``[geoip]``; none configured: empty geo fields, said once."""
    city, asn = config.geoip.city, config.geoip.asn
    if city is None and asn is None:
        emitter.emit(
            "geoip.disabled",
            {
                "message": "no [geoip] databases: client.geo.*, client.asn.* stay empty and "
                "impossible travel / new country are not detected"
            },
            kind="audit",
            outcome="unknown",
        )
        return GeoIP()
    geoip = GeoIP.from_paths(city, asn)
    emitter.emit(
        "geoip.open",
        {
            "geoip.city": str(city or ""),
            "geoip.asn": str(asn or ""),
            "geoip.types": [t for t in geoip.database_types if t],
        },
        kind="audit",
        outcome="success",
    )
    return geoip


async def open_store(
    config: Config, memory: MemoryStore, emitter: Emitter, stack: contextlib.AsyncExitStack
) -> Store:
    """The node's store: ``memory``, or Redis with ``memory`` as its fallback (FailoverStore)."""
    if config.state.backend != "redis":
        return memory
    from .state import RedisStore

    def changed(down: bool, why: str) -> None:
        emitter.emit(
            "state.degraded" if down else "state.recovered",
            {
                "state.backend": "redis",
                "state.on_failure": config.state.on_failure,
                "message": why,
            },
            kind="alert" if down else "audit",
            outcome="failure" if down else "success",
        )

    try:
        primary = await stack.enter_async_context(
            RedisStore.connect(config.state.url, timeout=config.state.timeout)
        )
    except StoreUnavailable as exc:
        raise ConfigError(f"[state] url: {exc}") from exc
    return FailoverStore(
        primary, fallback=memory, on_failure=config.state.on_failure, on_change=changed
    )


async def shared_salt(store: Store) -> bytes:
    """A salt every node of ``store`` agrees on (random on first use, kept for a year)."""
    try:
        (found,) = await store.run([GetProfile("node:salt")])
        if not found or not isinstance(found.get("salt"), str):
            await store.run(
                [PutProfile("node:salt", {"salt": os.urandom(16).hex()}, 365 * 86400.0)]
            )
            (found,) = await store.run([GetProfile("node:salt")])
        return bytes.fromhex(str(found["salt"]))
    except (StoreUnavailable, ValueError, TypeError, KeyError):
        return os.urandom(16)


def restore_snapshot(store: MemoryStore, path: Path, emitter: Emitter) -> None:
    """Counters, profiles and bans of the last run (``[state] snapshot``), if any."""
    try:
        data = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
        keys = store.restore(data)
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, msgpack.UnpackException) as exc:
        emitter.emit(
            "state.restore",
            {"file.path": str(path), "error.message": f"{type(exc).__name__}: {exc}"},
            kind="audit",
            outcome="failure",
        )
        return
    emitter.emit(
        "state.restore",
        {"file.path": str(path), "state.keys": keys, "state.bans": len(data.get("bans", []))},
        kind="audit",
        outcome="success",
    )


def save_snapshot(store: MemoryStore, path: Path, emitter: Emitter) -> None:
    """Write the store to ``path`` atomically (a crash leaves the old file or the new one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, msgpack.packb(store.snapshot()))
    except OSError as exc:
        emitter.emit(
            "state.snapshot",
            {"file.path": str(path), "error.message": str(exc)},
            kind="audit",
            outcome="failure",
        )
        return
    emitter.emit(
        "state.snapshot",
        {"file.path": str(path), "state.keys": len(store)},
        kind="audit",
        outcome="success",
    )


def load_rule_holder(config: Config) -> RuleHolder:
    """The node's rules, compiled; :class:`RuleErrors` (file:line each) if any file is bad."""
    holder = RuleHolder(config.rules.paths, mode=config.node.mode)
    result = holder.reload()
    if not result.ok:
        raise RuleErrors(result.errors)
    return holder


def read_admin_token(config: Config) -> str:
    assert config.admin is not None
    try:
        return config.admin.token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"[admin] token_file {str(config.admin.token_file)!r} cannot be read: {exc}"
        ) from exc


def build_admin(node: Node) -> AdminServer:
    """The admin API with the node's routes (``admin/_routes.py``, docs/admin.md)."""
    config = node.config
    assert config.admin is not None
    server = AdminServer(
        AdminConfig((config.admin.listen.host, config.admin.listen.port), read_admin_token(config)),
        node.emitter,
    )
    add_node_routes(server, node)
    return server


async def _watch_rules(node: Node) -> None:
    """``watch = true``: poll the rule paths; a change reloads as SIGHUP would.

    A write in progress shows as a change too: the reload then either sees a
    complete file or reports the error and retries at the next change.  To
    avoid compiling a file mid-write, a change is acted on once the
    fingerprint has held still for one interval.
    """
    paths = node.config.rules.paths
    interval = node.config.rules.watch_interval
    seen = await trio.to_thread.run_sync(snapshot, paths)
    pending: frozenset[tuple[str, int, int]] | None = None
    while True:
        await trio.sleep(interval)
        now = await trio.to_thread.run_sync(snapshot, paths)
        if now == seen:
            pending = None
            continue
        if now != pending:
            pending = now  # changed since the last look: wait until it holds still
            continue
        seen, pending = now, None
        node.reload_rules("watch")


async def _signals(node: Node, cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                node.reload("sighup")
            else:
                await node.drain()
                cancel.cancel()
                return
