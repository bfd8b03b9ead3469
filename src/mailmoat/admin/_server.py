"""The admin HTTP server: h11 over Trio, bearer-token auth, one error boundary per connection.

Theory of operation
-------------------
:meth:`AdminServer.serve` binds ``[admin] listen`` and hands every accepted
connection to :func:`trio.serve_listeners`, which runs one task per connection
in its nursery.  A connection is a loop of *read one request, dispatch it,
write one response* over an :class:`h11.Connection`:

* reading waits up to ``idle_timeout`` for the first byte of the next request
  (then closes silently) and up to ``request_timeout`` from that byte to the
  end of the body (then answers 408 and closes);
* the head is bounded by h11's ``max_incomplete_event_size`` (431 beyond it),
  the body by ``max_body_bytes`` whatever its framing (413, checked against
  ``Content-Length`` before reading a byte of the body, and while reading a
  chunked body);
* anything h11 refuses (:class:`h11.RemoteProtocolError`) is answered with its
  status hint (400 mostly) and the connection is closed;
* dispatch finds the route by path (404), then by method (405 with
  ``Allow``; ``HEAD`` is served by the ``GET`` route with the body left out),
  then checks the bearer token for ``auth=True`` routes (401, plus an
  ``admin.auth_failure`` audit event that never carries the presented token);
* h11 keeps the connection alive when both sides allow it.

The single broad ``except`` in :meth:`AdminServer._handle_connection` is the
per-connection error boundary: a handler that raises gets a 500 with a fixed
JSON body, an ``internal_error`` alert event names the exception type, and the
connection closes.  Exception text never reaches the peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import hmac
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, final
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from mailmoat.errors import ConfigError
from mailmoat.events import Emitter

_RECEIVE_SIZE = 65536
# how long, and how much, we read and discard after answering a request whose
# body we did not read, so that closing does not reset the connection before
# the peer has read our answer
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 4 << 20
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_METHOD = re.compile(r"[A-Z]+")
_CSP = "default-src 'self'"


@final
@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Where the admin API listens and the bearer token it expects.

    The caller reads ``token`` from ``[admin] token_file``; it is left out of ``repr``.
    """

    listen: tuple[str, int]
    token: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.token.strip():
            raise ConfigError("[admin] token_file: the admin token is empty")


@final
@dataclass(frozen=True, slots=True)
class AdminLimits:
    """Per-connection limits.

    The API takes small JSON documents, so 1 MiB of body and 16 KiB of head
    (h11's own default is 16 KiB too) are generous; 30 s of idle keep-alive
    matches common clients, and 10 s to send one request or to accept one
    response is far beyond what a loopback peer needs.
    """

    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 * 1024
    idle_timeout: float = 30.0
    request_timeout: float = 10.0
    send_timeout: float = 10.0


@final
@dataclass(frozen=True, slots=True)
class Request:
    """One complete request as a handler sees it.

    ``path`` is the path as sent (percent-encoding kept); ``path_params``
    holds the decoded values of the route's ``{name}`` segments.  Header
    names are lower-case; repeated headers are joined with ``", "``.
    """

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    client: tuple[str, int]
    path_params: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body parsed as JSON (raises :class:`ValueError` when it is not)."""
        return json.loads(self.body) if self.body else None


@final
@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def json(obj: Any, status: int = 200, *, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Response(status, body, "application/json", headers)


Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return Response.json({"error": message}, status, headers=headers)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_admin_address(host: str, tls: bool = False) -> None:
    """Refuse to expose the admin API beyond loopback without TLS.

    Loopback is ``localhost``, ``127.0.0.0/8`` and ``::1`` (also as
    ``::ffff:127.x.y.z``).  Any other name or address, including the
    wildcards ``0.0.0.0``, ``::`` and ``""``, raises :class:`ConfigError`.
    """
    if tls:
        return
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return
    try:
        address = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address is not None and address.is_loopback:
        return
    raise ConfigError(
        f"binding the admin API to a non-loopback address without TLS is refused ({host!r}):"
        " listen on 127.0.0.1 or ::1 and reach it through an SSH tunnel or a TLS reverse proxy"
    )


@final
@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: str
    segments: tuple[str, ...]
    handler: Handler
    auth: bool

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = unquote(got)
            elif want != got:
                return None
        return params


def _split_path(path: str) -> list[str]:
    return path.split("/")[1:]


class _PeerGone(Exception):
    """The peer went away or stopped reading; the connection just closes."""


@final
class AdminServer:
    """The admin API: routes, bearer-token auth and the HTTP/1.1 server loop."""

    def __init__(
        self, config: AdminConfig, emitter: Emitter, *, limits: AdminLimits | None = None
    ) -> None:
        check_admin_address(config.listen[0])
        self.config = config
        self.emitter = emitter
        self.limits = limits if limits is not None else AdminLimits()
        self._token = config.token.encode("utf-8")
        self._routes: list[_Route] = []
        self.route("GET", "/healthz", _healthz, auth=False)

    def route(self, method: str, pattern: str, handler: Handler, *, auth: bool = True) -> None:
        """Register ``handler`` for ``method`` on ``pattern`` (``{name}`` matches one segment)."""
        if not _METHOD.fullmatch(method):
            raise ValueError(f"route {pattern!r}: method must be upper-case letters: {method!r}")
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        segments = tuple(_split_path(pattern))
        names = []
        for segment in segments:
            if "{" in segment or "}" in segment:
                m = _PARAM.fullmatch(segment)
                if m is None:
                    raise ValueError(f"route {pattern!r}: bad parameter segment {segment!r}")
                names.append(m.group(1))
        if len(set(names)) != len(names):
            raise ValueError(f"route {pattern!r}: repeated parameter name")
        for r in self._routes:
            if r.method == method and r.segments == segments:
                raise ValueError(f"route {method} {pattern} is already registered")
        self._routes.append(_Route(method, pattern, segments, handler, auth))

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound ``(host, port)`` via ``task_status``, serve until cancelled."""
        host, port = self.config.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError(
                f"[admin] listen: cannot listen on {_format_address(host, port)}: {exc.strerror}"
            ) from exc
        try:
            sockname = listeners[0].socket.getsockname()
            bound = (str(sockname[0]), int(sockname[1]))
            self.emitter.emit(
                "admin.start",
                {"admin.address": _format_address(*bound)},
                kind="audit",
                outcome="success",
            )
            task_status.started(bound)
            await trio.serve_listeners(self._handle_connection, listeners)
        finally:
            for listener in listeners:
                listener.socket.close()

    # -- per connection -------------------------------------------------------------

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        conn = _Connection(self, stream, (str(peer[0]), int(peer[1])))
        try:
            await conn.run()
        except _PeerGone:
            pass
        except Exception as exc:  # noqa: BLE001 - the per-connection error boundary
            self.emitter.emit(
                "internal_error",
                {
                    "error.type": type(exc).__name__,
                    "source.ip": conn.client[0],
                    "url.path": conn.current_path,
                    "http.request.method": conn.current_method,
                },
                kind="alert",
                outcome="failure",
            )
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(_PeerGone, h11.LocalProtocolError),
            ):
                await conn.send_response(_error(500, "internal error", ("Connection", "close")))
        finally:
            await conn.aclose()

    async def dispatch(self, request: Request) -> Response:
        """Route ``request`` to its handler (404, 405 and 401 are answered here)."""
        parts = _split_path(request.path)
        wanted = "GET" if request.method == "HEAD" else request.method
        found: _Route | None = None
        params: dict[str, str] = {}
        allowed: set[str] = set()
        for r in self._routes:
            p = r.match(parts)
            if p is None:
                continue
            allowed.add(r.method)
            if r.method == request.method or (r.method == wanted and found is None):
                found, params = r, p
        if found is None:
            if not allowed:
                return _error(404, "not found")
            if "GET" in allowed:
                allowed.add("HEAD")
            return _error(405, "method not allowed", ("Allow", ", ".join(sorted(allowed))))
        if found.auth:
            reason = self._auth_failure(request)
            if reason is not None:
                self.emitter.emit(
                    "admin.auth_failure",
                    {
                        "source.ip": request.client[0],
                        "url.path": request.path,
                        "http.request.method": request.method,
                        "event.reason": reason,
                    },
                    kind="audit",
                    outcome="failure",
                )
                return _error(401, "unauthorized", ("WWW-Authenticate", "Bearer"))
        return await found.handler(dataclasses.replace(request, path_params=params))

    def _auth_failure(self, request: Request) -> str | None:
        """Why the request is not authorised, or None when it is."""
        value = request.headers.get("authorization")
        if value is None:
            return "missing token"
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return "not a bearer token"
        # header values are decoded as latin-1, so this gives back the bytes sent
        presented = credentials.strip().encode("latin-1")
        if not hmac.compare_digest(presented, self._token):
            return "wrong token"
        return None


async def _healthz(_request: Request) -> Response:
    return Response.json({"status": "ok"})


@final
class _Connection:
    """One client connection: the h11 state machine plus the stream it drives."""

    def __init__(self, server: AdminServer, stream: trio.SocketStream, client: tuple[str, int]):
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.client = client
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )
        self.current_method = ""
        self.current_path = ""

    async def run(self) -> None:
        while True:
            got = await self._read_request()
            if got is None:
                return
            if isinstance(got, Response):
                await self.send_response(got)
                return
            response = await self.server.dispatch(got)
            await self.send_response(response)
            if got.method in _MUTATING:
                self.server.emitter.emit(
                    "admin.request",
                    {
                        "source.ip": self.client[0],
                        "http.request.method": got.method,
                        "url.path": got.path,
                        "http.response.status_code": response.status,
                    },
                    kind="audit",
                    outcome="success" if response.status < 400 else "failure",
                )
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()
            self.current_method = self.current_path = ""

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _PeerGone from exc

    async def _send(self, data: bytes) -> None:
        try:
            with trio.fail_after(self.limits.send_timeout):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            raise _PeerGone from exc

    async def _read_request(self) -> Request | Response | None:
        """The next complete request, an error response to send before closing, or None to close."""
        limits = self.limits
        scope = trio.CancelScope(deadline=trio.current_time() + limits.idle_timeout)
        started = False
        head: h11.Request | None = None
        body = bytearray()
        try:
            with scope:
                while True:
                    event = self.h11.next_event()
                    if event is h11.NEED_DATA:
                        data = await self._receive()
                        if data and not started:
                            started = True
                            scope.deadline = trio.current_time() + limits.request_timeout
                        self.h11.receive_data(data)
                    elif isinstance(event, h11.Request):
                        if not started:  # pipelined: the bytes were already buffered
                            started = True
                            scope.deadline = trio.current_time() + limits.request_timeout
                        # h11 bounds only a head that arrives in pieces; one that came
                        # whole in a single read is measured here
                        if _head_size(event) > limits.max_header_bytes:
                            return _error(431, "request header too large", ("Connection", "close"))
                        head = event
                        self.current_method = event.method.decode("ascii")
                        self.current_path = _target_path(event.target.decode("latin-1"))
                        length = _content_length(event)
                        if length is not None and length > limits.max_body_bytes:
                            return _error(413, "request body too large", ("Connection", "close"))
                        if self.h11.they_are_waiting_for_100_continue:
                            await self._send(
                                self.h11.send(
                                    h11.InformationalResponse(status_code=100, headers=[])
                                )
                            )
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > limits.max_body_bytes:
                            return _error(413, "request body too large", ("Connection", "close"))
                    elif isinstance(event, h11.EndOfMessage):
                        assert head is not None
                        return self._make_request(head, bytes(body))
                    else:  # ConnectionClosed (PAUSED cannot happen: we stop at EndOfMessage)
                        return None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            message = "request header too large" if status == 431 else "malformed request"
            return _error(status, message, ("Connection", "close"))
        # only a deadline gets here
        if started:
            return _error(408, "request timeout", ("Connection", "close"))
        return None

    def _make_request(self, head: h11.Request, body: bytes) -> Request:
        target = head.target.decode("latin-1")
        query = ""
        if "?" in target:
            query = target.partition("?")[2]
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("ascii")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return Request(
            method=self.current_method,
            path=self.current_path,
            query=parse_qs(query, keep_blank_values=True),
            headers=headers,
            body=body,
            client=self.client,
        )

    async def send_response(self, response: Response) -> None:
        """Send ``response`` if h11 still lets us (a HEAD request gets the headers only)."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        no_body = response.status in (204, 304)
        headers = [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if not no_body:
            headers.append(("Content-Type", response.content_type))
            headers.append(("Content-Length", str(len(response.body))))
        if response.content_type.lower().startswith("text/html"):
            headers.append(("Content-Security-Policy", _CSP))
        headers.extend(response.headers)
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
        out = self.h11.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        if response.body and not no_body and self.current_method != "HEAD":
            out += self.h11.send(h11.Data(data=response.body))
        out += self.h11.send(h11.EndOfMessage())
        await self._send(out)

    async def aclose(self) -> None:
        """Close; when the peer may still be sending, half-close and drain a little first."""
        try:
            if self.h11.their_state in (h11.SEND_BODY, h11.ERROR) and self.h11.our_state in (
                h11.DONE,
                h11.MUST_CLOSE,
            ):
                with trio.move_on_after(_LINGER_SECONDS):
                    await self.stream.send_eof()
                    drained = 0
                    while drained < _LINGER_BYTES:
                        data = await self.stream.receive_some(_RECEIVE_SIZE)
                        if not data:
                            break
                        drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)


def _target_path(target: str) -> str:
    """The path of a request-target (origin-form, or absolute-form as proxies send)."""
    if target.startswith(("http://", "https://")):
        return urlsplit(target).path or "/"
    return target.partition("?")[0]


def _head_size(event: h11.Request) -> int:
    """The size of the request head as sent, give or take optional whitespace."""
    size = len(event.method) + len(event.target) + len(b" HTTP/1.1\r\n\r\n")
    return size + sum(len(name) + len(value) + 4 for name, value in event.headers)


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is digits and consistent
    return None
