"""Transcript tests of the pure SMTP proxy session (no I/O).

Each test reads like the protocol: what the client says, what the session
sends upstream, what the backend replies, what the client sees.
"""

from __future__ import annotations

import pytest

from mailmoat.detect import LoginFacts
from mailmoat.session.smtp import (
    Awaiting,
    CheckLogin,
    Close,
    Emit,
    SendToClient,
    SendToUpstream,
    SessionCommand,
    SmtpSession,
    SmtpSessionConfig,
    StartClientTls,
    StartUpstreamTls,
)

EHLO_REPLY = (
    b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n250-CHUNKING\r\n250 DSN\r\n"
)


def sends(cmds: list[SessionCommand], kind: type[SendToClient | SendToUpstream]) -> bytes:
    return b"".join(
        c.data for c in cmds if isinstance(c, SendToClient | SendToUpstream) and isinstance(c, kind)
    )


def to_client(cmds: list[SessionCommand]) -> bytes:
    return sends(cmds, SendToClient)


def upstream(cmds: list[SessionCommand]) -> bytes:
    return sends(cmds, SendToUpstream)


def emitted(cmds: list[SessionCommand]) -> list[str]:
    return [c.action for c in cmds if isinstance(c, Emit)]


def greeted(**kw: object) -> SmtpSession:
    s = SmtpSession(SmtpSessionConfig(listener="t", **kw))  # type: ignore[arg-type]
    waits = [s.awaiting]
    assert to_client(s.receive_upstream(b"220 mx.example.org ESMTP\r\n")) == (
        b"220 mx.example.org ESMTP\r\n"
    )
    waits.append(s.awaiting)
    assert waits == [Awaiting.UPSTREAM, Awaiting.CLIENT]
    return s


def ehloed(**kw: object) -> SmtpSession:
    s = greeted(**kw)
    assert upstream(s.receive_client(b"EHLO c.example.org\r\n")) == b"EHLO c.example.org\r\n"
    s.receive_upstream(EHLO_REPLY)
    return s


def test_ehlo_rewrite_keeps_only_handled_extensions() -> None:
    s = greeted(client_tls="starttls", max_message_size=5000000)
    s.receive_client(b"EHLO c.example.org\r\n")
    reply = to_client(s.receive_upstream(EHLO_REPLY))
    assert reply == (
        b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 5000000\r\n250-AUTH PLAIN LOGIN\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 STARTTLS\r\n"
    )


def test_require_tls_hides_auth_and_refuses_mail() -> None:
    s = greeted(client_tls="starttls", require_tls=True)
    s.receive_client(b"EHLO c\r\n")
    reply = to_client(s.receive_upstream(EHLO_REPLY))
    assert b"AUTH" not in reply
    assert b"STARTTLS" in reply
    out = s.receive_client(b"MAIL FROM:<a@b>\r\nAUTH PLAIN AGFsaWNlAHB3\r\n")
    assert upstream(out) == b""
    assert to_client(out) == (
        b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    )


def test_starttls_is_answered_locally_and_resets_the_session() -> None:
    s = ehloed(client_tls="starttls")
    out = s.receive_client(b"STARTTLS\r\n")
    assert out == [SendToClient(b"220 2.0.0 Ready to start TLS\r\n"), StartClientTls()]
    assert upstream(out) == b""  # the backend never sees the client's STARTTLS
    assert s.awaiting is Awaiting.NOTHING
    s.client_tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384", "mx.example.org")
    assert s.tls_active
    # RFC 3207 4.2: knowledge from before TLS is discarded; EHLO is needed again
    out = s.receive_client(b"MAIL FROM:<a@b>\r\n")
    assert to_client(out) == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    s.receive_client(b"EHLO c\r\n")
    reply = to_client(s.receive_upstream(EHLO_REPLY))
    assert b"STARTTLS" not in reply


def test_starttls_injection_is_refused_and_never_executed() -> None:
    s = ehloed(client_tls="starttls")
    out = s.receive_client(b"STARTTLS\r\nRSET\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert upstream(out) == b""
    assert to_client(out) == b"554 5.5.1 Error: commands pipelined after STARTTLS are refused\r\n"
    assert not any(isinstance(c, StartClientTls) for c in out)
    alert = next(c for c in out if isinstance(c, Emit))
    assert alert.action == "tls.starttls_injection"
    assert alert.kind == "alert"
    assert "RSET" in alert.fields["tls.injected_preview"]
    assert "AGFsaWNl" not in alert.fields["tls.injected_preview"]  # SASL blob redacted
    assert isinstance(out[-1], Close)
    assert s.closed


def test_pipelined_group_is_forwarded_in_one_write_and_replies_relayed_in_order() -> None:
    s = ehloed()
    out = s.receive_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\n")
    assert upstream(out) == b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\n"
    assert to_client(out) == b""
    assert s.awaiting is Awaiting.UPSTREAM
    out = s.receive_upstream(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n")
    assert to_client(out) == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n"
    out = s.receive_upstream(b"354 go\r\n")
    assert to_client(out) == b"354 go\r\n"
    out = s.receive_client(b"Subject: x\r\n\r\n..dot\r\n.\r\n")
    assert upstream(out) == b"Subject: x\r\n\r\n..dot\r\n.\r\n"
    out = s.receive_upstream(b"250 2.0.0 queued\r\n")
    assert to_client(out) == b"250 2.0.0 queued\r\n"
    assert s.messages == 1


def test_local_reply_waits_for_earlier_pipelined_replies() -> None:
    s = ehloed()
    out = s.receive_client(b"MAIL FROM:<a@b>\r\nBDAT 10 LAST\r\nRCPT TO:<x@y>\r\n")
    # BDAT is answered by mailmoat, but only after the backend's reply to MAIL
    assert to_client(out) == b""
    assert upstream(out) == b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n"
    out = s.receive_upstream(b"250 2.1.0 Ok\r\n")
    assert to_client(out) == b"250 2.1.0 Ok\r\n502 5.5.1 Command not implemented\r\n"
    out = s.receive_upstream(b"250 2.1.5 Ok\r\n")
    assert to_client(out) == b"250 2.1.5 Ok\r\n"


def test_pipelining_not_offered_is_a_violation() -> None:
    s = greeted()
    s.receive_client(b"EHLO c\r\n")
    reply = to_client(s.receive_upstream(b"250-mx\r\n250 8BITMIME\r\n"))
    assert b"PIPELINING" not in reply  # the backend does not pipeline, so neither may the client
    out = s.receive_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n")
    assert upstream(out) == b""
    assert to_client(out) == b"554 5.5.1 Error: improper command pipelining\r\n"
    assert emitted(out) == ["smtp.pipelining_violation"]
    assert s.close_reason == "pipelining_violation"


def test_auth_exchange_is_relayed_and_reported_without_secrets() -> None:
    s = ehloed()
    out = s.receive_client(b"AUTH LOGIN\r\n")
    assert upstream(out) == b"AUTH LOGIN\r\n"
    assert to_client(s.receive_upstream(b"334 VXNlcm5hbWU6\r\n")) == b"334 VXNlcm5hbWU6\r\n"
    # the SASL response is relayed as a response, not parsed as a command
    assert upstream(s.receive_client(b"YWxpY2U=\r\n")) == b"YWxpY2U=\r\n"
    s.receive_upstream(b"334 UGFzc3dvcmQ6\r\n")
    assert upstream(s.receive_client(b"c2VjcmV0\r\n")) == b"c2VjcmV0\r\n"
    out = s.receive_upstream(b"235 2.7.0 Authentication successful\r\n")
    # the reply waits until the state store has counted the login
    assert to_client(out) == b""
    assert out[-1] == CheckLogin("alice", True)
    waits = [s.awaiting]
    out += s.login_checked(LoginFacts(failures_ip=0, failures_user=0, distinct_users_ip=0))
    assert to_client(out) == b"235 2.7.0 Authentication successful\r\n"
    waits.append(s.awaiting)
    assert waits == [Awaiting.NOTHING, Awaiting.CLIENT]
    (ev,) = [c for c in out if isinstance(c, Emit)]
    assert ev.action == "auth.attempt"
    assert ev.outcome == "success"
    assert ev.fields["auth.mechanism"] == "LOGIN"
    assert "c2VjcmV0" not in repr(out)
    assert s.authenticated


def test_bdat_unknown_and_xclient_are_not_forwarded() -> None:
    s = ehloed()
    out = s.receive_client(b"XCLIENT ADDR=1.2.3.4\r\nBDAT 5\r\nFOO\r\n")
    assert upstream(out) == b""
    assert to_client(out) == (
        b"550 5.7.0 Error: XCLIENT and XFORWARD are not permitted\r\n"
        b"502 5.5.1 Command not implemented\r\n"
        b"500 5.5.2 Error: command not recognized\r\n"
    )
    assert emitted(out) == ["smtp.xclient_refused"]


def test_overlong_command_line_is_never_forwarded() -> None:
    s = ehloed()
    out = s.receive_client(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert to_client(out) == b"500 5.5.2 Line too long\r\n"
    assert upstream(out) == b"NOOP\r\n"


def test_backend_starttls_bootstrap_before_greeting() -> None:
    s = SmtpSession(SmtpSessionConfig(listener="t", backend_tls="starttls", hostname="edge"))
    out = s.receive_upstream(b"220 mx ESMTP\r\n")
    assert to_client(out) == b""  # the client is greeted only once the backend leg is secure
    assert upstream(out) == b"EHLO edge\r\n"
    out = s.receive_upstream(b"250-mx\r\n250 STARTTLS\r\n")
    assert upstream(out) == b"STARTTLS\r\n"
    out = s.receive_upstream(b"220 go ahead\r\n")
    assert out == [StartUpstreamTls()]
    out = s.upstream_tls_started("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    assert to_client(out) == b"220 mx ESMTP\r\n"
    assert s.awaiting is Awaiting.CLIENT


@pytest.mark.parametrize(
    ("ehlo", "starttls_reply", "alert"),
    [
        (b"250-mx\r\n250 8BITMIME\r\n", None, "backend.starttls_missing"),
        (b"250-mx\r\n250 STARTTLS\r\n", b"454 4.7.0 no\r\n", "backend.starttls_refused"),
        (
            b"250-mx\r\n250 STARTTLS\r\n",
            b"220 go\r\n250 injected\r\n",
            "backend.starttls_injection",
        ),
    ],
)
def test_backend_starttls_tampering_never_proceeds(
    ehlo: bytes, starttls_reply: bytes | None, alert: str
) -> None:
    s = SmtpSession(SmtpSessionConfig(listener="t", backend_tls="starttls"))
    s.receive_upstream(b"220 mx\r\n")
    out = s.receive_upstream(ehlo)
    if starttls_reply is not None:
        out = s.receive_upstream(starttls_reply)
    assert [c.action for c in out if isinstance(c, Emit) and c.kind == "alert"] == [alert]
    assert to_client(out) == b"421 4.3.2 Service not available, closing transmission channel\r\n"
    assert not any(isinstance(c, StartUpstreamTls) for c in out)
    assert s.closed


def test_backend_refusing_greeting_is_relayed() -> None:
    s = SmtpSession(SmtpSessionConfig(listener="t"))
    out = s.receive_upstream(b"554 5.7.1 go away\r\n")
    assert to_client(out) == b"554 5.7.1 go away\r\n"
    assert s.closed


def test_message_size_limit_from_mail_size_and_body() -> None:
    s = ehloed(max_message_size=100)
    out = s.receive_client(b"MAIL FROM:<a@b> SIZE=5000\r\n")
    assert to_client(out) == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    s.receive_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    s.receive_upstream(b"250 ok\r\n250 ok\r\n354 go\r\n")
    out = s.receive_client(b"x" * 200 + b"\r\n.\r\n")
    assert b".\r\n" not in upstream(out)  # never completes the oversize message upstream
    assert to_client(out).startswith(b"552 5.3.4")
    assert s.closed


def test_quit_backend_421_and_timeouts() -> None:
    s = ehloed()
    out = s.receive_client(b"QUIT\r\n")
    assert upstream(out) == b"QUIT\r\n"
    out = s.receive_upstream(b"221 2.0.0 Bye\r\n")
    assert to_client(out) == b"221 2.0.0 Bye\r\n"
    assert s.close_reason == "client_quit"

    s = ehloed()
    out = s.receive_client(b"NOOP\r\n")
    out = s.receive_upstream(b"421 4.3.0 going down\r\n")
    assert to_client(out) == b"421 4.3.0 going down\r\n"
    assert s.closed

    s = ehloed()
    out = s.timed_out("client")
    assert to_client(out) == b"421 4.4.2 Timeout exceeded, closing transmission channel\r\n"
    s = ehloed()
    s.receive_client(b"NOOP\r\n")
    out = s.timed_out("upstream")
    assert to_client(out) == b"421 4.3.2 Service not available, closing transmission channel\r\n"
    assert s.close_reason == "backend_timeout"


def test_backend_garbage_is_a_clean_421() -> None:
    s = ehloed()
    s.receive_client(b"NOOP\r\n")
    out = s.receive_upstream(b"this is not smtp\r\n")
    assert to_client(out) == b"421 4.3.2 Service not available, closing transmission channel\r\n"
    assert s.close_reason == "backend_protocol_error"


def test_client_eof_closes() -> None:
    s = ehloed()
    out = s.receive_client(b"")
    assert isinstance(out[-1], Close)
    assert s.close_reason == "client_closed"


@pytest.mark.parametrize(
    ("lines", "mechanism", "user"),
    [
        # XOAUTH2 with the token as initial response, then after a 334 challenge
        (
            [b"AUTH XOAUTH2 dXNlcj1kYXZlQGV4YW1wbGUub3JnAWF1dGg9QmVhcmVyIHRvazEBAQ==\r\n"],
            "XOAUTH2",
            "dave@example.org",
        ),
        (
            [b"AUTH XOAUTH2\r\n", b"dXNlcj1kYXZlQGV4YW1wbGUub3JnAWF1dGg9QmVhcmVyIHRvazEBAQ==\r\n"],
            "XOAUTH2",
            "dave@example.org",
        ),
        ([b"AUTH PLAIN\r\n", b"AGRhdmUAc2VjcmV0\r\n"], "PLAIN", "dave"),
    ],
)
def test_sasl_user_with_and_without_initial_response(
    lines: list[bytes], mechanism: str, user: str
) -> None:
    s = ehloed()
    out = s.receive_client(lines[0])
    for line in lines[1:]:
        s.receive_upstream(b"334 \r\n")
        out = s.receive_client(line)
        assert upstream(out) == line
    out = s.receive_upstream(b"535 5.7.8 Error: authentication failed\r\n")
    (ev,) = [c for c in out if isinstance(c, Emit)]
    assert ev.fields["auth.user"] == user
    assert ev.fields["auth.mechanism"] == mechanism
    assert ev.outcome == "failure"
    assert "dG9r" not in repr(ev)
    assert "c2VjcmV0" not in repr(ev)


def test_normalize_never_creates_a_terminator() -> None:
    from mailmoat.session.smtp import normalize_newlines

    for fake in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r"):
        body = b"a" + fake + b"MAIL FROM:<x@y>\r\n"
        out = normalize_newlines(body, b"\r\n", dot_pending=False)
        assert b"\r\n.\r\n" not in b"\r\n" + out, (fake, out)
        assert out.count(b"\n") == out.count(b"\r\n")  # no bare LF left
        assert b"\r" not in out.replace(b"\r\n", b"")  # no bare CR left
