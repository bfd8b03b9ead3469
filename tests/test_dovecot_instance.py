"""The private Dovecot used by the IMAP e2e tests really works, and Postfix can use it.

Talks to it with plain imaplib / smtplib / sockets, no mailmoat in between.
"""

from __future__ import annotations

import imaplib
import re
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mailmoat.demo.dovecot import (
    DovecotError,
    DovecotInstance,
    DovecotPorts,
    dovecot_available,
)
from mailmoat.demo.postfix import PostfixInstance, find_free_port

if TYPE_CHECKING:
    from postfix_fixtures import PostfixTLS

if "dovecot_fixtures" not in sys.modules:
    # tests/conftest.py normally provides the fixtures (``from dovecot_fixtures
    # import ...``); without it, load them as a plugin so this file runs alone.
    pytest_plugins = ["dovecot_fixtures"]

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
DOMAIN = "mailmoat.test"


# --------------------------------------------------------------------- helpers


def marker() -> str:
    return uuid.uuid4().hex


def make_message(to: str, mark: str, body: str = "hello from the test\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = to
    msg["Subject"] = f"test {mark}"
    msg["Message-ID"] = f"<{mark}@example.org>"
    msg["Date"] = "Thu, 01 Jan 2026 00:00:00 +0000"
    msg.set_content(body)
    return msg.as_bytes()


def wait_for_log(dc: DovecotInstance, pattern: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        for line in dc.log_lines():
            if regex.search(line):
                return line
        if time.monotonic() > deadline:
            tail = "\n".join(dc.log_lines()[-20:])
            pytest.fail(f"no log line matching {pattern!r}; log:\n{tail}")
        time.sleep(0.02)


def wait_for_marker(dc: DovecotInstance, user: str, mark: str, timeout: float = 20) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        for path in dc.messages(user):
            data = path.read_bytes()
            if mark.encode() in data:
                return data
        if time.monotonic() > deadline:
            tail = "\n".join(dc.log_lines()[-20:])
            pytest.fail(f"no message with {mark} for {user}; log:\n{tail}")
        time.sleep(0.02)


def proxy_v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """A PROXY protocol v2 header: PROXY command, TCP over IPv4."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = (
        socket.inet_aton(src[0]) + socket.inet_aton(dst[0]) + struct.pack("!HH", src[1], dst[1])
    )
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def read_tagged(sock: socket.socket, tag: bytes) -> bytes:
    """Read IMAP responses up to (and returning) the tagged one."""
    while True:
        line = read_line(sock)
        if not line or line.startswith(tag + b" "):
            return line


def dovecot_pids(instance: DovecotInstance) -> list[str]:
    """PIDs of processes that belong to ``instance`` (by command line)."""
    proc = subprocess.run(
        ["pgrep", "-f", f"({instance.config_path}|{instance.instance_name}/)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.split()


@pytest.fixture
def imap(dovecot: DovecotInstance) -> Iterator[imaplib.IMAP4]:
    assert dovecot.ports.imap is not None
    client = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    try:
        yield client
    finally:
        if client.state != "LOGOUT":  # logout() already closed it
            client.shutdown()


# ----------------------------------------------------------------------- tests


def test_dovecot_is_available() -> None:
    assert dovecot_available()


def test_greeting_and_capabilities(imap: imaplib.IMAP4) -> None:
    assert imap.welcome.startswith(b"* OK ")
    caps = set(imap.capabilities)
    assert {"STARTTLS", "ID", "IDLE"} <= caps
    assert "LOGINDISABLED" not in caps  # disable_plaintext_auth = no
    assert {"AUTH=PLAIN", "AUTH=LOGIN", "AUTH=CRAM-MD5"} <= caps


@pytest.mark.parametrize("user", ["alice", "alice@mailmoat.test", "Alice@MailMoat.test"])
def test_login_ok(imap: imaplib.IMAP4, user: str) -> None:
    typ, _ = imap.login(user, "alicepw")
    assert typ == "OK"
    assert imap.state == "AUTH"
    bye, _ = imap.logout()
    assert bye == "BYE"


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", "alicepw")])
def test_login_fails(
    dovecot: DovecotInstance, imap: imaplib.IMAP4, user: str, password: str
) -> None:
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login(user, password)
    assert time.monotonic() - started < 1.5  # auth_failure_delay = 0
    imap.logout()
    wait_for_log(dovecot, rf"imap-login: .*auth failed.*user=<{user}(@{DOMAIN})?>")


def test_authenticate_plain(dovecot: DovecotInstance, imap: imaplib.IMAP4) -> None:
    typ, _ = imap.authenticate("PLAIN", lambda _challenge: b"\0bob@mailmoat.test\0bobpw")
    assert typ == "OK"
    imap.logout()
    wait_for_log(dovecot, r"Login: user=<bob@mailmoat\.test>, method=PLAIN, rip=127\.0\.0\.1")


def test_authenticate_cram_md5(dovecot: DovecotInstance, imap: imaplib.IMAP4) -> None:
    typ, _ = imap.login_cram_md5("carol", "carolpw")
    assert typ == "OK"
    imap.logout()
    wait_for_log(dovecot, r"Login: user=<carol@mailmoat\.test>, method=CRAM-MD5")


def test_starttls_on_imap(
    dovecot: DovecotInstance, imap: imaplib.IMAP4, postfix_client_context: ssl.SSLContext
) -> None:
    typ, _ = imap.starttls(postfix_client_context)
    assert typ == "OK"
    assert isinstance(imap.sock, ssl.SSLSocket)
    assert imap.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert imap.login("alice", "alicepw")[0] == "OK"
    imap.logout()
    wait_for_log(dovecot, r"Login: user=<alice@mailmoat\.test>, method=PLAIN, .*TLS")


def test_imaps_implicit_tls(
    dovecot: DovecotInstance, postfix_client_context: ssl.SSLContext
) -> None:
    assert dovecot.ports.imaps is not None
    with imaplib.IMAP4_SSL(
        "localhost", dovecot.ports.imaps, ssl_context=postfix_client_context, timeout=10
    ) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert "STARTTLS" not in client.capabilities
        assert client.login("bob", "bobpw")[0] == "OK"
    # the certificate is from the test CA: an ordinary client refuses it
    with (
        socket.create_connection((HOST, dovecot.ports.imaps), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="mx.mailmoat.test")


def test_select_and_fetch_delivered_message(dovecot: DovecotInstance, imap: imaplib.IMAP4) -> None:
    mark = marker()
    before = len(dovecot.messages("alice"))
    dovecot.deliver("alice", make_message("alice@mailmoat.test", mark))
    assert len(dovecot.messages("alice")) == before + 1  # deliver() waits for the save
    assert imap.login("alice", "alicepw")[0] == "OK"
    typ, data = imap.select("INBOX", readonly=True)
    assert typ == "OK"
    assert int(data[0] or b"0") >= 1
    typ, data = imap.search(None, "HEADER", "Message-ID", f"<{mark}@example.org>")
    assert typ == "OK"
    (number,) = (data[0] or b"").split()
    typ, fetched = imap.fetch(number.decode(), "(BODY.PEEK[])")
    assert typ == "OK"
    first = fetched[0]
    assert isinstance(first, tuple)
    assert f"Subject: test {mark}".encode() in first[1]
    assert b"hello from the test" in first[1]
    imap.logout()


def test_id_x_originating_ip_is_logged_as_rip(
    dovecot: DovecotInstance, imap: imaplib.IMAP4
) -> None:
    typ, data = imap.xatom("ID", '("x-originating-ip" "203.0.113.5" "x-originating-port" "40000")')
    assert typ == "OK", data
    assert imap.login("carol", "carolpw")[0] == "OK"
    imap.logout()
    line = wait_for_log(dovecot, r"Login: user=<carol@mailmoat\.test>.*rip=203\.0\.113\.5")
    assert "lip=127.0.0.1" in line


def test_proxy_v2_header_sets_client_address(dovecot: DovecotInstance) -> None:
    assert dovecot.ports.proxy_imap is not None
    with socket.create_connection((HOST, dovecot.ports.proxy_imap), timeout=10) as sock:
        sock.sendall(proxy_v2_header(("198.51.100.7", 41000), ("192.0.2.1", 143)))
        assert read_line(sock).startswith(b"* OK ")
        sock.sendall(b"a1 LOGIN bulk bulkpw\r\n")
        assert read_tagged(sock, b"a1").startswith(b"a1 OK")
        sock.sendall(b"a2 LOGOUT\r\n")
        assert read_tagged(sock, b"a2").startswith(b"a2 OK")
    line = wait_for_log(dovecot, r"Login: user=<bulk@mailmoat\.test>.*rip=198\.51\.100\.7")
    assert "lip=192.0.2.1" in line


def test_proxy_listener_requires_the_header(dovecot: DovecotInstance) -> None:
    assert dovecot.ports.proxy_imap is not None
    with socket.create_connection((HOST, dovecot.ports.proxy_imap), timeout=10) as sock:
        sock.sendall(b"a1 CAPABILITY\r\n")
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            data = b""
    assert not data.startswith(b"* OK")  # dropped: not a PROXY header


# ------------------------------------------------------- Postfix SASL + LMTP


def submission(pf: PostfixInstance) -> smtplib.SMTP:
    assert pf.ports.submission is not None
    client = smtplib.SMTP(HOST, pf.ports.submission, timeout=10)
    client.ehlo("client.example")
    return client


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_postfix_submission_sasl_via_dovecot(
    postfix_sasl: PostfixInstance, dovecot: DovecotInstance, mechanism: str
) -> None:
    mark = marker()
    with submission(postfix_sasl) as client:
        assert client.has_extn("auth")
        assert {"PLAIN", "LOGIN", "CRAM-MD5"} <= set(client.esmtp_features["auth"].split())
        client.user, client.password = "alice", "alicepw"
        authenticator = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, _ = client.auth(mechanism, authenticator, initial_response_ok=False)
        assert code == 235
        refused = client.sendmail(
            "alice@mailmoat.test", ["bob@mailmoat.test"], make_message("bob@mailmoat.test", mark)
        )
        assert refused == {}
    data = wait_for_marker(dovecot, "bob", mark)
    assert b"Delivered-To: bob@mailmoat.test" in data
    assert any(
        f"sasl_method={mechanism}, sasl_username=alice@mailmoat.test" in line
        for line in postfix_sasl.log_lines()
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_postfix_submission_wrong_password(postfix_sasl: PostfixInstance, mechanism: str) -> None:
    with submission(postfix_sasl) as client:
        client.user, client.password = "alice", "not-the-password"
        authenticator = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.auth(mechanism, authenticator)
        assert excinfo.value.smtp_code == 535
        # unauthenticated submission is refused
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("alice@mailmoat.test", ["carol@mailmoat.test"], b"Subject: x\r\n\r\n")


def test_postfix_smtps_login_and_imap_sees_the_message(
    postfix_sasl: PostfixInstance,
    dovecot: DovecotInstance,
    postfix_client_context: ssl.SSLContext,
) -> None:
    assert postfix_sasl.ports.smtps is not None
    mark = marker()
    with smtplib.SMTP_SSL(
        HOST, postfix_sasl.ports.smtps, context=postfix_client_context, timeout=10
    ) as client:
        client.ehlo("client.example")
        client.user, client.password = "carol@mailmoat.test", "carolpw"
        assert client.auth("PLAIN", client.auth_plain)[0] == 235
        client.sendmail(
            "carol@mailmoat.test",
            ["carol@mailmoat.test"],
            make_message("carol@mailmoat.test", mark),
        )
    wait_for_marker(dovecot, "carol", mark)
    assert dovecot.ports.imap is not None
    with imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10) as client_imap:
        client_imap.login("carol", "carolpw")
        client_imap.select("INBOX")
        typ, data = client_imap.search(None, "HEADER", "Message-ID", f"<{mark}@example.org>")
        assert typ == "OK"
        assert len((data[0] or b"").split()) == 1


def test_postfix_port25_delivers_to_dovecot(
    postfix_sasl: PostfixInstance, dovecot: DovecotInstance
) -> None:
    mark = marker()
    with smtplib.SMTP(HOST, postfix_sasl.ports.smtp, timeout=10) as client:
        assert not client.ehlo("mx.example")[1].count(b"AUTH")  # no SASL on port 25
        client.sendmail(
            "x@example.org", ["bulk@mailmoat.test"], make_message("bulk@mailmoat.test", mark)
        )
    wait_for_marker(dovecot, "bulk", mark)


def test_auth_socket_is_reachable_by_postfix(dovecot: DovecotInstance) -> None:
    """What smtpd (user postfix) needs: a searchable path and a writable socket."""
    path = dovecot.auth_socket_path
    assert path.is_socket()
    assert path.stat().st_mode & 0o006 == 0o006
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=postfix",
            "--regid=postfix",
            "--init-groups",
            "/usr/bin/python3",
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(b'VERSION\\t1\\t2\\nCPID\\t1\\n'); print(s.recv(4096).decode())",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MECH\tPLAIN" in proc.stdout


# ------------------------------------------------------------ lifecycle


def test_second_instance_side_by_side_and_clean_stop(
    dovecot: DovecotInstance, postfix_tls: PostfixTLS
) -> None:
    root = Path(tempfile.mkdtemp(prefix="mailmoat-dovecot-"))
    try:
        instance = DovecotInstance(
            root, DovecotPorts(imap=find_free_port()), users={"dave": "davepw"}
        )
        started = time.monotonic()
        with instance:
            start_time = time.monotonic() - started
            assert instance.is_running()
            assert instance.base_dir != dovecot.base_dir
            assert dovecot_pids(instance)
            assert instance.ports.imap is not None
            with imaplib.IMAP4(HOST, instance.ports.imap, timeout=10) as client:
                assert "STARTTLS" not in client.capabilities  # ssl = no
                assert client.login("dave", "davepw")[0] == "OK"
            with (
                imaplib.IMAP4(HOST, instance.ports.imap, timeout=10) as client,
                pytest.raises(imaplib.IMAP4.error),
            ):
                client.login("alice", "alicepw")  # not a user of this instance
            stopping = time.monotonic()
        stop_time = time.monotonic() - stopping
        assert not instance.is_running()
        assert dovecot_pids(instance) == []
        assert not (instance.base_dir / "master.pid").exists()
        assert start_time < 5
        assert stop_time < 5
        instance.stop()  # idempotent
        assert dovecot.is_running()  # the session instance is untouched
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_mail_root_gives_postfix_layout() -> None:
    root = Path(tempfile.mkdtemp(prefix="mailmoat-dovecot-"))
    root.chmod(0o755)  # the dovecot user must reach root/dovecot and root/shared-mail
    try:
        mail_root = root / "shared-mail"
        with DovecotInstance(root / "dovecot", DovecotPorts(), mail_root=mail_root) as instance:
            assert instance.maildir("alice") == mail_root / DOMAIN / "alice"
            instance.deliver("alice", make_message("alice@mailmoat.test", "layout"))
            (path,) = instance.wait_for_messages("alice", 1, timeout=5)
            assert path.parent == mail_root / DOMAIN / "alice" / "new"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_deliver_to_unknown_user_fails(dovecot: DovecotInstance) -> None:
    with pytest.raises(DovecotError, match="mallory"):
        dovecot.deliver("mallory", make_message("mallory@mailmoat.test", "x"))


def test_invalid_options() -> None:
    root = Path("/nonexistent/mailmoat")
    with pytest.raises(ValueError, match="cert_file"):
        DovecotInstance(root, DovecotPorts(imaps=1))
    with pytest.raises(ValueError, match="user name"):
        DovecotInstance(root, DovecotPorts(), users={"a@b": "x"})
    with pytest.raises(ValueError, match="password"):
        DovecotInstance(root, DovecotPorts(), users={"a": "x:y"})
