"""SMTP hardening end to end: each refusal proven with bytes on the wire, against real Postfix.

Clients connect from 127.0.0.x addresses other than 127.0.0.1 (mailmoat's own
address towards Postfix) so that Postfix's log and Received: header show
whose address Postfix believes it talks to.
"""

from __future__ import annotations

import secrets
import smtplib
import socket
from pathlib import Path

import pytest
import trio

from conftest import RunningNode, StartNode
from mailmoat.demo.postfix import PostfixInstance
from test_smtp_e2e import base_config, count_subject, recv_replies, wait_for_subject

pytestmark = pytest.mark.e2e

ATTACKS = Path(__file__).parent / "attacks" / "smtp"
SMUGGLING = sorted(p.name for p in ATTACKS.glob("smuggle_*.body"))
BARE = ["bare_lf_only.body", "bare_cr_only.body"]
INJECTIONS = sorted(p.name for p in ATTACKS.glob("inject_*.session"))

PLAIN_LISTENER = """
[[listener]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "mx"
{extra}
"""


def config(postfix: PostfixInstance, listener_extra: str = "", backend_extra: str = "") -> str:
    return base_config(
        postfix,
        listeners=PLAIN_LISTENER.replace("{extra}", listener_extra),
        backend_extra=backend_extra,
    )


def connect(rn: RunningNode, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", rn.port("smtp")), timeout=10, source_address=(source, 0)
    )


def transaction_until_354(sock: socket.socket) -> None:
    assert recv_replies(sock, 1)[0].startswith(b"220")
    sock.sendall(b"EHLO client.example.org\r\n")
    recv_replies(sock, 1)
    sock.sendall(b"MAIL FROM:<sender@example.org>\r\n")
    assert recv_replies(sock, 1)[0].startswith(b"250")
    sock.sendall(b"RCPT TO:<alice@mailmoat.test>\r\n")
    assert recv_replies(sock, 1)[0].startswith(b"250")
    sock.sendall(b"DATA\r\n")
    assert recv_replies(sock, 1)[0].startswith(b"354")


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


# --------------------------------------------------------------------------- smuggling


@pytest.mark.parametrize("case", SMUGGLING + BARE)
async def test_smuggling_refused_nothing_delivered(
    postfix: PostfixInstance, start_node: StartNode, case: str
) -> None:
    rn = await start_node(config(postfix))
    tag = f"{case.split('.', maxsplit=1)[0]}-{secrets.token_hex(4)}"
    body = (ATTACKS / case).read_bytes().replace(b"{S}", tag.encode())

    def attack() -> bytes:
        with connect(rn) as sock:
            transaction_until_354(sock)
            sock.sendall(body + b"\r\n.\r\n")
            return read_all(sock)

    answer = await trio.to_thread.run_sync(attack)
    assert answer == (
        b"554 5.5.2 Error: bare <LF> or <CR> in message refused (SMTP smuggling defence)\r\n"
    )
    ev = await rn.wait_for("session.close")
    assert ev["session.close_reason"] in ("message_smuggling", "message_bare_newline")
    found = rn.events.find("smtp.smuggling") + rn.events.find("smtp.bare_newline")
    assert found
    assert found[-1]["smtp.data.smuggling"] is case.startswith("smuggle_")
    # give Postfix time to deliver anything it might have accepted, then look
    await trio.sleep(1.0)
    assert count_subject(postfix, "alice", tag) == 0
    assert count_subject(postfix, "alice", f"smuggled-{tag}") == 0
    assert postfix.queue_empty()


@pytest.mark.parametrize("case", SMUGGLING)
async def test_smuggling_normalized_exactly_one_message(
    postfix: PostfixInstance, start_node: StartNode, case: str
) -> None:
    rn = await start_node(config(postfix, listener_extra='bare_newline = "normalize"'))
    tag = f"norm-{case.split('.', maxsplit=1)[0]}-{secrets.token_hex(4)}"
    body = (ATTACKS / case).read_bytes().replace(b"{S}", tag.encode())

    def send() -> list[bytes]:
        with connect(rn) as sock:
            transaction_until_354(sock)
            sock.sendall(body + b"\r\n.\r\n")
            replies = recv_replies(sock, 1)
            sock.sendall(b"QUIT\r\n")
            return replies + recv_replies(sock, 1)

    replies = await trio.to_thread.run_sync(send)
    assert replies[0].startswith(b"250"), replies
    msg = await wait_for_subject(postfix, "alice", tag)
    await trio.sleep(1.0)
    assert count_subject(postfix, "alice", tag) == 1
    assert count_subject(postfix, "alice", f"smuggled-{tag}") == 0
    payload = msg.get_payload()
    assert isinstance(payload, str)
    # the smuggled transaction stayed inside the one message, as text
    assert "MAIL FROM:<smuggler@example.org>" in payload
    ev = await rn.wait_for("smtp.message")
    assert ev["smtp.data.normalized"] is True


async def test_clean_body_with_dot_stuffing_delivered(
    postfix: PostfixInstance, start_node: StartNode
) -> None:
    rn = await start_node(config(postfix))
    tag = f"clean-{secrets.token_hex(4)}"
    body = (ATTACKS / "clean.body").read_bytes().replace(b"{S}", tag.encode())

    def send() -> list[bytes]:
        with connect(rn) as sock:
            transaction_until_354(sock)
            sock.sendall(body + b".\r\n")
            return recv_replies(sock, 1)

    assert (await trio.to_thread.run_sync(send))[0].startswith(b"250")
    msg = await wait_for_subject(postfix, "alice", tag)
    assert ".dot-stuffed line" in str(msg.get_payload())


async def test_long_data_line_refused(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(config(postfix))
    tag = f"long-{secrets.token_hex(4)}"

    def send() -> bytes:
        with connect(rn) as sock:
            transaction_until_354(sock)
            sock.sendall(f"Subject: {tag}\r\n\r\n".encode() + b"x" * 1200 + b"\r\n.\r\n")
            return read_all(sock)

    assert await trio.to_thread.run_sync(send) == b"554 5.5.2 Error: message line too long\r\n"
    await trio.sleep(0.5)
    assert count_subject(postfix, "alice", tag) == 0


async def test_long_command_line_refused(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(config(postfix))

    # sent apart: in one packet before PIPELINING was offered it would be a
    # pipelining violation
    def send_apart() -> list[bytes]:
        with connect(rn) as sock:
            recv_replies(sock, 1)
            sock.sendall(b"EHLO " + b"a" * 600 + b"\r\n")
            first = recv_replies(sock, 1)
            sock.sendall(b"NOOP\r\n")
            return first + recv_replies(sock, 1)

    assert await trio.to_thread.run_sync(send_apart) == [
        b"500 5.5.2 Line too long",
        b"250 2.0.0 Ok",
    ]
    assert rn.events.find("smtp.line_too_long")
    log = "\n".join(postfix.log_lines())
    assert "a" * 600 not in log  # never forwarded


# --------------------------------------------------------------------------- STARTTLS injection


@pytest.mark.parametrize("case", INJECTIONS)
async def test_starttls_injection_never_executed(
    postfix: PostfixInstance, start_node: StartNode, case: str
) -> None:
    rn = await start_node(config(postfix))
    data = (ATTACKS / case).read_bytes()

    def attack() -> bytes:
        with connect(rn) as sock:
            recv_replies(sock, 1)
            sock.sendall(b"EHLO client.example.org\r\n")
            recv_replies(sock, 1)
            sock.sendall(data)
            return read_all(sock)

    answer = await trio.to_thread.run_sync(attack)
    assert answer == b"554 5.5.1 Error: commands pipelined after STARTTLS are refused\r\n"
    alert = await rn.wait_for("tls.starttls_injection")
    assert alert["event.kind"] == "alert"
    assert alert["tls.injected_plaintext"] == len(data) - len(b"STARTTLS\r\n")
    assert "AGFsaWNl" not in str(alert)  # the SASL blob is redacted
    closed = await rn.wait_for("session.close")
    # nothing after STARTTLS reached Postfix: only EHLO was relayed
    assert closed["smtp.commands"] == 2
    assert closed["backend.bytes_sent"] == len(b"EHLO client.example.org\r\n")


# ------------------------------------------------------------------ postscreen-style hygiene


async def test_pregreet_refused_patient_client_served(
    postfix: PostfixInstance, start_node: StartNode
) -> None:
    rn = await start_node(config(postfix, listener_extra="greet_delay = 0.5"))

    def bot() -> bytes:
        with connect(rn) as sock:
            sock.sendall(b"EHLO spambot.example.org\r\n")
            return read_all(sock)

    answer = await trio.to_thread.run_sync(bot)
    assert answer == (
        b"220-mailmoat ESMTP\r\n220 mailmoat ESMTP\r\n"
        b"554 5.5.1 Error: protocol error: client talked before the greeting\r\n"
    )
    ev = await rn.wait_for("smtp.pregreet")
    assert ev["smtp.pregreet_preview"].startswith("EHLO spambot")
    tag = f"patient-{secrets.token_hex(4)}"

    def patient() -> int:
        with smtplib.SMTP("127.0.0.1", rn.port("smtp"), timeout=10) as s:
            s.sendmail("a@example.org", ["alice@mailmoat.test"], f"Subject: {tag}\r\n\r\nhi\r\n")
            return 0

    await trio.to_thread.run_sync(patient)
    await wait_for_subject(postfix, "alice", tag)


async def test_non_smtp_command_closes(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(config(postfix))

    def http() -> bytes:
        with connect(rn) as sock:
            recv_replies(sock, 1)
            sock.sendall(b"GET / HTTP/1.1\r\n")
            return read_all(sock)

    assert await trio.to_thread.run_sync(http) == b"554 5.5.1 Error: non-SMTP command\r\n"
    ev = await rn.wait_for("smtp.non_smtp_command")
    assert ev["smtp.command"] == "GET"


async def test_pipelining_without_offer_refused(
    postfix: PostfixInstance, start_node: StartNode
) -> None:
    rn = await start_node(config(postfix))

    def rude() -> bytes:
        with connect(rn) as sock:
            recv_replies(sock, 1)
            sock.sendall(b"HELO rude.example.org\r\nMAIL FROM:<a@example.org>\r\n")
            return read_all(sock)

    assert (
        await trio.to_thread.run_sync(rude) == b"554 5.5.1 Error: improper command pipelining\r\n"
    )
    ev = await rn.wait_for("smtp.pipelining_violation")
    assert ev["smtp.command"] == "HELO"
    closed = await rn.wait_for("session.close")
    assert closed["backend.bytes_sent"] == 0


async def test_too_many_errors(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(config(postfix, listener_extra="max_errors = 3"))

    def noisy() -> bytes:
        with connect(rn) as sock:
            recv_replies(sock, 1)
            for verb in (b"FOO", b"BAR"):
                sock.sendall(verb + b"\r\n")
                recv_replies(sock, 1)
            sock.sendall(b"BAZ\r\n")
            return read_all(sock)

    assert await trio.to_thread.run_sync(noisy) == (
        b"500 5.5.2 Error: command not recognized\r\n"
        b"421 4.7.0 Error: too many errors, closing transmission channel\r\n"
    )
    assert (await rn.wait_for("smtp.too_many_errors"))["smtp.errors"] == 3


async def test_client_xclient_refused(postfix: PostfixInstance, start_node: StartNode) -> None:
    rn = await start_node(config(postfix))

    def spoof() -> list[bytes]:
        with connect(rn) as sock:
            recv_replies(sock, 1)
            sock.sendall(b"EHLO x\r\n")
            recv_replies(sock, 1)
            sock.sendall(b"XCLIENT ADDR=10.9.8.7\r\n")
            out = recv_replies(sock, 1)
            sock.sendall(b"XFORWARD ADDR=10.9.8.7\r\n")
            return out + recv_replies(sock, 1)

    assert await trio.to_thread.run_sync(spoof) == [
        b"550 5.7.0 Error: XCLIENT and XFORWARD are not permitted",
        b"550 5.7.0 Error: XCLIENT and XFORWARD are not permitted",
    ]
    # the reply goes out before the event is emitted: wait for the second one
    with trio.fail_after(10):
        while len(alerts := rn.events.find("smtp.xclient_refused")) < 2:
            await trio.sleep(0.02)
    assert [a["event.kind"] for a in alerts] == ["alert", "alert"]
    assert "10.9.8.7" not in "\n".join(postfix.log_lines())


# --------------------------------------------------------------------------- real client identity


@pytest.mark.parametrize(
    ("identity", "source"), [("xclient", "127.0.0.5"), ("proxy-v2", "127.0.0.6")]
)
async def test_backend_sees_real_client(
    postfix: PostfixInstance, start_node: StartNode, identity: str, source: str
) -> None:
    text = config(postfix, backend_extra=f'client_identity = "{identity}"')
    if identity == "proxy-v2":
        text = text.replace(
            f'address = "127.0.0.1:{postfix.ports.smtp}"',
            f'address = "127.0.0.1:{postfix.ports.proxy_v2}"',
        )
    rn = await start_node(text)
    tag = f"identity-{identity}-{secrets.token_hex(4)}"

    def send() -> None:
        with smtplib.SMTP(
            "127.0.0.1", rn.port("smtp"), timeout=10, source_address=(source, 0)
        ) as s:
            s.ehlo("real-client.example.org")
            s.sendmail("a@example.org", ["alice@mailmoat.test"], f"Subject: {tag}\r\n\r\nhi\r\n")

    await trio.to_thread.run_sync(send)
    msg = await wait_for_subject(postfix, "alice", tag)
    received = msg.get_all("Received") or []
    assert any(f"[{source}]" in r for r in received), received
    assert not any("[127.0.0.1]" in r for r in received), received
    log = "\n".join(postfix.log_lines())
    assert f"client=unknown[{source}]" in log
    if identity == "xclient":
        assert "real-client.example.org" in received[0]
