"""The webmail backends really work: the login webapp, alone and behind a private nginx.

Real clients only: curl (subprocess), ``http.client`` and a small WebSocket
client of our own on a raw socket (masked frames).  No mailmoat in between.
Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from mailmoat.demo.nginx import (
    ACCESS_LOG_FIELDS,
    SMALL_HTML,
    WORKER_USER,
    NginxError,
    NginxInstance,
)
from mailmoat.demo.postfix import find_free_port
from mailmoat.demo.webapp import (
    SESSION_COOKIE,
    WebApp,
    WebAppError,
    WebAppProcess,
    pattern_bytes,
    serve_webapp,
    websocket_accept,
)

if TYPE_CHECKING:
    from nginx_fixtures import NginxFactory

if "nginx_fixtures" not in sys.modules:
    # tests/conftest.py normally provides the fixtures (``from nginx_fixtures
    # import ...``); without it, load them as a plugin so this file runs alone.
    pytest_plugins = ["nginx_fixtures"]

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
TIMEOUT = 30
MiB = 1024 * 1024
COOKIE_RE = re.compile(rf"^{SESSION_COOKIE}=([A-Za-z0-9_-]{{16,}}); HttpOnly; Path=/$")
HOP_BY_HOP = ("connection", "keep-alive", "te", "transfer-encoding", "upgrade", "expect")


# --------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    chunked: bool = False,
) -> Reply:
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}), encode_chunked=chunked)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(TIMEOUT), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 10,
        check=True,
    )


def login(port: int, user: str, password: str) -> Reply:
    body = f"user={user}&password={password}".encode()
    return request(
        port, "POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"}
    )


def session_cookie(reply: Reply) -> str:
    cookie = reply.headers.get("Set-Cookie", "")
    assert COOKIE_RE.match(cookie), cookie
    return cookie.split(";", 1)[0]


def multipart(fields: Mapping[str, str]) -> tuple[str, bytes]:
    boundary = "----mailmoat" + uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return f"multipart/form-data; boundary={boundary}", body


def echo_headers(reply: Reply) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in reply.json()["headers"]:
        seen.setdefault(name, []).append(value)
    return seen


def marker() -> str:
    return uuid.uuid4().hex[:12]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class WsClient:
    """A minimal RFC 6455 client: handshake, masked frames, unmasked replies."""

    def __init__(
        self, port: int, path: str = "/ws", *, version: str = "13", upgrade: bool = True
    ) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        self.key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}"]
        if upgrade:
            lines += ["Upgrade: websocket", "Connection: Upgrade"]
        lines += [f"Sec-WebSocket-Key: {self.key}", f"Sec-WebSocket-Version: {version}"]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the server")
        return data

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += self._recv()
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def send(self, opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> None:
        size = len(payload)
        first = bytes([(0x80 if fin else 0) | opcode])
        bit = 0x80 if mask else 0
        if size < 126:
            head = first + bytes([bit | size])
        elif size < 1 << 16:
            head = first + bytes([bit | 126]) + size.to_bytes(2, "big")
        else:
            head = first + bytes([bit | 127]) + size.to_bytes(8, "big")
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.sock.sendall(head + payload)

    def receive(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        assert not b1 & 0x80, "server frames must not be masked"
        size = b1 & 0x7F
        if size == 126:
            size = int.from_bytes(self._read(2), "big")
        elif size == 127:
            size = int.from_bytes(self._read(8), "big")
        return bool(b0 & 0x80), b0 & 0x0F, self._read(size)

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def websocket_conversation(port: int) -> None:
    """Every frame kind through ``port``; asserts the echo."""
    ws = WsClient(port)
    try:
        assert ws.status == 101, ws.headers
        assert ws.headers["upgrade"].lower() == "websocket"
        assert ws.headers["sec-websocket-accept"] == websocket_accept(ws.key)
        ws.send(1, "héllo, wörld".encode())
        assert ws.receive() == (True, 1, "héllo, wörld".encode())
        medium = os.urandom(300)  # 16-bit length
        ws.send(2, medium)
        assert ws.receive() == (True, 2, medium)
        large = os.urandom(70_000)  # 64-bit length
        ws.send(2, large)
        assert ws.receive() == (True, 2, large)
        ws.send(9, b"are you there")  # ping
        assert ws.receive() == (True, 10, b"are you there")
        ws.send(1, b"frag", fin=False)  # fragmented text, a ping in between
        ws.send(9, b"p")
        ws.send(0, b"mented", fin=False)
        ws.send(0, b" message")
        assert ws.receive() == (True, 10, b"p")
        assert ws.receive() == (True, 1, b"fragmented message")
        ws.send(8, (1000).to_bytes(2, "big") + b"bye")
        assert ws.receive() == (True, 8, (1000).to_bytes(2, "big"))
        assert ws.at_eof()
    finally:
        ws.close()


# --------------------------------------------------------------- static files


def test_static_files_through_nginx_are_intact(nginx: NginxInstance, tmp_path: Path) -> None:
    for name, expected in (("small.html", SMALL_HTML), ("1mb.bin", pattern_bytes(MiB))):
        out = tmp_path / name
        result = curl(
            "-o", str(out), "-w", "%{http_code} %{content_type}", nginx.url(f"/static/{name}")
        )
        status, content_type = result.stdout.split()
        assert status == "200"
        assert content_type == (
            "text/html" if name.endswith("html") else "application/octet-stream"
        )
        data = out.read_bytes()
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert len(SMALL_HTML) == 1024
    assert nginx.static_path("1mb.bin").stat().st_size == MiB


def test_static_keep_alive_with_http_client(nginx: NginxInstance) -> None:
    conn = http.client.HTTPConnection(HOST, nginx.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/static/small.html")
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, SMALL_HTML)
        sock = conn.sock
        conn.request("GET", "/static/1mb.bin")
        second = conn.getresponse()
        assert second.status == 200
        assert second.read() == pattern_bytes(MiB)
        assert conn.sock is sock, "nginx closed a keep-alive connection"
        conn.request("GET", "/static/missing.txt")
        missing = conn.getresponse()
        missing.read()
        assert missing.status == 404
    finally:
        conn.close()


# ---------------------------------------------------------------------- login


def test_login_form_is_served(nginx: NginxInstance) -> None:
    reply = request(nginx.port, "GET", "/login")
    assert reply.status == 200
    assert reply.headers.get_content_type() == "text/html"
    assert b'name="user"' in reply.body
    assert b'name="password"' in reply.body
    assert request(nginx.port, "GET", "/").headers["Location"] == "/login"


def test_login_success_sets_cookie_and_redirects(nginx: NginxInstance) -> None:
    reply = login(nginx.port, "alice", "alicepw")
    assert reply.status == 302
    assert reply.headers["Location"] == "/mail/"
    cookie = session_cookie(reply)
    inbox = request(nginx.port, "GET", "/mail/", headers={"Cookie": cookie})
    assert inbox.status == 200
    assert b"inbox of alice" in inbox.body
    anonymous = request(nginx.port, "GET", "/mail/")
    assert (anonymous.status, anonymous.headers["Location"]) == (302, "/login")
    forged = request(nginx.port, "GET", "/mail/", headers={"Cookie": f"{SESSION_COOKIE}=forged"})
    assert forged.status == 302


def test_login_failure_is_200_with_the_form(nginx: NginxInstance) -> None:
    for user, password in (("alice", "wrong"), ("mallory", "alicepw"), ("alice", "")):
        reply = login(nginx.port, user, password)
        assert reply.status == 200
        assert b"Login failed." in reply.body
        assert b'<form name="form" method="post" action="/login">' in reply.body
        assert "Set-Cookie" not in reply.headers


def test_json_login(nginx: NginxInstance) -> None:
    body = json.dumps({"user": "bob", "password": "bobpw"}).encode()
    reply = request(nginx.port, "POST", "/login", body, {"Content-Type": "application/json"})
    assert reply.status == 302
    inbox = request(nginx.port, "GET", "/mail/", headers={"Cookie": session_cookie(reply)})
    assert b"inbox of bob" in inbox.body
    wrong = json.dumps({"user": "bob", "password": "alicepw"}).encode()
    reply = request(nginx.port, "POST", "/login", wrong, {"Content-Type": "application/json"})
    assert (reply.status, b"Login failed." in reply.body) == (200, True)


def test_multipart_login(nginx: NginxInstance) -> None:
    content_type, body = multipart({"user": "alice", "password": "alicepw", "_token": "x"})
    reply = request(nginx.port, "POST", "/login", body, {"Content-Type": content_type})
    assert reply.status == 302
    assert (
        b"inbox of alice"
        in request(nginx.port, "GET", "/mail/", headers={"Cookie": session_cookie(reply)}).body
    )
    content_type, body = multipart({"user": "alice", "password": "nope"})
    reply = request(nginx.port, "POST", "/login", body, {"Content-Type": content_type})
    assert (reply.status, b"Login failed." in reply.body) == (200, True)


def test_curl_multipart_login_follows_redirect_with_cookie(
    nginx: NginxInstance, tmp_path: Path
) -> None:
    jar = str(tmp_path / "cookies")
    result = curl(
        "-L", "-c", jar, "-b", jar, "-F", "user=bob", "-F", "password=bobpw", nginx.url("/login")
    )
    assert "inbox of bob" in result.stdout
    assert SESSION_COOKIE in Path(jar).read_text()


# ------------------------------------------------------------------- streaming


def test_20mb_chunked_upload_through_nginx(nginx: NginxInstance) -> None:
    digest = hashlib.sha256()
    mark = marker()

    def body() -> Iterator[bytes]:
        for _ in range(20 * 16):
            chunk = os.urandom(64 * 1024)
            digest.update(chunk)
            yield chunk

    reply = request(
        nginx.port,
        "POST",
        f"/upload?m={mark}",
        body(),
        {"Content-Type": "application/octet-stream"},
        chunked=True,
    )
    assert reply.status == 200, reply.body
    assert reply.json() == {"bytes": 20 * MiB, "sha256": digest.hexdigest()}
    entry = nginx.wait_for_access(lambda e: mark in e["request"])
    assert entry["status"] == 200
    assert entry["request_length"] > 20 * MiB


def test_upload_with_expect_100_continue_through_nginx(
    nginx: NginxInstance, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)  # curl sends Expect: 100-continue for bodies > 1 MiB
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    result = curl("--data-binary", f"@{path}", "-H", "Content-Type: x/y", nginx.url("/upload"))
    assert json.loads(result.stdout) == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_5mb_chunked_download_through_nginx(nginx: NginxInstance) -> None:
    size = 5 * MiB
    conn = http.client.HTTPConnection(HOST, nginx.port, timeout=TIMEOUT)
    try:
        conn.request("GET", f"/download?size={size}")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.getheader("Content-Length") is None
        digest = hashlib.sha256()
        received = 0
        while chunk := response.read(256 * 1024):
            digest.update(chunk)
            received += len(chunk)
    finally:
        conn.close()
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()


# -------------------------------------------------------------------- headers


def test_echo_headers_shows_what_nginx_forwarded(nginx: NginxInstance) -> None:
    reply = request(
        nginx.port,
        "GET",
        "/echo-headers",
        headers={
            "X-Forwarded-For": "198.51.100.7",
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Custom": "kept",
        },
    )
    assert reply.status == 200
    seen = echo_headers(reply)
    assert seen["x-forwarded-for"] == ["198.51.100.7, 127.0.0.1"]
    assert seen["forwarded"] == ["for=127.0.0.1;proto=http"]
    assert seen["x-real-ip"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["host"] == [f"{HOST}:{nginx.port}"]
    assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"][0])
    assert seen["x-custom"] == ["kept"]
    for name in HOP_BY_HOP:
        assert name not in seen, f"nginx forwarded hop-by-hop header {name}"
    assert reply.json()["http_version"] == "1.1"


# ------------------------------------------------------------------ WebSocket


def test_websocket_echo_through_nginx(nginx: NginxInstance) -> None:
    websocket_conversation(nginx.port)
    entry = nginx.wait_for_access(lambda e: e["request"] == "GET /ws HTTP/1.1")
    assert entry["status"] == 101


def test_websocket_without_upgrade_is_refused(nginx: NginxInstance) -> None:
    ws = WsClient(nginx.port, upgrade=False)
    ws.close()
    assert ws.status == 400
    old = WsClient(nginx.port, version="8")
    old.close()
    assert (old.status, old.headers.get("sec-websocket-version")) == (426, "13")


# ----------------------------------------------------------------- access log


def test_access_log_shows_each_request(nginx: NginxInstance) -> None:
    mark = marker()
    request(nginx.port, "GET", f"/static/small.html?m={mark}")
    login(nginx.port, "alice", "bad")
    request(nginx.port, "GET", f"/echo-headers?m={mark}", headers={"X-Forwarded-For": "192.0.2.9"})
    request(nginx.port, "GET", f"/nothing-here?m={mark}")

    static = nginx.wait_for_access(
        lambda e: e["request"] == f"GET /static/small.html?m={mark} HTTP/1.1"
    )
    assert static["status"] == 200
    assert static["body_bytes_sent"] == len(SMALL_HTML)
    assert static["upstream_addr"] == ""
    echo = nginx.wait_for_access(lambda e: e["request"] == f"GET /echo-headers?m={mark} HTTP/1.1")
    assert echo["http_x_forwarded_for"] == "192.0.2.9"
    assert echo["upstream_status"] == "200"
    missing = nginx.wait_for_access(
        lambda e: e["request"] == f"GET /nothing-here?m={mark} HTTP/1.1"
    )
    assert missing["status"] == 404
    for entry in (static, echo, missing):
        assert set(entry) == set(ACCESS_LOG_FIELDS)
        assert entry["remote_addr"] == HOST
        assert entry["http_host"] == f"{HOST}:{nginx.port}"
        assert entry["request_length"] > 0
        assert re.fullmatch(r"[0-9a-f]{32}", entry["request_id"])
    failed = nginx.wait_for_access(lambda e: e["request"] == "POST /login HTTP/1.1")
    assert failed["status"] == 200


# ------------------------------------------------------------------ lifecycle


def test_stop_leaves_no_process(fresh_nginx: NginxFactory) -> None:
    instance = fresh_nginx()
    pids = instance.process_ids()
    assert len(pids) == 2  # master + one worker
    assert instance.master_pid in pids
    assert request(instance.port, "GET", "/static/small.html").status == 200
    assert request(instance.port, "GET", "/login").status == 404  # static only
    instance.stop()
    assert not any(alive(pid) for pid in pids)
    assert not instance.is_running()
    assert not instance.pid_path.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, instance.port), timeout=2).close()
    instance.stop()  # idempotent
    assert not [
        line for line in instance.error_log_lines() if "[emerg]" in line or "[alert]" in line
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="the worker user only changes under root")
def test_workers_run_unprivileged_under_root(nginx: NginxInstance) -> None:
    import pwd

    nobody = pwd.getpwnam(WORKER_USER).pw_uid
    workers = [pid for pid in nginx.process_ids() if pid != nginx.master_pid]
    assert workers
    for pid in workers:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert {int(uid) for uid in uids} == {nobody}


def test_start_failure_reports_the_error_log(fresh_nginx: NginxFactory) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NginxError, match="Address already in use"):
            fresh_nginx(port=port)


def test_nginx_as_reverse_proxy_in_front_of_nginx(
    nginx: NginxInstance, fresh_nginx: NginxFactory
) -> None:
    front = fresh_nginx(proxy_to=nginx.address)
    reply = request(front.port, "GET", "/static/1mb.bin")
    assert reply.body == pattern_bytes(MiB)
    seen = echo_headers(request(front.port, "GET", "/echo-headers"))
    assert seen["x-forwarded-for"] == ["127.0.0.1, 127.0.0.1"]
    assert seen["forwarded"] == ["for=127.0.0.1;proto=http, for=127.0.0.1;proto=http"]
    reply = login(front.port, "bob", "bobpw")
    assert (reply.status, reply.headers["Location"]) == (302, "/mail/")
    websocket_conversation(front.port)
    front_entry = front.wait_for_access(lambda e: e["request"].startswith("GET /echo-headers"))
    assert front_entry["upstream_addr"] == str(nginx.address)


def test_constructor_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        NginxInstance(tmp_path, webapp=(HOST, 1), proxy_to=(HOST, 2))
    with pytest.raises(ValueError, match="worker_processes"):
        NginxInstance(tmp_path, worker_processes=0)
    with pytest.raises(ValueError, match="invalid host"):
        NginxInstance(tmp_path, proxy_to=("evil; include /etc/passwd", 80))


# ----------------------------------------------------- the webapp on its own


def raw_exchange(port: int, data: bytes, *, until: bytes = b"", then: bytes = b"") -> bytes:
    """Send ``data``; once ``until`` was received send ``then``; read to EOF or a response."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        received = b""
        if until:
            while until not in received:
                chunk = sock.recv(65536)
                assert chunk, f"closed before {until!r}: {received!r}"
                received += chunk
            sock.sendall(then)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            received += chunk
        return received


async def test_webapp_in_process_keep_alive_head_and_request_log() -> None:
    app = WebApp({"carol": "carolpw"})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(serve_webapp, app=app))

        def client() -> None:
            conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
            try:
                conn.request("GET", "/login", headers={"X-Trace": "one"})
                get = conn.getresponse()
                page = get.read()
                sock = conn.sock
                conn.request("HEAD", "/login")
                head = conn.getresponse()
                assert head.read() == b""
                assert head.getheader("Content-Length") == str(len(page))
                conn.request("HEAD", "/download?size=1000")
                assert conn.getresponse().read() == b""
                body = b"user=carol&password=carolpw"
                conn.request(
                    "POST",
                    "/login",
                    body,
                    {"Content-Type": "application/x-www-form-urlencoded"},
                )
                ok = conn.getresponse()
                ok.read()
                assert ok.status == 302
                conn.request("PUT", "/login", b"ignored body")
                refused = conn.getresponse()
                refused.read()
                assert (refused.status, refused.getheader("Allow")) == (405, "GET, HEAD, POST")
                conn.request("GET", "/download?size=3")
                assert conn.getresponse().read() == pattern_bytes(3)
                assert conn.sock is sock, "keep-alive connection was not reused"
            finally:
                conn.close()

        await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()
    assert [(r.method, r.target) for r in app.requests] == [
        ("GET", "/login"),
        ("HEAD", "/login"),
        ("HEAD", "/download?size=1000"),
        ("POST", "/login"),
        ("PUT", "/login"),
        ("GET", "/download?size=3"),
    ]
    assert app.requests[0].header("x-trace") == "one"
    assert list(app.sessions.values()) == ["carol"]


async def test_webapp_expect_100_continue_and_bad_requests() -> None:
    app = WebApp()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(serve_webapp, app=app))

        def client() -> None:
            head = (
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            out = raw_exchange(port, head, until=b"\r\n\r\n", then=b"hello")
            assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
            assert json.loads(out.split(b"\r\n\r\n")[2]) == {
                "bytes": 5,
                "sha256": hashlib.sha256(b"hello").hexdigest(),
            }
            # an endpoint that does not read the body answers without 100, then closes
            head = (
                b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            out = raw_exchange(port, head)
            assert out.startswith(b"HTTP/1.1 404 Not Found\r\n")
            assert b"\r\nConnection: close\r\n" in out
            assert b"100 Continue" not in out
            out = raw_exchange(port, b"GARBAGE\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400 ")
            for content_type, body, status in (
                ("text/plain", b"user=alice", 415),
                ("application/json", b"{not json", 400),
                ("application/json", b"[1, 2]", 400),
                ("multipart/form-data", b"--x--\r\n", 400),
            ):
                reply = request(port, "POST", "/login", body, {"Content-Type": content_type})
                assert reply.status == status, (content_type, reply.body)
            for size in ("-1", "x", str(2**40)):
                assert request(port, "GET", f"/download?size={size}").status == 400

        await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()


async def test_webapp_websocket_protocol_errors() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_webapp)

        def expect_close(send: Any, code: int) -> None:
            ws = WsClient(port)
            try:
                assert ws.status == 101
                send(ws)
                fin, opcode, payload = ws.receive()
                assert (fin, opcode, int.from_bytes(payload[:2], "big")) == (True, 8, code)
                assert ws.at_eof()
            finally:
                ws.close()

        def client() -> None:
            websocket_conversation(port)
            expect_close(lambda ws: ws.send(1, b"unmasked", mask=False), 1002)
            expect_close(lambda ws: ws.send(1, b"\xff\xfe"), 1007)
            expect_close(lambda ws: ws.send(9, b"x" * 126), 1002)
            expect_close(lambda ws: ws.send(0, b"orphan"), 1002)
            expect_close(lambda ws: ws.send(8, (999).to_bytes(2, "big")), 1002)
            expect_close(lambda ws: ws.send(8, (4000).to_bytes(2, "big")), 4000)

        await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()


def test_websocket_accept_rfc_6455_example() -> None:
    assert websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_pattern_is_deterministic_and_offset_consistent() -> None:
    data = pattern_bytes(3 * MiB)
    assert data == pattern_bytes(3 * MiB)
    assert data[MiB + 5 : MiB + 70_005] == pattern_bytes(70_000, MiB + 5)
    assert data[:MiB] != data[MiB : 2 * MiB]


def test_webapp_process_with_custom_users_and_port() -> None:
    port = find_free_port()
    process = WebAppProcess(port=port, users={"dave": "davepw"})
    try:
        started = time.monotonic()
        process.start()
        assert time.monotonic() - started < 10
        assert process.port == port
        assert login(port, "dave", "davepw").status == 302
        assert login(port, "alice", "alicepw").status == 200
        process.stop()
        assert not process.is_running()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, port), timeout=2).close()
    finally:
        process.cleanup()
    taken = WebAppProcess(port=port)
    with socket.socket() as sock:
        sock.bind((HOST, port))
        sock.listen()
        with pytest.raises(WebAppError, match="exited during start-up"):
            taken.start()
    taken.cleanup()
