"""Verdicts carried out by the pure SMTP session: ordering, closing, the login phase."""

from __future__ import annotations

from pathlib import Path

from mailmoat.detect import LoginFacts
from mailmoat.policy import RuleHolder
from mailmoat.session.smtp import (
    BanClient,
    CheckLogin,
    Close,
    Delay,
    Emit,
    SendToClient,
    SessionCommand,
    SmtpSession,
    SmtpSessionConfig,
)
from test_smtp_session import EHLO_REPLY, to_client, upstream


def session(tmp_path: Path, rules: str, *, mode: str = "enforce") -> SmtpSession:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    (d / "r.toml").write_text(rules)
    holder = RuleHolder([d], mode="detect" if mode == "detect" else "enforce")
    assert holder.reload().ok
    s = SmtpSession(
        SmtpSessionConfig(listener="t"), "192.0.2.7", 4242, rules=holder, session_id="sid"
    )
    assert s.start() == []
    s.receive_upstream(b"220 mx ESMTP\r\n")
    s.receive_client(b"EHLO c.example.org\r\n")
    s.receive_upstream(EHLO_REPLY)
    return s


def rule(rid: str, phase: str, when: str, action: str, extra: str = "") -> str:
    return (
        f'[[rule]]\nid = "{rid}"\nname = "{rid.lower()}"\nphase = "{phase}"\n'
        f"when = '{when}'\naction = \"{action}\"\n{extra}\n"
    )


def matches(out: list[SessionCommand]) -> list[Emit]:
    return [c for c in out if isinstance(c, Emit) and c.action == "rule.match"]


def test_deny_waits_for_replies_to_earlier_pipelined_commands(tmp_path: Path) -> None:
    s = session(tmp_path, rule("R", "rcpt", 'smtp.rcpt_to.exists(r, r == "trap@x.org")', "deny"))
    out = s.receive_client(
        b"MAIL FROM:<a@b.org>\r\nRCPT TO:<ok@x.org>\r\nRCPT TO:<trap@x.org>\r\nDATA\r\n"
    )
    # the trap RCPT and anything after it never reach the backend
    assert upstream(out) == b"MAIL FROM:<a@b.org>\r\nRCPT TO:<ok@x.org>\r\n"
    assert to_client(out) == b""
    assert not s.closed
    out = s.receive_upstream(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert to_client(out) == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.7.1 Access denied\r\n"
    assert s.close_reason == "policy_deny"
    assert isinstance(out[-1], Close)


def test_reject_answers_in_order_and_keeps_the_session(tmp_path: Path) -> None:
    s = session(
        tmp_path,
        rule(
            "R", "rcpt", "smtp.rcpt_count > 1", "reject", 'reply = { smtp = "452 4.5.3 Too many" }'
        ),
    )
    out = s.receive_client(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<1@x.org>\r\nRCPT TO:<2@x.org>\r\n")
    assert upstream(out) == b"MAIL FROM:<a@b.org>\r\nRCPT TO:<1@x.org>\r\n"
    out = s.receive_upstream(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert to_client(out) == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Too many\r\n"
    assert not s.closed
    (m,) = matches(s.receive_client(b"RCPT TO:<3@x.org>\r\n"))
    assert m.fields["verdict.evidence"] == {"smtp.rcpt_count": 3}


def test_command_phase_sees_every_command_and_tarpit_delays(tmp_path: Path) -> None:
    s = session(tmp_path, rule("T", "command", 'smtp.command == "VRFY"', "tarpit", 'tarpit = "3s"'))
    out = s.receive_client(b"VRFY root\r\n")
    assert out[:2] == [out[0], Delay(3.0)]
    assert upstream(out) == b"VRFY root\r\n"  # a tarpit delays, it does not refuse
    s.receive_upstream(b"252 2.0.0 root\r\n")
    out = s.receive_client(b"NOOP\r\n")
    assert matches(out) == []
    assert not any(isinstance(c, Delay) for c in out)
    assert upstream(out) == b"NOOP\r\n"


def test_login_reject_after_backend_success_closes(tmp_path: Path) -> None:
    s = session(tmp_path, rule("L", "login", 'auth.user == "mallory"', "reject"))
    s.receive_client(b"AUTH PLAIN AG1hbGxvcnkAcHc=\r\n")  # \0mallory\0pw
    out = s.receive_upstream(b"235 2.7.0 Authentication successful\r\n")
    assert out[-1] == CheckLogin("mallory", True)
    out = s.login_checked(LoginFacts(failures_ip=1, failures_user=0, distinct_users_ip=1))
    # the backend's session is logged in and cannot be taken back: refuse and close
    assert to_client(out) == b"550 5.7.1 Rejected by policy\r\n"
    assert s.closed
    assert s.close_reason == "policy_deny"


def test_login_ban_on_failure_counts(tmp_path: Path) -> None:
    s = session(
        tmp_path,
        rule(
            "B",
            "login",
            'auth.result == "failure" && login.failures_ip >= 5',
            "ban",
            'ban = "30m"',
        ),
    )
    s.receive_client(b"AUTH PLAIN AGJvYgB4\r\n")
    s.receive_upstream(b"535 5.7.8 Error: authentication failed\r\n")
    out = s.login_checked(LoginFacts(failures_ip=4, failures_user=4, distinct_users_ip=1))
    assert to_client(out) == b"535 5.7.8 Error: authentication failed\r\n"
    assert not s.closed
    s.receive_client(b"AUTH PLAIN AGJvYgB5\r\n")
    s.receive_upstream(b"535 5.7.8 Error: authentication failed\r\n")
    out = s.login_checked(LoginFacts(failures_ip=5, failures_user=5, distinct_users_ip=1))
    assert to_client(out) == b"554 5.7.1 Access denied\r\n"
    assert BanClient(1800.0, "rule B", "B") in out
    assert s.close_reason == "policy_ban"


def test_data_reject_holds_the_dot_and_closes(tmp_path: Path) -> None:
    s = session(tmp_path, rule("D", "data", "smtp.data.size > 10", "reject"))
    s.receive_client(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<1@x.org>\r\nDATA\r\n")
    s.receive_upstream(b"250 ok\r\n250 ok\r\n354 go\r\n")
    out = s.receive_client(b"Subject: x\r\n\r\n0123456789abcdef\r\n.\r\n")
    sent = upstream(out)
    assert b"0123456789abcdef" in sent
    assert not sent.endswith(b"\r\n.\r\n")  # the final dot never reached the backend
    assert to_client(out) == b"550 5.7.1 Rejected by policy\r\n"
    assert s.close_reason == "message_rejected"


def test_banned_client_is_refused_at_connect_unless_allowed(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "r.toml").write_text(rule("A", "connect", 'cidr(client.ip, "10.0.0.0/8")', "allow"))
    holder = RuleHolder([d])
    assert holder.reload().ok
    banned = SmtpSession(SmtpSessionConfig(listener="t"), "192.0.2.7", 1, rules=holder)
    out = banned.start(banned=True)
    assert (
        to_client(out) == b"554 5.7.1 Service unavailable; your address is blocked for a while\r\n"
    )
    assert banned.close_reason == "banned"
    trusted = SmtpSession(SmtpSessionConfig(listener="t"), "::ffff:10.1.2.3", 1, rules=holder)
    out = trusted.start(banned=True)
    assert to_client(out) == b""
    assert not trusted.closed
    assert [m.fields["rule.id"] for m in matches(out)] == ["A"]
    # on an implicit-TLS port nothing can be said in the clear: just close
    silent = SmtpSession(SmtpSessionConfig(listener="t"), "192.0.2.7", 1, rules=holder)
    out = silent.start(banned=True, greet=False)
    assert not any(isinstance(c, SendToClient) for c in out)
    assert silent.closed


def test_reload_reaches_a_session_in_flight(tmp_path: Path) -> None:
    s = session(tmp_path, rule("V", "mail_from", 'smtp.mail_from == "a@b.org"', "reject"))
    assert to_client(s.receive_client(b"MAIL FROM:<a@b.org>\r\n")) == (
        b"550 5.7.1 Rejected by policy\r\n"
    )
    (tmp_path / "rules" / "r.toml").write_text(
        rule("V", "mail_from", 'smtp.mail_from == "c@d.org"', "reject")
    )
    holder = s.judge.holder
    assert holder is not None
    assert holder.reload().ok
    assert upstream(s.receive_client(b"MAIL FROM:<a@b.org>\r\n")) == b"MAIL FROM:<a@b.org>\r\n"


def test_blind_store_refuses_logins_with_a_temporary_failure(tmp_path: Path) -> None:
    """[state] on_failure = "closed" and the shared store down: no login is decided blind."""
    s = session(tmp_path, rule("N", "helo", "false", "log"))
    s.receive_client(b"AUTH PLAIN AGJvYgB4\r\n")
    s.receive_upstream(b"535 5.7.8 Error: authentication failed\r\n")
    out = s.login_checked(LoginFacts(), blind=True)
    assert to_client(out) == b"454 4.7.0 Temporary authentication failure, try again later\r\n"
    assert not s.closed
    s.receive_client(b"AUTH PLAIN AGJvYgBib2Jwdw==\r\n")
    s.receive_upstream(b"235 2.7.0 Authentication successful\r\n")
    out = s.login_checked(LoginFacts(), blind=True)
    # the backend accepted it and cannot take it back: close instead
    assert to_client(out).startswith(b"421 4.7.0")
    assert s.close_reason == "state_unavailable"
