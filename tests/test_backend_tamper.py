"""End to end: a tampering backend between mailmoat and its mail server.

The backend here is our own small SMTP / IMAP server on loopback (trio, with
``trio.SSLStream`` for its TLS side) that plays a man in the middle on the
backend leg: it strips STARTTLS from EHLO / CAPABILITY, refuses STARTTLS,
injects a reply behind its STARTTLS answer, or presents a certificate that
must not verify (another CA, another name, a key that does not match the
pin).  After tampering it keeps serving like a real server -- EHLO, AUTH,
LOGIN, MAIL, DATA -- in plaintext or over the tampered TLS, so a mailmoat
that went on with the session *would* hand it the client's password.  It
records every byte it received from mailmoat, in the clear and decrypted.

The honest mode (a real STARTTLS with the certificate mailmoat trusts) shows
that the recording does see credentials when they flow; the tampering modes
then prove that none flowed.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import json
import re
import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import MailmoatTLS, RunningNode, StartNode

pytestmark = pytest.mark.e2e
T = TypeVar("T")

USER = "u"
PASSWORD = "hunter2-secret"
BACKEND_NAME = "backend.tamper.test"
MAILMOAT_EHLO = "mailmoat.tamper.test"
#: what must never reach a tampered backend, in any form a client may send it
SECRETS = (
    PASSWORD.encode(),
    base64.b64encode(PASSWORD.encode()),  # AUTH LOGIN
    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()),  # AUTH PLAIN (smtplib, swaks)
)
R_421 = b"421 4.3.2 Service not available, closing transmission channel"
B_BYE = b"* BYE [UNAVAILABLE]"

Mode = Literal[
    "honest",
    "strip_starttls",  # EHLO / CAPABILITY without STARTTLS (and STARTTLS unknown)
    "refuse_starttls",  # 454 / NO to STARTTLS
    "inject",  # a second reply in the same write as the STARTTLS answer
    "bad_cert",  # the right names, signed by a CA mailmoat does not trust
    "pin_mismatch",  # the trusted certificate, but mailmoat pins another key
    "wrong_name",  # signed by the trusted CA, issued to another name
]
TAMPER_MODES: tuple[Mode, ...] = (
    "strip_starttls",
    "refuse_starttls",
    "inject",
    "bad_cert",
    "pin_mismatch",
    "wrong_name",
)
TLS_FAILED_REASON = {
    "bad_cert": "verif",  # OpenSSL: "certificate verify failed"
    "pin_mismatch": "certificate pin mismatch",
    "wrong_name": "certificate hostname mismatch",
}
SMTP_ALERT: dict[Mode, str] = {
    "strip_starttls": "backend.starttls_missing",
    "refuse_starttls": "backend.starttls_refused",
    "inject": "backend.starttls_injection",
    "bad_cert": "backend.tls_failed",
    "pin_mismatch": "backend.tls_failed",
    "wrong_name": "backend.tls_failed",
}
SMTP_INJECTED = b"250 injected\r\n"
IMAP_INJECTED = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n"


async def run(fn: Callable[..., T], *args: Any) -> T:
    """A blocking client in a thread; an enclosing ``trio.fail_after`` abandons it."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


# --------------------------------------------------------------------------- certificates


def spki_pin(leaf: trustme.LeafCert) -> str:
    """The hex SHA-256 of the leaf's SubjectPublicKeyInfo (what ``pin_sha256`` holds)."""
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


@dataclass(frozen=True)
class BackendPKI:
    """The CA mailmoat trusts for its backend, and the certificates a backend may show."""

    ca_file: Path
    honest: trustme.LeafCert  # trusted CA, the backend's names
    rogue: trustme.LeafCert  # another CA, the same names
    misnamed: trustme.LeafCert  # trusted CA, a name that is not the backend's

    def leaf_for(self, mode: Mode) -> trustme.LeafCert:
        if mode == "bad_cert":
            return self.rogue
        if mode == "wrong_name":
            return self.misnamed
        return self.honest

    def server_context(self, mode: Mode) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.leaf_for(mode).configure_cert(ctx)
        return ctx

    def backend_toml(self, mode: Mode, *, server_name: bool = True) -> str:
        """The TLS keys of the ``[[backend]]`` table for a test in ``mode``."""
        if mode == "pin_mismatch":
            # a pin, valid in form, of a key the backend does not have
            return f'pin_sha256 = "{spki_pin(self.rogue)}"\n'
        lines = f'ca = "{self.ca_file}"\n'
        if server_name:
            lines += f'server_name = "{BACKEND_NAME}"\n'
        return lines


@pytest.fixture(scope="module")
def backend_pki(tmp_path_factory: pytest.TempPathFactory) -> BackendPKI:
    trusted, rogue = trustme.CA(), trustme.CA()
    d = tmp_path_factory.mktemp("backend-pki")
    ca_file = d / "backend-ca.pem"
    trusted.cert_pem.write_to_path(str(ca_file))
    return BackendPKI(
        ca_file=ca_file,
        honest=trusted.issue_cert(BACKEND_NAME, "127.0.0.1"),
        rogue=rogue.issue_cert(BACKEND_NAME, "127.0.0.1"),
        misnamed=trusted.issue_cert("evil.example.net"),
    )


# --------------------------------------------------------------------------- the backend


@dataclass
class Recording:
    """Everything one connection from mailmoat sent: in the clear, then decrypted."""

    plain: bytearray = field(default_factory=bytearray)
    decrypted: bytearray = field(default_factory=bytearray)
    tls_started: bool = False
    handshake_ok: bool = False
    handshake_error: str = ""
    closed: bool = False

    def all(self) -> bytes:
        return bytes(self.plain + self.decrypted)


class _Conn:
    """A line reader over a stream that may be upgraded to TLS, recording all it reads."""

    def __init__(self, stream: trio.abc.Stream, rec: Recording) -> None:
        self.stream = stream
        self.rec = rec
        self.buf = bytearray()
        self.tls = False

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        (self.rec.decrypted if self.tls else self.rec.plain).extend(data)
        self.buf.extend(data)
        return True

    async def line(self) -> bytes | None:
        while b"\n" not in self.buf:
            if not await self._fill():
                return None
        end = self.buf.index(b"\n") + 1
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def start_tls(self, ctx: ssl.SSLContext) -> bool:
        # RFC 3207 4.2 / RFC 9051 6.2.1: what came before the handshake is void
        # (it stays in the recording, though)
        self.buf.clear()
        self.rec.tls_started = True
        tls = trio.SSLStream(self.stream, ctx, server_side=True)
        try:
            with trio.fail_after(10):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.rec.handshake_error = repr(exc.__cause__ or exc)
            return False
        self.rec.handshake_ok = True
        self.stream = tls
        self.tls = True
        return True


@dataclass
class TamperBackend:
    """A backend that misbehaves in ``mode`` and otherwise serves like a real one."""

    protocol: Literal["smtp", "imap"]
    mode: Mode
    pki: BackendPKI
    implicit: bool = False
    port: int = 0
    connections: list[Recording] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    @property
    def ctx(self) -> ssl.SSLContext:
        return self.pki.server_context(self.mode)

    async def _handle(self, stream: trio.SocketStream) -> None:
        rec = Recording()
        self.connections.append(rec)
        conn = _Conn(stream, rec)
        try:
            with trio.move_on_after(30):
                if self.implicit and not await conn.start_tls(self.ctx):
                    return
                if self.protocol == "smtp":
                    await self._smtp(conn)
                else:
                    await self._imap(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # mailmoat hung up on us: that is what a careful proxy does
        finally:
            rec.closed = True
            await trio.aclose_forcefully(conn.stream)

    # ------------------------------------------------------------------ SMTP

    async def _smtp(self, conn: _Conn) -> None:
        await conn.send(f"220 {BACKEND_NAME} ESMTP tamper\r\n".encode())
        while (line := await conn.line()) is not None:
            words = line.split()
            verb = words[0].upper() if words else b""
            if verb in (b"EHLO", b"HELO"):
                exts = ["SIZE 10240000"]
                if not conn.tls and self.mode != "strip_starttls":
                    exts.append("STARTTLS")
                # a real server would not offer AUTH in the clear; a MITM does
                exts += ["AUTH PLAIN LOGIN", "8BITMIME", "ENHANCEDSTATUSCODES"]
                lines = [BACKEND_NAME, *exts]
                reply = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
                await conn.send(reply.encode())
            elif verb == b"STARTTLS":
                if conn.tls or self.mode == "strip_starttls":
                    await conn.send(b"502 5.5.1 Error: command not implemented\r\n")
                elif self.mode == "refuse_starttls":
                    await conn.send(b"454 4.7.0 TLS not available due to temporary reason\r\n")
                else:
                    if self.mode == "inject":
                        await conn.send(b"220 ready\r\n" + SMTP_INJECTED)  # one write
                    else:
                        await conn.send(b"220 2.0.0 Ready to start TLS\r\n")
                    if not await conn.start_tls(self.ctx):
                        return
            elif verb == b"AUTH":
                mech = words[1].upper() if len(words) > 1 else b""
                if mech == b"LOGIN":
                    if len(words) < 3:
                        await conn.send(b"334 VXNlcm5hbWU6\r\n")
                        await conn.line()
                    await conn.send(b"334 UGFzc3dvcmQ6\r\n")
                    await conn.line()
                elif len(words) < 3:
                    await conn.send(b"334 \r\n")
                    await conn.line()
                await conn.send(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"DATA":
                await conn.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                while (body := await conn.line()) is not None and body != b".\r\n":
                    pass
                await conn.send(b"250 2.0.0 Ok: queued as TAMPER\r\n")
            elif verb == b"QUIT":
                await conn.send(b"221 2.0.0 Bye\r\n")
                return
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                await conn.send(b"250 2.0.0 Ok\r\n")
            else:
                await conn.send(b"502 5.5.2 Error: command not recognized\r\n")

    # ------------------------------------------------------------------ IMAP

    def _caps(self, conn: _Conn) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "ID", "ENABLE", "IDLE", "AUTH=PLAIN"]
        if not conn.tls and self.mode != "strip_starttls":
            caps.append("STARTTLS")
        return " ".join(caps)

    async def _imap(self, conn: _Conn) -> None:
        await conn.send(f"* OK [CAPABILITY {self._caps(conn)}] tamper ready\r\n".encode())
        while (line := await conn.line()) is not None:
            words = line.split()
            if len(words) < 2:
                await conn.send(b"* BAD Error in IMAP command\r\n")
                continue
            tag, cmd = words[0], words[1].upper()
            if cmd == b"CAPABILITY":
                caps = self._caps(conn).encode()
                await conn.send(b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n")
            elif cmd == b"STARTTLS":
                if conn.tls or self.mode == "strip_starttls":
                    await conn.send(tag + b" BAD Unknown command\r\n")
                elif self.mode == "refuse_starttls":
                    await conn.send(tag + b" NO [UNAVAILABLE] TLS not available\r\n")
                else:
                    ok = tag + b" OK Begin TLS negotiation now\r\n"
                    await conn.send(ok + IMAP_INJECTED if self.mode == "inject" else ok)
                    if not await conn.start_tls(self.ctx):
                        return
            elif cmd == b"LOGIN":
                await conn.send(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            elif cmd == b"AUTHENTICATE":
                if len(words) < 4:
                    await conn.send(b"+ \r\n")
                    await conn.line()
                await conn.send(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            elif cmd == b"ID":
                await conn.send(b"* ID NIL\r\n" + tag + b" OK ID completed\r\n")
            elif cmd == b"LOGOUT":
                await conn.send(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
                return
            else:
                await conn.send(tag + b" OK done\r\n")


async def start_backend(
    nursery: trio.Nursery,
    protocol: Literal["smtp", "imap"],
    mode: Mode,
    pki: BackendPKI,
    *,
    implicit: bool = False,
) -> TamperBackend:
    backend = TamperBackend(protocol, mode, pki, implicit=implicit)
    await nursery.start(backend.serve)
    assert backend.port
    return backend


# --------------------------------------------------------------------------- mailmoat


def node_config(
    protocol: Literal["smtp", "imap"], backend: TamperBackend, tls_keys: str, *, tls: str
) -> str:
    """Two listeners in front of the tampering backend: submission-style (client
    STARTTLS required) and an open one (for clients that talk before the greeting)."""
    return f"""
[node]
name = "tamper"
drain_timeout = 2

[tls]
cert = "{{cert}}"
key = "{{key}}"

[log]
events = "none"

[[listener]]
name = "submission"
protocol = "{protocol}"
listen = "127.0.0.1:0"
tls = "starttls"
require_tls = true
hostname = "{MAILMOAT_EHLO}"
backend = "tamper"

[[listener]]
name = "open"
protocol = "{protocol}"
listen = "127.0.0.1:0"
tls = "none"
hostname = "{MAILMOAT_EHLO}"
backend = "tamper"

[[backend]]
name = "tamper"
address = "127.0.0.1:{backend.port}"
tls = "{tls}"
connect_timeout = 5
command_timeout = 10
{tls_keys}"""


def assert_no_credentials(backend: TamperBackend, *, allowed: set[bytes]) -> None:
    """No connection to the backend carried a password or a login command.

    ``allowed``: the only command verbs mailmoat may have said (its own
    EHLO/STARTTLS bootstrap), in the clear or over the tampered TLS.
    """
    assert backend.connections, "mailmoat never reached the tampering backend"
    for rec in backend.connections:
        data = rec.all()
        for secret in SECRETS:
            assert secret not in data, (secret, data)
        for line in data.splitlines():
            words = line.upper().split()
            if backend.protocol == "imap":
                words = words[1:]  # the tag
            verb = words[0] if words else b""
            assert verb not in (b"AUTH", b"AUTHENTICATE", b"LOGIN"), data
            assert verb in allowed, (verb, data)


def assert_healthy(rn: RunningNode, capfd: pytest.CaptureFixture[str]) -> None:
    """No connection died of an exception; no secret reached an event."""
    assert rn.events.find("internal_error") == []
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    dump = json.dumps(rn.events.events)
    for secret in SECRETS:
        assert secret.decode() not in dump


async def check_alert(
    rn: RunningNode, action: str, count: int, close_reason: str
) -> list[dict[str, Any]]:
    """``count`` critical alerts ``action``, each ending its session with ``close_reason``."""
    with trio.fail_after(10):
        while (
            len(rn.events.find(action)) < count
            or len(rn.events.find("session.close", session__close_reason=close_reason)) < count
        ):
            await trio.sleep(0.02)
    alerts = rn.events.find(action)
    assert len(alerts) == count, alerts
    closes = rn.events.find("session.close", session__close_reason=close_reason)
    assert {a["session.id"] for a in alerts} == {c["session.id"] for c in closes}
    for alert in alerts:
        assert alert["event.kind"] == "alert"
        assert alert["event.severity"] == "critical"
        assert alert["event.outcome"] == "failure"
    for close in closes:
        assert close["event.outcome"] == "failure"
    # nothing got as far as a login
    assert rn.events.find("auth.attempt") == []
    return alerts


async def first_of(rn: RunningNode, *actions: str) -> str:
    """Which of ``actions`` was emitted first (waiting for one)."""
    with trio.fail_after(10):
        while True:
            for event in rn.events.events:
                if event["event.action"] in actions:
                    return str(event["event.action"])
            await trio.sleep(0.02)


# --------------------------------------------------------------------------- SMTP clients


def smtplib_submission(port: int, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    """STARTTLS to mailmoat, AUTH PLAIN, one message; (code, message) of what stopped it."""
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as s:
            s.starttls(context=ctx)
            s.ehlo("client.example")
            s.login(USER, PASSWORD)
            s.sendmail("u@example.org", ["rcpt@example.org"], b"Subject: t\r\n\r\nhi\r\n")
    except smtplib.SMTPConnectError as exc:
        err = exc.smtp_error
        return exc.smtp_code, err if isinstance(err, bytes) else err.encode()
    return 250, b"sent"


async def swaks_submission(port: int) -> tuple[int, str]:
    result = await trio.run_process(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{port}",
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
            "--from",
            "u@example.org",
            "--to",
            "rcpt@example.org",
            "--timeout",
            "20",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")


def eager_client(port: int, payload: bytes) -> bytes:
    """A client that says everything, credentials included, before it is greeted."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(payload)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # mailmoat closed with our unread bytes in its buffer: an RST
            if not chunk:
                break
            got += chunk
    return got


EAGER_SMTP = (
    b"EHLO eager.example\r\nAUTH PLAIN "
    + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    + b"\r\nMAIL FROM:<u@example.org>\r\n"
)
EAGER_IMAP = f'a1 LOGIN {USER} "{PASSWORD}"\r\na2 SELECT INBOX\r\n'.encode()


# --------------------------------------------------------------------------- SMTP tests


@pytest.mark.parametrize("pinned", [False, True], ids=["ca", "pin"])
async def test_smtp_honest_backend_sees_the_login(
    nursery: trio.Nursery,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    backend_pki: BackendPKI,
    capfd: pytest.CaptureFixture[str],
    pinned: bool,
) -> None:
    """The control: with an honest backend the credentials do reach it (over TLS),
    so the recording would have caught them in every tampering test."""
    backend = await start_backend(nursery, "smtp", "honest", backend_pki)
    keys = (
        f'pin_sha256 = "{spki_pin(backend_pki.honest)}"\n'
        if pinned
        else backend_pki.backend_toml("honest")
    )
    rn = await start_node(node_config("smtp", backend, keys, tls="starttls"))
    port = rn.port("submission")
    with trio.fail_after(30):
        assert await run(smtplib_submission, port, mailmoat_tls.client_context()) == (
            250,
            b"sent",
        )
        code, out = await swaks_submission(port)
    assert code == 0, out
    assert "<~  235 2.7.0 Authentication successful" in out
    assert len(backend.connections) == 2
    plain_b64 = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    for rec in backend.connections:
        assert rec.handshake_ok
        # the bootstrap is mailmoat's own, in the clear; everything else is encrypted
        assert bytes(rec.plain) == f"EHLO {MAILMOAT_EHLO}\r\nSTARTTLS\r\n".encode()
        assert b"AUTH PLAIN " + plain_b64 + b"\r\n" in rec.decrypted
        assert re.search(rb"^mail FROM:<u@example\.org>", rec.decrypted, re.I | re.M)
    with trio.fail_after(10):
        while len(rn.events.find("auth.attempt", event__outcome="success")) < 2:
            await trio.sleep(0.02)
    backend_tls = rn.events.find("tls.handshake", tls__leg="backend")
    assert [e["event.outcome"] for e in backend_tls] == ["success", "success"]
    assert [e for e in rn.events.events if e["event.kind"] == "alert"] == []
    assert_healthy(rn, capfd)


@pytest.mark.parametrize("mode", TAMPER_MODES)
async def test_smtp_tampered_backend_never_sees_credentials(
    nursery: trio.Nursery,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    backend_pki: BackendPKI,
    capfd: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    backend = await start_backend(nursery, "smtp", mode, backend_pki)
    rn = await start_node(
        node_config("smtp", backend, backend_pki.backend_toml(mode), tls="starttls")
    )
    action = SMTP_ALERT[mode]
    reason = action.replace(".", "_")
    with trio.fail_after(60):
        # 1. smtplib, submission-style: the greeting already is the 421
        code, message = await run(
            smtplib_submission, rn.port("submission"), mailmoat_tls.client_context()
        )
        assert (code, message) == (421, R_421[4:])
        await check_alert(rn, action, 1, reason)
        # 2. swaks, the same: mailmoat is still up and gives the same answer
        rc, out = await swaks_submission(rn.port("submission"))
        assert rc != 0, out
        assert "<** 421 4.3.2 Service not available" in out, out
        assert "AUTH" not in out.split("<** 421", 1)[1], out
        await check_alert(rn, action, 2, reason)
        # 3. a client that pipelines its credentials before the greeting
        got = await run(eager_client, rn.port("open"), EAGER_SMTP)
        assert got == R_421 + b"\r\n", got
        alerts = await check_alert(rn, action, 3, reason)

    assert len(backend.connections) == 3
    allowed = {b"EHLO", b"STARTTLS", b"QUIT"}
    assert_no_credentials(backend, allowed=allowed)
    for rec in backend.connections:
        if mode == "strip_starttls":
            assert bytes(rec.plain) == f"EHLO {MAILMOAT_EHLO}\r\n".encode()
        else:
            assert bytes(rec.plain) == f"EHLO {MAILMOAT_EHLO}\r\nSTARTTLS\r\n".encode()
        # nothing went over the tampered TLS either (not even our own EHLO)
        assert bytes(rec.decrypted) == b""
        # (the injecting backend itself goes on to a handshake that never comes)
        assert rec.tls_started == (mode in TLS_FAILED_REASON or mode == "inject")
        if mode not in ("pin_mismatch", "wrong_name"):  # checked after the handshake
            assert not rec.handshake_ok
    for alert in alerts:
        match mode:
            case "strip_starttls" | "refuse_starttls":
                reply = alert["smtp.reply"]
                assert ("STARTTLS" not in reply) if mode == "strip_starttls" else "454" in reply
            case "inject":
                assert alert["tls.injected_bytes"] == len(SMTP_INJECTED)
                assert "250 injected" in alert["tls.injected_preview"]
            case _:
                assert alert["tls.leg"] == "backend"
                assert TLS_FAILED_REASON[mode] in alert["error.message"], alert
    assert_healthy(rn, capfd)


@pytest.mark.parametrize("mode", ["bad_cert", "pin_mismatch", "wrong_name"])
async def test_smtp_implicit_tls_backend_tampered(
    nursery: trio.Nursery,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    backend_pki: BackendPKI,
    capfd: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    """``tls = "implicit"``: the certificate is checked before a byte of SMTP is said."""
    backend = await start_backend(nursery, "smtp", mode, backend_pki, implicit=True)
    rn = await start_node(
        node_config("smtp", backend, backend_pki.backend_toml(mode), tls="implicit")
    )
    with trio.fail_after(60):
        for n in (1, 2):
            code, message = await run(
                smtplib_submission, rn.port("submission"), mailmoat_tls.client_context()
            )
            assert (code, message) == (421, R_421[4:])
            alerts = await check_alert(rn, "backend.tls_failed", n, "backend_tls_failed")
        got = await run(eager_client, rn.port("open"), EAGER_SMTP)
        assert got == R_421 + b"\r\n", got
        alerts = await check_alert(rn, "backend.tls_failed", 3, "backend_tls_failed")
    assert_no_credentials(backend, allowed=set())
    for rec in backend.connections:
        assert rec.all() == b""
    for alert in alerts:
        assert TLS_FAILED_REASON[mode] in alert["error.message"], alert
    assert_healthy(rn, capfd)


async def test_smtp_backend_certificate_for_another_name_without_server_name(
    nursery: trio.Nursery,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    backend_pki: BackendPKI,
) -> None:
    """``address = "127.0.0.1:..."`` and no ``server_name``: a certificate issued by
    the trusted CA to evil.example.net (no 127.0.0.1 in it) must still be refused --
    the address mailmoat dialled is the name the certificate has to carry."""
    backend = await start_backend(nursery, "smtp", "wrong_name", backend_pki)
    keys = backend_pki.backend_toml("wrong_name", server_name=False)
    rn = await start_node(node_config("smtp", backend, keys, tls="starttls"))
    with trio.fail_after(30):
        code, _ = await run(
            smtplib_submission, rn.port("submission"), mailmoat_tls.client_context()
        )
    assert_no_credentials(backend, allowed={b"EHLO", b"STARTTLS", b"QUIT"})
    assert code == 421
    await check_alert(rn, "backend.tls_failed", 1, "backend_tls_failed")


# --------------------------------------------------------------------------- IMAP


def imaplib_login(port: int, ctx: ssl.SSLContext) -> str:
    """STARTTLS to mailmoat, LOGIN, LOGOUT; what stopped it, or "ok"."""
    try:
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    except imaplib.IMAP4.error as exc:
        return f"greeting: {exc}"
    try:
        imap.starttls(ssl_context=ctx)
        imap.login(USER, PASSWORD)
        imap.logout()
    except (imaplib.IMAP4.error, OSError) as exc:
        imap.shutdown()
        return f"failed: {exc}"
    return "ok"


async def test_imap_honest_backend_sees_the_login(
    nursery: trio.Nursery,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    backend_pki: BackendPKI,
    capfd: pytest.CaptureFixture[str],
) -> None:
    backend = await start_backend(nursery, "imap", "honest", backend_pki)
    rn = await start_node(
        node_config("imap", backend, backend_pki.backend_toml("honest"), tls="starttls")
    )
    with trio.fail_after(30):
        assert await run(imaplib_login, rn.port("submission"), mailmoat_tls.client_context()) == (
            "ok"
        )
    [rec] = backend.connections
    assert rec.handshake_ok
    assert bytes(rec.plain) == b"mm.tls STARTTLS\r\n"
    assert re.search(rb'LOGIN "?u"? "hunter2-secret"\r\n', bytes(rec.decrypted)), rec.decrypted
    login = await rn.wait_for("auth.attempt", auth__user=USER)
    assert login["event.outcome"] == "success"
    assert [e for e in rn.events.events if e["event.kind"] == "alert"] == []
    assert_healthy(rn, capfd)


@pytest.mark.parametrize("mode", TAMPER_MODES)
async def test_imap_tampered_backend_never_sees_credentials(
    nursery: trio.Nursery,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    backend_pki: BackendPKI,
    capfd: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    backend = await start_backend(nursery, "imap", mode, backend_pki)
    rn = await start_node(
        node_config("imap", backend, backend_pki.backend_toml(mode), tls="starttls")
    )
    action = SMTP_ALERT[mode]
    with trio.fail_after(60):
        got = await run(imaplib_login, rn.port("submission"), mailmoat_tls.client_context())
        assert got.startswith("greeting: "), got
        assert "BYE [UNAVAILABLE]" in got, got
        reason = action.replace(".", "_")
        await check_alert(rn, action, 1, reason)
        # the same again: still up, same answer
        got = await run(imaplib_login, rn.port("submission"), mailmoat_tls.client_context())
        assert got.startswith("greeting: "), got
        assert "BYE [UNAVAILABLE]" in got, got
        await check_alert(rn, action, 2, reason)
        # a client that sends LOGIN before it is greeted
        raw = await run(eager_client, rn.port("open"), EAGER_IMAP)
        assert raw.startswith(B_BYE), raw
        assert b" OK" not in raw, raw
        alerts = await check_alert(rn, action, 3, reason)

    assert len(backend.connections) == 3
    assert_no_credentials(backend, allowed={b"STARTTLS", b"CAPABILITY", b"LOGOUT"})
    for rec in backend.connections:
        # a greeting listing capabilities without STARTTLS: mailmoat says nothing at all
        expected = b"" if mode == "strip_starttls" else b"mm.tls STARTTLS\r\n"
        assert bytes(rec.plain) == expected
        assert bytes(rec.decrypted) == b""
        if mode not in ("pin_mismatch", "wrong_name"):  # checked after the handshake
            assert not rec.handshake_ok
    for alert in alerts:
        match mode:
            case "strip_starttls":
                assert "STARTTLS" not in alert["imap.reply"]
                assert "CAPABILITY" in alert["imap.reply"]
            case "refuse_starttls":
                assert "NO [UNAVAILABLE]" in alert["imap.reply"]
            case "inject":
                assert alert["tls.injected_bytes"] == len(IMAP_INJECTED)
                assert "injected" in alert["tls.injected_preview"]
            case _:
                assert alert["tls.leg"] == "backend"
                assert TLS_FAILED_REASON[mode] in alert["error.message"], alert
    assert_healthy(rn, capfd)
