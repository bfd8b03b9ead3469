"""Transcript tests of the pure IMAP proxy session (no I/O)."""

from __future__ import annotations

from typing import Any

from mailmoat.detect import LoginFacts
from mailmoat.session.imap import (
    Awaiting,
    ImapCommand,
    ImapSession,
    ImapSessionConfig,
    StartRelay,
)
from mailmoat.session.smtp import (
    CheckLogin,
    Emit,
    SendToClient,
    SendToUpstream,
    StartClientTls,
    StartUpstreamTls,
)

DOVECOT_GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
    b"STARTTLS AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 AUTH=GSSAPI COMPRESS=DEFLATE XFOO] "
    b"Dovecot ready.\r\n"
)


def to_client(out: list[ImapCommand]) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, SendToClient))


def upstream(out: list[ImapCommand]) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, SendToUpstream))


def emitted(out: list[ImapCommand]) -> list[Emit]:
    return [c for c in out if isinstance(c, Emit)]


def greeted(**kw: Any) -> tuple[ImapSession, bytes]:
    s = ImapSession(ImapSessionConfig(listener="t", **kw), "192.0.2.9", 4711)
    out = s.receive_upstream(DOVECOT_GREETING)
    return s, to_client(out)


def test_greeting_before_tls_where_required() -> None:
    _, greeting = greeted(client_tls="starttls", require_tls=True)
    assert greeting == (
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED]"
        b" Dovecot ready.\r\n"
    )


def test_greeting_keeps_only_what_mailmoat_handles() -> None:
    _, greeting = greeted(client_tls="implicit")
    # AUTH=GSSAPI (user unreadable), COMPRESS, LOGIN-REFERRALS, XFOO and the
    # backend's own STARTTLS are gone
    assert greeting == (
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN"
        b" AUTH=CRAM-MD5] Dovecot ready.\r\n"
    )


def test_capability_noop_answered_locally_other_commands_refused() -> None:
    s, _ = greeted(client_tls="starttls")
    out = s.receive_client(b"a CAPABILITY\r\nb NOOP\r\nc SELECT INBOX\r\n")
    assert upstream(out) == b""
    assert to_client(out) == (
        b"* CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN"
        b" AUTH=CRAM-MD5 STARTTLS\r\n"
        b"a OK CAPABILITY completed\r\n"
        b"b OK NOOP completed\r\n"
        b"c BAD Command not valid before authentication\r\n"
    )


def test_starttls_then_login_then_relay() -> None:
    s, _ = greeted(client_tls="starttls", require_tls=True)
    out = s.receive_client(b"a1 LOGIN alice secret\r\n")
    assert to_client(out) == b"a1 NO [PRIVACYREQUIRED] TLS required: use STARTTLS first\r\n"
    out = s.receive_client(b"a2 STARTTLS\r\n")
    assert to_client(out) == b"a2 OK Begin TLS negotiation now\r\n"
    assert isinstance(out[-1], StartClientTls)
    assert s.awaiting is Awaiting.NOTHING
    s.client_tls_started("TLSv1.3", "TLS_AES_128_GCM_SHA256", None)
    out = s.receive_client(b"a3 LOGIN {5}\r\n")
    assert to_client(out) == b"+ Ready for literal data\r\n"
    out = s.receive_client(b"alice secret\r\na4 SELECT INBOX\r\n")
    # one write to the backend, the literal as {5+} (the backend has LITERAL+)
    assert upstream(out) == b"a3 LOGIN {5+}\r\nalice secret\r\n"
    out = s.receive_upstream(b"a3 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n")
    assert to_client(out) == b""
    assert out[-1] == CheckLogin("alice", True)
    (ev,) = emitted(out)
    assert ev.action == "auth.attempt"
    assert ev.fields["auth.user"] == "alice"
    assert "secret" not in repr(out)
    out = s.login_checked(LoginFacts(failures_ip=0, failures_user=0, distinct_users_ip=1))
    # after login the backend's list stands (inspection is over), and the
    # command the client pipelined behind LOGIN goes to the relay
    assert to_client(out) == b"a3 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n"
    assert out[-1] == StartRelay(b"a4 SELECT INBOX\r\n", b"")
    assert s.relaying


def test_failed_login_stays_in_command_state() -> None:
    s, _ = greeted(client_tls="implicit")
    s.receive_client(b"a1 AUTHENTICATE PLAIN\r\n")
    out = s.receive_upstream(b"+ \r\n")
    assert to_client(out) == b"+ \r\n"
    out = s.receive_client(b"AGJvYgB3cm9uZw==\r\n")  # \0bob\0wrong
    assert upstream(out) == b"AGJvYgB3cm9uZw==\r\n"
    out = s.receive_upstream(b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert out[-1] == CheckLogin("bob", False)
    out = s.login_checked(LoginFacts(failures_ip=1, failures_user=1, distinct_users_ip=1))
    assert to_client(out) == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert s.awaiting is Awaiting.CLIENT
    assert not s.relaying


def test_imap_id_identity_goes_first_and_client_id_is_stripped() -> None:
    s = ImapSession(
        ImapSessionConfig(listener="t", client_identity="imap-id"),
        "192.0.2.9",
        4711,
        local=("198.51.100.1", 143),
    )
    out = s.receive_upstream(DOVECOT_GREETING)
    assert to_client(out) == b""  # the client waits until the backend knows who it is
    assert upstream(out) == (
        b'mm.id ID ("x-originating-ip" "192.0.2.9" "x-originating-port" "4711"'
        b' "x-connected-ip" "198.51.100.1" "x-connected-port" "143")\r\n'
    )
    out = s.receive_upstream(b'* ID ("name" "Dovecot")\r\nmm.id OK ID completed.\r\n')
    assert to_client(out).startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    out = s.receive_client(b'x ID ("name" "mutt" "X-Originating-IP" "203.0.113.1")\r\n')
    assert upstream(out) == b'x ID ("name" "mutt")\r\n'
    (ev,) = emitted(out)
    assert ev.action == "imap.id_spoofing"
    assert ev.fields["imap.id_keys"] == ["x-originating-ip"]


def test_backend_starttls_bootstrap_and_preauth_refused() -> None:
    s = ImapSession(ImapSessionConfig(listener="t", backend_tls="starttls"))
    out = s.receive_upstream(DOVECOT_GREETING)
    assert upstream(out) == b"mm.tls STARTTLS\r\n"
    out = s.receive_upstream(b"mm.tls OK Begin TLS negotiation now.\r\n")
    assert isinstance(out[-1], StartUpstreamTls)
    out = s.upstream_tls_started("TLSv1.3", "X")
    assert upstream(out) == b"mm.cap CAPABILITY\r\n"
    out = s.receive_upstream(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nmm.cap OK done\r\n")
    assert to_client(out) == b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"

    p = ImapSession(ImapSessionConfig(listener="t"))
    out = p.receive_upstream(b"* PREAUTH [CAPABILITY IMAP4rev1] logged in as root\r\n")
    assert to_client(out) == b"* BYE [UNAVAILABLE] Service not available, try again later\r\n"
    assert p.close_reason == "backend_preauth"


def test_too_many_bad_commands_close() -> None:
    s, _ = greeted(max_errors=3)
    out = s.receive_client(b"a FOO\r\nb BAR\r\nc BAZ\r\nd NOOP\r\n")
    assert to_client(out).endswith(b"* BYE Too many invalid IMAP commands\r\n")
    assert b"d OK" not in to_client(out)
    assert s.close_reason == "too_many_errors"


def test_unsupported_mechanism_refused_locally() -> None:
    s, _ = greeted(client_tls="implicit")
    out = s.receive_client(b"a AUTHENTICATE GSSAPI\r\n")
    assert upstream(out) == b""
    assert to_client(out) == b"a NO [CANNOT] Unsupported authentication mechanism\r\n"


def test_blind_store_refuses_the_login() -> None:
    s, _ = greeted(client_tls="implicit")
    s.receive_client(b"a1 LOGIN bob secret\r\n")
    s.receive_upstream(b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    out = s.login_checked(LoginFacts(), blind=True)
    assert to_client(out) == b"a1 NO [UNAVAILABLE] Temporary authentication failure\r\n"
    s.receive_client(b"a2 LOGIN bob secret\r\n")
    s.receive_upstream(b"a2 OK Logged in\r\n")
    out = s.login_checked(LoginFacts(), blind=True)
    assert to_client(out) == b"* BYE [UNAVAILABLE] Service not available, try again later\r\n"
    assert s.close_reason == "state_unavailable"
