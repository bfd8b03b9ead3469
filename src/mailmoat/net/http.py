"""The HTTP connection driver: a webmail reverse proxy with h11 on both legs.

Theory of operation
-------------------
One task per client connection (:func:`serve_http`).  The client's bytes go
through :class:`~mailmoat.protocols.http.HeadScreen` (which refuses what a
front proxy must not pass on: docs/http.md, "Request hardening") and then
into an :class:`h11.Connection` in the server role; the backend leg is an
:class:`h11.Connection` in the client role over a connection from the
listener's :class:`~mailmoat.net.upstream.BackendPool`, kept alive across
requests while both ends allow it.

Per request:

1. wait for the head: ``idle_timeout`` for its first byte (a quiet
   keep-alive connection closes silently), then ``header_timeout`` for the
   rest (slowloris: 408 and close);
2. the login endpoint (``[listener.login]``): read the body up to 64 KiB
   first, answering ``100 Continue`` itself when the client waits for it, so
   that the user name is known to the rules;
3. the ``request`` rule phase (:class:`~mailmoat.session.http.HttpSession`);
   a refusal answers 403/429 and closes;
4. forward the normalised request (:func:`normalize_request`) and stream its
   body in one task while another reads the response: a backend may answer
   before the upload ends;
5. the response head: the ``response`` phase and, for a login, the login
   accounting and the ``login`` phase -- the head is held until then, so a
   login refused after the backend accepted it never hands over the session
   cookie; then the body is streamed as it comes, never buffered whole;
6. a ``101`` to a WebSocket handshake turns the connection into a byte relay.

Failures: the backend cannot be reached, 502; it sends no response head within
the backend's ``command_timeout``, 504; it breaks mid-body, the client
connection is closed (the status line is gone already).  A client that goes
away mid-response cancels both legs: every task of a connection lives in its
nursery.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, final

import h11
import trio

from mailmoat.policy import IpRanges, parse_network
from mailmoat.protocols.http import (
    DEFAULT_FORM_LIMIT,
    FormExtractor,
    FormResult,
    HeadScreen,
    HttpLimits,
    LoginForm,
    LoginOutcome,
    RequestLine,
    RequestRefused,
    is_websocket_upgrade,
    judge_login,
    normalize_request,
    normalize_response,
    request_fields,
)
from mailmoat.session.commands import BanClient, CheckLogin, Close, Emit, StartClientTls
from mailmoat.session.http import REASONS, HttpSession, HttpSessionConfig, Respond
from mailmoat.state import StoreUnavailable

from ._connection import BROKEN, ConnectionBase, ServiceBase, as_bytes, serve_connection
from .tls import TlsError
from .upstream import BackendUnavailable

#: what a connection gets when mailmoat itself fails (never exception text)
B_UNAVAILABLE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
    b"content-length: 20\r\nconnection: close\r\n\r\nservice unavailable\n"
)
B_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 5\r\n"
    b"content-length: 20\r\nconnection: close\r\n\r\nservice unavailable\n"
)
#: after a WebSocket upgrade: how long both directions may stay silent
UPGRADE_IDLE_TIMEOUT: Final = 600.0
#: a response that ends before its request's upload: how long the upload may still finish
UPLOAD_GRACE: Final = 1.0
#: reads on the body paths: larger reads, fewer round trips through h11
BODY_RECEIVE_SIZE: Final = 256 * 1024


class _Abort(Exception):
    """The connection is over (the session knows why); unwind to ``run``."""


@final
@dataclass
class HttpService(ServiceBase):
    """Everything the connections of one HTTP listener share."""

    session_config: HttpSessionConfig = field(init=False)
    limits: HttpLimits = field(init=False)
    login: LoginForm | None = field(init=False)
    outcome: LoginOutcome | None = field(init=False)
    #: ``trusted_proxies``, matched as the rule engine matches networks
    trusted: IpRanges = field(init=False)
    #: the node is draining (see :meth:`start_draining`)
    draining: bool = field(default=False, init=False)
    #: the read deadlines of connections waiting for their next request
    idle_waits: set[trio.CancelScope] = field(default_factory=set, init=False)
    #: told of every request answered: (listener, status, seconds from its head
    #: to the end of the answer); the node's metrics (no event per request)
    observe_request: Callable[[str, int, float], None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        hc = self.listener.http
        assert hc is not None, "an http listener has an http section"
        deny_page = None
        if hc.deny_page is not None:
            deny_page = hc.deny_page.read_bytes()
        scheme: Literal["http", "https"] = "https" if self.listener.tls == "implicit" else "http"
        self.session_config = HttpSessionConfig(self.listener.name, scheme, deny_page)
        self.limits = HttpLimits(
            max_head_size=hc.max_head_size,
            max_header_count=hc.max_header_count,
            max_target_length=hc.max_target_length,
            max_body_size=hc.max_body_size,
        )
        self.trusted = IpRanges(parse_network(n) for n in hc.trusted_proxies)
        self.login: LoginForm | None = hc.login.form if hc.login else None
        self.outcome: LoginOutcome | None = hc.login.outcome if hc.login else None

    def start_draining(self) -> None:
        """The node drains: kept-alive connections waiting for a request close now,
        and responses in flight say ``Connection: close``."""
        self.draining = True
        for scope in list(self.idle_waits):
            scope.cancel()


def _send_now(stream: trio.abc.Stream, data: bytes) -> int:
    """Hand ``data`` to the kernel at once if it has room; how many bytes it took.

    Most writes of a proxied request fit the socket buffer: this spares them
    the deadline scope a blocking ``send_all`` needs (a tenth of the CPU of a
    small request).  Plain TCP only (TLS streams write through OpenSSL); on
    any error nothing is taken and ``send_all`` runs and reports it.
    """
    if type(stream) is not trio.SocketStream:
        return 0
    try:
        return os.write(stream.socket.fileno(), data)
    except OSError:  # BlockingIOError (buffer full), a reset: send_all decides
        return 0


def _has_body(request: h11.Request) -> bool:
    """Does the request carry a body (RFC 9112 6.3: a framing field says so)?"""
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def _own_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete response written without h11 (h11 may be in its error state)."""
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Error"))]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Content-Length: %d" % len(body), b"Connection: close", b"", b""]
    return b"\r\n".join(lines) + body


@final
class _Connection(ConnectionBase):
    """One HTTP client connection (tier 3 half of the session)."""

    protocol = "http"

    def __init__(self, service: HttpService, client: trio.SocketStream) -> None:
        super().__init__(service, client)
        self.service = service
        hc = service.listener.http
        assert hc is not None
        self.hc = hc
        self.session: HttpSession = HttpSession(
            service.session_config,
            self.ip,
            self.port,
            rules=service.rules,
            session_id=self.id,
            clock=self.elapsed,
        )
        self.screen = HeadScreen(service.limits)
        self.h_client = h11.Connection(
            h11.SERVER, max_incomplete_event_size=service.limits.max_head_size + 2
        )
        self.h_up: h11.Connection | None = None
        self.trusted = self.ip in service.trusted
        #: the client's bytes h11 has not seen (held by the screen) are in the screen
        self.client_eof = False
        #: the request being answered: HEAD, its method
        self.method = b""
        #: the status of the last response head sent to the client (0: none yet)
        self.status = 0
        self.switched = False
        #: backend streams to close with the connection (replaced keep-alive legs)
        self._closing: list[trio.abc.Stream] = []
        #: what the client sent that is refused; answered once every task is done
        self.pending: RequestRefused | h11.RemoteProtocolError | None = None
        #: mailmoat answered with "Connection: close": read away the rest before closing
        self.linger = False
        #: response bytes not yet written (coalesced: head, small body and end in one write)
        self._out = bytearray()

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        implicit = self.service.listener.tls == "implicit"
        self.emit(Emit("session.open", {"tls.active": implicit}))
        banned, reputation = await self.connect_facts(self.service.geoip.lookup)
        await self.execute(
            self.session.start(
                banned,
                ban_remaining=self.ban_remaining,
                reputation=reputation,
                geo=self.geo.fields(),
            )
        )
        if self.ended():
            return
        if implicit:
            await self.execute([StartClientTls()])
            if self.ended():
                return
        try:
            while not self.ended():
                request = await self._next_request()
                if request is None:
                    break
                began, self.status = trio.current_time(), 0
                try:
                    await self._serve(request)
                finally:
                    self._observe(began)
                if self.ended() or self.switched or self.pending is not None:
                    break
                if not self._next_cycle():
                    self.session.ended("client_closed")
                    break
        except _Abort:
            pass
        if self.pending is not None:
            began, self.status = trio.current_time(), 0
            with contextlib.suppress(_Abort):
                await self._refuse(self.pending)
            self._observe(began)

    def _observe(self, began: float) -> None:
        """One request answered (its status sent): into the node's request metrics."""
        observe = self.service.observe_request
        if observe is not None and self.status:
            observe(self.service.listener.name, self.status, trio.current_time() - began)

    def _next_cycle(self) -> bool:
        """Both legs ready for the next request?  (Else the client connection closes.)"""
        h = self.h_client
        if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False
        h.start_next_cycle()
        up = self.h_up
        if up is not None:
            if up.our_state is h11.DONE and up.their_state is h11.DONE:
                up.start_next_cycle()
            else:
                self._drop_upstream()
        return True

    def _drop_upstream(self) -> None:
        self.h_up = None
        stream, self.upstream = self.upstream, None
        if stream is not None:
            self._closing.append(stream)

    # ------------------------------------------------------------------ client leg

    async def _receive_client(self, timeout: float, *, idle: bool = False) -> bytes | None:
        """Up to BODY_RECEIVE_SIZE bytes; ``b""`` at EOF, ``None`` on timeout.

        ``idle``: waiting for the next request of a kept-alive connection,
        which a drain ends at once (:meth:`HttpService.start_draining`).
        """
        idle_waits = self.service.idle_waits
        try:
            with trio.move_on_after(timeout) as scope:
                if idle:
                    idle_waits.add(scope)
                data = as_bytes(await self.client.receive_some(BODY_RECEIVE_SIZE))
        except BROKEN:
            data = b""
        finally:
            if idle:
                idle_waits.discard(scope)
        if scope.cancelled_caught:
            return None
        self.client_in += len(data)
        return data

    async def _feed_client(self, timeout: float, *, idle: bool = False) -> bool:
        """Read, screen and hand the bytes to h11; ``False`` on timeout.

        Refused bytes: ``self.pending`` says why and :class:`_Abort` unwinds.
        """
        data = await self._receive_client(timeout, idle=idle)
        if data is None:
            return False
        if not data:
            self.client_eof = True
            self.h_client.receive_data(b"")
            return True
        try:
            screened = self.screen.feed(data)
        except RequestRefused as exc:
            self.pending = exc
            raise _Abort from None
        if screened:
            self.h_client.receive_data(screened)
        return True

    async def _client_event(self, timeout: float) -> Any:
        """The next h11 event from the client (body parts, end of message)."""
        while True:
            try:
                event = self.h_client.next_event()
            except h11.RemoteProtocolError as exc:
                self.pending = exc
                raise _Abort from None
            if event is not h11.NEED_DATA:
                return event
            if not await self._feed_client(timeout):
                self.session.ended("client_timeout")
                raise _Abort

    async def _next_request(self) -> h11.Request | None:
        """The next request head, or ``None`` when the connection ends quietly."""
        started = False
        deadline = 0.0
        while True:
            try:
                event = self.h_client.next_event()
            except h11.RemoteProtocolError as exc:
                self.pending = exc
                return None
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed) or self.client_eof:
                self.session.ended("client_closed")
                return None
            if event is not h11.NEED_DATA:
                self.session.ended("client_closed")
                return None
            if started:
                timeout = deadline - trio.current_time()
            else:
                timeout = self.service.listener.idle_timeout
            before = self.client_in
            if not started and self.service.draining:
                self.session.ended("shutdown")
                return None
            try:
                ok = timeout > 0 and await self._feed_client(timeout, idle=not started)
            except _Abort:
                return None
            if not ok:
                if started:
                    await self._own(408, b"The request took too long to arrive.\n", close=True)
                    self.session.ended("client_timeout")
                else:
                    self.session.ended("shutdown" if self.service.draining else "client_idle")
                return None
            if not started and self.client_in > before:
                started = True
                deadline = trio.current_time() + self.hc.header_timeout

    # ------------------------------------------------------------------ one request

    async def _serve(self, request: h11.Request) -> None:
        self.method = request.method
        if self.hc.redirect_https:
            await self._redirect(request)
            return
        login = self.service.login
        form: FormResult | None = None
        buffered: list[bytes] = []
        body_done = False
        line = RequestLine(request)
        self.session.note_request(line)
        if login is not None and login.matches(request):
            form, buffered, body_done = await self._read_login_body(request)
            self.session.note_login(line, form.fields, password=form.password)
        user = form.user if form is not None else None
        if self.session.wants_request_facts() or form is not None:
            fields = request_fields(request, form)
            refused = await self.run_commands(self.session.request(fields, login_user=user))
            if refused or self.ended():
                return
        else:
            self.session.requests += 1
        websocket = self.hc.websocket and is_websocket_upgrade(request)
        try:
            outbound = normalize_request(
                request,
                client_ip=self.ip,
                client_port=self.port,
                scheme=self.service.session_config.scheme,
                trusted=self.trusted,
                allow_websocket=websocket,
            )
        except RequestRefused as exc:
            self.pending = exc
            return
        if form is not None:
            # the body is in hand: the backend need not be asked to wait for it
            outbound = h11.Request(
                method=outbound.method,
                target=outbound.target,
                headers=[(k, v) for k, v in outbound.headers.raw_items() if k.lower() != b"expect"],
            )
        if not await self._ensure_upstream():
            return
        assert self.h_up is not None
        head = self.h_up.send(outbound) or b""
        if form is None and not _has_body(request):
            # no body (most requests): one write to the backend, no upload task
            ended = self.h_client.next_event()
            assert isinstance(ended, h11.EndOfMessage), ended
            end = self.h_up.send(h11.EndOfMessage()) or b""
            if not await self._send_up(head + end):
                await self.execute(self._upstream_failed("backend_closed", "closed on send"))
                return
            try:
                await self._relay_response(user, websocket)
            except _Abort:
                return
            if self.switched and not self.ended():
                await self._tunnel()
            return
        if not await self._send_up(head):
            await self.execute(self._upstream_failed("backend_closed", "closed on send"))
            return
        # _Abort must not leave a task: with strict exception groups it would
        # come out of the nursery wrapped; each side turns it into a cancel
        uploaded = trio.Event()

        async def upload() -> None:
            try:
                if body_done:
                    await self._upload_buffered(buffered, True)
                else:
                    await self._upload(buffered)
            finally:
                uploaded.set()

        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(self._guard, scope, upload())
            await self._guard(scope, self._relay_response(user, websocket))
            if self.ended() or self.switched or self.pending is not None:
                scope.cancel()
            elif self.h_client.their_state is not h11.DONE:
                # the response is complete before the upload: often only by a
                # hair (the rest of the body is already here); give the upload
                # a moment, else the backend did not want the rest and this
                # connection cannot go on
                with trio.move_on_after(UPLOAD_GRACE):
                    await uploaded.wait()
                if self.h_client.their_state is not h11.DONE:
                    scope.cancel()
                    self.session.ended("response_before_body")
        if self.switched and not self.ended():
            await self._tunnel()

    @staticmethod
    async def _guard(scope: trio.CancelScope, work: Any) -> None:
        try:
            await work
        except _Abort:
            scope.cancel()

    async def _read_login_body(self, request: h11.Request) -> tuple[FormResult, list[bytes], bool]:
        """The login request's body, up to the form limit: (form, bytes read, complete?)."""
        login = self.service.login
        assert login is not None
        content_type = next((v for k, v in request.headers if k == b"content-type"), None)
        extractor = FormExtractor(login, content_type)
        if self.h_client.they_are_waiting_for_100_continue:
            await self._send_client_event(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._client_event(self.service.listener.idle_timeout)
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                chunks.append(data)
                extractor.feed(data)
                size += len(data)
                if size > DEFAULT_FORM_LIMIT:
                    return extractor.finish(), chunks, False
            elif isinstance(event, h11.EndOfMessage):
                return extractor.finish(), chunks, True
            else:
                self.session.ended("client_closed")
                raise _Abort

    async def _redirect(self, request: h11.Request) -> None:
        origin = self.hc.redirect_https
        if origin == "host":
            host = next((v for k, v in request.headers if k == b"host"), b"")
            name = host.decode("ascii", "replace")
            if name.startswith("["):
                name = name[: name.find("]") + 1]
            else:
                name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
            origin = "https://" + name if name else ""
        if not origin:
            await self._own(400, b"This address only serves HTTPS; say which host you want.\n")
            return
        target = request.target if request.target.startswith(b"/") else b"/"
        location = origin.encode("ascii", "replace") + target
        status = 301 if request.method in (b"GET", b"HEAD") else 308
        body = b"Moved to " + location + b"\n"
        close = self.h_client.their_state is not h11.DONE
        if not close:
            # a request with a body: read it away so the connection can go on
            close = not await self._discard_body()
        await self._own(status, body, [(b"Location", location)], close=close)

    async def _discard_body(self) -> bool:
        """Read the rest of a small request body; ``False`` if it is too big to bother."""
        seen = 0
        while self.h_client.their_state is h11.SEND_BODY:
            event = await self._client_event(self.service.listener.idle_timeout)
            if isinstance(event, h11.Data):
                seen += len(event.data)
                if seen > DEFAULT_FORM_LIMIT:
                    return False
            elif not isinstance(event, h11.EndOfMessage):
                return False
        return True

    # ------------------------------------------------------------------ backend leg

    async def _ensure_upstream(self) -> bool:
        if self.h_up is not None:
            return True
        try:
            self.upstream, address = await self.connect_backend()
        except BackendUnavailable as exc:
            await self.execute(self._upstream_failed("backend_unavailable", str(exc)))
            return False
        except TlsError as exc:
            await self.execute(self.session.upstream_tls_failed(exc.reason))
            return False
        except trio.BrokenResourceError:
            await self.execute(self._upstream_failed("backend_closed", "closed during handshake"))
            return False
        self.backend_address = str(address)
        self.backend = address
        self.h_up = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        return True

    def _upstream_failed(self, reason: str, detail: str) -> list[Any]:
        return self.session.upstream_failed(reason, detail)

    async def _send_up(self, data: bytes | None) -> bool:
        if not data:
            return True
        assert self.upstream is not None
        sent = _send_now(self.upstream, data)
        try:
            if sent < len(data):
                with trio.fail_after(self.service.listener.idle_timeout):
                    await self.upstream.send_all(data[sent:] if sent else data)
        except (*BROKEN, trio.TooSlowError):
            return False
        self.up_out += len(data)
        return True

    async def _upload_buffered(self, chunks: list[bytes], done: bool) -> None:
        assert self.h_up is not None
        up = self.h_up
        for chunk in chunks:
            if not await self._send_up(up.send(h11.Data(data=chunk))):
                return
        if done:
            await self._send_up(up.send(h11.EndOfMessage()))

    async def _upload(self, chunks: list[bytes]) -> None:
        """Stream the request body to the backend as it arrives."""
        await self._upload_buffered(chunks, False)
        assert self.h_up is not None
        up = self.h_up
        while True:
            event = await self._client_event(self.service.listener.idle_timeout)
            if isinstance(event, h11.Data):
                if not await self._send_up(up.send(h11.Data(data=bytes(event.data)))):
                    return  # the response side sees the backend gone
            elif isinstance(event, h11.EndOfMessage):
                # trailers are not forwarded (the screen checked them)
                await self._send_up(up.send(h11.EndOfMessage()))
                return
            else:
                self.session.ended("client_closed")
                raise _Abort

    async def _up_event(self, timeout: float) -> Any:
        """The next h11 event from the backend; ``None`` if it timed out."""
        up = self.h_up
        assert up is not None
        assert self.upstream is not None
        while True:
            event = up.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self._out:
                await self._flush()
            try:
                with trio.move_on_after(timeout) as scope:
                    data = as_bytes(await self.upstream.receive_some(BODY_RECEIVE_SIZE))
            except BROKEN:
                data = b""
            if scope.cancelled_caught:
                return None
            self.up_in += len(data)
            up.receive_data(data)

    async def _relay_response(self, user: str | None, websocket: bool) -> None:
        config = self.service.pool.config
        # ---- the head
        while True:
            try:
                event = await self._up_event(config.command_timeout)
            except h11.RemoteProtocolError as exc:
                await self.execute(self._upstream_failed("backend_protocol_error", str(exc)))
                return
            if event is None:
                await self.execute(self._upstream_failed("backend_timeout", "no response head"))
                return
            if isinstance(event, h11.ConnectionClosed):
                await self.execute(
                    self._upstream_failed("backend_closed", "closed before answering")
                )
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    await self._switch(event, websocket)
                    return
                if event.status_code == 100 and not self.h_client.they_are_waiting_for_100_continue:
                    continue  # we answered 100 ourselves, or the client did not ask
                await self._send_client_event(normalize_response(event))
                continue
            assert isinstance(event, h11.Response)
            break
        response = event
        refusal = await self._judge_response(response, user)
        if refusal or self.ended():
            self._drop_upstream()
            return
        # ---- forward head and body: what is already here goes out in one write
        outgoing = normalize_response(response)
        if self.service.draining:
            # tell the client not to send another request on this connection
            outgoing = h11.Response(
                status_code=outgoing.status_code,
                headers=[*outgoing.headers.raw_items(), (b"Connection", b"close")],
                reason=outgoing.reason,
            )
        self._queue(outgoing)
        while True:
            try:
                event = await self._up_event(config.data_timeout)
            except h11.RemoteProtocolError:
                event = None
            if event is None or isinstance(event, h11.ConnectionClosed):
                # the status line is gone: all we can do is cut the client off
                with contextlib.suppress(_Abort):
                    await self._flush()
                self._drop_upstream()
                self.session.ended("backend_closed")
                self.emit(
                    Emit(
                        "backend.failure",
                        {"error.message": "backend broke off the response body"},
                        outcome="failure",
                    )
                )
                return
            if isinstance(event, h11.Data):
                self._queue(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._queue(h11.EndOfMessage())
                await self._flush()
                return

    async def _judge_response(self, response: h11.Response, user: str | None) -> bool:
        """The response and login phases; ``True`` if mailmoat answered instead."""
        if self.session.judge.has("response"):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}
            if await self.run_commands(self.session.response(response.status_code, headers)):
                return True
        if user is not None and self.service.outcome is not None:
            outcome = judge_login(response, self.service.outcome)
            commands = self.session.login_result(user, outcome == "success", response.status_code)
            if await self.run_commands(commands):
                return True
        return False

    async def _switch(self, event: h11.InformationalResponse, websocket: bool) -> None:
        """The backend answered 101: pass it on and become a byte relay."""
        if not websocket:
            await self.execute(self._upstream_failed("backend_protocol_error", "unasked 101"))
            return
        await self._send_client_event(normalize_response(event, websocket=True))
        self.switched = True

    async def _tunnel(self) -> None:
        assert self.upstream is not None
        assert self.h_up is not None
        upstream = self.upstream
        to_client = self.h_up.trailing_data[0]
        to_upstream = self.h_client.trailing_data[0] + self.screen.switch_protocols()
        if to_client:
            await self._send_client_raw(to_client)
        if to_upstream and not await self._send_up(to_upstream):
            self.session.ended("backend_closed")
            return
        reason = await self.copy_both_ways(upstream, UPGRADE_IDLE_TIMEOUT, BODY_RECEIVE_SIZE)
        self.session.ended(reason)

    # ------------------------------------------------------------------ answers

    def _queue(self, event: Any) -> None:
        """An event for the client, written at the next :meth:`_flush`."""
        if type(event) is h11.Response:
            self.status = event.status_code
        try:
            data = self.h_client.send(event)
        except h11.LocalProtocolError as exc:
            raise AssertionError(f"h11 refused our own event: {exc}") from exc
        if data:
            self._out += data

    async def _flush(self) -> None:
        data = bytes(self._out)
        self._out.clear()
        if data:
            await self._send_client_raw(data)

    async def _send_client_event(self, event: Any) -> None:
        """An event for the client, written now (after anything queued)."""
        self._queue(event)
        await self._flush()

    async def _send_client_raw(self, data: bytes) -> None:
        sent = _send_now(self.client, data)
        try:
            if sent < len(data):
                with trio.fail_after(self.service.listener.idle_timeout):
                    await self.client.send_all(data[sent:] if sent else data)
        except (*BROKEN, trio.TooSlowError):
            self.session.client_gone()
            raise _Abort from None
        self.client_out += len(data)

    async def _own(
        self,
        status: int,
        body: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        close: bool = True,
    ) -> None:
        """Answer with mailmoat's own response (through h11 while it can);
        plain text unless ``headers`` name a Content-Type."""
        headers = list(headers)
        if not any(name.lower() == b"content-type" for name, _ in headers):
            headers.insert(0, (b"Content-Type", b"text/plain; charset=utf-8"))
        h = self.h_client
        if h.our_state is h11.SEND_RESPONSE and h.their_state is not h11.ERROR:
            if close:
                headers.append((b"Connection", b"close"))
            headers.append((b"Content-Length", b"%d" % len(body)))
            await self._send_client_event(
                h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))
            )
            if self.method != b"HEAD":
                await self._send_client_event(h11.Data(data=body))
            await self._send_client_event(h11.EndOfMessage())
        elif h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.status = status
            await self._send_client_raw(_own_response(status, headers, body))
        if close:
            self.linger = True

    async def _linger(self) -> None:
        """Half-close and read away what the client still sends, so that it reads our answer
        instead of a reset (RFC 9112 9.6); bounded in time and bytes."""
        stream = self.client
        with contextlib.suppress(*BROKEN, AttributeError, NotImplementedError):
            if isinstance(stream, trio.SocketStream):
                await stream.send_eof()
        with trio.move_on_after(1.0), contextlib.suppress(*BROKEN):
            seen = 0
            while seen < 256 * 1024:
                data = await stream.receive_some(65536)
                if not data:
                    break
                seen += len(data)

    async def _refuse(self, exc: RequestRefused | h11.RemoteProtocolError) -> None:
        """The screen (or h11) refused the client's bytes: an event, 4xx, close."""
        if isinstance(exc, RequestRefused):
            reason, status, detail, body = exc.reason, exc.status, "", f"{exc.reason}\n"
        else:
            reason, status, detail, body = (
                "h11",
                exc.error_status_hint or 400,
                str(exc),
                "bad request\n",
            )
        await self.execute(self.session.screen_refused(reason, status, detail))
        await self._own(status, body.encode())

    # ------------------------------------------------------------------ commands

    async def execute(self, commands: list[Any]) -> None:
        await self.run_commands(commands)

    async def run_commands(self, commands: list[Any]) -> bool:
        """Run the session's commands; ``True`` if one answered the client for mailmoat."""
        answered = False
        i = 0
        while i < len(commands):
            cmd = commands[i]
            match cmd:
                case Emit():
                    self.emit(cmd)
                case BanClient():
                    try:
                        await self.ban(cmd)
                    except StoreUnavailable as exc:
                        self.store_alert(exc)
                case CheckLogin():
                    commands[i + 1 : i + 1] = await self.check_login(cmd)
                case StartClientTls():
                    commands[i + 1 : i + 1] = await self.client_handshake()
                case Respond():
                    answered = True
                    with contextlib.suppress(_Abort):
                        await self._own(cmd.status, cmd.body, cmd.headers)
                case Close():
                    pass
            i += 1
        return answered

    async def on_drain_deadline(self) -> None:
        self.session.ended("shutdown")

    CLEAN_CLOSES = frozenset({"client_closed", "client_idle"})

    def close_fields(self) -> dict[str, Any]:
        s = self.session
        return {
            "http.requests": s.requests,
            "http.refused": s.refused,
            "auth.user": s.login_user,
            "tls.active": self.client_tls_version() != "",
        }

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for stream in self._closing:
                await trio.aclose_forcefully(stream)
            if self.linger:
                await self._linger()
        await super().close()


async def serve_http(service: HttpService, stream: trio.SocketStream) -> None:
    """Handle one HTTP client connection from accept to close."""
    await serve_connection(_Connection(service, stream), B_UNAVAILABLE)
