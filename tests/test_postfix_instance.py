"""The private Postfix used by ``mailmoat demo`` and the e2e tests really works.

Talks to it with plain smtplib (and swaks), no mailmoat in between.
"""

from __future__ import annotations

import base64
import hashlib
import os
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
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mailmoat.demo.postfix import (
    PostfixError,
    PostfixInstance,
    PostfixPorts,
    find_free_port,
    postfix_available,
)

if TYPE_CHECKING:
    from postfix_fixtures import PostfixFactory, PostfixTLS

if "postfix_fixtures" not in sys.modules:
    # tests/conftest.py normally provides the fixtures (``from postfix_fixtures
    # import *``); without it, load them as a plugin so this file runs alone.
    pytest_plugins = ["postfix_fixtures"]

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"


# --------------------------------------------------------------------- helpers


def make_message(to: str, marker: str, body: str = "hello from the test\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = to
    msg["Subject"] = f"test {marker}"
    msg["Message-ID"] = f"<{marker}@example.org>"
    msg["Date"] = "Thu, 01 Jan 2026 00:00:00 +0000"
    msg.set_content(body)
    return msg


def wait_for_marker(pf: PostfixInstance, user: str, marker: str, timeout: float = 20) -> bytes:
    """The delivered message of ``user`` that contains ``marker``."""
    deadline = time.monotonic() + timeout
    needle = marker.encode()
    while True:
        for path in pf.messages(user):
            data = path.read_bytes()
            if needle in data:
                return data
        if time.monotonic() > deadline:
            tail = "\n".join(pf.log_lines()[-20:])
            pytest.fail(f"no message with {marker} for {user}; log:\n{tail}")
        time.sleep(0.02)


def wait_for_log(pf: PostfixInstance, pattern: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        for line in pf.log_lines():
            if regex.search(line):
                return line
        if time.monotonic() > deadline:
            tail = "\n".join(pf.log_lines()[-20:])
            pytest.fail(f"no log line matching {pattern!r}; log:\n{tail}")
        time.sleep(0.02)


def queue_id_of(pf: PostfixInstance, marker: str) -> str:
    """The queue id of the message whose Message-ID contains ``marker``."""
    line = wait_for_log(pf, rf"\]: ([0-9A-F]+): message-id=<{re.escape(marker)}@")
    match = re.search(r"\]: ([0-9A-F]+): message-id=", line)
    assert match is not None
    return match.group(1)


def marker() -> str:
    return uuid.uuid4().hex


def proxy_v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """A PROXY protocol v2 header: PROXY command, TCP over IPv4."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = (
        socket.inet_aton(src[0]) + socket.inet_aton(dst[0]) + struct.pack("!HH", src[1], dst[1])
    )
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def smtp_over(sock: socket.socket) -> smtplib.SMTP:
    """An smtplib client on an already connected socket (reads the greeting)."""
    client = smtplib.SMTP(timeout=10)
    client.sock = sock
    client._host = HOST  # type: ignore[attr-defined]
    code, _ = client.getreply()
    assert code == 220
    return client


# ----------------------------------------------------------------------- tests


def test_postfix_is_available() -> None:
    assert postfix_available()


def test_banner_and_plain_delivery(postfix: PostfixInstance) -> None:
    m = marker()
    with smtplib.SMTP(HOST, postfix.ports.smtp, timeout=10) as client:
        refused = client.send_message(make_message("alice@mailmoat.test", m))
        assert refused == {}
    data = wait_for_marker(postfix, "alice", m)
    assert b"Subject: test " + m.encode() in data
    assert b"Delivered-To: alice@mailmoat.test" in data
    assert wait_for_log(
        postfix, rf"{queue_id_of(postfix, m)}: to=<alice@mailmoat.test>.*status=sent"
    )


def test_banner_names_the_test_postfix(postfix: PostfixInstance) -> None:
    with socket.create_connection((HOST, postfix.ports.smtp), timeout=10) as sock:
        greeting = sock.recv(1024)
        sock.sendall(b"QUIT\r\n")
    assert greeting.startswith(b"220 mx.mailmoat.test ESMTP mailmoat test postfix")


def test_submission_starttls(
    postfix: PostfixInstance, postfix_client_context: ssl.SSLContext
) -> None:
    assert postfix.ports.submission is not None
    m = marker()
    with smtplib.SMTP(HOST, postfix.ports.submission, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # no SASL without sasl_path
        code, _ = client.starttls(context=postfix_client_context)
        assert code == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("client.example")
        assert client.send_message(make_message("bob@mailmoat.test", m)) == {}
    data = wait_for_marker(postfix, "bob", m)
    received = BytesParser(policy=default_policy).parsebytes(data)["Received"]
    assert "TLS" in received  # smtpd_tls_received_header


def test_smtps_implicit_tls(
    postfix: PostfixInstance, postfix_client_context: ssl.SSLContext
) -> None:
    assert postfix.ports.smtps is not None
    m = marker()
    with smtplib.SMTP_SSL(
        HOST, postfix.ports.smtps, context=postfix_client_context, timeout=10
    ) as client:
        client.ehlo("client.example")
        assert not client.has_extn("starttls")  # already TLS
        assert client.send_message(make_message("carol@mailmoat.test", m)) == {}
    data = wait_for_marker(postfix, "carol", m)
    assert b"TLS" in data


def test_certificate_is_verified_for_the_mx_name(
    postfix: PostfixInstance, postfix_client_context: ssl.SSLContext
) -> None:
    assert postfix.ports.smtps is not None
    with (
        socket.create_connection((HOST, postfix.ports.smtps), timeout=10) as raw,
        postfix_client_context.wrap_socket(raw, server_hostname="mx.mailmoat.test") as tls,
    ):
        assert tls.recv(1024).startswith(b"220 ")
    with (
        socket.create_connection((HOST, postfix.ports.smtps), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="mx.mailmoat.test")


def test_one_megabyte_message_arrives_intact(postfix: PostfixInstance) -> None:
    m = marker()
    payload = base64.encodebytes(os.urandom(768 * 1024)).decode("ascii")  # ~1 MiB of lines
    assert len(payload) > 1_000_000
    msg = make_message("bulk@mailmoat.test", m, body=payload)
    with smtplib.SMTP(HOST, postfix.ports.smtp, timeout=30) as client:
        assert client.send_message(msg) == {}
    data = wait_for_marker(postfix, "bulk", m)
    delivered = BytesParser(policy=default_policy).parsebytes(data)
    body = delivered.get_body()
    assert body is not None
    got = body.get_content()
    assert hashlib.sha256(got.encode()).hexdigest() == hashlib.sha256(payload.encode()).hexdigest()


def test_unknown_user_is_rejected_with_550(postfix: PostfixInstance) -> None:
    with smtplib.SMTP(HOST, postfix.ports.smtp, timeout=10) as client:
        client.ehlo("client.example")
        assert client.mail("sender@example.org")[0] == 250
        code, text = client.rcpt("nosuchuser@mailmoat.test")
        assert code == 550, text
        assert b"User unknown" in text
        # a listed user in the same transaction is still fine
        assert client.rcpt("alice@mailmoat.test")[0] == 250
        client.rset()


def test_relay_is_refused_with_554(postfix: PostfixInstance) -> None:
    for port in (postfix.ports.smtp, postfix.ports.submission):
        assert port is not None
        with smtplib.SMTP(HOST, port, timeout=10) as client:
            client.ehlo("client.example")
            assert client.mail("sender@example.org")[0] == 250
            code, text = client.rcpt("someone@example.com")
            assert code == 554, text
            assert b"Relay access denied" in text


def test_xclient_from_loopback_sets_the_client_address(postfix: PostfixInstance) -> None:
    m = marker()
    with smtplib.SMTP(HOST, postfix.ports.smtp, timeout=10) as client:
        client.ehlo("proxy.example")
        assert client.has_extn("xclient")
        code, text = client.docmd("XCLIENT", "ADDR=203.0.113.9 NAME=[UNAVAILABLE]")
        assert code == 220, text  # XCLIENT answers with a fresh greeting
        client.ehlo("real-client.example")
        assert client.send_message(make_message("alice@mailmoat.test", m)) == {}
    data = wait_for_marker(postfix, "alice", m)
    queue_id = queue_id_of(postfix, m)
    assert wait_for_log(postfix, rf"{queue_id}: client=unknown\[203\.0\.113\.9\]")
    received = BytesParser(policy=default_policy).parsebytes(data)["Received"]
    assert "203.0.113.9" in received
    assert "real-client.example" in received


def test_proxy_protocol_v2_sets_the_client_address(postfix: PostfixInstance) -> None:
    port = postfix.ports.proxy_v2
    assert port is not None
    m = marker()
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(proxy_v2_header(("198.51.100.7", 40000), (HOST, port)))
    with smtp_over(sock) as client:
        client.ehlo("behind-haproxy.example")
        assert client.send_message(make_message("bob@mailmoat.test", m)) == {}
    data = wait_for_marker(postfix, "bob", m)
    queue_id = queue_id_of(postfix, m)
    assert wait_for_log(postfix, rf"{queue_id}: client=\S*\[198\.51\.100\.7\]")
    assert b"198.51.100.7" in data


def test_swaks_delivers(postfix: PostfixInstance, postfix_tls: PostfixTLS) -> None:
    swaks = shutil.which("swaks")
    assert swaks is not None, "swaks is not installed: run .ci/run or apt-get install swaks"
    assert postfix.ports.submission is not None
    m = marker()
    run = subprocess.run(
        [
            swaks,
            "--server",
            HOST,
            "--port",
            str(postfix.ports.submission),
            "--ehlo",
            "swaks.example",
            "--from",
            "sender@example.org",
            "--to",
            "carol@mailmoat.test",
            "--header",
            f"Subject: swaks {m}",
            "--body",
            f"sent by swaks {m}",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(postfix_tls.ca_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = wait_for_marker(postfix, "carol", m)
    assert b"swaks.example" in data


def test_queue_drains(postfix: PostfixInstance) -> None:
    deadline = time.monotonic() + 10
    while not postfix.queue_empty():
        assert time.monotonic() < deadline, "Postfix queue did not drain"
        time.sleep(0.05)


# ------------------------------------------------------ instances side by side


def test_second_instance_side_by_side(
    postfix: PostfixInstance, fresh_postfix: PostfixFactory
) -> None:
    other = fresh_postfix(domain="other.test", users=["dave"], message_size_limit=100_000)
    assert other.config_dir != postfix.config_dir
    m = marker()
    with smtplib.SMTP(HOST, other.ports.smtp, timeout=10) as client:
        client.ehlo("client.example")
        assert client.send_message(make_message("dave@other.test", m)) == {}
        # the other instance does not know the session instance's domain ...
        client.mail("sender@example.org")
        assert client.rcpt("alice@mailmoat.test")[0] == 554
        client.rset()
        # ... and has its own size limit
        big = make_message("dave@other.test", marker(), body=("y" * 75 + "\n") * 2000)
        with pytest.raises(smtplib.SMTPSenderRefused) as exc_info:
            client.send_message(big)
        assert exc_info.value.smtp_code == 552
    wait_for_marker(other, "dave", m)
    assert other.maildir("dave").is_relative_to(other.root)
    assert not any(m in line for line in postfix.log_lines())
    pid = other.master_pid
    assert pid is not None
    other.stop()
    other.stop()  # idempotent
    assert not Path(f"/proc/{pid}/exe").exists() or _is_zombie(pid)
    # the session instance is unaffected
    with smtplib.SMTP(HOST, postfix.ports.smtp, timeout=10) as client:
        assert client.noop()[0] == 250


def _is_zombie(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line[stat_line.rindex(")") + 2] in "ZX"


def test_start_and_stop_are_quick(fresh_postfix: PostfixFactory) -> None:
    began = time.monotonic()
    instance = fresh_postfix()
    started = time.monotonic() - began
    began = time.monotonic()
    instance.stop()
    stopped = time.monotonic() - began
    assert started < 5, started
    assert stopped < 5, stopped


def test_context_manager_and_failed_start() -> None:
    root = Path(tempfile.mkdtemp(prefix="mailmoat-postfix-"))
    try:
        with socket.create_server((HOST, 0)) as blocker:
            busy = blocker.getsockname()[1]
            instance = PostfixInstance(root, PostfixPorts(smtp=find_free_port(), submission=busy))
            with pytest.raises(PostfixError) as exc_info:
                instance.start(timeout=10)
            assert "last lines" in str(exc_info.value)
        assert instance.master_pid is None
        with PostfixInstance(root, PostfixPorts(smtp=find_free_port())) as again:
            assert again.master_pid is not None
            with smtplib.SMTP(HOST, again.ports.smtp, timeout=10) as client:
                assert client.noop()[0] == 250
        assert again.master_pid is None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_smtps_needs_a_certificate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cert_file"):
        PostfixInstance(tmp_path, PostfixPorts(smtp=1, smtps=2))


def test_sasl_configuration_is_only_on_submission_and_smtps(tmp_path: Path) -> None:
    instance = PostfixInstance(
        tmp_path,
        PostfixPorts(smtp=2525, submission=2587, smtps=2465, proxy_v2=2526),
        cert_file=tmp_path / "cert.pem",
        sasl_path="/run/dovecot/auth-postfix",
    )
    main_cf = instance.main_cf()
    assert "smtpd_sasl_type = dovecot" in main_cf
    assert "smtpd_sasl_path = /run/dovecot/auth-postfix" in main_cf
    assert "smtpd_sasl_auth_enable = no" in main_cf
    master_cf = instance.master_cf()
    services = master_cf.split("\n127.0.0.1:")
    enabled = [s.split()[0] for s in services if "smtpd_sasl_auth_enable=yes" in s]
    assert enabled == ["2587", "2465"]
    assert "127.0.0.1:2526 inet" in master_cf
    assert "smtpd_upstream_proxy_protocol=haproxy" in master_cf
    # nothing can leave the box
    assert "\nsmtp " not in master_cf
    assert "\nrelay " not in master_cf
    assert "default_transport = error:" in main_cf
