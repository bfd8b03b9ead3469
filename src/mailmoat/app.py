"""The composition root: one Trio nursery running a node from a :class:`Config`.

``run_node`` opens every listener, serves connections, and handles signals:

* SIGHUP reloads the TLS certificates (new handshakes use the new ones; a
  broken file keeps the old ones and says so in an event);
* SIGTERM / SIGINT drain: stop accepting, let sessions finish for up to
  ``node.drain_timeout`` seconds, then tell the rest ``421`` and close.
"""

from __future__ import annotations

import contextlib
import errno
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import final

import trio

from .config import Address, Config
from .errors import ConfigError, MailmoatError
from .events import Emitter, EventSink, json_lines_sink
from .net.smtp import SmtpService, serve_smtp
from .net.tls import CertKeyPair, CertStore
from .net.upstream import BackendPool

R_BUSY = b"421 4.7.0 Too many connections, try again later\r\n"


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
    services: dict[str, SmtpService] = field(default_factory=dict)
    bound: dict[str, list[Address]] = field(default_factory=dict)
    accept_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    draining: bool = False

    def active_sessions(self) -> int:
        return sum(len(s.active) for s in self.services.values())

    def reload_certificates(self) -> bool:
        if self.certs is None:
            return True
        try:
            self.certs.reload()
        except ConfigError as exc:
            self.emitter.emit(
                "tls.reload", {"error.message": str(exc)}, kind="audit", outcome="failure"
            )
            return False
        self.emitter.emit("tls.reload", {}, kind="audit", outcome="success")
        return True

    async def drain(self) -> None:
        """Stop accepting; wait for sessions up to drain_timeout; then cancel the rest."""
        if self.draining:
            return
        self.draining = True
        self.accept_scope.cancel()
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


def build_certs(config: Config) -> CertStore | None:
    if not config.tls.certs:
        return None
    return CertStore(
        [CertKeyPair(c.cert, c.key) for c in config.tls.certs], min_version=config.tls.min_version
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
) -> None:
    sinks: list[EventSink] = list(extra_sinks)
    close_log: Callable[[], None] = lambda: None  # noqa: E731
    if config.log.events != "none":
        sink, close_log = json_lines_sink(config.log.events)
        sinks.append(sink)
    emitter = Emitter(config.node.name, sinks)
    node = Node(config, emitter, build_certs(config))
    all_listeners: list[trio.SocketListener] = []
    try:
        sockets: list[tuple[SmtpService, list[trio.SocketListener]]] = []
        pools = {name: BackendPool(b) for name, b in config.backends.items()}
        for lc in config.listeners:
            service = SmtpService(lc, pools[lc.backend], node.certs, emitter)
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
        emitter.emit("node.stop", {}, kind="audit", outcome="success")
        close_log()


async def _accept_loop(
    service: SmtpService, listener: trio.SocketListener, sessions: trio.Nursery
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
            sessions.start_soon(_refuse_busy, stream)
            continue
        sessions.start_soon(serve_smtp, service, stream)


async def _refuse_busy(stream: trio.SocketStream) -> None:
    with trio.move_on_after(2):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(R_BUSY)
    await trio.aclose_forcefully(stream)


async def _signals(node: Node, cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                node.reload_certificates()
            else:
                await node.drain()
                cancel.cancel()
                return
