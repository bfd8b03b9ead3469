"""Rules wired into every SMTP phase, end to end: real clients -> mailmoat -> real Postfix.

Each test writes a rule file, starts a node whose ``[rules]`` points at it,
and checks what the client saw, what Postfix delivered, and the ``rule.match``
events (with the fields each condition read as evidence).
"""

from __future__ import annotations

import base64
import json
import os
import smtplib
import socket
import sys
import time
from pathlib import Path

import pytest
import trio

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.admin import admin_call
from mailmoat.demo.dovecot import DovecotInstance
from mailmoat.demo.postfix import PostfixInstance
from test_smtp_e2e import DOMAIN, count_subject, make_message, unique, wait_for_subject

pytestmark = pytest.mark.e2e

TOKEN = "rules-test-token-" + "0" * 16


def node_config(
    backend_port: int,
    *,
    mode: str = "enforce",
    watch: bool = False,
    greet_delay: float = 0,
    identity: str = "xclient",
) -> str:
    return f"""
[node]
name = "rules"
mode = "{mode}"
drain_timeout = 2

[tls]
cert = "{{cert}}"
key = "{{key}}"

[log]
events = "none"

[rules]
paths = ["rules/"]
watch = {str(watch).lower()}
watch_interval = 0.2

[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"

[[listener]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
greet_delay = {greet_delay}
backend = "mx"

[[backend]]
name = "mx"
address = "127.0.0.1:{backend_port}"
client_identity = "{identity}"
"""


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    return d


async def start_with_rules(
    start_node: StartNode, rules_dir: Path, rules: str, port: int, **kw: object
) -> RunningNode:
    (rules_dir / "50-test.toml").write_text(rules)
    return await start_node(node_config(port, **kw))  # type: ignore[arg-type]


def send(
    port: int,
    subject: str,
    *,
    helo: str = "client.example.org",
    sender: str = "sender@example.org",
    rcpts: list[str] | None = None,
    body: str = "hello\r\n",
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=20) as s:
        return s.sendmail(sender, rcpts or [f"alice@{DOMAIN}"], make_message(subject, body))


def matches(rn: RunningNode, rule_id: str) -> list[dict[str, object]]:
    return rn.events.find("rule.match", rule__id=rule_id)


async def test_rcpt_reject_keeps_the_session_and_records_evidence(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-RCPT"
name = "too-many-recipients"
phase = "rcpt"
when = "smtp.rcpt_count > 2"
action = "reject"
reply = { smtp = "452 4.5.3 Too many recipients" }
severity = "medium"
""",
        postfix.ports.smtp,
    )
    subject = unique("rcpt")
    rcpts = [f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"carol@{DOMAIN}", f"alice+x@{DOMAIN}"]
    refused = await trio.to_thread.run_sync(lambda: send(rn.port("smtp"), subject, rcpts=rcpts))
    assert refused == {
        f"carol@{DOMAIN}": (452, b"4.5.3 Too many recipients"),
        f"alice+x@{DOMAIN}": (452, b"4.5.3 Too many recipients"),
    }
    await wait_for_subject(postfix, "alice", subject)
    await wait_for_subject(postfix, "bob", subject)
    assert count_subject(postfix, "carol", subject) == 0
    first = matches(rn, "T-RCPT")[0]
    assert first["verdict.action"] == "reject"
    assert first["rule.name"] == "too-many-recipients"
    assert first["rule.severity"] == "medium"
    assert first["rule.phase"] == "rcpt"
    assert first["verdict.evidence"] == {"smtp.rcpt_count": 3}
    assert first["event.kind"] == "verdict"
    assert first["session.id"]
    assert rn.node.rules.current.stats()["T-RCPT"] == 2


async def test_helo_deny_closes_and_mail_from_list_reject_goes_on(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[list]]
name = "bad_senders"
kind = "domain"
items = ["spam.example"]

[[rule]]
id = "T-HELO"
name = "bad-helo"
phase = "helo"
when = 'glob(smtp.helo, "*.bad.example")'
action = "deny"

[[rule]]
id = "T-FROM"
name = "bad-sender"
phase = "mail_from"
when = "smtp.mail_from in lists.bad_senders"
action = "reject"
""",
        postfix.ports.smtp,
    )
    port = rn.port("smtp")

    def bad_helo() -> tuple[int, bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"EHLO host.bad.example\r\n")
            reply = f.readline()
            rest = f.read()  # the server closes
            return int(reply[:3]), reply, rest

    code, reply, rest = await trio.to_thread.run_sync(bad_helo)
    assert code == 554
    assert reply == b"554 5.7.1 Access denied\r\n"
    assert rest == b""
    await rn.wait_for("session.close", session__close_reason="policy_deny")

    subject = unique("from")

    def two_senders() -> tuple[tuple[int, bytes], dict[str, tuple[int, bytes]]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("client.example.org")
            refused = s.mail("x@spam.example")
            s.rset()
            return refused, s.sendmail("ok@example.org", [f"alice@{DOMAIN}"], make_message(subject))

    refused, ok = await trio.to_thread.run_sync(two_senders)
    assert refused == (550, b"5.7.1 Rejected by policy")
    assert ok == {}
    await wait_for_subject(postfix, "alice", subject)
    (m,) = matches(rn, "T-FROM")
    assert m["verdict.evidence"] == {"smtp.mail_from": "x@spam.example"}


async def test_data_phase_reject_delivers_nothing(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-SIZE"
name = "too-big-for-policy"
phase = "data"
when = "smtp.data.size > 5000"
action = "reject"
reply = { smtp = "552 5.3.4 Message too big for this policy" }
""",
        postfix.ports.smtp,
    )
    big, small = unique("big"), unique("small")

    def big_message() -> int:
        try:
            send(rn.port("smtp"), big, body="x" * 70 + "\r\n" * 1 + ("y" * 70 + "\r\n") * 100)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
        return 250

    assert await trio.to_thread.run_sync(big_message) == 552
    await trio.to_thread.run_sync(lambda: send(rn.port("smtp"), small))
    await wait_for_subject(postfix, "alice", small)
    await trio.sleep(0.5)
    assert count_subject(postfix, "alice", big) == 0
    (m,) = matches(rn, "T-SIZE")
    assert m["verdict.evidence"]["smtp.data.size"] > 5000  # type: ignore[index]
    await rn.wait_for("session.close", session__close_reason="message_rejected")


async def test_tarpit_delays_the_reply(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-SLOW"
name = "slow-down"
phase = "helo"
when = 'smtp.helo == "slow.example"'
action = "tarpit"
tarpit = "1s"
""",
        postfix.ports.smtp,
    )

    def ehlo_time(name: str) -> float:
        with smtplib.SMTP("127.0.0.1", rn.port("smtp"), timeout=20) as s:
            start = time.monotonic()
            code, _ = s.ehlo(name)
            assert code == 250
            return time.monotonic() - start

    assert await trio.to_thread.run_sync(ehlo_time, "slow.example") >= 0.95
    assert len(matches(rn, "T-SLOW")) == 1
    await trio.to_thread.run_sync(ehlo_time, "fast.example")
    assert len(matches(rn, "T-SLOW")) == 1


async def test_ban_refuses_the_next_connection_until_unbanned(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-BAN"
name = "ban-me"
phase = "helo"
when = 'smtp.helo == "banme.example"'
action = "ban"
ban = "1h"
severity = "high"
""",
        postfix.ports.smtp,
    )
    port = rn.port("smtp")

    def helo(name: str) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            return s.ehlo(name)

    assert await trio.to_thread.run_sync(helo, "banme.example") == (554, b"5.7.1 Access denied")
    ban = await rn.wait_for("client.ban")
    assert ban["rule.id"] == "T-BAN"
    assert 3590 < ban["ban.seconds"] <= 3600

    def greeting() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            return sock.makefile("rb").read()

    assert await trio.to_thread.run_sync(greeting) == (
        b"554 5.7.1 Service unavailable; your address is blocked for a while\r\n"
    )
    await rn.wait_for("client.banned")
    assert rn.node.admin_address is not None
    host, aport = rn.node.admin_address
    status, body = await trio.to_thread.run_sync(
        lambda: admin_call(host, aport, TOKEN, "GET", "/api/bans")
    )
    assert status == 200
    assert [b["ip"] for b in body["bans"]] == ["127.0.0.1"]
    status, _ = await trio.to_thread.run_sync(
        lambda: admin_call(host, aport, TOKEN, "DELETE", "/api/bans/127.0.0.1")
    )
    assert status == 200
    assert (await trio.to_thread.run_sync(helo, "fine.example"))[0] == 250


async def test_detect_mode_blocks_nothing_but_logs_what_it_would_do(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-DENY"
name = "deny-everyone"
phase = "mail_from"
when = "true"
action = "deny"
""",
        postfix.ports.smtp,
        mode="detect",
    )
    subject = unique("detect")
    assert await trio.to_thread.run_sync(lambda: send(rn.port("smtp"), subject)) == {}
    await wait_for_subject(postfix, "alice", subject)
    (m,) = matches(rn, "T-DENY")
    assert m["verdict.action"] == "detect"
    assert m["verdict.would_have"] == "deny"


async def test_connect_allow_trusts_the_whole_session(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[list]]
name = "trusted"
kind = "cidr"
items = ["127.0.0.0/8"]

[[rule]]
id = "T-ALLOW"
name = "trusted-networks"
phase = "connect"
when = "client.ip in lists.trusted"
action = "allow"

[[rule]]
id = "T-DENY"
name = "deny-everyone"
phase = "mail_from"
when = "true"
action = "deny"
""",
        postfix.ports.smtp,
    )
    subject = unique("allow")
    assert await trio.to_thread.run_sync(lambda: send(rn.port("smtp"), subject)) == {}
    await wait_for_subject(postfix, "alice", subject)
    assert len(matches(rn, "T-ALLOW")) == 1
    assert matches(rn, "T-DENY") == []


async def test_scores_add_up_to_the_deny_threshold(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[scoring]
reject = 4
deny = 6

[[rule]]
id = "T-S1"
name = "odd-helo"
phase = "helo"
when = 'smtp.helo.startsWith("odd")'
action = "score"
score = 3

[[rule]]
id = "T-S2"
name = "odd-sender"
phase = "mail_from"
when = 'smtp.mail_from.startsWith("odd")'
action = "score"
score = 3
""",
        postfix.ports.smtp,
    )

    def odd() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", rn.port("smtp"), timeout=20) as s:
            helo = s.ehlo("odd.example")
            return helo, s.mail("odd@example.org")

    (helo_code, _), mail = await trio.to_thread.run_sync(odd)
    assert helo_code == 250  # 3 points: under both thresholds
    assert mail == (554, b"5.7.1 Access denied")  # 6 points: deny
    ev = await rn.wait_for("risk.threshold")
    assert ev["risk.score"] == 6
    assert ev["verdict.action"] == "deny"


async def test_pregreet_close_phase_bans_the_client(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-PREGREET"
name = "ban-pregreeters"
phase = "close"
when = 'session.close_reason == "pregreet"'
action = "ban"
ban = "10m"
""",
        postfix.ports.smtp,
        greet_delay=0.5,
    )
    port = rn.port("smtp")

    def pregreet() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"EHLO early.example\r\n")
            return sock.makefile("rb").read()

    assert b"client talked before the greeting" in await trio.to_thread.run_sync(pregreet)
    ban = await rn.wait_for("client.ban")
    assert ban["rule.id"] == "T-PREGREET"
    (m,) = matches(rn, "T-PREGREET")
    assert m["verdict.evidence"] == {"session.close_reason": "pregreet"}

    def greeting() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            return sock.makefile("rb").read()

    assert (await trio.to_thread.run_sync(greeting)).startswith(b"554 5.7.1 Service unavailable")


def sasl_login(port: int, tls: MailmoatTLS, user: str, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.starttls(context=tls.client_context())
        s.ehlo("client.example.org")
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return s.docmd("AUTH", "PLAIN " + blob)


async def test_repeated_failed_logins_ban_the_address(
    postfix_sasl: PostfixInstance,
    dovecot: DovecotInstance,
    start_node: StartNode,
    rules_dir: Path,
    mailmoat_tls: MailmoatTLS,
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-BRUTE"
name = "failed-logins"
phase = "login"
when = 'auth.result == "failure" && login.failures_ip >= 3'
action = "ban"
ban = "1h"
""",
        postfix_sasl.ports.submission or postfix_sasl.ports.smtp,
    )
    port = rn.port("smtp")
    ok = await trio.to_thread.run_sync(sasl_login, port, mailmoat_tls, "bob", "bobpw")
    assert ok[0] == 235
    for attempt in (1, 2):
        code, _ = await trio.to_thread.run_sync(
            sasl_login, port, mailmoat_tls, "bob", f"wrong-{attempt}"
        )
        assert code == 535
    code, text = await trio.to_thread.run_sync(sasl_login, port, mailmoat_tls, "carol", "wrong-3")
    assert (code, text) == (554, b"5.7.1 Access denied")
    (m,) = matches(rn, "T-BRUTE")
    assert m["verdict.evidence"] == {"auth.result": "failure", "login.failures_ip": 3}
    with pytest.raises(smtplib.SMTPConnectError):
        await trio.to_thread.run_sync(sasl_login, port, mailmoat_tls, "bob", "bobpw")
    dump = json.dumps(rn.events.events)
    for secret in ("bobpw", "wrong-1", "wrong-3"):
        assert secret not in dump


# --------------------------------------------------------------------------- reload


RULES_V1 = """
[[rule]]
id = "T-V"
name = "version-one"
phase = "helo"
when = 'smtp.helo == "v1.example"'
action = "reject"
"""

RULES_V2 = RULES_V1.replace("version-one", "version-two").replace("v1.example", "v2.example")

BROKEN = """
[[rule]]
id = "T-V"
name = "broken"
phase = "helo"
when = 'smtp.helo == "v1.example" &&'
action = "reject"
"""


CLI_ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailmoat.cli", *args]


def helo_code(port: int, name: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        return s.ehlo(name)[0]


async def test_reload_via_cli_swaps_rules_and_keeps_old_ones_on_error(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path, tmp_path: Path
) -> None:
    rn = await start_with_rules(start_node, rules_dir, RULES_V1, postfix.ports.smtp)
    port = rn.port("smtp")
    assert await trio.to_thread.run_sync(helo_code, port, "v1.example") == 550
    assert await trio.to_thread.run_sync(helo_code, port, "v2.example") == 250
    config = tmp_path / "mailmoat.toml"
    # the test config listens on port 0: tell the CLI where the admin API really is
    assert rn.node.admin_address is not None
    text = config.read_text().replace(
        'listen = "127.0.0.1:0"\ntoken_file',
        f'listen = "127.0.0.1:{rn.node.admin_address[1]}"\ntoken_file',
    )
    cli_config = tmp_path / "cli.toml"
    cli_config.write_text(text)

    (rules_dir / "50-test.toml").write_text(RULES_V2)
    r = await trio.run_process(
        cli("reload", "-c", str(cli_config)),
        env=CLI_ENV,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert b"rules reloaded: 1 rules from 1 files; changed T-V" in r.stdout
    assert await trio.to_thread.run_sync(helo_code, port, "v1.example") == 250
    assert await trio.to_thread.run_sync(helo_code, port, "v2.example") == 550

    (rules_dir / "50-test.toml").write_text(BROKEN)
    r = await trio.run_process(
        cli("reload", "-c", str(cli_config)),
        env=CLI_ENV,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"{rules_dir / '50-test.toml'}:6:" in err
    assert "the previous rules stay in force" in err
    # the old (v2) rules are still in force, and the counters survived both reloads
    assert await trio.to_thread.run_sync(helo_code, port, "v2.example") == 550
    assert rn.node.rules.current.stats()["T-V"] == 3  # v1, v2, v2 again
    failed = await rn.wait_for("rules.reload", event__outcome="failure")
    assert failed["rules.trigger"] == "admin"
    assert "50-test.toml:6:" in failed["error.message"]


async def test_watched_rule_file_reloads_by_itself(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(start_node, rules_dir, RULES_V1, postfix.ports.smtp, watch=True)
    port = rn.port("smtp")
    assert await trio.to_thread.run_sync(helo_code, port, "v1.example") == 550
    (rules_dir / "50-test.toml").write_text(RULES_V2)
    ev = await rn.wait_for("rules.reload", rules__trigger="watch")
    assert ev["event.outcome"] == "success"
    assert ev["rules.changed"] == ["T-V"]
    assert await trio.to_thread.run_sync(helo_code, port, "v2.example") == 550
    (rules_dir / "50-test.toml").write_text(BROKEN)
    await rn.wait_for("rules.reload", rules__trigger="watch", event__outcome="failure")
    assert await trio.to_thread.run_sync(helo_code, port, "v2.example") == 550


async def test_hundred_reloads_under_load_lose_nothing(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    """100 reloads (SIGHUP's code path) while 4 clients send 120 messages: every
    session completes, every message is delivered exactly once."""
    rules = (
        RULES_V1
        + """
[[rule]]
id = "T-LOG"
name = "log-every-rcpt"
phase = "rcpt"
when = "smtp.rcpt_count >= 1"
action = "log"
"""
    )
    rn = await start_with_rules(start_node, rules_dir, rules, postfix.ports.smtp)
    port = rn.port("smtp")
    prefix = unique("load")
    workers, per_worker = 4, 30
    results: list[dict[str, tuple[int, bytes]]] = []
    done = trio.Event()

    def worker(w: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for i in range(per_worker):
                results.append(
                    s.sendmail(
                        "load@example.org", [f"alice@{DOMAIN}"], make_message(f"{prefix}-{w}-{i}")
                    )
                )
                if i % 5 == 4:  # a new session now and then, too
                    s.rset()
                    s.quit()
                    s.connect("127.0.0.1", port)

    async def load() -> None:
        async with trio.open_nursery() as n:
            for w in range(workers):
                n.start_soon(trio.to_thread.run_sync, worker, w)
        done.set()

    async def reloads() -> None:
        for i in range(100):
            (rules_dir / "50-test.toml").write_text(rules if i % 2 else rules.replace("v1", "vx"))
            result, _ = rn.node.reload("sighup")
            assert result.ok
            await trio.sleep(0.01)

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            n.start_soon(load)
            n.start_soon(reloads)
        await done.wait()
    assert results == [{}] * (workers * per_worker)
    assert len(rn.events.find("rules.reload", rules__trigger="sighup")) == 100
    deadline = trio.current_time() + 60
    while True:
        delivered = [
            p for p in postfix.messages("alice") if prefix.encode() in p.read_bytes()[:2000]
        ]
        if len(delivered) >= workers * per_worker or trio.current_time() > deadline:
            break
        await trio.sleep(0.2)
    subjects = sorted(
        line
        for p in delivered
        for line in p.read_bytes().decode().splitlines()
        if line.startswith(f"Subject: {prefix}")
    )
    expected = sorted(
        f"Subject: {prefix}-{w}-{i}" for w in range(workers) for i in range(per_worker)
    )
    assert subjects == expected
    closes = rn.events.find("session.close")
    assert closes
    assert all(c["session.close_reason"] == "client_quit" for c in closes)
    assert rn.node.rules.current.stats()["T-LOG"] == workers * per_worker


async def test_outbound_burst_of_an_authenticated_user(
    postfix_sasl: PostfixInstance,
    dovecot: DovecotInstance,
    start_node: StartNode,
    rules_dir: Path,
    mailmoat_tls: MailmoatTLS,
) -> None:
    """A user who suddenly mails far more people than usual: alert, and the rule refuses it."""
    from mailmoat.detect.outbound import Outbound
    from mailmoat.net.smtp import SmtpService

    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-BURST"
name = "sending-burst"
phase = "data"
when = "smtp.user_burst"
action = "reject"
reply = { smtp = "550 5.7.1 Unusual sending volume, contact your admin" }
""",
        postfix_sasl.ports.submission or postfix_sasl.ports.smtp,
    )
    service = rn.node.services["smtp"]
    assert isinstance(service, SmtpService)
    service.outbound = Outbound(learning_messages=2, min_burst=5, burst_factor=3)
    port = rn.port("smtp")
    users = [f"{u}@{DOMAIN}" for u in ("alice", "carol", "bulk")]

    def submit(rcpts: list[str], subject: str) -> dict[str, tuple[int, bytes]] | int:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.starttls(context=mailmoat_tls.client_context())
            s.login("bob", "bobpw")
            try:
                return s.sendmail(f"bob@{DOMAIN}", rcpts, make_message(subject))
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code

    for i in range(2):
        assert await trio.to_thread.run_sync(submit, users[:1], unique(f"normal{i}")) == {}
    burst_subject = unique("burst")
    # 12 recipients tried (3 local users, 9 that this Postfix refuses): the rate
    # counts what the user tried, > 3 x the baseline of 1 and > 5; the message is
    # refused before its final dot, so nothing is delivered
    many = users + [f"r{k}@d{k % 4}.example.net" for k in range(9)]
    assert await trio.to_thread.run_sync(submit, many, burst_subject) == 550
    alert = await rn.wait_for("smtp.user_burst")
    assert alert["auth.user"] == "bob"
    assert alert["smtp.user_rcpt_rate"] >= 12
    assert alert["smtp.user_domains"] == 5
    (m,) = matches(rn, "T-BURST")
    assert m["verdict.evidence"] == {"smtp.user_burst": True}
    await trio.sleep(0.5)
    assert not any(burst_subject.encode() in p.read_bytes() for p in dovecot.messages("alice"))


async def test_reputation_outlives_a_lifted_ban(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start_with_rules(
        start_node,
        rules_dir,
        """
[[rule]]
id = "T-BAN"
name = "ban-me"
phase = "helo"
when = 'smtp.helo == "banme.example"'
action = "ban"
ban = "1h"

[[rule]]
id = "T-REP"
name = "bad-reputation"
phase = "connect"
when = "client.reputation <= -20"
action = "tarpit"
tarpit = "100ms"
""",
        postfix.ports.smtp,
    )
    port = rn.port("smtp")

    def helo(name: str) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            return s.ehlo(name)[0]

    assert await trio.to_thread.run_sync(helo, "banme.example") == 554
    await rn.wait_for("client.ban")
    assert rn.node.admin_address is not None
    host, aport = rn.node.admin_address
    status, _ = await trio.to_thread.run_sync(
        lambda: admin_call(host, aport, TOKEN, "DELETE", "/api/bans/127.0.0.1")
    )
    assert status == 200
    assert await trio.to_thread.run_sync(helo, "fine.example") == 250
    (m,) = matches(rn, "T-REP")  # the ban is lifted, the memory of it is not
    evidence = m["verdict.evidence"]
    assert isinstance(evidence, dict)
    assert evidence["client.reputation"] <= -20
