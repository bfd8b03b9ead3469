"""The admin API server against real clients on loopback: curl, raw sockets, admin_call."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import trio

from mailmoat.admin import (
    AdminConfig,
    AdminLimits,
    AdminServer,
    AdminUnavailable,
    Request,
    Response,
    admin_call,
    check_admin_address,
)
from mailmoat.errors import ConfigError
from mailmoat.events import Emitter, MemorySink

TOKEN = "s3cret-admin-token"
MiB = 1 << 20


@dataclass
class Admin:
    host: str
    port: int
    sink: MemorySink
    server: AdminServer

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


async def _echo(request: Request) -> Response:
    return Response.json(
        {
            "method": request.method,
            "path": request.path,
            "params": dict(request.path_params),
            "query": dict(request.query),
        }
    )


async def _post(request: Request) -> Response:
    return Response.json({"size": len(request.body), "sha": hash(request.body) & 0xFFFF})


async def _boom(request: Request) -> Response:
    raise RuntimeError("secret-detail /etc/shadow")


async def _page(request: Request) -> Response:
    return Response(200, b"<p>review</p>", "text/html; charset=utf-8")


async def start_admin(nursery: trio.Nursery, limits: AdminLimits | None = None) -> Admin:
    sink = MemorySink()
    server = AdminServer(
        AdminConfig(("127.0.0.1", 0), TOKEN), Emitter("test-node", [sink]), limits=limits
    )
    server.route("GET", "/api/sessions/{id}", _echo)
    server.route("GET", "/api/echo", _echo)
    server.route("POST", "/api/echo", _post)
    server.route("GET", "/api/boom", _boom)
    server.route("GET", "/review", _page, auth=False)
    host, port = await nursery.start(server.serve)
    return Admin(host, port, sink, server)


@pytest.fixture
async def admin(nursery: trio.Nursery) -> Admin:
    return await start_admin(nursery)


@dataclass
class CurlResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(*args: str, stdin: bytes = b"") -> CurlResult:
    proc = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", "-D", "-", *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: bytes = proc.stdout
    while True:
        head, _, out = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100:
            break
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return CurlResult(status, headers, out)


async def raw_exchange(admin: Admin, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes."""
    stream = await trio.open_tcp_stream(admin.host, admin.port)
    async with stream:
        await stream.send_all(data)
        got = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                got += chunk
    return got


def _auth() -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {TOKEN}")


async def test_healthz_needs_no_token(admin: Admin) -> None:
    r = await curl(f"{admin.base}/healthz")
    assert r.status == 200
    assert r.json() == {"status": "ok"}
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in r.headers


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing token"),
        ("Bearer wrong-token", "wrong token"),
        ("Basic YWRtaW46YWRtaW4=", "not a bearer token"),
        ("Bearer s3cret-admin-token\xe9", "wrong token"),
    ],
)
async def test_wrong_or_missing_token_is_401_and_audited(
    admin: Admin, header: str | None, reason: str
) -> None:
    args = ["-g", f"{admin.base}/api/sessions/abc?x=1"]
    if header is not None:
        args += ["-H", f"Authorization: {header}"]
    r = await curl(*args)
    assert r.status == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": "unauthorized"}
    [event] = admin.sink.find("admin.auth_failure")
    assert event["event.kind"] == "audit"
    assert event["event.outcome"] == "failure"
    assert event["source.ip"] == "127.0.0.1"
    assert event["url.path"] == "/api/sessions/abc"
    assert event["http.request.method"] == "GET"
    assert event["event.reason"] == reason
    logged = repr(admin.sink.events)
    assert "wrong-token" not in logged
    assert "YWRtaW46" not in logged


async def test_token_ok_with_curl_and_path_params(admin: Admin) -> None:
    r = await curl(*_auth(), f"{admin.base}/api/sessions/0190ab%20cd?q=a&q=b&empty=")
    assert r.status == 200
    assert r.json() == {
        "method": "GET",
        "path": "/api/sessions/0190ab%20cd",
        "params": {"id": "0190ab cd"},
        "query": {"q": ["a", "b"], "empty": [""]},
    }
    assert not admin.sink.find("admin.auth_failure")


async def test_admin_call_client(admin: Admin) -> None:
    status, body = await trio.to_thread.run_sync(
        admin_call, admin.host, admin.port, TOKEN, "GET", "/api/sessions/s1"
    )
    assert status == 200
    assert body["params"] == {"id": "s1"}
    status, body = await trio.to_thread.run_sync(
        admin_call, admin.host, admin.port, TOKEN, "POST", "/api/echo", {"ip": "192.0.2.1"}
    )
    assert status == 200
    assert body["size"] == len(json.dumps({"ip": "192.0.2.1"}))
    status, body = await trio.to_thread.run_sync(
        admin_call, admin.host, admin.port, "nope", "GET", "/api/echo"
    )
    assert (status, body) == (401, {"error": "unauthorized"})


async def test_admin_call_names_the_address_when_nobody_listens() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # bound, never listened: connecting is refused
    with pytest.raises(AdminUnavailable, match=rf"127\.0\.0\.1:{port}.*is mailmoat running"):
        await trio.to_thread.run_sync(admin_call, "127.0.0.1", port, TOKEN, "GET", "/healthz")


async def test_keep_alive_two_requests_on_one_connection(admin: Admin) -> None:
    client = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(admin.host, admin.port)
    async with stream:
        for path in (b"/healthz", b"/api/sessions/two"):
            request = h11.Request(
                method="GET",
                target=path,
                headers=[("Host", "admin"), ("Authorization", f"Bearer {TOKEN}")],
            )
            await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
            body = b""
            response: h11.Response | None = None
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert response is not None
            assert response.status_code == 200
            assert (b"connection", b"close") not in response.headers
            assert client.our_state is h11.DONE
            assert client.their_state is h11.DONE
            client.start_next_cycle()
        assert json.loads(body)["params"] == {"id": "two"}


async def test_pipelined_requests_are_answered_in_order(admin: Admin) -> None:
    one = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    two = b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    got = await raw_exchange(admin, one + two)
    assert got.startswith(b"HTTP/1.1 200 ")
    assert got.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 404 " in got


async def test_chunked_post_body_with_curl(admin: Admin) -> None:
    payload = bytes(range(256)) * 1000  # > 1 KiB: curl also asks for 100-continue
    r = await curl(
        *_auth(),
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        "@-",
        f"{admin.base}/api/echo",
        stdin=payload,
    )
    assert r.status == 200
    assert r.json() == {"size": len(payload), "sha": hash(payload) & 0xFFFF}
    [event] = admin.sink.find("admin.request")
    assert event["event.kind"] == "audit"
    assert event["event.outcome"] == "success"
    assert event["http.request.method"] == "POST"
    assert event["url.path"] == "/api/echo"
    assert event["http.response.status_code"] == 200


async def test_chunked_body_raw_socket(admin: Admin) -> None:
    got = await raw_exchange(
        admin,
        b"POST /api/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body)["size"] == 11


async def test_content_length_over_limit_is_413_before_reading_the_body(admin: Admin) -> None:
    got = await raw_exchange(
        admin,
        b"POST /api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\npartial" % (2 * MiB),
    )
    assert got.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in got.lower()
    assert got.endswith(b'{"error":"request body too large"}')


async def test_chunked_body_over_limit_is_413(admin: Admin) -> None:
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)) + b"0\r\n\r\n"
    got = await raw_exchange(
        admin,
        b"POST /api/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n" + body,
    )
    assert got.startswith(b"HTTP/1.1 413 ")


async def test_curl_upload_over_limit_is_413(admin: Admin) -> None:
    r = await curl(*_auth(), "--data-binary", "@-", f"{admin.base}/api/echo", stdin=b"y" * 2 * MiB)
    assert r.status == 413
    assert r.json() == {"error": "request body too large"}


async def test_unknown_path_is_404(admin: Admin) -> None:
    r = await curl(*_auth(), f"{admin.base}/api/nothing-here")
    assert r.status == 404
    assert r.json() == {"error": "not found"}


async def test_wrong_method_is_405_with_allow(admin: Admin) -> None:
    r = await curl(*_auth(), "-X", "DELETE", f"{admin.base}/api/echo")
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD, POST"
    r = await curl("-X", "POST", f"{admin.base}/healthz")
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD"


async def test_head_is_served_by_the_get_route(admin: Admin) -> None:
    get = await curl(f"{admin.base}/healthz")
    head = await curl("-I", "-o", "/dev/null", f"{admin.base}/healthz")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(get.body))
    assert head.headers["content-type"] == "application/json"
    # and on one keep-alive connection the next response follows right after the headers
    got = await raw_exchange(
        admin,
        b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    first, _, rest = got.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert rest.endswith(b'{"status":"ok"}')


async def test_html_gets_a_strict_csp(admin: Admin) -> None:
    r = await curl(f"{admin.base}/review")
    assert r.status == 200
    assert r.headers["content-security-policy"] == "default-src 'self'"
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 80000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X-Many: 1\r\n" * 2000 + b"\r\n", 431),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40, 400),  # TLS hello
    ],
)
async def test_malformed_request_is_answered_and_closed(
    admin: Admin, data: bytes, status: int
) -> None:
    got = await raw_exchange(admin, data)
    assert got.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close" in got.lower()
    assert b"Traceback" not in got
    assert not admin.sink.find("internal_error")


async def test_handler_exception_is_500_without_leaking(admin: Admin) -> None:
    r = await curl(*_auth(), f"{admin.base}/api/boom")
    assert r.status == 500
    assert r.json() == {"error": "internal error"}
    assert b"secret-detail" not in r.body
    assert b"shadow" not in r.body
    [event] = admin.sink.find("internal_error")
    assert event["event.kind"] == "alert"
    assert event["error.type"] == "RuntimeError"
    assert event["url.path"] == "/api/boom"
    assert "secret-detail" not in repr(event)
    # the server is still up
    assert (await curl(f"{admin.base}/healthz")).status == 200


async def test_idle_connection_is_closed(nursery: trio.Nursery) -> None:
    admin = await start_admin(nursery, AdminLimits(idle_timeout=0.2))
    assert await raw_exchange(admin, b"") == b""


async def test_slow_request_gets_408(nursery: trio.Nursery) -> None:
    admin = await start_admin(nursery, AdminLimits(request_timeout=0.2))
    got = await raw_exchange(admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
    assert got.startswith(b"HTTP/1.1 408 ")


async def test_server_start_is_audited(admin: Admin) -> None:
    [event] = admin.sink.find("admin.start")
    assert event["admin.address"] == f"127.0.0.1:{admin.port}"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "", "mail.example.org"])
def test_non_loopback_admin_address_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="non-loopback address without TLS is refused"):
        check_admin_address(host)
    check_admin_address(host, tls=True)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"]
)
def test_loopback_admin_address_is_accepted(host: str) -> None:
    check_admin_address(host)


def test_server_refuses_a_public_address() -> None:
    with pytest.raises(ConfigError):
        AdminServer(AdminConfig(("0.0.0.0", 9099), TOKEN), Emitter("n"))


def test_config_keeps_the_token_out_of_repr() -> None:
    assert TOKEN not in repr(AdminConfig(("127.0.0.1", 9099), TOKEN))
    with pytest.raises(ConfigError, match="empty"):
        AdminConfig(("127.0.0.1", 9099), " \n")


def test_route_patterns_are_checked() -> None:
    server = AdminServer(AdminConfig(("127.0.0.1", 0), TOKEN), Emitter("n"))
    with pytest.raises(ValueError, match="already registered"):
        server.route("GET", "/healthz", _echo)
    with pytest.raises(ValueError, match="bad parameter"):
        server.route("GET", "/api/{id", _echo)
    with pytest.raises(ValueError, match="upper-case"):
        server.route("get", "/api/x", _echo)
