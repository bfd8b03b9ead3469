"""SMTP AUTH through mailmoat against real Postfix whose SASL is a real Dovecot.

The backend decides; mailmoat observes the exchange and emits ``auth.attempt``
with user, mechanism and outcome -- never the password or the SASL blob.
"""

from __future__ import annotations

import base64
import json
import secrets
import smtplib
from collections.abc import Callable

import pytest
import trio

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.demo.dovecot import DovecotInstance
from mailmoat.demo.postfix import PostfixInstance

pytestmark = pytest.mark.e2e


def sasl_config(postfix_sasl: PostfixInstance) -> str:
    return f"""
[node]
name = "auth"
[tls]
cert = "{{cert}}"
key = "{{key}}"
[log]
events = "none"

[[listener]]
name = "submission"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
require_tls = true
backend = "submission"

[[backend]]
name = "submission"
address = "127.0.0.1:{postfix_sasl.ports.submission}"
client_identity = "xclient"
"""


def no_secrets(rn: RunningNode, *secrets_: str) -> None:
    dump = json.dumps(rn.events.events)
    for s in secrets_:
        assert s not in dump


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_auth_success_and_failure_are_events(
    postfix_sasl: PostfixInstance,
    dovecot: DovecotInstance,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    mechanism: str,
) -> None:
    rn = await start_node(sasl_config(postfix_sasl))
    tag = f"auth-{mechanism}-{secrets.token_hex(4)}"

    def session(password: str) -> tuple[int, bytes | str]:
        with smtplib.SMTP("127.0.0.1", rn.port("submission"), timeout=20) as s:
            s.starttls(context=mailmoat_tls.client_context())
            s.ehlo("client.example.org")
            s.user, s.password = "bob", password
            method: dict[str, Callable[..., str]] = {
                "PLAIN": s.auth_plain,
                "LOGIN": s.auth_login,
                "CRAM-MD5": s.auth_cram_md5,
            }
            try:
                code, text = s.auth(
                    mechanism,
                    method[mechanism],
                    initial_response_ok=mechanism == "PLAIN",
                )
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, exc.smtp_error
            s.sendmail(
                "bob@mailmoat.test", ["alice@mailmoat.test"], f"Subject: {tag}\r\n\r\nhi\r\n"
            )
            return code, text

    code, _ = await trio.to_thread.run_sync(session, "bobpw")
    assert code == 235
    ok = await rn.wait_for("auth.attempt", event__outcome="success")
    assert ok["auth.user"] == "bob"
    assert ok["auth.mechanism"] == mechanism
    assert ok["smtp.reply_code"] == 235
    deadline = trio.current_time() + 20
    while not any(tag.encode() in p.read_bytes() for p in dovecot.messages("alice")):
        assert trio.current_time() < deadline, "authenticated message not delivered"
        await trio.sleep(0.05)

    code, _ = await trio.to_thread.run_sync(session, "wrong-pass-" + mechanism)
    assert code == 535
    bad = await rn.wait_for("auth.attempt", event__outcome="failure")
    assert bad["auth.user"] == "bob"
    assert bad["smtp.reply_code"] == 535
    no_secrets(
        rn,
        "bobpw",
        "wrong-pass-" + mechanism,
        base64.b64encode(b"\0bob\0bobpw").decode(),
        base64.b64encode(b"bobpw").decode(),
    )


async def test_auth_refused_before_starttls_and_swaks_login(
    postfix_sasl: PostfixInstance, start_node: StartNode
) -> None:
    rn = await start_node(sasl_config(postfix_sasl))

    def plaintext_auth() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", rn.port("submission"), timeout=20) as s:
            s.ehlo("client.example.org")
            assert not s.has_extn("auth")  # not advertised before TLS
            return s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0carol\0carolpw").decode())

    assert await trio.to_thread.run_sync(plaintext_auth) == (
        530,
        b"5.7.0 Must issue a STARTTLS command first",
    )
    assert rn.events.find("auth.attempt") == []

    r = await trio.run_process(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{rn.port('submission')}",
            "-tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "carol",
            "--auth-password",
            "carolpw",
            "--to",
            "alice@mailmoat.test",
            "--from",
            "carol@mailmoat.test",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout.decode()
    ev = await rn.wait_for("auth.attempt", event__outcome="success")
    assert ev["auth.user"] == "carol"
    assert ev["auth.mechanism"] == "LOGIN"
    # Postfix saw the real client through XCLIENT and logged the SASL user
    log = "\n".join(postfix_sasl.log_lines())
    assert "sasl_username=carol" in log
    no_secrets(rn, "carolpw", base64.b64encode(b"carolpw").decode())
