"""Session transcripts (``session.transcript``): content, bounds, redaction, order.

Unit tests drive the pure sessions (helpers of test_smtp_session and
test_imap_session); the end-to-end ones run real clients through mailmoat
against the real Postfix (with Dovecot SASL) and Dovecot the suite starts.
"""

from __future__ import annotations

import base64
import imaplib
import json
import secrets
import smtplib
from typing import Any

import pytest
import trio

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.demo.dovecot import DovecotInstance
from mailmoat.demo.postfix import PostfixInstance
from mailmoat.detect import LoginFacts
from mailmoat.session._transcript import Transcript
from mailmoat.session.imap import ImapSession, ImapSessionConfig, StartRelay
from mailmoat.session.smtp import Emit, SmtpSession, SmtpSessionConfig
from test_imap_e2e import Raw, SourceIMAP, imap_config
from test_imap_session import greeted as imap_greeted
from test_smtp_auth import no_secrets, sasl_config
from test_smtp_session import EHLO_REPLY, ehloed, greeted

# -------------------------------------------------------------------- helpers


def transcript_of(session: SmtpSession | ImapSession) -> Emit:
    """The one ``session.transcript`` event the session's finish() gives."""
    out = session.finish()
    found = [c for c in out if isinstance(c, Emit) and c.action == "session.transcript"]
    assert len(found) == 1, out
    assert out[0] is found[0]  # before the close phase's events
    assert session.finish() == []  # once
    return found[0]


def lines(ev: Emit | dict[str, Any]) -> list[tuple[str, str]]:
    fields = ev.fields if isinstance(ev, Emit) else ev
    return [(e["dir"], e["line"]) for e in fields["transcript"]]


class Clock:
    """A driver's clock: seconds since the session started, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -------------------------------------------------------------------- SMTP, pure


def test_smtp_inbound_session_recorded_without_the_message() -> None:
    clock = Clock()
    s = SmtpSession(SmtpSessionConfig(listener="t"), clock=clock)
    s.receive_upstream(b"220 mx.example.org ESMTP\r\n")
    clock.now = 0.0125
    s.receive_client(b"EHLO c.example.org\r\n")
    clock.now = 0.02
    s.receive_upstream(EHLO_REPLY)
    s.receive_client(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
    s.receive_upstream(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    s.receive_client(b"Subject: secret plans\r\n\r\nthe body\r\n.\r\n")
    s.receive_upstream(b"250 2.0.0 Ok: queued\r\n")
    clock.now = 1.23456
    s.receive_client(b"QUIT\r\n")
    s.receive_upstream(b"221 2.0.0 Bye\r\n")
    ev = transcript_of(s)
    assert ev.kind == "session"
    assert ev.fields["transcript.truncated"] == 0
    got = lines(ev)
    assert got[:3] == [
        ("s", "220 mx.example.org ESMTP"),
        ("c", "EHLO c.example.org"),
        ("s", "250-mx.example.org"),
    ]
    assert got[got.index(("s", "250 DSN")) :] == [
        ("s", "250 DSN"),
        ("c", "MAIL FROM:<a@b.example>"),
        ("c", "RCPT TO:<x@y.example>"),
        ("c", "DATA"),
        ("s", "250 2.1.0 Ok"),
        ("s", "250 2.1.5 Ok"),
        ("s", "354 go ahead"),
        ("c", "."),  # the end of the message; never its content
        ("s", "250 2.0.0 Ok: queued"),
        ("c", "QUIT"),
        ("s", "221 2.0.0 Bye"),
    ]
    assert "secret plans" not in repr(ev)
    assert "the body" not in repr(ev)
    times = [e["t"] for e in ev.fields["transcript"]]
    assert times[:3] == [0.0, 12.5, 20.0]
    assert times[-1] == 1234.6  # ms since session start, one decimal
    assert times == sorted(times)


def test_smtp_auth_plain_redacted_then_only_refusals() -> None:
    s = ehloed()
    blob = base64.b64encode(b"\0alice\0s3cret-pw").decode()
    s.receive_client(f"AUTH PLAIN {blob}\r\n".encode())
    s.receive_upstream(b"235 2.7.0 Authentication successful\r\n")
    s.login_checked(LoginFacts())
    # authenticated: relayed commands and the backend's own refusals are not recorded
    s.receive_client(b"MAIL FROM:<alice@example.org>\r\n")
    s.receive_upstream(b"250 2.1.0 Ok\r\n")
    s.receive_client(b"RCPT TO:<nobody@example.org>\r\n")
    s.receive_upstream(b"550 5.1.1 unknown user\r\n")
    # ...but what mailmoat itself refuses is, with the refusing reply
    s.receive_client(b"BDAT 5\r\n")
    s.receive_client(b"XCLIENT ADDR=192.0.2.1\r\n")
    s.receive_client(b"NOOP\r\n")
    s.receive_upstream(b"250 2.0.0 Ok\r\n")
    ev = transcript_of(s)
    got = lines(ev)
    i = got.index(("c", "AUTH PLAIN ***"))
    assert got[i:] == [
        ("c", "AUTH PLAIN ***"),
        ("s", "235 2.7.0 Authentication successful"),
        ("c", "BDAT 5"),
        ("s", "502 5.5.1 Command not implemented"),
        ("c", "XCLIENT ADDR=192.0.2.1"),
        ("s", "550 5.7.0 Error: XCLIENT and XFORWARD are not permitted"),
    ]
    assert "s3cret-pw" not in repr(ev)
    assert blob not in repr(ev)


def test_smtp_auth_login_continuations_and_backend_failure() -> None:
    s = ehloed()
    s.receive_client(b"AUTH LOGIN\r\n")
    s.receive_upstream(b"334 VXNlcm5hbWU6\r\n")
    s.receive_client(base64.b64encode(b"bob") + b"\r\n")
    s.receive_upstream(b"334 UGFzc3dvcmQ6\r\n")
    s.receive_client(base64.b64encode(b"hunter2-wrong") + b"\r\n")
    s.receive_upstream(b"535 5.7.8 Error: authentication failed: authentication failure\r\n")
    s.login_checked(LoginFacts())
    s.receive_client(b"AUTH LOGIN\r\n")
    s.receive_upstream(b"334 VXNlcm5hbWU6\r\n")
    s.receive_client(b"*\r\n")  # cancelled
    s.receive_upstream(b"501 5.7.0 Authentication aborted\r\n")
    s.login_checked(LoginFacts())
    ev = transcript_of(s)
    got = lines(ev)
    i = got.index(("c", "AUTH LOGIN"))
    assert got[i:] == [
        ("c", "AUTH LOGIN"),
        ("s", "334 VXNlcm5hbWU6"),
        ("c", "***"),
        ("s", "334 UGFzc3dvcmQ6"),
        ("c", "***"),
        # the backend's refusal, relayed during pre-auth, counts as a reply
        ("s", "535 5.7.8 Error: authentication failed: authentication failure"),
        ("c", "AUTH LOGIN"),
        ("s", "334 VXNlcm5hbWU6"),
        ("c", "*"),
        ("s", "501 5.7.0 Authentication aborted"),
    ]
    text = repr(ev)
    for secret in (b"bob", b"hunter2-wrong"):
        assert base64.b64encode(secret).decode() not in text
    assert "hunter2" not in text


def test_smtp_refusals_policy_and_closing_reply_recorded() -> None:
    s = greeted(client_tls="starttls", require_tls=True)
    s.receive_client(b"EHLO c\r\n")
    s.receive_upstream(EHLO_REPLY)
    s.receive_client(b"AUTH PLAIN AGFsaWNlAHB3\r\n")
    s.receive_client(b"GET / HTTP/1.0\r\n")
    assert s.closed
    got = lines(transcript_of(s))
    assert got[-4:] == [
        ("c", "AUTH PLAIN ***"),
        ("s", "530 5.7.0 Must issue a STARTTLS command first"),
        ("c", "GET / HTTP/1.0"),
        ("s", "554 5.5.1 Error: non-SMTP command"),
    ]
    assert "AGFsaWNlAHB3" not in repr(got)


def test_smtp_pregreet_and_pop3_password_redacted() -> None:
    s = SmtpSession(SmtpSessionConfig(listener="t", greet_delay=1.0))
    s.begin_greet_delay()
    s.pregreet(b"AUTH PLAIN AGFsaWNlAHB3\r\n")
    got = lines(transcript_of(s))
    assert got[0] == ("s", "220-mailmoat.invalid ESMTP")
    assert got[1] == ("c", "AUTH PLAIN ***")
    assert got[-1] == ("s", "554 5.5.1 Error: protocol error: client talked before the greeting")
    s = greeted()
    s.receive_client(b"PASS letmein\r\n")
    got = lines(transcript_of(s))
    assert got[-2:] == [("c", "PASS ***"), ("s", "554 5.5.1 Error: non-SMTP command")]


def test_smtp_transcript_is_bounded_with_one_marker() -> None:
    s = ehloed(max_errors=10_000)
    for i in range(400):
        s.receive_client(f"FOO {i}\r\n".encode())
    ev = transcript_of(s)
    entries = ev.fields["transcript"]
    assert len(entries) == 200  # the marker included
    kept = lines(ev)[:-1]
    assert ("c", "FOO 0") in kept
    assert ("c", "FOO 399") not in kept
    ehlo_reply = sum(1 for d, line in kept if line.startswith("250"))
    total = 1 + 1 + ehlo_reply + 400 * 2  # greeting, EHLO and its reply, 400 refusals
    assert ev.fields["transcript.truncated"] == total - len(kept)
    marker = entries[-1]
    assert marker["dir"] == "s"
    assert f"{total - len(kept)} more lines left out" in marker["line"]


def test_transcript_bytes_and_line_length_bounds() -> None:
    t = Transcript(max_bytes=2000)
    t.command(b"x" * 5000 + b"\r\n")
    (entry,) = t.entries
    assert len(entry["line"]) == 512
    assert entry["line"].endswith("...")
    for _ in range(10):
        t.reply(b"250 " + b"y" * 300 + b"\r\n")
    ev = t.event()
    assert ev is not None
    kept = ev.fields["transcript"][:-1]
    assert sum(len(e["line"]) for e in kept) <= 2000
    assert ev.fields["transcript.truncated"] == 11 - len(kept)
    assert t.event() is None  # written once


def test_nothing_recorded_means_no_event() -> None:
    s = SmtpSession(SmtpSessionConfig(listener="t"))
    s.upstream_failed("backend_unavailable")  # says 421 to the client: recorded
    assert [c.action for c in s.finish() if isinstance(c, Emit)] == ["session.transcript"]
    quiet = SmtpSession(SmtpSessionConfig(listener="t"))
    quiet.client_gone()
    assert quiet.finish() == []
    imap = ImapSession(ImapSessionConfig(listener="t"))
    imap.client_gone()
    assert imap.finish() == []


# -------------------------------------------------------------------- IMAP, pure


def test_imap_login_literal_redacted_and_relay_not_recorded() -> None:
    s, _ = imap_greeted(client_tls="starttls")
    s.receive_client(b"a0 CAPABILITY\r\n")
    s.receive_client(b"a1 SELECT INBOX\r\n")
    s.receive_client(b'a2 LOGIN alice "wr0ng-pw"\r\n')
    s.receive_upstream(b"a2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    s.login_checked(LoginFacts())
    s.receive_client(b"a3 LOGIN {5}\r\n")
    s.receive_client(b"alice {9+}\r\nr1ght-pw!\r\na4 SELECT INBOX\r\n")
    out = s.receive_upstream(b"a3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    out += s.login_checked(LoginFacts())
    assert any(isinstance(c, StartRelay) for c in out)
    s.relay_ended("client_closed")
    ev = transcript_of(s)
    got = lines(ev)
    assert got[0][0] == "s"
    assert got[0][1].startswith("* OK [CAPABILITY IMAP4rev1")
    assert got[1:] == [
        ("c", "a0 CAPABILITY"),
        ("s", got[2][1]),
        ("s", "a0 OK CAPABILITY completed"),
        ("c", "a1 SELECT INBOX"),
        ("s", "a1 BAD Command not valid before authentication"),
        ("c", 'a2 LOGIN "alice" ***'),
        ("s", "a2 NO [AUTHENTICATIONFAILED] Authentication failed."),
        ("c", "a3 LOGIN {5}"),
        ("s", "+ Ready for literal data"),
        ("c", 'a3 LOGIN "alice" ***'),
        ("s", "a3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in"),
    ]
    assert got[2][1].startswith("* CAPABILITY ")
    text = repr(ev)
    assert "wr0ng-pw" not in text
    assert "r1ght-pw" not in text
    assert "a4 SELECT" not in text  # after login: the relay, never recorded


def test_imap_authenticate_continuation_and_refusals() -> None:
    s, _ = imap_greeted(client_tls="implicit")
    blob = base64.b64encode(b"\0bob\0b0b-secret")
    s.receive_client(b"x1 AUTHENTICATE GSSAPI\r\n")
    s.receive_client(b"x2 AUTHENTICATE PLAIN " + blob + b"\r\n")
    s.receive_upstream(b"x2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    s.login_checked(LoginFacts())
    s.receive_client(b"x3 AUTHENTICATE PLAIN\r\n")
    s.receive_upstream(b"+ \r\n")
    s.receive_client(blob + b"\r\n")
    s.receive_upstream(b"x3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    s.login_checked(LoginFacts())
    s.receive_client(b"x4 LOGOUT\r\n")
    got = lines(transcript_of(s))
    assert got[1:] == [
        ("c", "x1 AUTHENTICATE GSSAPI"),
        ("s", "x1 NO [CANNOT] Unsupported authentication mechanism"),
        ("c", "x2 AUTHENTICATE PLAIN ***"),
        ("s", "x2 NO [AUTHENTICATIONFAILED] Authentication failed."),
        ("c", "x3 AUTHENTICATE PLAIN"),
        ("s", "+ "),
        ("c", "***"),
        ("s", "x3 NO [AUTHENTICATIONFAILED] Authentication failed."),
        ("c", "x4 LOGOUT"),
        ("s", "* BYE Logging out"),
        ("s", "x4 OK LOGOUT completed"),
    ]
    assert blob.decode() not in repr(got)
    assert "b0b-secret" not in repr(got)


# -------------------------------------------------------------------- end to end

pytest_e2e = pytest.mark.e2e


def node_events(rn: RunningNode, session_id: str) -> list[dict[str, Any]]:
    return [e for e in rn.events.events if e.get("session.id") == session_id]


async def transcript_for(rn: RunningNode, session_id: str) -> dict[str, Any]:
    """The session's transcript, checked to come once and before its session.close."""
    await rn.wait_for("session.close", session__id=session_id, timeout=20)
    actions = [e["event.action"] for e in node_events(rn, session_id)]
    assert actions.count("session.transcript") == 1, actions
    assert actions.index("session.transcript") < actions.index("session.close")
    ev = rn.events.find("session.transcript", session__id=session_id)[0]
    assert ev["event.kind"] == "session"
    times = [e["t"] for e in ev["transcript"]]
    assert times == sorted(times)
    assert all(isinstance(t, float) for t in times)
    return ev


def smtp_config(postfix_sasl: PostfixInstance) -> str:
    """The AUTH tests' submission listener, plus an inbound (port 25) one."""
    return (
        sasl_config(postfix_sasl)
        + f"""
[[listener]]
name = "mx"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "mx"

[[backend]]
name = "mx"
address = "127.0.0.1:{postfix_sasl.ports.smtp}"
"""
    )


@pytest_e2e
async def test_smtp_auth_transcript_against_postfix(
    postfix_sasl: PostfixInstance,
    dovecot: DovecotInstance,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
) -> None:
    rn = await start_node(smtp_config(postfix_sasl))
    mark = f"transcript-{secrets.token_hex(4)}"
    wrong = "wrong-" + secrets.token_hex(4)

    def session() -> tuple[int, int, int]:
        with smtplib.SMTP("127.0.0.1", rn.port("submission"), timeout=20) as s:
            s.ehlo("client.example.org")
            s.starttls(context=mailmoat_tls.client_context())
            s.ehlo("client.example.org")
            s.user, s.password = "bob", wrong
            try:
                s.auth("PLAIN", s.auth_plain, initial_response_ok=True)
                failed = 0
            except smtplib.SMTPAuthenticationError as exc:
                failed = exc.smtp_code
            s.password = "bobpw"
            code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
            s.sendmail("bob@mailmoat.test", ["alice@mailmoat.test"], f"Subject: {mark}\r\n\r\nhi")
            refused, _ = s.docmd("BDAT", "5")
            return failed, code, refused

    assert await trio.to_thread.run_sync(session) == (535, 235, 502)
    attempt = await rn.wait_for("auth.attempt", event__outcome="success", auth__user="bob")
    ev = await transcript_for(rn, attempt["session.id"])
    got = lines(ev)
    assert got[0][0] == "s"
    assert got[0][1].startswith("220 ")
    assert ("c", "STARTTLS") in got
    assert ("s", "220 2.0.0 Ready to start TLS") in got
    i = got.index(("c", "AUTH PLAIN ***"))
    assert got[i + 1][0] == "s"
    assert got[i + 1][1].startswith("535 5.7.8")
    assert got[i + 2 :] == [
        ("c", "AUTH LOGIN"),
        ("s", "334 VXNlcm5hbWU6"),
        ("c", "***"),
        ("s", "334 UGFzc3dvcmQ6"),
        ("c", "***"),
        ("s", "235 2.7.0 Authentication successful"),
        # after login only what mailmoat refused: not MAIL/RCPT/DATA, the message or QUIT
        ("c", "BDAT 5"),
        ("s", "502 5.5.1 Command not implemented"),
    ]
    assert mark not in json.dumps(ev)
    no_secrets(
        rn,
        "bobpw",
        wrong,
        base64.b64encode(b"bobpw").decode(),
        base64.b64encode(f"\0bob\0{wrong}".encode()).decode(),
        base64.b64encode(b"\0bob\0bobpw").decode(),
    )


@pytest_e2e
async def test_smtp_inbound_transcript_has_commands_not_content(
    postfix_sasl: PostfixInstance, dovecot: DovecotInstance, start_node: StartNode
) -> None:
    rn = await start_node(smtp_config(postfix_sasl))
    mark = f"content-{secrets.token_hex(4)}"

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", rn.port("mx"), timeout=20) as s:
            s.ehlo("sender.example.net")
            s.sendmail(
                "someone@example.net", ["alice@mailmoat.test"], f"Subject: {mark}\r\n\r\n{mark}"
            )

    await trio.to_thread.run_sync(send)
    close = await rn.wait_for("session.close", session__listener="mx", timeout=20)
    got = lines(await transcript_for(rn, close["session.id"]))
    # as the client sent them (smtplib speaks lower case)
    assert ("c", "ehlo sender.example.net") in got
    i = next(i for i, (d, line) in enumerate(got) if line.startswith("mail FROM:<someone@"))
    assert got[i][0] == "c"
    assert got[i + 1 : i + 4] == [
        ("s", "250 2.1.0 Ok"),
        ("c", "rcpt TO:<alice@mailmoat.test>"),
        ("s", "250 2.1.5 Ok"),
    ]
    assert got[i + 4 : i + 7] == [("c", "data"), got[i + 5], ("c", ".")]
    assert got[i + 5][1].startswith("354 ")
    assert got[i + 7][1].startswith("250 2.0.0 Ok: queued")
    assert got[-2:] == [("c", "QUIT"), got[-1]]
    assert got[-1][1].startswith("221 ")
    assert mark not in json.dumps(got)


@pytest_e2e
async def test_imap_transcripts_against_dovecot(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS
) -> None:
    rn = await start_node(imap_config(dovecot))
    wrong = "wrong-" + secrets.token_hex(4)

    def login_session() -> None:
        imap = SourceIMAP("127.0.0.1", rn.port("imap"), timeout=20)
        imap.starttls(ssl_context=mailmoat_tls.client_context())
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("alice", wrong)
        imap.login("alice", "alicepw")
        imap.select("INBOX")
        imap.logout()

    def literal_and_authenticate() -> tuple[bytes, bytes]:
        c = Raw(rn.port("imaps"), tls=mailmoat_tls.client_context())
        c.line()
        c.send(b"b1 LOGIN {5}\r\n")
        assert c.line().startswith(b"+")
        c.send(b"carol {7+}\r\nnotpass\r\n")
        failed = c.until(b"b1")[-1]
        c.send(b"b2 AUTHENTICATE PLAIN\r\n")
        assert c.line().startswith(b"+")
        c.send(base64.b64encode(b"\0carol\0carolpw") + b"\r\n")
        ok = c.until(b"b2")[-1]
        c.send(b"b3 LOGOUT\r\n")
        c.until(b"b3")
        c.close()
        return failed, ok

    await trio.to_thread.run_sync(login_session)
    failed, ok = await trio.to_thread.run_sync(literal_and_authenticate)
    assert failed.startswith(b"b1 NO")
    assert ok.startswith(b"b2 OK")

    alice = await rn.wait_for("auth.attempt", auth__user="alice", event__outcome="success")
    got = lines(await transcript_for(rn, alice["session.id"]))
    assert got[0][0] == "s"
    assert got[0][1].startswith("* OK [CAPABILITY ")
    starttls = next(i for i, (d, line) in enumerate(got) if line.endswith(" STARTTLS"))
    assert got[starttls + 1][1].endswith(" OK Begin TLS negotiation now")
    logins = [i for i, (d, line) in enumerate(got) if d == "c" and " LOGIN " in line]
    assert [got[i][1].split(" ", 1)[1] for i in logins] == ['LOGIN "alice" ***'] * 2
    assert " NO [AUTHENTICATIONFAILED]" in got[logins[0] + 1][1]  # Dovecot's refusal
    last = got[logins[1] + 1]
    assert last[0] == "s"
    assert " OK " in last[1]
    assert got[-1] == last  # SELECT and LOGOUT went through the relay: not recorded

    carol = await rn.wait_for("auth.attempt", auth__user="carol", event__outcome="success")
    got = lines(await transcript_for(rn, carol["session.id"]))
    assert got[1:4] == [
        ("c", "b1 LOGIN {5}"),
        ("s", "+ Ready for literal data"),
        ("c", 'b1 LOGIN "carol" ***'),
    ]
    assert got[4][1].startswith("b1 NO [AUTHENTICATIONFAILED]")
    assert got[5:8] == [("c", "b2 AUTHENTICATE PLAIN"), got[6], ("c", "***")]
    assert got[6][0] == "s"
    assert got[6][1].startswith("+")
    assert got[8][1].startswith("b2 OK ")
    assert len(got) == 9  # b3 LOGOUT: the relay
    no_secrets(
        rn,
        "alicepw",
        wrong,
        "notpass",
        "carolpw",
        base64.b64encode(b"\0carol\0carolpw").decode(),
    )
