"""The webmail proxy end to end: real nginx and the login application behind mailmoat.

Clients are ``curl`` (subprocesses) and ``httpx``; the backends are a private
nginx (static files, and a reverse proxy to :mod:`mailmoat.demo.webapp`) and
the login application itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.demo.dovecot import DovecotInstance
from mailmoat.demo.nginx import NginxInstance
from mailmoat.demo.webapp import WebAppProcess, pattern_bytes, websocket_accept
from mailmoat.events.journal import EventFilter, Journal
from nginx_fixtures import NginxFactory
from test_metrics import samples, series, value

pytestmark = pytest.mark.e2e

CURL = shutil.which("curl")


def http_config(
    backend: str,
    *,
    tls: str = "none",
    extra: str = "",
    login: bool = True,
    rules: Path | None = None,
    backend_extra: str = "",
    data_dir: str = "data",
) -> str:
    rules_section = f'[rules]\npaths = ["{rules}"]\n' if rules else ""
    login_section = (
        """
[listener.login]
path = "/login"
user_field = "user"
password_field = "password"
success_status = [302]
success_location = "/mail/"
success_cookie = "webmail_session"
"""
        if login
        else ""
    )
    return f"""
[node]
name = "http-test"
data_dir = "{data_dir}"
[log]
events = "none"
[tls]
cert = "{{cert}}"
key = "{{key}}"
{rules_section}
[[backend]]
name = "web"
address = ["{backend}"]
connect_timeout = 2
{backend_extra}
[[listener]]
name = "web"
protocol = "http"
listen = ["127.0.0.1:0"]
tls = "{tls}"
backend = "web"
{extra}
{login_section}
"""


async def start_web(start_node: StartNode, backend: Any, **options: Any) -> RunningNode:
    if isinstance(backend, tuple):
        backend = f"{backend[0]}:{backend[1]}"
    return await start_node(http_config(str(backend), **options))


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    if CURL is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    return subprocess.run(
        [CURL, "-sS", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )


def rule_dir(tmp_path: Path, text: str) -> Path:
    """A rules directory holding one file with ``text``."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "test.toml").write_text(text)
    return rules


def logged(nginx: NginxInstance, marker: str) -> bool:
    """Did any request carrying ``marker`` reach nginx?"""
    return any(marker in json.dumps(entry) for entry in nginx.access_log())


async def acurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return await trio.to_thread.run_sync(lambda: curl(*args, timeout=timeout))


# --------------------------------------------------------------------------- plain proxying


async def test_static_files_and_keep_alive(nginx: NginxInstance, start_node: StartNode) -> None:
    rn = await start_web(start_node, nginx.address)
    base = f"http://127.0.0.1:{rn.port('web')}"
    small = nginx.static_path("small.html").read_bytes()
    # two URLs in one curl run: the second reuses the connection
    got = await acurl(
        "-w",
        "\n%{num_connects}",
        f"{base}/static/small.html",
        f"{base}/static/small.html",
    )
    assert got.returncode == 0, got.stderr
    out = got.stdout
    assert out.count(small) == 2
    assert out.rstrip().endswith(b"\n0"), "the second request must reuse the connection"
    close = await rn.wait_for("session.close")
    assert close["http.requests"] == 2
    assert close["event.outcome"] == "success"
    assert close["backend.address"] == str(nginx.address)


async def test_large_download_and_head(nginx: NginxInstance, start_node: StartNode) -> None:
    rn = await start_web(start_node, nginx.address)
    base = f"http://127.0.0.1:{rn.port('web')}"
    expected = nginx.static_path("1mb.bin").read_bytes()
    got = await acurl(f"{base}/static/1mb.bin")
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256(got.stdout).digest() == hashlib.sha256(expected).digest()
    head = await acurl("-I", f"{base}/static/1mb.bin")
    assert head.returncode == 0, head.stderr
    assert b"HTTP/1.1 200" in head.stdout
    assert f"Content-Length: {len(expected)}".lower().encode() in head.stdout.lower()
    # a chunked response from the application, through nginx, of 8 MiB
    size = 8 * 1024 * 1024
    got = await acurl(f"{base}/download?size={size}")
    assert got.returncode == 0, got.stderr
    assert len(got.stdout) == size
    assert got.stdout == pattern_bytes(size)


async def test_uploads_content_length_chunked_and_expect(
    nginx: NginxInstance, start_node: StartNode, tmp_path: Path
) -> None:
    rn = await start_web(start_node, nginx.address)
    url = f"http://127.0.0.1:{rn.port('web')}/upload"
    body = os.urandom(6 * 1024 * 1024)
    path = tmp_path / "upload.bin"
    path.write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    for extra in (
        ["-H", "Expect:"],  # plain Content-Length
        ["-H", "Transfer-Encoding: chunked", "-H", "Expect:"],  # chunked upload
        ["-H", "Expect: 100-continue"],  # waits for 100 before the body
    ):
        got = await acurl("--data-binary", f"@{path}", *extra, url)
        assert got.returncode == 0, (extra, got.stderr)
        assert json.loads(got.stdout) == {"bytes": len(body), "sha256": digest}, extra


async def test_httpx_keep_alive_client(nginx: NginxInstance, start_node: StartNode) -> None:
    rn = await start_web(start_node, nginx.address)
    base = f"http://127.0.0.1:{rn.port('web')}"

    def run() -> list[int]:
        with httpx.Client(base_url=base, timeout=20) as client:
            statuses = []
            for i in range(20):
                r = client.get(f"/static/small.html?n={i}")
                statuses.append(r.status_code)
            r = client.post("/upload", content=b"x" * 100_000)
            assert r.json()["bytes"] == 100_000
            return statuses

    statuses = await trio.to_thread.run_sync(run)
    assert statuses == [200] * 20
    close = await rn.wait_for("session.close")
    assert close["http.requests"] == 21  # one connection for all of them


async def test_forwarding_headers_are_mailmoat_s(
    webapp: WebAppProcess, start_node: StartNode
) -> None:
    """X-Forwarded-For from the client is not believed; mailmoat sets its own."""
    rn = await start_web(start_node, webapp.address)
    got = await acurl(
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "X-Real-IP: 6.6.6.6",
        "-H",
        "Forwarded: for=6.6.6.6",
        f"http://127.0.0.1:{rn.port('web')}/echo-headers",
    )
    assert got.returncode == 0, got.stderr
    headers = json.loads(got.stdout)["headers"]
    values = {n: v for n, v in headers}
    assert values["x-forwarded-for"] == "127.0.0.1"
    assert values["x-real-ip"] == "127.0.0.1"
    assert values["x-forwarded-proto"] == "http"
    assert values["forwarded"].startswith('for="127.0.0.1:')
    assert not any("6.6.6.6" in v for _, v in headers)


async def test_https_with_alpn(
    nginx: NginxInstance,
    webapp: WebAppProcess,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    tmp_path: Path,
) -> None:
    rn = await start_web(start_node, nginx.address, tls="implicit")
    ca = tmp_path / "ca.pem"
    mailmoat_tls.ca.cert_pem.write_to_path(str(ca))
    url = f"https://localhost:{rn.port('web')}/static/small.html"
    got = await acurl("--cacert", str(ca), "-w", "\n%{http_version}", url)
    assert got.returncode == 0, got.stderr
    assert got.stdout.endswith(b"\n1.1")
    assert nginx.static_path("small.html").read_bytes() in got.stdout
    handshake = await rn.wait_for("tls.handshake", tls__leg="client")
    assert "http/1.1" in handshake["tls.client_alpn"]
    # the negotiated protocol, seen by a Python client offering h2 first
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2", "http/1.1"])

    def negotiated() -> str | None:
        with (
            socket.create_connection(("127.0.0.1", rn.port("web")), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return tls.selected_alpn_protocol()

    assert await trio.to_thread.run_sync(negotiated) == "http/1.1"
    # and the forwarded scheme is https (straight to the application: nginx sets its own)
    direct = await start_web(start_node, webapp.address, tls="implicit", data_dir="data2")
    got = await acurl("--cacert", str(ca), f"https://localhost:{direct.port('web')}/echo-headers")
    values = dict(json.loads(got.stdout)["headers"])
    assert values["x-forwarded-proto"] == "https"
    assert values["forwarded"].endswith(";proto=https")


def _ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + masked


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _ws_read(sock: socket.socket) -> tuple[int, bytes]:
    b0, b1 = _read_exact(sock, 2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(_read_exact(sock, 2), "big")
    elif n == 127:
        n = int.from_bytes(_read_exact(sock, 8), "big")
    return b0 & 0x0F, _read_exact(sock, n)


async def test_websocket_echo_through_the_upgrade(
    nginx: NginxInstance, start_node: StartNode
) -> None:
    rn = await start_web(start_node, nginx.address)
    port = rn.port("web")

    def talk() -> list[bytes]:
        key = base64.b64encode(os.urandom(16)).decode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                (
                    "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    f"Sec-WebSocket-Key: {key}\r\n\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 101"), head
            assert websocket_accept(key).encode() in head
            echoed = []
            for payload in (b"hello", os.urandom(70_000)):
                s.sendall(_ws_frame(payload, 1 if payload == b"hello" else 2))
                echoed.append(_ws_read(s)[1])
            s.sendall(_ws_frame((1000).to_bytes(2, "big"), 8))
            opcode, _ = _ws_read(s)
            assert opcode == 8
            return echoed

    echoed = await trio.to_thread.run_sync(talk)
    assert echoed[0] == b"hello"
    assert len(echoed[1]) == 70_000
    close = await rn.wait_for("session.close")
    assert close["session.close_reason"] in ("backend_closed", "client_closed")


# --------------------------------------------------------------------------- login detection


async def test_login_success_and_failure_events(
    nginx: NginxInstance, start_node: StartNode
) -> None:
    rn = await start_web(start_node, nginx.address)
    base = f"http://127.0.0.1:{rn.port('web')}"
    bad = await acurl("-d", "user=alice&password=Wr0ngSecret-xyz", f"{base}/login")
    assert bad.returncode == 0, bad.stderr
    assert b"Login failed" in bad.stdout
    failure = await rn.wait_for("auth.attempt", event__outcome="failure")
    assert failure["auth.user"] == "alice"
    assert failure["auth.mechanism"] == "form"
    # multipart and JSON logins are read too
    good = await acurl(
        "-F", "user=bob", "-F", "password=bobpw", "-D", "-", "-o", "/dev/null", f"{base}/login"
    )
    assert b"302" in good.stdout.split(b"\r\n")[0]
    assert b"webmail_session=" in good.stdout
    success = await rn.wait_for("auth.attempt", event__outcome="success")
    assert success["auth.user"] == "bob"
    await acurl(
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"user": "carol", "password": "Json-Secret-123"}),
        f"{base}/login",
    )
    await rn.wait_for("auth.attempt", auth__user="carol")
    # the transcript of a connection with a login: the request, the user, the answer
    transcript = await rn.wait_for("session.transcript", session__id=failure["session.id"])
    lines = [(e["dir"], e["line"]) for e in transcript["transcript"]]
    assert lines[:3] == [
        ("c", "POST /login"),
        ("c", "[form] user=alice"),
        ("s", "HTTP/1.1 200 (login failure for alice)"),
    ], lines
    for event in rn.events.events:
        text = json.dumps(event, default=str)
        assert "Wr0ngSecret" not in text
        assert "bobpw" not in text
        assert "Json-Secret" not in text


async def test_brute_force_over_http_is_banned_with_429(
    nginx: NginxInstance, start_node: StartNode, tmp_path: Path
) -> None:
    rules = rule_dir(
        tmp_path,
        """
[[rule]]
id = "T-HTTP-BRUTE"
name = "webmail brute force"
phase = "login"
protocols = ["http"]
when = 'auth.result == "failure" && login.failures_ip >= 3'
action = "ban"
ban = "10m"
severity = "high"
""",
    )
    rn = await start_web(start_node, nginx.address, rules=rules)
    base = f"http://127.0.0.1:{rn.port('web')}"
    statuses = []
    for i in range(4):
        got = await acurl(
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-d",
            f"user=alice&password=wrong{i}",
            f"{base}/login?bf-attempt-{i}",
        )
        statuses.append(got.stdout.split(b"\r\n")[0])
    assert b"200" in statuses[0]
    assert b"200" in statuses[1]
    assert b"429" in statuses[2], statuses
    await rn.wait_for("client.ban")
    # a new connection of a banned client: 429 with Retry-After, nothing reaches the backend
    got = await acurl("-D", "-", "-o", "/dev/null", f"{base}/static/small.html?banned-probe")
    head = got.stdout.decode()
    assert head.startswith("HTTP/1.1 429"), head
    retry = int(
        next(line for line in head.split("\r\n") if line.lower().startswith("retry-after")).split(
            ":"
        )[1]
    )
    assert 500 < retry <= 600
    with trio.fail_after(5):  # the control: the first logins reached nginx
        while not logged(nginx, "bf-attempt-0"):
            await trio.sleep(0.05)
    await trio.sleep(0.3)
    assert not logged(nginx, "banned-probe")
    assert not logged(nginx, "bf-attempt-3")  # refused before it was forwarded


async def test_request_and_response_rules(
    nginx: NginxInstance, start_node: StartNode, tmp_path: Path
) -> None:
    rules = rule_dir(
        tmp_path,
        """
[[rule]]
id = "T-HTTP-ADMIN"
name = "no admin paths"
phase = "request"
protocols = ["http"]
when = 'http.path.startsWith("/admin") || http.user_agent.contains("sqlmap")'
action = "deny"
severity = "medium"

[[rule]]
id = "T-HTTP-STATUS"
name = "hide server errors"
phase = "response"
protocols = ["http"]
when = 'http.status == 404'
action = "reject"
reply = { http = "451" }
severity = "low"
""",
    )
    rn = await start_web(start_node, nginx.address, rules=rules)
    base = f"http://127.0.0.1:{rn.port('web')}"
    got = await acurl("-D", "-", "-o", "/dev/null", f"{base}/admin/panel?rule-probe-1")
    assert got.stdout.startswith(b"HTTP/1.1 403"), got.stdout
    got = await acurl(
        "-A", "sqlmap/1.7", "-D", "-", "-o", "/dev/null", f"{base}/?rule-probe-2&auth_token=zz9"
    )
    assert got.stdout.startswith(b"HTTP/1.1 403"), got.stdout
    await rn.wait_for("rule.match", rule__id="T-HTTP-ADMIN", verdict__action="deny")
    first = rn.events.find("rule.match", rule__id="T-HTTP-ADMIN")[0]
    refused = rn.events.find("http.request")
    assert [e["url.query"] for e in refused] == ["rule-probe-1", "rule-probe-2&auth_token=***"]
    assert first["verdict.evidence"]["http.path"] == "/admin/panel"
    # the control reaches nginx, so the log is read right; the refused requests did not
    ok = await acurl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/static/small.html?probe-ok")
    assert ok.stdout == b"200"
    with trio.fail_after(5):
        while not logged(nginx, "probe-ok"):
            await trio.sleep(0.05)
    assert not logged(nginx, "rule-probe")
    got = await acurl("-D", "-", "-o", "/dev/null", f"{base}/no-such-page?token=s3cr3t&x=1")
    assert got.stdout.startswith(b"HTTP/1.1 451"), got.stdout
    # the refused request and the answer are in the session's transcript, the token is not
    refusal = await rn.wait_for("rule.match", rule__id="T-HTTP-STATUS")
    transcript = await rn.wait_for("session.transcript", session__id=refusal["session.id"])
    assert [(e["dir"], e["line"]) for e in transcript["transcript"]] == [
        ("c", "GET /no-such-page?token=***&x=1"),
        ("s", "HTTP/1.1 451 Unavailable For Legal Reasons"),
    ]
    assert not any("s3cr3t" in json.dumps(e, default=str) for e in rn.events.events)
    # and normal traffic still flows
    ok = await acurl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/static/small.html")
    assert ok.stdout == b"200"
    # every answer, mailmoat's own included, is in the request metrics
    metrics = rn.node.metrics
    assert metrics is not None
    r, d = "mailmoat_http_requests_total", "mailmoat_http_request_duration_seconds"
    with trio.fail_after(5):
        while value(samples(metrics), f"{d}_count", listener="web") != 5:
            await trio.sleep(0.02)
    got_metrics = samples(metrics)
    assert {k: value(got_metrics, r, listener="web", status=k) for k in ("200", "403", "451")} == {
        "200": 2,
        "403": 2,
        "451": 1,
    }
    assert series(got_metrics, r) == [
        {"listener": "web", "status": code} for code in ("403", "200", "451")
    ]


# --------------------------------------------------------------------------- failures


async def test_backend_down_is_502(start_node: StartNode) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    rn = await start_web(start_node, f"127.0.0.1:{port}", login=False)
    got = await acurl("-D", "-", f"http://127.0.0.1:{rn.port('web')}/")
    assert got.stdout.startswith(b"HTTP/1.1 502"), got.stdout
    assert b"could not be reached" in got.stdout
    await rn.wait_for("backend.failure")


async def test_backend_slow_is_504(start_node: StartNode, nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, silent, listeners)
    rn = await start_web(
        start_node, f"127.0.0.1:{port}", login=False, backend_extra="command_timeout = 1"
    )
    got = await acurl("-D", "-", f"http://127.0.0.1:{rn.port('web')}/slow")
    assert got.stdout.startswith(b"HTTP/1.1 504"), got.stdout
    close = await rn.wait_for("session.close")
    assert close["session.close_reason"] == "backend_timeout"


async def test_client_gone_mid_response_leaves_nothing_running(
    nginx: NginxInstance, start_node: StartNode
) -> None:
    rn = await start_web(start_node, nginx.address)
    port = rn.port("web")

    def read_some_and_vanish() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /download?size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    await trio.to_thread.run_sync(read_some_and_vanish)
    close = await rn.wait_for("session.close", timeout=20)
    assert close["session.close_reason"] in ("client_gone", "client_closed")
    service = rn.node.services["web"]
    with trio.fail_after(5):
        while service.active:
            await trio.sleep(0.05)


async def test_redirect_listener(start_node: StartNode) -> None:
    rn = await start_node(
        """
[node]
name = "redirect"
[log]
events = "none"
[[listener]]
name = "plain"
protocol = "http"
listen = ["127.0.0.1:0"]
redirect_https = "host"
"""
    )
    got = await acurl(
        "-D",
        "-",
        "-H",
        "Host: mail.example.org:8080",
        f"http://127.0.0.1:{rn.port('plain')}/inbox?x=1",
    )
    head = got.stdout.decode()
    assert head.startswith("HTTP/1.1 301"), head
    assert "Location: https://mail.example.org/inbox?x=1" in head


async def test_webapp_login_through_nginx_with_fresh_backend(
    webapp: WebAppProcess, fresh_nginx: NginxFactory, start_node: StartNode
) -> None:
    """A cookie session: login, then the inbox, through mailmoat and nginx."""
    proxy = fresh_nginx(webapp=webapp.address)
    rn = await start_web(start_node, proxy.address)
    base = f"http://127.0.0.1:{rn.port('web')}"

    def run() -> str:
        with httpx.Client(base_url=base, timeout=20, follow_redirects=True) as client:
            r = client.post("/login", data={"user": "alice", "password": "alicepw"})
            return r.text

    text = await trio.to_thread.run_sync(run)
    assert "inbox of alice" in text
    event = await rn.wait_for("auth.attempt", event__outcome="success")
    assert event["auth.user"] == "alice"


async def test_tarpit_is_429_and_detect_mode_refuses_nothing(
    nginx: NginxInstance, start_node: StartNode, tmp_path: Path
) -> None:
    rules = rule_dir(
        tmp_path,
        """
[[rule]]
id = "T-HTTP-SLOW"
name = "slow down scanners"
phase = "request"
protocols = ["http"]
when = 'http.path.endsWith(".php")'
action = "tarpit"
tarpit = "7s"
severity = "low"

[[rule]]
id = "T-HTTP-DENY"
name = "deny a path"
phase = "request"
protocols = ["http"]
when = 'http.path == "/static/small.html" && http.query == "deny-me"'
action = "deny"
severity = "low"
""",
    )
    rn = await start_web(start_node, nginx.address, rules=rules)
    base = f"http://127.0.0.1:{rn.port('web')}"
    got = await acurl("-D", "-", "-o", "/dev/null", f"{base}/wp-login.php")
    head = got.stdout.decode()
    assert head.startswith("HTTP/1.1 429"), head
    assert "Retry-After: 7" in head
    close = await rn.wait_for("session.close")
    assert close["session.close_reason"] == "policy_tarpit"

    detect = await start_node(
        http_config(str(nginx.address), rules=rules, data_dir="data2").replace(
            'name = "http-test"', 'name = "http-detect"\nmode = "detect"'
        )
    )
    got = await acurl(
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://127.0.0.1:{detect.port('web')}/static/small.html?deny-me",
    )
    assert got.stdout == b"200"
    match = await detect.wait_for("rule.match", rule__id="T-HTTP-DENY")
    assert match["verdict.action"] == "detect"


async def test_webmail_failures_count_with_imap_logins(
    nginx: NginxInstance,
    dovecot: DovecotInstance,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    tmp_path: Path,
) -> None:
    """One address, one set of counters: failed webmail logins are seen by an IMAP login."""
    import imaplib

    rules = rule_dir(
        tmp_path,
        """
[[rule]]
id = "T-CROSS"
name = "failures from this address on any protocol"
phase = "login"
protocols = ["imap"]
when = 'login.failures_ip >= 3'
action = "log"
severity = "medium"
""",
    )
    text = (
        http_config(str(nginx.address), rules=rules)
        + f"""
[[listener]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "none"
backend = "dovecot"

[[backend]]
name = "dovecot"
address = "127.0.0.1:{dovecot.ports.imap}"
client_identity = "imap-id"
"""
    )
    rn = await start_node(text)
    base = f"http://127.0.0.1:{rn.port('web')}"
    for i in range(3):
        await acurl("-o", "/dev/null", "-d", f"user=alice&password=nope{i}", f"{base}/login")
    await rn.wait_for("auth.attempt", event__outcome="failure", session__protocol="http")
    assert len(rn.events.find("auth.attempt", session__protocol="http")) == 3

    def imap_login() -> None:
        with imaplib.IMAP4("127.0.0.1", rn.port("imap"), timeout=20) as imap:
            imap.login("alice", "alicepw")
            imap.logout()

    await trio.to_thread.run_sync(imap_login)
    match = await rn.wait_for("rule.match", rule__id="T-CROSS")
    assert match["session.protocol"] == "imap"
    assert match["verdict.evidence"]["login.failures_ip"] >= 3


def form_login(user: str, password: str, encoding: str) -> list[str]:
    """curl arguments posting a login form in ``encoding``."""
    if encoding == "urlencoded":
        return ["-d", f"user={user}&password={password}"]
    if encoding == "multipart":
        return ["-F", f"user={user}", "-F", f"password={password}"]
    body = json.dumps({"user": user, "password": password})
    return ["-H", "Content-Type: application/json", "-d", body]


async def test_webmail_wrong_passwords_are_counted_apart_and_never_kept(
    nginx: NginxInstance, start_node: StartNode, tmp_path: Path
) -> None:
    """Failed webmail logins feed login.distinct_passwords_user as SMTP AUTH and
    IMAP LOGIN do: a guesser's passwords add up, one stale password retried
    counts once, whatever the form's encoding; no password is in the events,
    the event log or the journal."""
    rules = rule_dir(
        tmp_path,
        """
[[rule]]
id = "T-HTTP-GUESS"
name = "webmail password guessing"
phase = "login"
protocols = ["http"]
when = 'auth.result == "failure" && login.distinct_passwords_user >= 3'
action = "log"
severity = "high"

[[rule]]
id = "T-HTTP-STALE"
name = "one stale password retried"
phase = "login"
protocols = ["http"]
when = 'auth.result == "failure" && login.failures_user >= 3 && login.distinct_passwords_user == 1'
action = "log"
""",
    )
    log = tmp_path / "events.jsonl"
    rn = await start_node(
        http_config(str(nginx.address), rules=rules).replace('events = "none"', f'events = "{log}"')
    )
    base = f"http://127.0.0.1:{rn.port('web')}"
    run = os.urandom(4).hex()
    stale = f"Stale-{run}"
    guesses = [f"Guess-{run}-{i}" for i in range(3)]
    encodings = ("urlencoded", "multipart", "json")

    async def fail(user: str, password: str, encoding: str) -> None:
        got = await acurl(*form_login(user, password, encoding), f"{base}/login")
        assert got.returncode == 0, got.stderr
        assert b"Login failed" in got.stdout, (encoding, got.stdout)

    # one password, three times (once per encoding): the same fingerprint
    for encoding in encodings:
        await fail("alice", stale, encoding)
    match = await rn.wait_for("rule.match", rule__id="T-HTTP-STALE")
    assert match["session.protocol"] == "http"
    assert match["verdict.evidence"]["login.distinct_passwords_user"] == 1
    assert len(rn.events.find("auth.attempt", auth__user="alice", event__outcome="failure")) == 3
    assert rn.events.find("rule.match", rule__id="T-HTTP-GUESS") == []
    # as many failures with three passwords: a guesser
    for password, encoding in zip(guesses, encodings, strict=True):
        await fail("bob", password, encoding)
    match = await rn.wait_for("rule.match", rule__id="T-HTTP-GUESS")
    assert match["session.protocol"] == "http"
    assert match["verdict.evidence"]["login.distinct_passwords_user"] == 3
    assert len(rn.events.find("rule.match", rule__id="T-HTTP-GUESS")) == 1
    assert len(rn.events.find("rule.match", rule__id="T-HTTP-STALE")) == 1

    passwords = [stale, *guesses]
    events = json.dumps(rn.events.events, default=str)
    assert events.count('"event.action": "auth.attempt"') == 6
    assert "session.transcript" in events
    for password in passwords:
        assert password not in events
    # the event log (JSON lines) and the journal (msgpack, uncompressed) on disk
    journal_dir = tmp_path / "data" / "journal"
    journal = Journal(journal_dir)
    with trio.fail_after(10):
        while (
            len(list(journal.query(EventFilter(action="auth.attempt")))) < 6
            or log.read_text().count('"auth.attempt"') < 6
        ):
            await trio.sleep(0.1)  # the journal writer flushes a batch at a time
    stored = log.read_bytes() + b"".join(
        path.read_bytes() for path in journal_dir.iterdir() if path.is_file()
    )
    for password in passwords:
        assert password.encode() not in stored


async def test_drain_closes_idle_keep_alive_connections_at_once(
    nginx: NginxInstance, start_node: StartNode, nursery: trio.Nursery
) -> None:
    rn = await start_node(
        http_config(str(nginx.address)).replace(
            'name = "http-test"', 'name = "drain"\ndrain_timeout = 30'
        )
    )
    stream = await trio.open_tcp_stream("127.0.0.1", rn.port("web"))
    await stream.send_all(b"GET /static/small.html HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    small = nginx.static_path("small.html").read_bytes()
    with trio.fail_after(10):
        while not got.endswith(small):
            got += await stream.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 200")
    # the connection now waits, kept alive, for its next request
    started = trio.current_time()
    nursery.start_soon(rn.node.drain)
    with trio.fail_after(5):  # not drain_timeout (30 s): an idle connection holds nothing
        assert await stream.receive_some(65536) == b""
    assert trio.current_time() - started < 5
    close = await rn.wait_for("session.close")
    assert close["session.close_reason"] == "shutdown"
    assert close["http.requests"] == 1
    await stream.aclose()


async def test_connect_phase_refusal_answers_the_first_request(
    nginx: NginxInstance, start_node: StartNode, tmp_path: Path
) -> None:
    rules = rule_dir(
        tmp_path,
        """
[[rule]]
id = "T-HTTP-CONNECT"
name = "no clients from loopback"
phase = "connect"
protocols = ["http"]
when = 'client.ip == "127.0.0.1"'
action = "deny"
severity = "low"
""",
    )
    rn = await start_web(start_node, nginx.address, rules=rules)
    got = await acurl(
        "-D",
        "-",
        "-o",
        "/dev/null",
        f"http://127.0.0.1:{rn.port('web')}/static/small.html?conn-probe",
    )
    assert got.stdout.startswith(b"HTTP/1.1 403"), got.stdout
    close = await rn.wait_for("session.close")
    assert close["session.close_reason"] == "policy_deny"
    assert close["http.requests"] == 1
    await trio.sleep(0.3)
    assert not logged(nginx, "conn-probe")


async def test_a_trusted_proxy_s_forwarding_headers_are_kept(
    webapp: WebAppProcess, start_node: StartNode
) -> None:
    rn = await start_web(
        start_node, webapp.address, extra='trusted_proxies = ["127.0.0.0/8"]', login=False
    )
    got = await acurl(
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        f"http://127.0.0.1:{rn.port('web')}/echo-headers",
    )
    values = dict(json.loads(got.stdout)["headers"])
    assert values["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
