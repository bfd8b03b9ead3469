"""End to end: TLS fingerprints, version policy, downgrade and STARTTLS stripping.

Real clients (``openssl s_client`` forced to each TLS version and with
``-fallback_scsv``, Python's ``ssl``/``imaplib``/``smtplib``, ``curl``) talk to
mailmoat on loopback in front of a real Dovecot (IMAP) or Postfix (SMTP); the
assertions read the events the rules see.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import shutil
import smtplib
import ssl
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.demo.dovecot import DovecotInstance
from mailmoat.demo.postfix import PostfixInstance
from test_smtp_e2e import DOMAIN, make_message, unique

pytestmark = pytest.mark.e2e
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
JA4 = re.compile(r"^[tq](1[0-3]|00)[di]\d{4}[0-9a-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}$")
OPENSSL_VERSION = {
    "-tls1": "TLSv1",
    "-tls1_1": "TLSv1.1",
    "-tls1_2": "TLSv1.2",
    "-tls1_3": "TLSv1.3",
}


async def run(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def imap_config(dovecot: DovecotInstance, *, min_version: str = "1.2", rules: bool = False) -> str:
    rules_table = '[rules]\npaths = ["rules/"]\n' if rules else ""
    return f"""
[node]
name = "tls"
drain_timeout = 2
[tls]
cert = "{{cert}}"
key = "{{key}}"
min_version = "{min_version}"
[log]
events = "none"
[state]
downgrade_min_logins = 3
{rules_table}
[[listener]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "implicit"
backend = "dovecot"

[[listener]]
name = "imap-open"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "dovecot"

[[backend]]
name = "dovecot"
address = "127.0.0.1:{dovecot.ports.imap}"
client_identity = "imap-id"
"""


def ca_file(tls: MailmoatTLS, tmp_path: Path) -> Path:
    path = tmp_path / "mailmoat-ca.pem"
    tls.ca.cert_pem.write_to_path(str(path))
    return path


def s_client(port: int, ca: Path, *flags: str) -> str:
    """``openssl s_client`` to an implicit-TLS IMAP port: say LOGOUT, return its output."""
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(ca),
        "-cipher",
        "DEFAULT@SECLEVEL=0",  # TLS 1.0/1.1 need it with OpenSSL 3
        "-ign_eof",  # read until the server closes (after LOGOUT)
        *flags,
    ]
    done = subprocess.run(cmd, input=b"a1 LOGOUT\r\n", capture_output=True, timeout=30, check=False)
    return (done.stdout + done.stderr).decode("utf-8", "replace")


def handshakes(rn: RunningNode, outcome: str) -> list[dict[str, Any]]:
    return [
        e
        for e in rn.events.find("tls.handshake")
        if e.get("tls.leg") == "client" and e["event.outcome"] == outcome
    ]


async def wait_handshakes(rn: RunningNode, outcome: str, count: int) -> list[dict[str, Any]]:
    with trio.fail_after(10):
        while len(found := handshakes(rn, outcome)) < count:
            await trio.sleep(0.02)
    return found


# --------------------------------------------------------------------------- versions


async def test_openssl_each_version_gives_its_fingerprint(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    """A listener allowing TLS 1.0: each forced version is negotiated and fingerprinted."""
    rn = await start_node(imap_config(dovecot, min_version="1.0"))
    ca = ca_file(mailmoat_tls, tmp_path)
    for n, flag in enumerate(OPENSSL_VERSION, start=1):
        out = await run(s_client, rn.port("imaps"), ca, flag)
        assert "* OK" in out, out
        events = await wait_handshakes(rn, "success", n)
        ev = events[-1]
        version = OPENSSL_VERSION[flag]
        assert ev["tls.version"] == version
        assert ev["tls.client_max_version"] == version
        assert JA4.match(ev["tls.ja4"]), ev["tls.ja4"]
        # JA4's version digits: t10, t11, t12, t13
        assert ev["tls.ja4"][1:3] == {"TLSv1": "10", "TLSv1.1": "11"}.get(
            version, version[-3] + version[-1]
        )
        assert ev["tls.ja4"][3] == "d"  # s_client sent SNI "localhost"
        assert re.fullmatch(r"[0-9a-f]{32}", ev["tls.ja3"])
        assert ev["tls.fallback_scsv"] is False
    ja4s = [e["tls.ja4"] for e in handshakes(rn, "success")]
    assert len(set(ja4s)) == 4, "each version offers a different hello"
    # the same client twice: the same fingerprint
    await run(s_client, rn.port("imaps"), ca, "-tls1_3")
    again = await wait_handshakes(rn, "success", 5)
    assert again[-1]["tls.ja4"] == ja4s[-1]


async def test_minimum_version_refuses_old_tls_with_evidence(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    rn = await start_node(imap_config(dovecot))  # the default minimum: TLS 1.2
    ca = ca_file(mailmoat_tls, tmp_path)
    for n, flag in enumerate(("-tls1", "-tls1_1"), start=1):
        out = await run(s_client, rn.port("imaps"), ca, flag)
        assert "* OK" not in out
        ev = (await wait_handshakes(rn, "failure", n))[-1]
        assert ev["error.message"], ev
        # the refused hello is still fingerprinted: the analyst sees who tried
        assert ev["tls.client_max_version"] == OPENSSL_VERSION[flag]
        assert JA4.match(ev["tls.ja4"])
    for flag in ("-tls1_2", "-tls1_3"):
        assert "* OK" in await run(s_client, rn.port("imaps"), ca, flag)
    await wait_handshakes(rn, "success", 2)
    refused = rn.events.find("session.close", session__close_reason="tls_failed")
    assert len(refused) == 2


async def test_fallback_scsv_refused_and_alerted(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    """RFC 7507: a TLS 1.2 retry carrying the SCSV at a TLS 1.3 server is a downgrade."""
    rn = await start_node(imap_config(dovecot))
    ca = ca_file(mailmoat_tls, tmp_path)
    out = await run(s_client, rn.port("imaps"), ca, "-tls1_2", "-fallback_scsv")
    assert "* OK" not in out
    alert = await rn.wait_for("tls.fallback_refused")
    assert alert["event.kind"] == "alert"
    assert alert["tls.fallback_scsv"] is True
    assert alert["tls.client_max_version"] == "TLSv1.2"
    assert "fallback" in alert["error.message"]
    # the SCSV at the highest version both speak is harmless: served, flag seen
    out = await run(s_client, rn.port("imaps"), ca, "-tls1_3", "-fallback_scsv")
    assert "* OK" in out
    ev = (await wait_handshakes(rn, "success", 1))[-1]
    assert ev["tls.fallback_scsv"] is True
    assert len(rn.events.find("tls.fallback_refused")) == 1


async def test_python_ssl_and_curl_fingerprints(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    rn = await start_node(imap_config(dovecot))
    port = rn.port("imaps")

    def python_client() -> None:
        imap = imaplib.IMAP4_SSL(
            "localhost", port, ssl_context=mailmoat_tls.client_context(), timeout=20
        )
        imap.logout()

    await run(python_client)
    py = (await wait_handshakes(rn, "success", 1))[-1]
    ca = ca_file(mailmoat_tls, tmp_path)
    done = await run(
        lambda: subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(ca),
                "--resolve",
                f"localhost:{port}:127.0.0.1",
                "-u",
                "alice:alicepw",
                f"imaps://localhost:{port}/",
                "-X",
                "CAPABILITY",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
    )
    assert done.returncode == 0, done.stderr
    curl = (await wait_handshakes(rn, "success", 2))[-1]
    for ev in (py, curl):
        assert ev["tls.version"] == "TLSv1.3"
        assert JA4.match(ev["tls.ja4"])
        assert ev["tls.sni"] == "localhost"
    assert py["tls.ja4"] != curl["tls.ja4"], "two TLS stacks, two fingerprints"
    # the login that followed carries the same fingerprint in the rule context
    login = await rn.wait_for("auth.attempt", auth__user="alice")
    assert login["event.outcome"] == "success"


# --------------------------------------------------------------------------- downgrade


def write_mitm_rules(tmp_path: Path, *, mode: str) -> Path:
    """The shipped rules/60-tls-mitm.toml, its rules switched to ``mode``."""
    target = tmp_path / "rules"
    target.mkdir(exist_ok=True)
    (target / "lists").mkdir(exist_ok=True)
    shutil.copy(ROOT / "rules" / "lists" / "blocked_ja4.txt", target / "lists")
    text = (ROOT / "rules" / "60-tls-mitm.toml").read_text(encoding="utf-8")
    assert text.count('mode = "detect"') == 5
    (target / "60-tls-mitm.toml").write_text(text.replace('mode = "detect"', f'mode = "{mode}"'))
    return target


def version_context(tls: MailmoatTLS, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = tls.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 on purpose
        ctx.minimum_version = version
        ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    return ctx


def imaps_login(port: int, ctx: ssl.SSLContext, user: str, password: str) -> str:
    try:
        imap = imaplib.IMAP4_SSL("localhost", port, ssl_context=ctx, timeout=20)
    except (OSError, imaplib.IMAP4.error) as exc:
        return f"refused: {exc}"
    try:
        imap.login(user, password)
        imap.logout()
    except (imaplib.IMAP4.error, imaplib.IMAP4.abort, OSError) as exc:
        with contextlib.suppress(OSError):
            imap.shutdown()
        return f"failed: {exc}"
    return "ok"


async def test_downgrade_to_tls_1_0_detected_then_enforced(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    """alice logs in with TLS 1.3 three times, then with TLS 1.0: the shipped
    rule reports it in detect mode; switched to enforce, it blocks the login."""
    write_mitm_rules(tmp_path, mode="detect")
    rn = await start_node(imap_config(dovecot, min_version="1.0", rules=True))
    port = rn.port("imaps")
    modern = version_context(mailmoat_tls, ssl.TLSVersion.TLSv1_3)
    legacy = version_context(mailmoat_tls, ssl.TLSVersion.TLSv1)
    for _ in range(3):
        assert await run(imaps_login, port, modern, "alice", "alicepw") == "ok"
    assert rn.events.find("rule.match", rule__id="MM-MITM-0001") == []
    assert await run(imaps_login, port, legacy, "alice", "alicepw") == "ok"
    match = await rn.wait_for("rule.match", rule__id="MM-MITM-0001")
    assert match["verdict.action"] == "detect"
    assert match["verdict.evidence"]["tls.downgrade"] is True
    # another user's first TLS 1.0 login is no downgrade: no history yet
    assert await run(imaps_login, port, legacy, "bob", "bobpw") == "ok"
    assert len(rn.events.find("rule.match", rule__id="MM-MITM-0001")) == 1

    write_mitm_rules(tmp_path, mode="enforce")
    result = rn.node.reload_rules("test")
    assert result.ok
    got = await run(imaps_login, port, legacy, "alice", "alicepw")
    assert got != "ok"
    blocked = await rn.wait_for("rule.match", rule__id="MM-MITM-0001", verdict__action="deny")
    assert blocked["verdict.evidence"]["tls.downgrade"] is True
    await rn.wait_for("session.close", session__close_reason="policy_deny")
    # TLS 1.3 still works for her
    assert await run(imaps_login, port, modern, "alice", "alicepw") == "ok"


async def test_plaintext_login_after_tls_history_is_a_downgrade(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    write_mitm_rules(tmp_path, mode="detect")
    rn = await start_node(imap_config(dovecot, rules=True))
    modern = version_context(mailmoat_tls, ssl.TLSVersion.TLSv1_3)
    for _ in range(3):
        assert await run(imaps_login, rn.port("imaps"), modern, "alice", "alicepw") == "ok"

    def plain() -> None:
        imap = imaplib.IMAP4("127.0.0.1", rn.port("imap-open"), timeout=20)
        with contextlib.suppress(imaplib.IMAP4.error):
            imap.login("alice", "wrong-password")
        imap.logout()

    await run(plain)  # a failed guess over a stripped connection is a downgrade too
    match = await rn.wait_for("rule.match", rule__id="MM-MITM-0001")
    assert match["verdict.evidence"]["tls.downgrade"] is True
    attempt = await rn.wait_for("auth.attempt", auth__user="alice", event__outcome="failure")
    assert attempt["event.outcome"] == "failure"


# --------------------------------------------------------------------------- inbound


def smtp_config(postfix: PostfixInstance) -> str:
    return f"""
[node]
name = "mx"
drain_timeout = 2
[tls]
cert = "{{cert}}"
key = "{{key}}"
[log]
events = "none"
[rules]
paths = ["rules/"]

[[listener]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "mx"

[[backend]]
name = "mx"
address = "127.0.0.1:{postfix.ports.smtp}"
client_identity = "xclient"
"""


async def test_inbound_starttls_stripping_detected(
    postfix: PostfixInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    """A sender that used STARTTLS three times arrives in plain text: reported."""
    write_mitm_rules(tmp_path, mode="detect")
    rn = await start_node(smtp_config(postfix))
    port = rn.port("smtp")

    def send(tls: bool) -> None:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mx.sender.example", timeout=20) as s:
            if tls:
                s.starttls(context=mailmoat_tls.client_context())
            s.sendmail(
                "news@sender.example", [f"alice@{DOMAIN}"], make_message(unique("strip"), "hi\r\n")
            )

    for _ in range(3):
        await run(send, True)
    assert rn.events.find("rule.match", rule__id="MM-MITM-0004") == []
    await run(send, False)
    match = await rn.wait_for("rule.match", rule__id="MM-MITM-0004")
    assert match["verdict.action"] == "detect"
    evidence = match["verdict.evidence"]
    assert evidence["tls.stripped_inbound"] is True
    # detect mode: the message was still accepted
    assert len(rn.events.find("smtp.message", event__outcome="success")) == 4
