"""A small webmail-like login application: the HTTP backend behind mailmoat's webmail proxy.

Written with trio + h11 only, so that the tests and ``mailmoat demo`` have a
real HTTP/1.1 backend on loopback (directly, or behind a private nginx, see
:mod:`mailmoat.demo.nginx`).  It behaves like the parts of a webmail a proxy
cares about; it is not a mail client.

Endpoints (anything else is ``404``; a wrong method is ``405`` with ``Allow``):

``GET /``
    ``302`` to ``/login``.
``GET /login``
    An HTML login form (fields ``user`` and ``password``, posted to ``/login``).
``POST /login``
    Accepts ``application/x-www-form-urlencoded``, ``multipart/form-data`` and
    ``application/json`` (an object with string fields) up to
    ``max_form_size`` bytes.  Success: ``302`` to ``/mail/`` with
    ``Set-Cookie: webmail_session=<random>; HttpOnly; Path=/``.  Wrong
    credentials: ``200`` with the form again and ``Login failed.`` (like
    Roundcube).  An unreadable body: ``400``; an unknown content type:
    ``415``; a body larger than ``max_form_size``: ``413``.
``GET /mail/``
    With a valid ``webmail_session`` cookie: ``200`` "inbox of <user>";
    without: ``302`` to ``/login``.  (``/mail`` redirects to ``/mail/``.)
``POST /upload``
    Streams the body (``Content-Length`` or chunked) through SHA-256 without
    keeping it and answers ``{"bytes": n, "sha256": "<hex>"}``.
``GET /download?size=N``
    ``N`` bytes of :func:`pattern_bytes` (a deterministic pattern) sent with
    ``Transfer-Encoding: chunked`` (never a ``Content-Length``), in chunks of
    ``DOWNLOAD_CHUNK`` bytes.  ``0 <= N <= MAX_DOWNLOAD``, else ``400``.
``<any method> /echo-headers``
    JSON ``{"method", "target", "http_version", "peer", "headers"}`` where
    ``headers`` is the list of ``[name, value]`` pairs received, in order,
    names lower-cased (as h11 reports them); a request body is read and
    discarded.
``GET /ws``
    A WebSocket (RFC 6455, version 13, no extensions or subprotocols): ``101``
    with ``Sec-WebSocket-Accept`` (:func:`websocket_accept`), then every text
    or binary message is echoed back as one unfragmented frame (fragmented
    input is reassembled, at most ``max_ws_message`` bytes), ``ping`` is
    answered with ``pong``, ``close`` with a close frame carrying the same
    status code, then the connection is closed.  Client frames must be
    masked; protocol errors close with 1002, invalid UTF-8 text with 1007,
    an oversized message with 1009.  A request to ``/ws`` that is not a valid
    upgrade gets ``400`` (``426`` when the version is not 13).

HTTP: keep-alive, ``HEAD`` (headers of the ``GET``, no body) and
``Expect: 100-continue`` (``100`` is sent when an endpoint starts reading the
body; an endpoint that answers without reading it closes the connection) as
h11 allows.  Every wait is bounded: ``idle_timeout`` between requests and
``io_timeout`` for any single read or write inside a request; an idle
WebSocket is closed (1001) after ``ws_idle_timeout``.

Every request head received is appended to :attr:`WebApp.requests` (a list of
:class:`RequestRecord`, the newest ``log_limit`` kept), for tests that run the
app in-process with :func:`serve_webapp`.

Run it alone with ``python -m mailmoat.demo.webapp --port N``; the module
imports only the standard library, trio, h11 and :mod:`mailmoat.errors`, so
:class:`WebAppProcess` runs this file directly (``python -P <file>``) and the
backend starts in ~0.2 s without importing the proxy (``mailmoat.demo``
itself imports the whole node).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import email.message
import email.parser
import email.policy
import functools
import hashlib
import hmac
import html
import http
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple

import h11
import trio

from mailmoat.errors import MailmoatError

__all__ = [
    "DEFAULT_USERS",
    "DOWNLOAD_CHUNK",
    "MAX_DOWNLOAD",
    "SESSION_COOKIE",
    "RequestRecord",
    "WebApp",
    "WebAppError",
    "WebAppProcess",
    "main",
    "pattern_bytes",
    "serve_webapp",
    "websocket_accept",
]

log = logging.getLogger("mailmoat.demo.webapp")

DEFAULT_USERS: Mapping[str, str] = MappingProxyType({"alice": "alicepw", "bob": "bobpw"})
SESSION_COOKIE = "webmail_session"
DOWNLOAD_CHUNK = 64 * 1024
MAX_DOWNLOAD = 16 * 1024**3
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_RECEIVE_SIZE = 64 * 1024
_MAX_SESSIONS = 100_000
#: Period of the download pattern: a prime, so a chunk that is lost, repeated
#: or reordered at any power-of-two boundary changes the hash.
_PATTERN_PERIOD = 1_048_573
_POLL = 0.02


class WebAppError(MailmoatError):
    """The webapp subprocess could not be started."""


class RequestRecord(NamedTuple):
    """One request head as received: method, target, headers (names lower-cased)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (several are joined with ``", "``), or None."""
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None


# --------------------------------------------------------------------- helpers


@functools.cache
def _pattern_period() -> bytes:
    blocks = (
        hashlib.sha256(b"mailmoat-pattern-%d" % i).digest()
        for i in range(_PATTERN_PERIOD // 32 + 1)
    )
    period = b"".join(blocks)[:_PATTERN_PERIOD]
    return period + period[: DOWNLOAD_CHUNK * 4]


def pattern_bytes(size: int, offset: int = 0) -> bytes:
    """``size`` bytes of the deterministic download pattern, starting at ``offset``.

    ``/download?size=N`` sends ``pattern_bytes(N)``; the nginx instance's
    ``/static/1mb.bin`` is ``pattern_bytes(1 << 20)``.
    """
    if size < 0 or offset < 0:
        raise ValueError("size and offset must be >= 0")
    doubled = _pattern_period()
    out = bytearray()
    position = offset % _PATTERN_PERIOD
    while len(out) < size:
        take = min(size - len(out), _PATTERN_PERIOD - position)
        out += doubled[position : position + take]
        position = 0
    return bytes(out)


def websocket_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii"), usedforsecurity=False)
    return base64.b64encode(digest.digest()).decode("ascii")


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower-cased) and parameters of a Content-Type value."""
    message = email.message.Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def _cookies(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers:
        if name != "cookie":
            continue
        for pair in value.split(";"):
            key, sep, val = pair.strip().partition("=")
            if sep and key and key not in found:
                found[key] = val.strip().strip('"')
    return found


class _BodyTooLarge(Exception):
    pass


class _BadForm(Exception):
    pass


def _parse_login(content_type: str, body: bytes) -> dict[str, str]:
    """``user``/``password`` (and any other string field) of a login body."""
    media, params = _media_type(content_type)
    if media == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=False)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadForm(str(exc)) from exc
        return dict(reversed(pairs))  # the first value of a repeated field wins
    if media == "application/json":
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadForm(str(exc)) from exc
        if not isinstance(data, dict):
            raise _BadForm("the JSON body is not an object")
        return {k: v for k, v in data.items() if isinstance(v, str)}
    if media == "multipart/form-data":
        boundary = params.get("boundary", "")
        if not boundary or len(boundary) > 200 or any(c in boundary for c in '\r\n"'):
            raise _BadForm("multipart/form-data without a usable boundary")
        head = f'Content-Type: multipart/form-data; boundary="{boundary}"\r\n\r\n'
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            head.encode("ascii") + body
        )
        if not message.is_multipart() or message.defects:
            raise _BadForm("malformed multipart/form-data body")
        fields: dict[str, str] = {}
        for part in message.get_payload():
            assert isinstance(part, email.message.Message)
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if not isinstance(name, str) or not isinstance(payload, bytes):
                continue
            charset = part.get_content_charset() or "utf-8"
            try:
                fields.setdefault(name, payload.decode(charset))
            except (LookupError, UnicodeDecodeError) as exc:
                raise _BadForm(f"field {name!r} is not {charset}") from exc
        return fields
    raise LookupError(media)


def _login_page(error: str | None = None, user: str = "") -> bytes:
    message = f'<p class="error" role="alert">{html.escape(error)}</p>\n' if error else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8"><title>mailmoat webmail :: Welcome</title>'
        "</head>\n<body>\n<h1>mailmoat webmail</h1>\n"
        f"{message}"
        '<form name="form" method="post" action="/login">\n'
        '<label>User <input name="user" id="user" autocomplete="username" '
        f'value="{html.escape(user)}" required></label>\n'
        '<label>Password <input name="password" id="password" type="password" '
        'autocomplete="current-password" required></label>\n'
        '<button type="submit">Login</button>\n'
        "</form>\n</body></html>\n"
    ).encode()


# ------------------------------------------------------------------- the app


class _Exchange:
    """One request/response cycle on an h11 connection."""

    def __init__(
        self, app: WebApp, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request
    ) -> None:
        self.app = app
        self.conn = conn
        self.stream = stream
        self.request = request
        self.method = request.method.decode("ascii", "replace")
        self.target = request.target.decode("ascii", "replace")
        parsed = urllib.parse.urlsplit(self.target)
        self.path = parsed.path
        self.query = urllib.parse.parse_qs(parsed.query)
        self.headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers]
        self.body_done = False
        self.upgraded = False
        self.force_close = False

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values) if values else None

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(self.app.io_timeout):
                await self.stream.send_all(data)

    async def next_event(
        self, timeout: float
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next h11 event (never ``NEED_DATA``), waiting ``timeout`` per read."""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(timeout):
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                self.conn.receive_data(bytes(data))
                continue
            return event

    async def read_chunk(self) -> bytes | None:
        """The next piece of the request body, ``None`` at its end (sends ``100`` first)."""
        if self.body_done:
            return None
        if self.conn.they_are_waiting_for_100_continue:
            await self.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            )
        while True:
            event = await self.next_event(self.app.io_timeout)
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return None
            raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")

    async def read_body(self, limit: int) -> bytes:
        """The whole request body; ``_BodyTooLarge`` beyond ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.read_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            parts.append(chunk)
        return b"".join(parts)

    async def start(
        self, status: int, headers: Sequence[tuple[str, str]] = (), *, chunked: bool = False
    ) -> None:
        all_headers = [("Server", "mailmoat-webapp"), *headers]
        if chunked:
            all_headers.append(("Transfer-Encoding", "chunked"))
        if not self.body_done and self.conn.they_are_waiting_for_100_continue:
            # the client holds its body back: answer without it, then close
            self.force_close = True
        if self.force_close:
            all_headers.append(("Connection", "close"))
        await self.send(
            h11.Response(status_code=status, headers=all_headers, reason=_reason(status))
        )

    async def data(self, data: bytes) -> None:
        if data and self.method != "HEAD":
            await self.send(h11.Data(data=data))

    async def end(self) -> None:
        await self.send(h11.EndOfMessage())

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        all_headers = [*headers, ("Content-Length", str(len(body)))]
        if body:
            all_headers.insert(0, ("Content-Type", content_type))
        await self.start(status, all_headers)
        await self.data(body)
        await self.end()

    async def respond_json(self, status: int, value: Any) -> None:
        body = json.dumps(value, separators=(",", ":")).encode() + b"\n"
        await self.respond(status, body, "application/json")

    async def redirect(self, location: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        await self.respond(302, b"", headers=[("Location", location), *headers])


class WebApp:
    """The login application; one object serves any number of connections.

    ``users`` maps user names to passwords.  ``requests`` is the request log
    (newest ``log_limit`` heads), ``sessions`` maps live session cookies to
    users.
    """

    def __init__(
        self,
        users: Mapping[str, str] = DEFAULT_USERS,
        *,
        log_limit: int = 10_000,
        idle_timeout: float = 60.0,
        io_timeout: float = 60.0,
        ws_idle_timeout: float = 300.0,
        max_form_size: int = 1024 * 1024,
        max_ws_message: int = 16 * 1024 * 1024,
    ) -> None:
        if not users:
            raise ValueError("at least one user is needed")
        self.users = dict(users)
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.ws_idle_timeout = ws_idle_timeout
        self.max_form_size = max_form_size
        self.max_ws_message = max_ws_message
        self._log: collections.deque[RequestRecord] = collections.deque(maxlen=log_limit)
        self.sessions: dict[str, str] = {}

    @property
    def requests(self) -> list[RequestRecord]:
        """The request heads received so far, oldest first (a copy)."""
        return list(self._log)

    def clear_requests(self) -> None:
        self._log.clear()

    # ------------------------------------------------------------- serving

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) and serve until cancelled.

        With ``nursery.start`` the bound port is returned once it listens.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound: int = listeners[0].socket.getsockname()[1]
        task_status.started(bound)
        await trio.serve_listeners(self.handle_connection, listeners)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it closes (never raises)."""
        try:
            await self._connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            log.exception("webapp: connection failed")
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        peer = "unknown"
        if isinstance(stream, trio.SocketStream):
            with contextlib.suppress(OSError):
                address = stream.socket.getpeername()
                peer = f"{address[0]}:{address[1]}"
        while True:
            ex: _Exchange | None = None
            try:
                timeout = self.idle_timeout
                while True:
                    event = conn.next_event()
                    if event is not h11.NEED_DATA:
                        break
                    with trio.fail_after(timeout):
                        data = await stream.receive_some(_RECEIVE_SIZE)
                    conn.receive_data(bytes(data))
                    timeout = self.io_timeout  # a request has started
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                ex = _Exchange(self, conn, stream, event)
                self._log.append(RequestRecord(ex.method, ex.target, tuple(ex.headers)))
                await self._dispatch(ex, peer)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    body = f"bad request: {exc}\n".encode()
                    response = h11.Response(
                        status_code=exc.error_status_hint,
                        reason=_reason(exc.error_status_hint),
                        headers=[
                            ("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))),
                            ("Connection", "close"),
                        ],
                    )
                    with trio.fail_after(self.io_timeout):
                        await stream.send_all(conn.send(response) or b"")
                        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                return
            if ex.upgraded or conn.our_state is not h11.DONE:
                return
            if conn.their_state is h11.SEND_BODY and not ex.force_close:
                await self._discard_body(ex)
            if conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _discard_body(self, ex: _Exchange, limit: int = 1024 * 1024) -> None:
        """Read an unread request body (up to ``limit``) so the connection can be reused."""
        size = 0
        with contextlib.suppress(h11.RemoteProtocolError):
            while (chunk := await ex.read_chunk()) is not None:
                size += len(chunk)
                if size > limit:
                    return

    async def _dispatch(self, ex: _Exchange, peer: str) -> None:
        routes: dict[str, tuple[tuple[str, ...], Any]] = {
            "/": (("GET", "HEAD"), self._root),
            "/login": (("GET", "HEAD", "POST"), self._login),
            "/mail": (("GET", "HEAD"), self._mail_redirect),
            "/mail/": (("GET", "HEAD"), self._mail),
            "/upload": (("POST", "PUT"), self._upload),
            "/download": (("GET", "HEAD"), self._download),
            "/ws": (("GET",), self._websocket),
        }
        if ex.path == "/echo-headers":
            await self._echo_headers(ex, peer)
            return
        route = routes.get(ex.path)
        if route is None:
            await ex.respond(404, b"not found\n")
            return
        methods, handler = route
        if ex.method not in methods:
            await ex.respond(405, b"method not allowed\n", headers=[("Allow", ", ".join(methods))])
            return
        await handler(ex)

    # ------------------------------------------------------------ handlers

    async def _root(self, ex: _Exchange) -> None:
        await ex.redirect("/login")

    async def _mail_redirect(self, ex: _Exchange) -> None:
        await ex.redirect("/mail/")

    async def _login(self, ex: _Exchange) -> None:
        page = functools.partial(ex.respond, content_type="text/html; charset=utf-8")
        if ex.method != "POST":
            await page(200, _login_page())
            return
        content_type = ex.header("content-type") or ""
        try:
            body = await ex.read_body(self.max_form_size)
        except _BodyTooLarge:
            ex.force_close = True
            await ex.respond(413, b"login form too large\n")
            return
        try:
            fields = _parse_login(content_type, body)
        except LookupError:
            await ex.respond(415, b"unsupported content type for /login\n")
            return
        except _BadForm as exc:
            await ex.respond(400, f"bad login form: {exc}\n".encode())
            return
        user = fields.get("user", "")
        password = fields.get("password", "")
        expected = self.users.get(user)
        if expected is None or not hmac.compare_digest(
            expected.encode("utf-8"), password.encode("utf-8")
        ):
            await page(200, _login_page("Login failed.", user))
            return
        token = secrets.token_urlsafe(24)
        if len(self.sessions) >= _MAX_SESSIONS:
            del self.sessions[next(iter(self.sessions))]
        self.sessions[token] = user
        cookie = f"{SESSION_COOKIE}={token}; HttpOnly; Path=/"
        await ex.redirect("/mail/", headers=[("Set-Cookie", cookie)])

    async def _mail(self, ex: _Exchange) -> None:
        token = _cookies(ex.headers).get(SESSION_COOKIE)
        user = self.sessions.get(token) if token else None
        if user is None:
            await ex.redirect("/login")
            return
        body = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Inbox</title></head>'
            f"<body><h1>inbox of {html.escape(user)}</h1></body></html>\n"
        )
        await ex.respond(200, body.encode(), "text/html; charset=utf-8")

    async def _upload(self, ex: _Exchange) -> None:
        digest = hashlib.sha256()
        size = 0
        while (chunk := await ex.read_chunk()) is not None:
            digest.update(chunk)
            size += len(chunk)
        await ex.respond_json(200, {"bytes": size, "sha256": digest.hexdigest()})

    async def _download(self, ex: _Exchange) -> None:
        values = ex.query.get("size", [])
        try:
            size = int(values[0]) if len(values) == 1 else -1
        except ValueError:
            size = -1
        if not 0 <= size <= MAX_DOWNLOAD:
            await ex.respond(400, f"size must be an integer in 0..{MAX_DOWNLOAD}\n".encode())
            return
        await ex.start(200, [("Content-Type", "application/octet-stream")], chunked=True)
        sent = 0
        while sent < size and ex.method != "HEAD":
            chunk = pattern_bytes(min(DOWNLOAD_CHUNK, size - sent), sent)
            await ex.data(chunk)
            sent += len(chunk)
        await ex.end()

    async def _echo_headers(self, ex: _Exchange, peer: str) -> None:
        await self._discard_body(ex)
        await ex.respond_json(
            200,
            {
                "method": ex.method,
                "target": ex.target,
                "http_version": ex.request.http_version.decode("ascii"),
                "peer": peer,
                "headers": [[n, v] for n, v in ex.headers],
            },
        )

    async def _websocket(self, ex: _Exchange) -> None:
        upgrade = _tokens(ex.header("upgrade") or "")
        connection = _tokens(ex.header("connection") or "")
        key = ex.header("sec-websocket-key") or ""
        version = ex.header("sec-websocket-version") or ""
        try:
            key_ok = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            key_ok = False
        # h11 only lets us send 101 once the (empty) request body has been read
        await self._discard_body(ex, limit=0)
        if ex.request.http_version != b"1.1" or "websocket" not in upgrade:
            await ex.respond(400, b"this endpoint needs a WebSocket upgrade\n")
            return
        if version != "13":
            await ex.respond(
                426, b"unsupported WebSocket version\n", headers=[("Sec-WebSocket-Version", "13")]
            )
            return
        if "upgrade" not in connection or not key_ok or not ex.body_done:
            await ex.respond(400, b"bad WebSocket handshake\n")
            return
        await ex.send(
            h11.InformationalResponse(
                status_code=101,
                reason=b"Switching Protocols",
                headers=[
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", websocket_accept(key)),
                ],
            )
        )
        assert ex.conn.our_state is h11.SWITCHED_PROTOCOL
        ex.upgraded = True
        trailing, closed = ex.conn.trailing_data
        await _WebSocketEcho(self, ex.stream, bytes(trailing), closed).run()


# ------------------------------------------------------------- WebSocket echo

_OP_CONTINUATION, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10


class _WsFailure(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _PeerGone(Exception):
    pass


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final server frame."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + size.to_bytes(8, "big")
    return head + payload


def _unmask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    size = len(payload)
    mask = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(size, "big")


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or (3000 <= code <= 4999)


class _WebSocketEcho:
    def __init__(self, app: WebApp, stream: trio.abc.Stream, buffered: bytes, eof: bool) -> None:
        self.app = app
        self.stream = stream
        self.buffer = bytearray(buffered)
        self.eof = eof

    async def _read(self, size: int, timeout: float) -> bytes:
        while len(self.buffer) < size:
            if self.eof:
                raise _PeerGone
            with trio.fail_after(timeout):
                data = await self.stream.receive_some(max(_RECEIVE_SIZE, size - len(self.buffer)))
            if not data:
                self.eof = True
            self.buffer += data
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def _send(self, opcode: int, payload: bytes) -> None:
        with trio.fail_after(self.app.io_timeout):
            await self.stream.send_all(_ws_frame(opcode, payload))

    async def _close(self, code: int, reason: str = "") -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send(_OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])

    async def _frame(self) -> tuple[bool, int, bytes]:
        io = self.app.io_timeout
        try:
            head = await self._read(2, self.app.ws_idle_timeout)
        except trio.TooSlowError:
            raise _WsFailure(1001, "idle timeout") from None
        fin, rsv, opcode = head[0] & 0x80, head[0] & 0x70, head[0] & 0x0F
        masked, size = head[1] & 0x80, head[1] & 0x7F
        if rsv:
            raise _WsFailure(1002, "reserved bits set")
        if opcode not in (_OP_CONTINUATION, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG):
            raise _WsFailure(1002, "unknown opcode")
        if not masked:
            raise _WsFailure(1002, "client frames must be masked")
        if size == 126:
            size = int.from_bytes(await self._read(2, io), "big")
        elif size == 127:
            size = int.from_bytes(await self._read(8, io), "big")
            if size >> 63:
                raise _WsFailure(1002, "bad payload length")
        if opcode >= _OP_CLOSE and (not fin or size > 125):
            raise _WsFailure(1002, "bad control frame")
        if size > self.app.max_ws_message:
            raise _WsFailure(1009, "message too big")
        key = await self._read(4, io)
        payload = _unmask(await self._read(size, io), key)
        return bool(fin), opcode, payload

    async def run(self) -> None:
        try:
            await self._echo()
        except _WsFailure as failure:
            await self._close(failure.code, failure.reason)
        except _PeerGone:
            pass

    async def _echo(self) -> None:
        message_opcode: int | None = None
        parts: list[bytes] = []
        size = 0
        while True:
            fin, opcode, payload = await self._frame()
            if opcode == _OP_PING:
                await self._send(_OP_PONG, payload)
                continue
            if opcode == _OP_PONG:
                continue
            if opcode == _OP_CLOSE:
                await self._answer_close(payload)
                return
            if opcode == _OP_CONTINUATION:
                if message_opcode is None:
                    raise _WsFailure(1002, "continuation without a message")
            elif message_opcode is not None:
                raise _WsFailure(1002, "new message inside a fragmented one")
            else:
                message_opcode = opcode
            size += len(payload)
            if size > self.app.max_ws_message:
                raise _WsFailure(1009, "message too big")
            parts.append(payload)
            if not fin:
                continue
            message = b"".join(parts)
            if message_opcode == _OP_TEXT:
                try:
                    message.decode("utf-8")
                except UnicodeDecodeError:
                    raise _WsFailure(1007, "invalid UTF-8 in a text message") from None
            await self._send(message_opcode, message)
            message_opcode, parts, size = None, [], 0

    async def _answer_close(self, payload: bytes) -> None:
        if not payload:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._send(_OP_CLOSE, b"")
            return
        if len(payload) < 2:
            raise _WsFailure(1002, "close payload of one byte")
        code = int.from_bytes(payload[:2], "big")
        if not _valid_close_code(code):
            raise _WsFailure(1002, "invalid close code")
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise _WsFailure(1007, "invalid UTF-8 in the close reason") from None
        await self._close(code)


# ------------------------------------------------------------ entry points


async def serve_webapp(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    app: WebApp | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (default: a new :class:`WebApp`) on ``host:port`` until cancelled.

    ``port = await nursery.start(serve_webapp)`` (or ``nursery.start(serve_webapp,
    host, port)``) gives the bound port; pass your own ``app`` (with
    ``functools.partial``) to read its request log.
    """
    await (app or WebApp()).serve(host, port, task_status=task_status)


def _parse_user(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise argparse.ArgumentTypeError("expected NAME:PASSWORD")
    return user, password


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mailmoat.demo.webapp [--host H] [--port N] [--user NAME:PW]...``."""
    parser = argparse.ArgumentParser(
        prog="python -m mailmoat.demo.webapp", description="mailmoat's demo webmail backend"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--user",
        type=_parse_user,
        action="append",
        metavar="NAME:PASSWORD",
        help="a login (repeatable; default alice:alicepw and bob:bobpw)",
    )
    parser.add_argument(
        "--port-file", type=Path, help="write the bound port here once listening (for scripts)"
    )
    args = parser.parse_args(argv)
    app = WebApp(dict(args.user) if args.user else DEFAULT_USERS)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(app.serve, args.host, args.port)
            if args.port_file is not None:
                partial = args.port_file.with_name(args.port_file.name + ".tmp")
                partial.write_text(f"{port}\n", encoding="ascii")
                partial.replace(args.port_file)
            shown = f"[{args.host}]" if ":" in args.host else args.host
            print(f"mailmoat webapp listening on http://{shown}:{port}/", flush=True)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


# ------------------------------------------------------------- as a process


class WebAppProcess:
    """The webapp in a subprocess of its own (synchronous start/stop, context manager).

    ``port=0`` lets the process pick a free port (read back through a port
    file, so there is no race); ``port``/``address``/``url()`` are valid
    after ``start()``.  Output goes to ``log_path`` (a file in a private
    temporary directory unless given).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        users: Mapping[str, str] = DEFAULT_USERS,
        log_path: Path | None = None,
    ) -> None:
        for user, password in users.items():
            if ":" in user or not user:
                raise ValueError(f"invalid user name {user!r}")
            if not password.isprintable():
                raise ValueError(f"password of {user!r} is not printable")
        self.host = host
        self.requested_port = port
        self.users = dict(users)
        self._log_path = log_path
        self._dir: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise WebAppError("the webapp process has not been started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def url(self, path: str = "/") -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}{path}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path:
        if self._log_path is not None:
            return self._log_path
        if self._dir is None:
            raise WebAppError("the webapp process has not been started")
        return self._dir / "webapp.log"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except (OSError, WebAppError):
            return "(no output)"
        return "\n".join(text[-lines:]) or "(no output)"

    def start(self, timeout: float = 15) -> None:
        """Start the process and wait until it listens; ``WebAppError`` on failure."""
        if self._process is not None:
            return
        deadline = time.monotonic() + timeout
        self._dir = Path(tempfile.mkdtemp(prefix="mailmoat-webapp-"))
        port_file = self._dir / "port"
        command = [
            sys.executable,
            "-P",  # not the script's directory (demo/) on sys.path: its modules are not top-level
            str(Path(__file__).resolve()),
            "--host",
            self.host,
            "--port",
            str(self.requested_port),
            "--port-file",
            str(port_file),
        ]
        for user, password in self.users.items():
            command += ["--user", f"{user}:{password}"]
        with self.log_path.open("ab") as output:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._port = self._wait_port_file(self._process, port_file, deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_port_file(
        self, process: subprocess.Popen[bytes], port_file: Path, deadline: float
    ) -> int:
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(port_file.read_text(encoding="ascii"))
            if process.poll() is not None:
                raise WebAppError(
                    f"the webapp exited during start-up (status {process.returncode}):"
                    f"\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                raise WebAppError(f"the webapp did not start in time\n{self._tail()}")
            time.sleep(_POLL)

    def stop(self, timeout: float = 10) -> None:
        """Terminate the process (SIGTERM, SIGKILL after ``timeout``); idempotent.

        The private directory (and the log in it) stays until ``cleanup()``.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def cleanup(self) -> None:
        """``stop()`` and remove the private directory (with the log, unless ``log_path``)."""
        self.stop()
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> WebAppProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


if __name__ == "__main__":
    sys.exit(main())
