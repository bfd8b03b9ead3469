"""The node as an operator runs it: `mailmoat run` / `mailmoat demo` as real processes.

SIGTERM drains (no new sessions, sessions in flight finish, the rest get 421
after drain_timeout), SIGHUP reloads certificates, the demo delivers mail.
"""

from __future__ import annotations

import http.client
import imaplib
import json
import os
import random
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailmoat.demo.postfix import PostfixInstance

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


class Proc:
    """A mailmoat subprocess whose stdout (JSON events, banner) we read line by line."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "mailmoat.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        self.lines: list[str] = []
        self._buf = b""

    def read_until(self, predicate: Any, timeout: float = 20) -> str:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while time.monotonic() < deadline:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode()
                self.lines.append(line)
                if predicate(line):
                    return line
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._buf += chunk
        err = self.p.stderr.read().decode() if self.p.poll() is not None and self.p.stderr else ""
        raise AssertionError(f"timed out; stdout so far: {self.lines[-20:]}; stderr: {err}")

    def event(self, action: str, timeout: float = 20) -> dict[str, Any]:
        def match(line: str) -> bool:
            return line.startswith("{") and json.loads(line).get("event.action") == action

        return dict(json.loads(self.read_until(match, timeout)))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def proc_factory() -> Iterator[Any]:
    procs: list[Proc] = []

    def make(args: list[str], cwd: Path | None = None) -> Proc:
        p = Proc(args, cwd)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


def write_config(
    tmp_path: Path, postfix: PostfixInstance, cert: Path, key: Path, drain: float
) -> Path:
    cfg = tmp_path / "mailmoat.toml"
    cfg.write_text(f"""
[node]
name = "lifecycle"
data_dir = "data"
drain_timeout = {drain}

[tls]
cert = "{cert}"
key = "{key}"

[log]
events = "stdout"

[[listener]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "mx"

[[listener]]
name = "smtps"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "implicit"
backend = "mx"

[[backend]]
name = "mx"
address = "127.0.0.1:{postfix.ports.smtp}"
""")
    return cfg


def issue(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def ports_of(proc: Proc) -> dict[str, int]:
    out: dict[str, int] = {}
    for _ in range(2):
        ev = proc.event("listener.start")
        out[ev["session.listener"]] = int(ev["listener.addresses"][0].rsplit(":", 1)[1])
    return out


def reply(f: Any) -> bytes:
    while True:
        line: bytes = f.readline()
        if not line or line[3:4] != b"-":
            return line


def test_sigterm_drains(tmp_path: Path, postfix: PostfixInstance, proc_factory: Any) -> None:
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path / "tls")
    proc = proc_factory(["run", "-c", str(write_config(tmp_path, postfix, cert, key, drain=5))])
    port = ports_of(proc)["smtp"]

    busy = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = busy.makefile("rb")
    assert reply(f).startswith(b"220")
    busy.sendall(b"EHLO drain.example.org\r\n")
    assert reply(f).startswith(b"250")
    busy.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@mailmoat.test>\r\n")
    assert reply(f).startswith(b"250")
    assert reply(f).startswith(b"250")

    proc.p.send_signal(signal.SIGTERM)
    proc.event("node.drain")
    # no new sessions once draining
    refused = False
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            refused = True
            break
        time.sleep(0.05)
    assert refused
    # the session in flight finishes its message
    busy.sendall(b"DATA\r\n")
    assert reply(f).startswith(b"354")
    busy.sendall(b"Subject: drained\r\n\r\nbody\r\n.\r\n")
    assert reply(f).startswith(b"250")
    busy.sendall(b"QUIT\r\n")
    assert reply(f).startswith(b"221")
    busy.close()
    assert proc.p.wait(10) == 0
    postfix.wait_for_messages("alice", 1)


def test_drain_timeout_says_421(
    tmp_path: Path, postfix: PostfixInstance, proc_factory: Any
) -> None:
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path / "tls")
    proc = proc_factory(["run", "-c", str(write_config(tmp_path, postfix, cert, key, drain=0.5))])
    port = ports_of(proc)["smtp"]
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    assert reply(f).startswith(b"220")
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    assert reply(f) == b"421 4.3.2 Server shutting down, closing transmission channel\r\n"
    assert time.monotonic() - t0 < 5
    assert proc.p.wait(10) == 0
    s.close()


def _peer_serial(port: int, ca: trustme.CA) -> int:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_certificates(
    tmp_path: Path, postfix: PostfixInstance, proc_factory: Any
) -> None:
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path / "tls")
    proc = proc_factory(["run", "-c", str(write_config(tmp_path, postfix, cert, key, drain=2))])
    ports = ports_of(proc)
    first = _peer_serial(ports["smtps"], ca)

    # a session that stays open across the reload
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    old = smtplib.SMTP_SSL("localhost", ports["smtps"], context=ctx, timeout=10)
    old.ehlo("old.example.org")

    issue(ca, tmp_path / "tls")  # new certificate, same files
    proc.p.send_signal(signal.SIGHUP)
    ev = proc.event("tls.reload")
    assert ev["event.outcome"] == "success"
    second = _peer_serial(ports["smtps"], ca)
    assert second != first
    assert old.noop()[0] == 250  # the old session did not notice
    old.quit()

    # a broken key keeps the old certificate in force
    (tmp_path / "tls" / "key.pem").write_text("not a key")
    proc.p.send_signal(signal.SIGHUP)
    ev = proc.event("tls.reload")
    assert ev["event.outcome"] == "failure"
    assert "key.pem" in ev["error.message"]
    assert _peer_serial(ports["smtps"], ca) == second


def _free_base() -> int:
    for _ in range(100):
        base = random.randrange(20000, 40000, 1000)
        ok = True
        for off in (25, 587, 465, 99, 143, 993, 80, 443):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + off))
                except OSError:
                    ok = False
        if ok:
            return base
    raise AssertionError("no free port base")


@pytest.mark.parametrize("backend", ["sink", "postfix"])
def test_demo_delivers(tmp_path: Path, proc_factory: Any, backend: str) -> None:
    base = _free_base()
    data = tmp_path / "demo"
    proc = proc_factory(
        ["demo", "--data-dir", str(data), "--port-base", str(base), "--backend", backend]
    )
    proc.read_until(lambda line: line.startswith("Stop with Ctrl-C"), timeout=40)
    banner = "\n".join(proc.lines)
    assert f"swaks --server 127.0.0.1:{base + 25}" in banner
    assert (data / "tls" / "cert.pem").is_file()
    assert (data / "mailmoat.toml").is_file()
    rules_line = next(x for x in proc.lines if x.startswith("Rules:"))
    assert int(rules_line.split()[1]) >= 10, rules_line  # the shipped rule sets are loaded

    # with Dovecot behind Postfix, submission wants SMTP AUTH, as the banner says
    auth = ["--auth-user", "bob", "--auth-password", "bobpw"] if "--auth-user" in banner else []
    r = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{base + 587}",
            "-tls",
            *auth,
            "--to",
            "alice@mailmoat.test",
            "--header",
            "Subject: demo-check",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout
    if backend == "sink":
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list((data / "mail").glob("*.eml")):
            time.sleep(0.05)
        (stored,) = (data / "mail").glob("*.eml")
        assert b"Subject: demo-check" in stored.read_bytes()
    else:
        line = next(x for x in proc.lines if x.startswith("Delivered mail:"))
        maildir = Path(line.split(":", 1)[1].split()[0].replace("<user>", "alice"))
        deadline = time.monotonic() + 20
        found: list[Path] = []
        while time.monotonic() < deadline and not found:
            found = list(maildir.glob("new/*"))
            time.sleep(0.05)
        assert found
        assert b"Subject: demo-check" in found[0].read_bytes()
        # with Dovecot there, the same message reads back through mailmoat's IMAP
        assert any(x.startswith("  imap ") for x in proc.lines)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the demo's self-signed certificate
        with imaplib.IMAP4("127.0.0.1", base + 143, timeout=20) as imap:
            assert "LOGINDISABLED" in imap.capabilities
            imap.starttls(ssl_context=ctx)
            imap.login("alice", "alicepw")
            imap.select("INBOX", readonly=True)
            typ, hits = imap.search(None, "SUBJECT", "demo-check")
            assert typ == "OK"
            assert hits[0], hits
    # the webmail: a login through mailmoat's HTTPS listener, and the port-80 redirect
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the demo's self-signed certificate
    conn = http.client.HTTPSConnection("127.0.0.1", base + 443, context=ctx, timeout=20)
    conn.request(
        "POST",
        "/login",
        body="user=alice&password=alicepw",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    reply = conn.getresponse()
    assert reply.status == 302
    assert "webmail_session=" in (reply.getheader("Set-Cookie") or "")
    conn.close()
    plain = http.client.HTTPConnection("127.0.0.1", base + 80, timeout=20)
    plain.request("GET", "/mail/")
    moved = plain.getresponse()
    assert moved.status == 301
    assert moved.getheader("Location") == f"https://127.0.0.1:{base + 443}/mail/"
    plain.close()
    proc.p.send_signal(signal.SIGTERM)
    assert proc.p.wait(20) == 0
