"""End to end: real IMAP clients -> mailmoat -> a real Dovecot, all on loopback.

Clients are Python's imaplib, curl and raw sockets.  The client binds
127.0.0.2 as its source address so that Dovecot's log can prove it saw the
client's address (``rip=127.0.0.2``) and not mailmoat's (127.0.0.1).
"""

from __future__ import annotations

import hashlib
import imaplib
import json
import re
import secrets
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.demo.dovecot import DovecotInstance
from test_dovecot_instance import make_message, wait_for_log

pytestmark = pytest.mark.e2e
T = TypeVar("T")

CLIENT_IP = "127.0.0.2"


def imap_config(dovecot: DovecotInstance, *, identity: str = "imap-id", rules: str = "") -> str:
    backend_port = dovecot.ports.proxy_imap if identity == "proxy-v2" else dovecot.ports.imap
    return f"""
[node]
name = "imap"
drain_timeout = 2
[tls]
cert = "{{cert}}"
key = "{{key}}"
[log]
events = "none"
{rules}
[[listener]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "starttls"
require_tls = true
backend = "dovecot"

[[listener]]
name = "imap-open"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "dovecot"

[[listener]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "implicit"
backend = "dovecot"

[[backend]]
name = "dovecot"
address = "127.0.0.1:{backend_port}"
client_identity = "{identity}"
"""


class SourceIMAP(imaplib.IMAP4):
    """imaplib from 127.0.0.2."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock: socket.socket = socket.create_connection(
            (self.host, self.port), timeout=timeout, source_address=(CLIENT_IP, 0)
        )
        return sock


def no_secrets(rn: RunningNode, *secrets_: str) -> None:
    dump = json.dumps(rn.events.events)
    for s in secrets_:
        assert s not in dump


class Raw:
    """A line-oriented raw IMAP client (for what imaplib cannot say)."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=15, source_address=(CLIENT_IP, 0)
        )
        self.sock: socket.socket = (
            tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        )
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def rest(self) -> bytes:
        data = self.buf
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def rn(dovecot: DovecotInstance, start_node: StartNode) -> RunningNode:
    return await start_node(imap_config(dovecot))


async def run(fn: Callable[..., T], *args: object) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def starttls_login(port: int, tls: MailmoatTLS, user: str, password: str) -> SourceIMAP:
    imap = SourceIMAP("127.0.0.1", port, timeout=20)
    imap.starttls(ssl_context=tls.client_context())
    imap.login(user, password)
    return imap


async def test_starttls_login_select_fetch_5mb_intact(
    rn: RunningNode, dovecot: DovecotInstance, mailmoat_tls: MailmoatTLS
) -> None:
    mark = secrets.token_hex(6)
    body = "".join(f"{i:08d} " + "x" * 70 + "\n" for i in range(5 * 1024 * 1024 // 80))
    message = make_message(dovecot.address("alice"), mark, body)
    assert len(message) > 5 * 1024 * 1024
    await run(dovecot.deliver, "alice", message)

    def session() -> tuple[tuple[str, ...], bytes, str]:
        imap = SourceIMAP("127.0.0.1", rn.port("imap"), timeout=30)
        before = imap.capabilities
        imap.starttls(ssl_context=mailmoat_tls.client_context())
        imap.login("alice", "alicepw")
        imap.select("INBOX")
        typ, data = imap.search(None, "HEADER", "Message-ID", f"<{mark}@example.org>")
        (num,) = data[0].split()
        typ, fetched = imap.fetch(num, "(BODY.PEEK[])")
        assert typ == "OK"
        item = fetched[0]
        assert isinstance(item, tuple)
        raw = item[1]
        imap.logout()
        return before, raw, " ".join(imap.capabilities)

    before, raw, _after = await run(session)
    # before TLS on a require_tls listener: STARTTLS and LOGINDISABLED, no AUTH=
    assert "STARTTLS" in before
    assert "LOGINDISABLED" in before
    assert not any(c.startswith("AUTH=") for c in before)
    assert "COMPRESS=DEFLATE" not in before
    # Dovecot adds its delivery headers in front, stores CRLF and (LMTP via
    # smtplib) one empty line at the end: everything else must be intact
    unix = raw.replace(b"\r\n", b"\n").rstrip(b"\n")
    sent = message.rstrip(b"\n")
    assert len(unix) > len(sent)
    assert hashlib.sha256(unix[-len(sent) :]).digest() == hashlib.sha256(sent).digest()
    ev = await rn.wait_for("auth.attempt", auth__user="alice")
    assert ev["event.outcome"] == "success"
    assert ev["auth.mechanism"] == "LOGIN"
    line = await run(wait_for_log, dovecot, r"Login: user=<alice@mailmoat\.test>.*rip=127\.0\.0\.2")
    assert "rip=127.0.0.2" in str(line)
    close = await rn.wait_for("session.close", auth__user="alice")
    assert close["backend.bytes_received"] > 5 * 1024 * 1024
    no_secrets(rn, "alicepw")


async def test_login_failure_and_login_before_tls(
    rn: RunningNode, mailmoat_tls: MailmoatTLS
) -> None:
    def plaintext_login() -> str:
        imap = SourceIMAP("127.0.0.1", rn.port("imap"), timeout=20)
        try:
            imap.login("alice", "alicepw")
        except imaplib.IMAP4.error as exc:
            return str(exc)
        finally:
            imap.shutdown()
        return "accepted"

    assert "PRIVACYREQUIRED" in await run(plaintext_login)

    def wrong() -> str:
        imap = SourceIMAP("127.0.0.1", rn.port("imap"), timeout=20)
        imap.starttls(ssl_context=mailmoat_tls.client_context())
        try:
            imap.login("bob", "wrong-secret-1")
        except imaplib.IMAP4.error as exc:
            return str(exc)
        finally:
            imap.shutdown()
        return "accepted"

    assert "AUTHENTICATIONFAILED" in await run(wrong)
    ev = await rn.wait_for("auth.attempt", auth__user="bob")
    assert ev["event.outcome"] == "failure"
    no_secrets(rn, "wrong-secret-1", "alicepw")


async def test_authenticate_plain_with_sasl_ir_and_continuation(
    rn: RunningNode, dovecot: DovecotInstance, mailmoat_tls: MailmoatTLS
) -> None:
    import base64

    blob = base64.b64encode(b"\0carol\0carolpw")

    def sasl_ir() -> list[bytes]:
        c = Raw(rn.port("imaps"), tls=mailmoat_tls.client_context())
        greeting = c.line()
        assert b"AUTH=PLAIN" in greeting
        assert b"SASL-IR" in greeting
        c.send(b"a1 AUTHENTICATE PLAIN " + blob + b"\r\n")
        lines = c.until(b"a1")
        c.close()
        return lines

    def continuation() -> list[bytes]:
        c = Raw(rn.port("imaps"), tls=mailmoat_tls.client_context())
        c.line()
        c.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert c.line().startswith(b"+")
        c.send(base64.b64encode(b"\0bob\0nope") + b"\r\n")
        lines = c.until(b"a1")
        c.close()
        return lines

    ok = await run(sasl_ir)
    assert ok[-1].startswith(b"a1 OK")
    bad = await run(continuation)
    assert bad[-1].startswith(b"a1 NO")
    good = await rn.wait_for("auth.attempt", auth__user="carol")
    assert good["auth.mechanism"] == "PLAIN"
    assert good["event.outcome"] == "success"
    failed = await rn.wait_for("auth.attempt", auth__user="bob")
    assert failed["event.outcome"] == "failure"
    no_secrets(rn, "carolpw", blob.decode(), "nope")


async def test_login_with_literals(rn: RunningNode, mailmoat_tls: MailmoatTLS) -> None:
    def literal_login() -> list[bytes]:
        c = Raw(rn.port("imaps"), tls=mailmoat_tls.client_context())
        c.line()
        c.send(b"a1 LOGIN {5}\r\n")
        assert c.line().startswith(b"+")
        c.send(b"alice {7+}\r\nalicepw\r\n")
        lines = c.until(b"a1")
        c.send(b"a2 LOGOUT\r\n")
        c.until(b"a2")
        c.close()
        return lines

    lines = await run(literal_login)
    assert lines[-1].startswith(b"a1 OK")
    await rn.wait_for("auth.attempt", auth__user="alice", event__outcome="success")


async def test_implicit_tls_and_curl(
    rn: RunningNode, dovecot: DovecotInstance, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    mark = secrets.token_hex(6)
    await run(dovecot.deliver, "bulk", make_message(dovecot.address("bulk"), mark))
    ca = tmp_path / "ca.pem"
    mailmoat_tls.ca.cert_pem.write_to_path(str(ca))
    r = await trio.run_process(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(ca),
            "--interface",
            CLIENT_IP,
            f"imaps://localhost:{rn.port('imaps')}/INBOX",
            "-u",
            "bulk:bulkpw",
            "-X",
            f'SEARCH HEADER Message-ID "<{mark}@example.org>"',
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(rb"\* SEARCH \d+", r.stdout), r.stdout
    r = await trio.run_process(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(ca),
            "--ssl-reqd",
            f"imap://localhost:{rn.port('imap')}/",
            "-u",
            "bulk:bulkpw",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert b"INBOX" in r.stdout
    no_secrets(rn, "bulkpw")


async def test_idle_is_woken_by_a_delivery(
    rn: RunningNode, dovecot: DovecotInstance, mailmoat_tls: MailmoatTLS
) -> None:
    port, ctx = rn.port("imaps"), mailmoat_tls.client_context()
    c = await trio.to_thread.run_sync(lambda: Raw(port, tls=ctx))
    try:
        await run(c.line)
        c.send(b"a1 LOGIN alice alicepw\r\na2 SELECT INBOX\r\n")
        await run(c.until, b"a2")
        c.send(b"a3 IDLE\r\n")
        assert (await run(c.line)).startswith(b"+")
        await trio.sleep(0.3)
        await run(dovecot.deliver, "alice", make_message(dovecot.address("alice"), "idle"))
        woke: bytes = await run(c.line)
        assert re.fullmatch(rb"\* \d+ EXISTS", woke), woke
        c.send(b"DONE\r\n")
        lines: list[bytes] = await run(c.until, b"a3")
        assert lines[-1].startswith(b"a3 OK")
    finally:
        c.close()


async def test_injection_after_starttls_is_refused(rn: RunningNode) -> None:
    def inject() -> bytes:
        c = Raw(rn.port("imap-open"))
        c.line()
        c.send(b"a1 STARTTLS\r\na2 LOGIN alice alicepw\r\n")
        data = c.rest()
        c.close()
        return data

    data = await run(inject)
    assert data == b"* BYE Commands pipelined after STARTTLS are refused\r\n"
    ev = await rn.wait_for("tls.starttls_injection")
    assert ev["tls.injected_plaintext"] == len(b"a2 LOGIN alice alicepw\r\n")
    assert "alicepw" not in ev["tls.injected_preview"]
    assert rn.events.find("auth.attempt") == []


async def test_oversized_literal_and_line(rn: RunningNode) -> None:
    def oversized() -> list[bytes]:
        c = Raw(rn.port("imap-open"))
        c.line()
        c.send(b"a1 LOGIN {100000}\r\n")
        first = c.line()
        c.send(b"a2 NOOP\r\n")
        second = c.line()
        c.send(b"a3 " + b"X" * 20000 + b"\r\n")
        third = c.line()
        c.send(b"a4 NOOP\r\n")
        fourth = c.line()
        c.close()
        return [first, second, third, fourth]

    lines = await run(oversized)
    assert lines == [  # the session stays in step: no desync
        b"a1 BAD [TOOBIG] Literal too big",
        b"a2 OK NOOP completed",
        b"a3 BAD [TOOBIG] Line too long",
        b"a4 OK NOOP completed",
    ]


async def test_client_id_cannot_spoof_the_address(
    rn: RunningNode, dovecot: DovecotInstance, mailmoat_tls: MailmoatTLS
) -> None:
    def spoof() -> list[bytes]:
        c = Raw(rn.port("imaps"), tls=mailmoat_tls.client_context())
        c.line()
        c.send(b'a1 ID ("name" "evil" "x-originating-ip" "203.0.113.99")\r\n')
        lines = c.until(b"a1")
        c.send(b"a2 LOGIN carol carolpw\r\n")
        lines += c.until(b"a2")
        c.close()
        return lines

    lines = await run(spoof)
    assert lines[-1].startswith(b"a2 OK")
    ev = await rn.wait_for("imap.id_spoofing")
    assert ev["imap.id_keys"] == ["x-originating-ip"]
    line = await run(wait_for_log, dovecot, r"Login: user=<carol@mailmoat\.test>.*rip=127\.0\.0\.2")
    assert "203.0.113.99" not in str(line)


async def test_proxy_v2_backend(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS
) -> None:
    rn = await start_node(imap_config(dovecot, identity="proxy-v2"))
    imap = await run(starttls_login, rn.port("imap"), mailmoat_tls, "bulk", "bulkpw")
    await run(imap.logout)
    line = await run(wait_for_log, dovecot, r"Login: user=<bulk@mailmoat\.test>.*rip=127\.0\.0\.2")
    assert line


async def test_rules_at_imap_phases(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text(
        """
[[rule]]
id = "I-AUTH"
name = "no-mallory"
phase = "auth"
protocols = ["imap"]
when = 'auth.user == "mallory"'
action = "reject"
reply = { imap = "NO [AUTHORIZATIONFAILED] Not you" }

[[rule]]
id = "I-BRUTE"
name = "failed-logins"
phase = "login"
protocols = ["imap"]
when = 'auth.result == "failure" && login.failures_ip >= 2'
action = "ban"
ban = "1h"
"""
    )
    rn = await start_node(imap_config(dovecot, rules='[rules]\npaths = ["rules/"]\n'))

    def attempts() -> list[bytes]:
        c = Raw(rn.port("imaps"), tls=mailmoat_tls.client_context())
        c.line()
        c.send(b"a1 LOGIN mallory x\r\n")
        out = c.until(b"a1")
        c.send(b"a2 LOGIN bob wrong-1\r\n")
        out += c.until(b"a2")
        c.send(b"a3 LOGIN bob wrong-2\r\n")
        out.append(c.rest())
        c.close()
        return out

    out = await run(attempts)
    assert out[0] == b"a1 NO [AUTHORIZATIONFAILED] Not you"
    assert out[1].startswith(b"a2 NO")
    assert out[2] == b"* BYE Access denied\r\n"
    await rn.wait_for("client.ban")

    def banned() -> bytes:
        c = Raw(rn.port("imap-open"))
        data = c.rest()
        c.close()
        return data

    assert await run(banned) == b"* BYE [UNAVAILABLE] Your address is blocked for a while\r\n"


async def test_spraying_and_a_stale_password_told_apart(
    dovecot: DovecotInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tmp_path: Path
) -> None:
    """imaplib LOGIN through mailmoat: one address trying many users is banned;
    a phone retrying one stale password is only logged."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text(
        """
[[rule]]
id = "I-SPRAY"
name = "spraying"
phase = "login"
when = 'auth.result == "failure" && login.distinct_users_ip >= 3'
action = "ban"
ban = "1h"

[[rule]]
id = "I-STALE"
name = "stale-password"
phase = "login"
when = 'auth.result == "failure" && login.failures_user >= 3 && login.distinct_passwords_user == 1'
action = "log"
"""
    )
    rn = await start_node(imap_config(dovecot, rules='[rules]\npaths = ["rules/"]\n'))
    port = rn.port("imap")

    def login(user: str, password: str) -> str:
        try:
            imap = SourceIMAP("127.0.0.1", port, timeout=20)
        except imaplib.IMAP4.error as exc:
            return f"refused: {exc}"
        try:
            imap.starttls(ssl_context=mailmoat_tls.client_context())
            imap.login(user, password)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        except (imaplib.IMAP4.abort, OSError) as exc:
            return f"aborted: {exc}"
        finally:
            imap.shutdown()
        return "ok"

    for _ in range(3):  # the same stale password, three times: logged, not banned
        assert "AUTHENTICATIONFAILED" in await run(login, "dave", "stale-pw")
    stale = rn.events.find("rule.match", rule__id="I-STALE")
    assert stale[-1]["verdict.evidence"]["login.distinct_passwords_user"] == 1
    assert rn.events.find("client.ban") == []
    assert "AUTHENTICATIONFAILED" in await run(login, "erin", "guess-1")
    result = await run(login, "frank", "guess-2")  # the third distinct user
    assert "AUTHENTICATIONFAILED" not in result
    ban = await rn.wait_for("client.ban")
    assert ban["rule.id"] == "I-SPRAY"
    banned = await run(login, "alice", "alicepw")  # the ban holds for the next connection
    assert banned == "refused: b'* BYE [UNAVAILABLE] Your address is blocked for a while'"
    no_secrets(rn, "stale-pw", "guess-1", "guess-2", "alicepw")


async def test_geoip_and_impossible_travel(
    dovecot: DovecotInstance,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    tmp_path: Path,
    geoip_dbs: tuple[Path, Path],
) -> None:
    """Berlin, then Sydney an hour later: login.travel_kmh is far beyond any plane.

    The clients are on loopback, so the test maps their source addresses onto
    the test databases' networks (127.0.0.2 -> Berlin, 127.0.0.3 -> Sydney)
    before the real MaxMind lookup; the node's wall clock is moved an hour.
    """
    from mailmoat.detect.geo import GeoInfo, GeoIP

    city, asn = geoip_dbs
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text(
        """
[[rule]]
id = "G-WHERE"
name = "where-from"
phase = "connect"
when = 'client.geo.country != ""'
action = "log"

[[rule]]
id = "G-TRAVEL"
name = "impossible-travel"
phase = "login"
when = 'auth.result == "success" && login.travel_kmh > 1000.0'
action = "tag"
tags = ["ato.impossible_travel"]
"""
    )
    config = imap_config(dovecot, rules='[rules]\npaths = ["rules/"]\n')
    config += f'\n[geoip]\ncity = "{city}"\nasn = "{asn}"\n'
    rn = await start_node(config)
    real = GeoIP.from_paths(city, asn)
    places = {"127.0.0.2": "192.0.2.10", "127.0.0.3": "198.51.100.10"}

    class Mapped:
        def lookup(self, ip: str) -> GeoInfo:
            return real.lookup(places.get(ip, ip))

    service = rn.node.services["imap"]
    service.geoip = Mapped()  # type: ignore[assignment]
    now = [1_800_000_000.0]
    service.wall_clock = lambda: now[0]
    port = rn.port("imap")

    def login(source: str) -> None:
        class From(imaplib.IMAP4):
            def _create_socket(self, timeout: float | None) -> socket.socket:
                sock: socket.socket = socket.create_connection(
                    (self.host, self.port), timeout=timeout, source_address=(source, 0)
                )
                return sock

        imap = From("127.0.0.1", port, timeout=20)
        imap.starttls(ssl_context=mailmoat_tls.client_context())
        imap.login("carol", "carolpw")
        imap.logout()

    await run(login, "127.0.0.2")
    berlin = rn.events.find("rule.match", rule__id="G-WHERE")[-1]
    assert berlin["verdict.evidence"] == {"client.geo.country": "DE"}
    assert rn.events.find("rule.match", rule__id="G-TRAVEL") == []
    now[0] += 3600
    await run(login, "127.0.0.3")
    sydney = rn.events.find("rule.match", rule__id="G-WHERE")[-1]
    assert sydney["verdict.evidence"] == {"client.geo.country": "AU"}
    (travel,) = rn.events.find("rule.match", rule__id="G-TRAVEL")
    kmh = travel["verdict.evidence"]["login.travel_kmh"]
    assert 15000 < kmh < 17000, kmh  # ~16 000 km in an hour


async def test_credential_stuffing_from_many_addresses(
    dovecot: DovecotInstance, start_node: StartNode, tmp_path: Path
) -> None:
    """One account failing from five loopback addresses: login.distinct_ips_user counts them."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text(
        """
[[rule]]
id = "I-STUFF"
name = "stuffing"
phase = "login"
when = 'auth.result == "failure" && login.distinct_ips_user >= 5'
action = "log"
severity = "high"
"""
    )
    rn = await start_node(imap_config(dovecot, rules='[rules]\npaths = ["rules/"]\n'))
    port = rn.port("imap-open")

    def attempt(source: str) -> bytes:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=20, source_address=(source, 0)
        ) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"a1 LOGIN ceo wrong-" + source.encode() + b"\r\n")
            return f.readline()

    for n in range(2, 7):
        assert (await run(attempt, f"127.0.0.{n}")).startswith(b"a1 NO")
    (m,) = rn.events.find("rule.match", rule__id="I-STUFF")
    assert m["verdict.evidence"] == {"auth.result": "failure", "login.distinct_ips_user": 5}
    assert m["client.ip"] == "127.0.0.6"
