"""End to end: real clients -> mailmoat -> a real Postfix, all on loopback.

Each test starts a mailmoat node in-process (trio) with a config file written
by the test, drives it with a real client (Python smtplib, swaks, openssl
s_client, raw sockets) and checks what Postfix delivered to its Maildir.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import hashlib
import os
import secrets
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trio

from conftest import MailmoatTLS, StartNode
from mailmoat.demo.postfix import PostfixInstance, find_free_port

pytestmark = pytest.mark.e2e

DOMAIN = "mailmoat.test"


def base_config(postfix: PostfixInstance, *, backend_extra: str = "", listeners: str = "") -> str:
    ports = postfix.ports
    return f"""
[node]
name = "test"
data_dir = "data"
drain_timeout = 2

[tls]
cert = "{{cert}}"
key = "{{key}}"

[log]
events = "none"

{listeners or DEFAULT_LISTENERS}

[[backend]]
name = "mx"
address = "127.0.0.1:{ports.smtp}"
{backend_extra}

[[backend]]
name = "submission"
address = "127.0.0.1:{ports.submission}"
"""


DEFAULT_LISTENERS = """
[[listener]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "mx"

[[listener]]
name = "submission"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
require_tls = true
backend = "submission"

[[listener]]
name = "smtps"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "implicit"
backend = "submission"
"""


def make_message(subject: str, body: str = "hello through mailmoat\r\n") -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@{DOMAIN}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.org>\r\n\r\n{body}"
    ).encode()


async def wait_for_subject(
    postfix: PostfixInstance, user: str, subject: str, timeout: float = 20
) -> email.message.Message:
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        for path in postfix.messages(user):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
            if msg["Subject"] == subject:
                return msg
        await trio.sleep(0.05)
    raise AssertionError(
        f"no message {subject!r} for {user}; log tail: {postfix.log_lines()[-10:]}"
    )


def count_subject(postfix: PostfixInstance, user: str, subject: str) -> int:
    """How many delivered messages carry this Subject header (not body text)."""
    n = 0
    for path in postfix.messages(user):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        if msg["Subject"] == subject:
            n += 1
    return n


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


# --------------------------------------------------------------------------- plain relay


async def test_plain_relay_with_smtplib(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(base_config(postfix))
    subject = unique("plain")

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", rn.port("smtp"), timeout=20) as s:
            s.ehlo("client.example.org")
            return s.sendmail("sender@example.org", [f"alice@{DOMAIN}"], make_message(subject))

    refused = await trio.to_thread.run_sync(send)
    assert refused == {}
    msg = await wait_for_subject(postfix, "alice", subject)
    assert msg.get_payload() == "hello through mailmoat\n"
    closed = await rn.wait_for("session.close", session__listener="smtp")
    opened = rn.events.find("session.open", session__listener="smtp")
    assert closed["session.close_reason"] == "client_quit"
    assert closed["smtp.messages"] == 1
    assert closed["client.bytes"] > 0
    assert closed["backend.bytes_sent"] > 0
    assert opened[-1]["session.id"] == closed["session.id"]


async def test_swaks_plain_and_starttls(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(base_config(postfix))
    for extra in ([], ["-tls"]):
        subject = unique("swaks")
        result = await trio.run_process(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{rn.port('smtp')}",
                "--to",
                f"bob@{DOMAIN}",
                "--from",
                "sender@example.org",
                "--header",
                f"Subject: {subject}",
                *extra,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        out = result.stdout.decode()
        assert result.returncode == 0, out + result.stderr.decode()
        if extra:
            assert "<-  220 2.0.0 Ready to start TLS" in out
            assert "TLS started with cipher" in out
        await wait_for_subject(postfix, "bob", subject)
    tls_events = rn.events.find("tls.handshake", tls__leg="client")
    assert tls_events
    assert tls_events[-1]["tls.version"] in ("TLSv1.2", "TLSv1.3")
    assert 0 < tls_events[-1]["tls.handshake_ms"] < 20_000  # the driver timed it


# --------------------------------------------------------------------------- TLS


async def test_starttls_submission_requires_tls(
    postfix: PostfixInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS
) -> None:
    rn = await start_node(base_config(postfix))
    subject = unique("submission")

    def session() -> tuple[tuple[int, bytes], bool, bool, bool]:
        with smtplib.SMTP("127.0.0.1", rn.port("submission"), timeout=20) as s:
            s.ehlo("client.example.org")
            before_tls = s.has_extn("starttls")
            refused = s.docmd("MAIL", "FROM:<sender@example.org>")
            s.starttls(context=mailmoat_tls.client_context())
            s.ehlo("client.example.org")
            after_tls = s.has_extn("starttls")
            s.sendmail("sender@example.org", [f"carol@{DOMAIN}"], make_message(subject))
            return refused, before_tls, after_tls, s.has_extn("size")

    refused, before_tls, after_tls, has_size = await trio.to_thread.run_sync(session)
    assert refused == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert before_tls is True
    assert after_tls is False  # removed once TLS is active
    assert has_size
    await wait_for_subject(postfix, "carol", subject)


async def test_implicit_tls_smtplib_and_swaks(
    postfix: PostfixInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS
) -> None:
    rn = await start_node(base_config(postfix))
    subject = unique("smtps")

    def send() -> str:
        with smtplib.SMTP_SSL(
            "localhost", rn.port("smtps"), context=mailmoat_tls.client_context(), timeout=20
        ) as s:
            s.ehlo("client.example.org")
            assert not s.has_extn("starttls")
            s.sendmail("sender@example.org", [f"alice@{DOMAIN}"], make_message(subject))
            sock = s.sock
            assert isinstance(sock, ssl.SSLSocket)
            return sock.version() or ""

    version = await trio.to_thread.run_sync(send)
    assert version in ("TLSv1.2", "TLSv1.3")
    await wait_for_subject(postfix, "alice", subject)

    subject2 = unique("smtps-swaks")
    result = await trio.run_process(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{rn.port('smtps')}",
            "--tls-on-connect",
            "--to",
            f"alice@{DOMAIN}",
            "--header",
            f"Subject: {subject2}",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode()
    await wait_for_subject(postfix, "alice", subject2)


async def test_openssl_s_client_min_version(
    postfix: PostfixInstance, start_node: StartNode
) -> None:
    text = base_config(postfix).replace('key = "{key}"', 'key = "{key}"\nmin_version = "1.3"')
    rn = await start_node(text)
    port = rn.port("smtps")

    async def s_client(*flags: str) -> tuple[int, str]:
        """Talk like a person at the keyboard: a line, wait for the answer, the next."""
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-ign_eof", *flags]
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdout = proc.stdout
        out = b""

        async def read_until(marker: bytes) -> bool:
            nonlocal out
            while marker not in out:
                chunk = await stdout.receive_some(4096)
                if not chunk:
                    return False
                out += chunk
            return True

        try:
            with trio.fail_after(20):
                if await read_until(b"220 "):
                    await proc.stdin.send_all(b"EHLO openssl.example.org\r\n")
                    if await read_until(b"\n250 "):
                        await proc.stdin.send_all(b"QUIT\r\n")
                        await read_until(b"221 ")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await proc.stdin.aclose()
                while chunk := await stdout.receive_some(4096):
                    out += chunk
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    rc, out = await s_client("-tls1_3")
    assert "250-" in out, out
    assert "221" in out, out
    rc, out = await s_client("-tls1_2")
    assert rc != 0
    assert "250-" not in out
    failed = rn.events.find("tls.handshake", tls__leg="client")
    assert any(e["event.outcome"] == "failure" for e in failed)
    assert all(e["tls.handshake_ms"] >= 0 for e in failed)


# --------------------------------------------------------------------------- big messages


async def test_ten_megabyte_message_intact(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(base_config(postfix))
    subject = unique("big")
    # 10 MB of base64-ish lines, including lines that start with "." (dot-stuffing)
    rnd = secrets.token_bytes(7_600_000)
    import base64

    b64 = base64.encodebytes(rnd).decode()
    lines = b64.splitlines()
    lines = [("." + line) if i % 97 == 0 else line for i, line in enumerate(lines)]
    body = "\r\n".join(lines) + "\r\n"
    message = make_message(subject, body)
    assert len(message) > 10_000_000
    want = hashlib.sha256(body.encode()).hexdigest()

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", rn.port("smtp"), timeout=60) as s:
            s.sendmail("sender@example.org", [f"bob@{DOMAIN}"], message)

    await trio.to_thread.run_sync(send)
    msg = await wait_for_subject(postfix, "bob", subject, timeout=60)
    got = msg.get_payload()
    assert isinstance(got, str)
    got_crlf = got.replace("\r\n", "\n").replace("\n", "\r\n")
    assert hashlib.sha256(got_crlf.encode()).hexdigest() == want


# --------------------------------------------------------------------------- pipelining


def recv_replies(sock: socket.socket, count: int, timeout: float = 10) -> list[bytes]:
    """Read until `count` complete replies arrived; returns the final lines."""
    sock.settimeout(timeout)
    buf = b""
    finals: list[bytes] = []
    while len(finals) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if (len(line) >= 4 and line[3:4] == b" ") or len(line) == 3:
                finals.append(line)
    return finals


async def test_pipelined_commands(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(base_config(postfix))
    subject = unique("pipelined")
    port = rn.port("smtp")

    def session() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            replies = recv_replies(sock, 1)
            sock.sendall(b"EHLO pipeliner.example.org\r\n")
            replies += recv_replies(sock, 1)
            # one write: a whole RFC 2920 group, with an unknown recipient in the middle
            sock.sendall(
                b"MAIL FROM:<sender@example.org>\r\n"
                + f"RCPT TO:<alice@{DOMAIN}>\r\n".encode()
                + f"RCPT TO:<nobody-here@{DOMAIN}>\r\n".encode()
                + f"RCPT TO:<carol@{DOMAIN}>\r\n".encode()
                + b"DATA\r\n"
            )
            replies += recv_replies(sock, 5)
            sock.sendall(make_message(subject) + b".\r\nQUIT\r\n")
            replies += recv_replies(sock, 2)
            return replies

    replies = await trio.to_thread.run_sync(session)
    codes = [r[:3] for r in replies]
    assert codes == [b"220", b"250", b"250", b"250", b"550", b"250", b"354", b"250", b"221"], (
        replies
    )
    await wait_for_subject(postfix, "alice", subject)
    await wait_for_subject(postfix, "carol", subject)

    # swaks' own pipelining mode, end to end
    subject2 = unique("swaks-pipe")
    r = await trio.run_process(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{port}",
            "--pipeline",
            "--to",
            f"bob@{DOMAIN}",
            "--header",
            f"Subject: {subject2}",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout.decode()
    await wait_for_subject(postfix, "bob", subject2)


async def test_ehlo_rewritten(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(base_config(postfix))

    def ehlo() -> bytes:
        with socket.create_connection(("127.0.0.1", rn.port("smtp")), timeout=10) as sock:
            recv_replies(sock, 1)
            sock.sendall(b"EHLO x.example.org\r\n")
            sock.settimeout(10)
            data = b""
            while not data.endswith(b"\r\n") or b"\r\n250 " not in b"\r\n" + data:
                data += sock.recv(4096)
            return data

    reply = await trio.to_thread.run_sync(ehlo)
    keywords = {line[4:].split(b" ")[0].upper() for line in reply.split(b"\r\n")[1:] if line}
    assert b"STARTTLS" in keywords
    assert b"PIPELINING" in keywords
    # Postfix offers these to 127.0.0.1; mailmoat does not handle them, so hides them
    assert b"XCLIENT" not in keywords
    assert b"CHUNKING" not in keywords
    assert b"ETRN" not in keywords


async def test_starttls_injection_refused(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(base_config(postfix))

    def inject() -> tuple[list[bytes], bytes]:
        with socket.create_connection(("127.0.0.1", rn.port("smtp")), timeout=10) as sock:
            recv_replies(sock, 1)
            sock.sendall(b"EHLO x.example.org\r\n")
            recv_replies(sock, 1)
            sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
            replies = recv_replies(sock, 1)
            rest = sock.recv(100)
            return replies, rest

    replies, rest = await trio.to_thread.run_sync(inject)
    assert replies[0].startswith(b"554 5.5.1")
    assert rest == b""  # closed
    alerts = rn.events.find("tls.starttls_injection")
    assert alerts
    assert alerts[0]["event.kind"] == "alert"
    assert "MAIL FROM" in alerts[0]["tls.injected_preview"]


# --------------------------------------------------------------------------- backend trouble


async def test_backend_down_gives_421(postfix: PostfixInstance, start_node: StartNode) -> None:
    dead = find_free_port()
    text = base_config(postfix).replace(
        f'address = "127.0.0.1:{postfix.ports.smtp}"', f'address = "127.0.0.1:{dead}"'
    )
    rn = await start_node(text)

    def connect() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", rn.port("smtp")), timeout=10) as sock:
            return recv_replies(sock, 1)

    replies = await trio.to_thread.run_sync(connect)
    assert replies == [b"421 4.3.2 Service not available, closing transmission channel"]
    assert rn.events.find("backend.failure")


async def test_backend_list_tried_in_order(postfix: PostfixInstance, start_node: StartNode) -> None:
    dead = find_free_port()
    text = base_config(postfix).replace(
        f'address = "127.0.0.1:{postfix.ports.smtp}"',
        f'address = ["127.0.0.1:{dead}", "127.0.0.1:{postfix.ports.smtp}"]',
    )
    rn = await start_node(text)
    subject = unique("failover")

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", rn.port("smtp"), timeout=20) as s:
            s.sendmail("sender@example.org", [f"alice@{DOMAIN}"], make_message(subject))

    await trio.to_thread.run_sync(send)
    await wait_for_subject(postfix, "alice", subject)
    closed = await rn.wait_for("session.close")
    assert closed["backend.address"] == f"127.0.0.1:{postfix.ports.smtp}"


async def test_backend_failing_mid_session(start_node: StartNode, tmp_path: Path) -> None:
    """A backend that dies after the greeting: the client gets 421 4.3.2 and a clean close."""

    async def flaky_backend(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        stream = await listeners[0].accept()
        await listeners[0].aclose()
        await stream.send_all(b"220 flaky ESMTP\r\n")
        await stream.receive_some(100)  # EHLO
        await stream.aclose()  # die

    async with trio.open_nursery() as n:
        port = await n.start(flaky_backend)
        rn = await start_node(f"""
[node]
name = "t"
[log]
events = "none"
[[listener]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:0"
backend = "b"
[[backend]]
name = "b"
address = "127.0.0.1:{port}"
""")

        def talk() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", rn.port("smtp")), timeout=10) as sock:
                out = recv_replies(sock, 1)
                sock.sendall(b"EHLO x\r\n")
                out += recv_replies(sock, 1)
                out.append(sock.recv(10))
                return out

        replies = await trio.to_thread.run_sync(talk)
    assert replies == [
        b"220 flaky ESMTP",
        b"421 4.3.2 Service not available, closing transmission channel",
        b"",
    ]


async def test_backend_starttls_and_implicit_tls(
    postfix: PostfixInstance, start_node: StartNode, postfix_tls: object
) -> None:
    ca_file = postfix_tls.ca_file  # type: ignore[attr-defined]
    listeners = """
[[listener]]
name = "via-starttls"
protocol = "smtp"
listen = "127.0.0.1:0"
backend = "sub-starttls"

[[listener]]
name = "via-implicit"
protocol = "smtp"
listen = "127.0.0.1:0"
backend = "sub-implicit"
"""
    text = (
        base_config(postfix, listeners=listeners)
        + f"""
[[backend]]
name = "sub-starttls"
address = "127.0.0.1:{postfix.ports.submission}"
tls = "starttls"
ca = "{ca_file}"
server_name = "mx.mailmoat.test"

[[backend]]
name = "sub-implicit"
address = "127.0.0.1:{postfix.ports.smtps}"
tls = "implicit"
ca = "{ca_file}"
server_name = "mx.mailmoat.test"
"""
    )
    rn = await start_node(text)
    for listener in ("via-starttls", "via-implicit"):
        subject = unique(listener)

        def send(port: int = rn.port(listener), subject: str = subject) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.sendmail("sender@example.org", [f"alice@{DOMAIN}"], make_message(subject))

        await trio.to_thread.run_sync(send)
        await wait_for_subject(postfix, "alice", subject)
    backend_tls = rn.events.find("tls.handshake", tls__leg="backend")
    assert len(backend_tls) >= 2
    assert all(e["event.outcome"] == "success" for e in backend_tls)
    # STARTTLS to the backend is timed on its own; implicit TLS is part of the connect
    starttls = [e for e in backend_tls if e["session.listener"] == "via-starttls"]
    assert starttls
    assert all(e["tls.handshake_ms"] > 0 for e in starttls)
    closes = rn.events.find("session.close")
    assert {c["session.listener"] for c in closes if c["backend.connect_ms"] > 0} >= {
        "via-starttls",
        "via-implicit",
    }
    # Postfix logged a TLS connection from mailmoat on both
    log = "\n".join(postfix.log_lines())
    assert "Anonymous TLS connection established" in log or "TLS connection established" in log


async def test_backend_tls_wrong_ca_sends_nothing(
    postfix: PostfixInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS
) -> None:
    """Backend certificate not trusted: the client gets 421 and an alert is emitted."""
    listeners = """
[[listener]]
name = "l"
protocol = "smtp"
listen = "127.0.0.1:0"
backend = "bad"
"""
    # mailmoat's own CA did not sign Postfix's certificate
    ca_path = mailmoat_tls.cert.parent / "other-ca.pem"
    mailmoat_tls.ca.cert_pem.write_to_path(str(ca_path))
    text = (
        base_config(postfix, listeners=listeners)
        + f"""
[[backend]]
name = "bad"
address = "127.0.0.1:{postfix.ports.smtps}"
tls = "implicit"
ca = "{ca_path}"
"""
    )
    rn = await start_node(text)

    def connect() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", rn.port("l")), timeout=10) as sock:
            return recv_replies(sock, 1)

    assert await trio.to_thread.run_sync(connect) == [
        b"421 4.3.2 Service not available, closing transmission channel"
    ]
    alerts = rn.events.find("backend.tls_failed")
    assert alerts
    assert alerts[0]["event.kind"] == "alert"


# --------------------------------------------------------------------------- timeouts, IPv6


async def test_idle_timeout(postfix: PostfixInstance, start_node: StartNode) -> None:
    text = base_config(postfix).replace(
        'tls = "starttls"\nbackend = "mx"',
        'tls = "starttls"\nbackend = "mx"\nidle_timeout = 0.5',
        1,
    )
    rn = await start_node(text)

    def idle() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", rn.port("smtp")), timeout=10) as sock:
            return recv_replies(sock, 2)

    t0 = time.monotonic()
    replies = await trio.to_thread.run_sync(idle)
    assert replies[1:] == [b"421 4.4.2 Timeout exceeded, closing transmission channel"], replies
    assert time.monotonic() - t0 < 8
    assert (await rn.wait_for("session.close"))["session.close_reason"] == "client_timeout"


async def test_ipv6_listener(postfix: PostfixInstance, start_node: StartNode) -> None:
    if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
        pytest.fail("IPv6 loopback is not available on this machine")
    text = base_config(postfix).replace(
        'listen = "127.0.0.1:0"', 'listen = ["127.0.0.1:0", "[::1]:0"]', 1
    )
    rn = await start_node(text)
    v6 = [a for a in rn.node.bound["smtp"] if ":" in a.host]
    assert v6
    subject = unique("ipv6")

    def send() -> None:
        with smtplib.SMTP("::1", v6[0].port, timeout=20) as s:
            s.sendmail("sender@example.org", [f"alice@{DOMAIN}"], make_message(subject))

    await trio.to_thread.run_sync(send)
    await wait_for_subject(postfix, "alice", subject)
    assert any(e["client.ip"] == "::1" for e in rn.events.find("session.open"))
