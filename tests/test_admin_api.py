"""The node's admin API and the analyst commands, end to end.

A real node on loopback in front of a real Postfix, real SMTP sessions from
smtplib (STARTTLS, a denied HELO, a ban), then the admin API (``admin_call``,
as the CLI uses it) and the ``mailmoat session``/``unban``/``allow`` commands
in a subprocess: the journal behind ``/api/events`` and ``/api/sessions``,
labels landing in the journal, unban, and the allow list file changed and
reloaded so that the next session is let through.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import trio

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.admin import admin_call
from mailmoat.demo.postfix import PostfixInstance
from mailmoat.events.journal import Journal

pytestmark = pytest.mark.e2e

TOKEN = "admin-api-test-token-" + "7" * 16
REPO = Path(__file__).resolve().parents[1]
CLI_ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))

TEST_RULES = """
[[rule]]
id = "T-DENY"
name = "deny-bad-helo"
phase = "helo"
when = 'smtp.helo == "bad.example"'
action = "deny"
severity = "high"

[[rule]]
id = "T-BAN"
name = "ban-on-helo"
phase = "helo"
when = 'smtp.helo == "banme.example"'
action = "ban"
ban = "1h"
severity = "high"
"""


def node_config(backend_port: int, *, admin: bool = True) -> str:
    admin_section = '[admin]\nlisten = "127.0.0.1:0"\ntoken_file = "admin.token"\n'
    return f"""
[node]
name = "admin-api"
drain_timeout = 2

[tls]
cert = "{{cert}}"
key = "{{key}}"

[log]
events = "none"

[rules]
paths = ["rules/"]

{admin_section if admin else ""}

[[listener]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "mx"

[[backend]]
name = "mx"
address = "127.0.0.1:{backend_port}"
"""


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The shipped allow-list rule and its (empty) list file, plus the test rules."""
    d = tmp_path / "rules"
    (d / "lists").mkdir(parents=True)
    shutil.copy(REPO / "rules" / "10-allowlist.toml", d)
    shutil.copy(REPO / "rules" / "lists" / "trusted_networks.txt", d / "lists")
    (d / "50-test.toml").write_text(TEST_RULES)
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    return d


async def start(start_node: StartNode, postfix: PostfixInstance, **kw: bool) -> RunningNode:
    return await start_node(node_config(postfix.ports.smtp, **kw))


async def api(
    rn: RunningNode,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str = TOKEN,
) -> tuple[int, Any]:
    assert rn.node.admin_address is not None
    host, port = rn.node.admin_address
    return await trio.to_thread.run_sync(lambda: admin_call(host, port, token, method, path, body))


def cli_config(rn: RunningNode, tmp_path: Path) -> Path:
    """The node's config with the admin port it really got (the test config says 0)."""
    assert rn.node.admin_address is not None
    text = (tmp_path / "mailmoat.toml").read_text()
    text = text.replace(
        'listen = "127.0.0.1:0"\ntoken_file',
        f'listen = "127.0.0.1:{rn.node.admin_address[1]}"\ntoken_file',
    )
    path = tmp_path / "cli.toml"
    path.write_text(text)
    return path


async def cli(*args: str) -> tuple[int, str, str]:
    done = await trio.run_process(
        [sys.executable, "-m", "mailmoat.cli", *args],
        env=CLI_ENV,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert "Traceback" not in err
    return done.returncode, out, err


def ehlo(port: int, name: str, tls: MailmoatTLS | None = None) -> int:
    """The reply to EHLO ``name`` (or the greeting's code when the client is refused)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="start.example", timeout=20) as s:
            if tls is not None:
                s.starttls(context=tls.client_context())
            return s.ehlo(name)[0]
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code


async def journal_until(
    rn: RunningNode, pick: Callable[[Journal], list[dict[str, Any]]], timeout: float = 10
) -> list[dict[str, Any]]:
    """Poll the node's journal until ``pick`` finds something (the writer flushes in batches)."""
    journal = Journal(rn.node.config.node.data_dir / "journal")
    with trio.fail_after(timeout):
        while not (found := await trio.to_thread.run_sync(pick, journal)):
            await trio.sleep(0.1)
    return found


async def denied_session(rn: RunningNode, tls: MailmoatTLS) -> str:
    """A STARTTLS session denied at HELO; its id once its close is in the journal."""
    assert await trio.to_thread.run_sync(ehlo, rn.port("smtp"), "bad.example", tls) == 554
    close = await rn.wait_for("session.close", session__close_reason="policy_deny")
    sid = str(close["session.id"])
    await journal_until(
        rn, lambda j: [e for e in j.session(sid) if e["event.action"] == "session.close"]
    )
    return sid


# --------------------------------------------------------------------------- events


async def test_events_endpoint_filters_newest_first_and_names_bad_parameters(
    postfix: PostfixInstance,
    start_node: StartNode,
    rules_dir: Path,
    mailmoat_tls: MailmoatTLS,
) -> None:
    rn = await start(start_node, postfix)
    assert await trio.to_thread.run_sync(ehlo, rn.port("smtp"), "good.example") == 250
    good = await rn.wait_for("session.close", session__close_reason="client_quit")
    bad = await denied_session(rn, mailmoat_tls)

    status, body = await api(rn, "GET", "/api/events?" + urlencode({"since": "1h"}))
    assert status == 200
    events = body["events"]
    assert body["count"] == len(events) > 0
    stamps = [e["@timestamp"] for e in events]
    assert stamps == sorted(stamps, reverse=True)
    assert {good["session.id"], bad} <= {e.get("session.id") for e in events}

    status, body = await api(rn, "GET", "/api/events?blocked")
    assert status == 200
    blocked = body["events"]
    assert {e["event.action"] for e in blocked} == {"rule.match", "session.close"}
    assert {e["session.id"] for e in blocked} == {bad}
    assert not any(e.get("session.id") == good["session.id"] for e in blocked)

    query = urlencode({"rule": "T-DENY", "ip": "127.0.0.0/8", "protocol": "smtp"})
    status, body = await api(rn, "GET", f"/api/events?{query}")
    assert status == 200
    [match] = body["events"]
    assert match["verdict.evidence"] == {"smtp.helo": "bad.example"}

    status, body = await api(rn, "GET", "/api/events?limit=2&blocked=false")
    assert (status, body["count"]) == (200, 2)
    assert not [e for e in body["events"] if e.get("rule.id") == "T-DENY"]
    status, body = await api(rn, "GET", "/api/events?since=2099-01-01T00:00:00Z")
    assert (status, body["count"]) == (200, 0)
    status, body = await api(rn, "GET", "/api/events?ip=192.0.2.0/24")
    assert (status, body["events"]) == (200, [])

    for query, name in [
        ("since=yesterday-ish", "since"),
        ("until=soon", "until"),
        ("ip=not-an-ip", "ip"),
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("protocol=ftp", "protocol"),
        ("blocked=maybe", "blocked"),
        ("colour=red", "colour"),
        ("rule=a&rule=b", "rule"),
    ]:
        status, body = await api(rn, "GET", f"/api/events?{query}")
        assert status == 400, query
        assert body["parameter"] == name
        assert body["error"].startswith(f"{name}: ")
    status, _ = await api(rn, "GET", "/api/events", token="wrong-token-" + "0" * 16)
    assert status == 401


# --------------------------------------------------------------------------- sessions


async def test_session_endpoint_label_and_session_command(
    postfix: PostfixInstance,
    start_node: StartNode,
    rules_dir: Path,
    mailmoat_tls: MailmoatTLS,
    tmp_path: Path,
) -> None:
    rn = await start(start_node, postfix)
    sid = await denied_session(rn, mailmoat_tls)
    # a transcript as the session would record it (the event another module adds)
    rn.node.emitter.emit(
        "session.transcript",
        {
            "transcript": [
                {"dir": "c", "line": "EHLO injected.example"},
                {"dir": "s", "line": "554 5.7.1 Access denied"},
            ]
        },
        session_id=sid,
    )

    status, body = await api(rn, "GET", f"/api/sessions/{sid}")
    assert status == 200
    events = body["events"]
    assert body["count"] == len(events)
    assert events[0]["event.action"] == "session.open"
    assert all(e["session.id"] == sid for e in events)
    summary = body["summary"]
    assert summary["session_id"] == sid
    assert summary["protocol"] == "smtp"
    assert summary["listener"] == "smtp"
    assert summary["client"]["ip"] == "127.0.0.1"
    assert isinstance(summary["client"]["port"], int)
    assert summary["tls"]["active"] is True
    assert summary["tls"]["version"] == "TLSv1.3"
    assert summary["tls"]["ja4"].startswith("t13")
    assert summary["close"]["reason"] == "policy_deny"
    assert summary["blocked"] is True
    [verdict] = summary["verdicts"]
    assert verdict["rule_id"] == "T-DENY"
    assert verdict["verdict"] == "deny"
    assert verdict["evidence"] == {"smtp.helo": "bad.example"}

    status, body = await api(rn, "GET", "/api/sessions/0000deadbeef00000000")
    assert status == 404
    assert "0000deadbeef00000000" in body["error"]

    # a label: an audit event of that session, in the journal, in the summary
    status, body = await api(
        rn,
        "POST",
        f"/api/sessions/{sid}/label",
        {"label": "false_positive", "note": "our own relay"},
    )
    assert status == 200
    label = await rn.wait_for("session.label")
    assert label["session.id"] == sid
    assert label["event.kind"] == "audit"
    assert label["label.value"] == "false_positive"
    assert label["label.note"] == "our own relay"
    assert label["admin.client"] == "127.0.0.1"
    await journal_until(
        rn, lambda j: [e for e in j.session(sid) if e["event.action"] == "session.label"]
    )
    status, body = await api(rn, "GET", f"/api/sessions/{sid}")
    assert [x["label"] for x in body["summary"]["labels"]] == ["false_positive"]
    transcript = body["summary"]["transcript"]
    assert {"dir": "c", "line": "EHLO injected.example"} in transcript

    status, body = await api(rn, "POST", f"/api/sessions/{sid}/label", {"label": "maybe"})
    assert (status, body["parameter"]) == (400, "label")
    status, body = await api(rn, "POST", f"/api/sessions/{sid}/label", {"label": 1})
    assert (status, body["parameter"]) == (400, "label")
    status, _ = await api(
        rn, "POST", "/api/sessions/0000deadbeef00000000/label", {"label": "confirmed"}
    )
    assert status == 404

    # the command reads the journal itself
    config = str(tmp_path / "mailmoat.toml")
    code, out, err = await cli("session", "-c", config, sid)
    assert code == 0, err
    assert sid in out
    assert "127.0.0.1 port" in out
    assert "TLSv1.3" in out
    assert "T-DENY deny-bad-helo (deny, high) at helo" in out
    assert "smtp.helo = bad.example" in out
    assert "policy_deny" in out
    assert "false_positive by 127.0.0.1" in out
    assert "C: EHLO injected.example" in out
    assert "S: 554 5.7.1 Access denied" in out
    code, out, err = await cli("session", "-c", config, sid, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["session_id"] == sid
    assert data["summary"]["verdicts"][0]["rule_id"] == "T-DENY"
    assert data["events"][0]["event.action"] == "session.open"
    code, out, err = await cli("session", "-c", config, "0000deadbeef00000000")
    assert (code, out) == (1, "")
    assert "no session '0000deadbeef00000000'" in err


# --------------------------------------------------------------------------- unban


async def test_unban_by_api_and_command(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path, tmp_path: Path
) -> None:
    rn = await start(start_node, postfix)
    port = rn.port("smtp")
    assert await trio.to_thread.run_sync(ehlo, port, "banme.example") == 554
    await rn.wait_for("client.ban")
    assert await trio.to_thread.run_sync(ehlo, port, "fine.example") == 554

    status, body = await api(rn, "POST", "/api/unban", {"ip": "127.0.0.1"})
    assert (status, body) == (200, {"ok": True, "ip": "127.0.0.1"})
    event = await rn.wait_for("client.unban")
    assert event["event.kind"] == "audit"
    assert event["event.outcome"] == "success"
    assert event["client.ip"] == "127.0.0.1"
    assert event["admin.client"] == "127.0.0.1"
    assert await trio.to_thread.run_sync(ehlo, port, "fine.example") == 250
    status, body = await api(rn, "POST", "/api/unban", {"ip": "127.0.0.1"})
    assert status == 404
    assert "not banned" in body["error"]
    for bad in ({"ip": "nope"}, {"ip": 7}, {}):
        status, body = await api(rn, "POST", "/api/unban", bad)
        assert (status, body["parameter"]) == (400, "ip")

    # the command, through [admin] of the config
    assert await trio.to_thread.run_sync(ehlo, port, "banme.example") == 554
    config = str(cli_config(rn, tmp_path))
    code, out, err = await cli("unban", "-c", config, "127.0.0.1")
    assert code == 0, err
    assert out == "unbanned 127.0.0.1\n"
    assert await trio.to_thread.run_sync(ehlo, port, "fine.example") == 250
    code, _, err = await cli("unban", "-c", config, "127.0.0.1")
    assert code == 1
    assert "127.0.0.1 is not banned" in err
    code, _, err = await cli("unban", "-c", config, "not-an-ip")
    assert code == 2
    assert "not an IP address" in err


# --------------------------------------------------------------------------- allow


async def test_allow_appends_to_the_list_file_and_reloads(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path, tmp_path: Path
) -> None:
    rn = await start(start_node, postfix)
    port = rn.port("smtp")
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 554
    list_file = rules_dir / "lists" / "trusted_networks.txt"
    list_file.chmod(0o640)
    shipped = list_file.read_text()

    status, body = await api(
        rn,
        "POST",
        "/api/allow",
        {"kind": "ip", "value": "127.0.0.1", "comment": "test relay\n10.0.0.0/8\u2028::/0"},
    )
    assert status == 200, body
    assert body["added"] is True
    assert body["active"] is True
    assert body["list"] == "trusted_networks"
    assert body["file"] == str(list_file)
    text = list_file.read_text()
    assert text.startswith(shipped)
    added = text[len(shipped) :].splitlines()
    [line] = added  # the newlines in the comment did not make entries of their own
    assert line.startswith("127.0.0.1  # added by 127.0.0.1 at ")
    assert line.endswith(": test relay 10.0.0.0/8 ::/0")
    assert list_file.stat().st_mode & 0o777 == 0o640
    assert not [p for p in list_file.parent.iterdir() if p.name.endswith(".tmp")]
    reload = await rn.wait_for("rules.reload", rules__trigger="admin")
    assert reload["event.outcome"] == "success"
    audit = await rn.wait_for("allowlist.add")
    assert audit["event.kind"] == "audit"
    assert audit["event.outcome"] == "success"
    assert audit["allowlist.value"] == "127.0.0.1"
    assert audit["list.name"] == "trusted_networks"
    assert audit["admin.client"] == "127.0.0.1"
    # the next session is trusted: the allow rule ends evaluation at connect
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 250
    assert rn.events.find("rule.match", rule__id="MM-NET-0001")

    # a duplicate (also as /32, or inside a listed network) is not appended twice
    for kind, value in (("ip", "127.0.0.1"), ("cidr", "127.0.0.1/32")):
        status, body = await api(rn, "POST", "/api/allow", {"kind": kind, "value": value})
        assert (status, body["added"]) == (200, False)
        assert "already in the list" in body["message"]
    assert list_file.read_text() == text
    assert len(rn.events.find("allowlist.add")) == 1

    # the command: the kind from the value, a comment
    config = str(cli_config(rn, tmp_path))
    code, out, err = await cli("allow", "-c", config, "10.1.0.0/16", "--comment", "office")
    assert code == 0, err
    assert "added 10.1.0.0/16 to trusted_networks" in out
    assert "rules reloaded:" in out
    assert list_file.read_text().splitlines()[-1].startswith("10.1.0.0/16  # added by ")
    assert list_file.read_text().endswith(": office\n")
    code, out, _ = await cli("allow", "-c", config, "cidr", "10.1.2.0/24")
    assert code == 0
    assert "already in the list 'trusted_networks' as 10.1.0.0/16" in out

    # and out again: the API for the address, the command for the network
    status, body = await api(rn, "POST", "/api/allow/remove", {"kind": "ip", "value": "127.0.0.1"})
    assert (status, body["removed"]) == (200, True), body
    assert not [x for x in list_file.read_text().splitlines() if x.startswith("127.0.0.1")]
    removed = await rn.wait_for("allowlist.remove")
    assert removed["allowlist.value"] == "127.0.0.1"
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 554  # no longer trusted
    code, out, _ = await cli("allow", "-c", config, "--remove", "10.1.2.0/24")
    assert code == 1
    assert "covered by 10.1.0.0/16" in out
    code, out, err = await cli("allow", "-c", config, "--remove", "10.1.0.0/16")
    assert code == 0, err
    assert "removed 10.1.0.0/16 from trusted_networks" in out
    assert list_file.read_text() == shipped

    # bad values name the field; a list that is not there is a conflict
    for request, name in [
        ({"kind": "cidr", "value": "10.1.0.1/16"}, "value"),
        ({"kind": "ip", "value": "10.0.0.0/8"}, "value"),
        ({"kind": "ip", "value": "mail.example.org"}, "value"),
        ({"kind": "host", "value": "10.0.0.1"}, "kind"),
        ({"value": "10.0.0.1"}, "kind"),
    ]:
        status, body = await api(rn, "POST", "/api/allow", request)
        assert (status, body["parameter"]) == (400, name), request
    status, body = await api(
        rn, "POST", "/api/allow", {"kind": "ip", "value": "192.0.2.1", "list": "nope"}
    )
    assert status == 409
    assert "'nope' is not loaded" in body["error"]
    code, _, err = await cli("allow", "-c", config, "10.1.0.1/16")
    assert code == 2
    assert "host bits set" in err


async def test_allow_keeps_the_file_when_the_reload_fails(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start(start_node, postfix)
    list_file = rules_dir / "lists" / "trusted_networks.txt"
    before = list_file.read_text()
    (rules_dir / "70-broken.toml").write_text("[[rule]]\nid = 'X'\n")
    status, body = await api(rn, "POST", "/api/allow", {"kind": "ip", "value": "192.0.2.9"})
    assert status == 422
    assert body["added"] is False
    assert "taken out again" in body["error"]
    assert body["rules"]["errors"]
    assert list_file.read_text() == before
    failed = await rn.wait_for("allowlist.add")
    assert failed["event.outcome"] == "failure"


async def test_allow_needs_a_file_backed_cidr_list(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path, tmp_path: Path
) -> None:
    (rules_dir / "10-allowlist.toml").unlink()
    (rules_dir / "20-inline.toml").write_text(
        '[[list]]\nname = "inline_nets"\nkind = "cidr"\nitems = ["192.0.2.0/24"]\n'
    )
    rn = await start(start_node, postfix)
    status, body = await api(rn, "POST", "/api/allow", {"kind": "ip", "value": "192.0.2.1"})
    assert status == 409
    assert "'trusted_networks' is not loaded" in body["error"]
    assert "inline_nets" in body["error"]  # the cidr lists there are
    status, body = await api(
        rn, "POST", "/api/allow", {"kind": "ip", "value": "198.51.100.1", "list": "inline_nets"}
    )
    assert status == 409
    assert "inline" in body["error"]
    code, _, err = await cli("allow", "-c", str(cli_config(rn, tmp_path)), "192.0.2.1")
    assert code == 1
    assert "'trusted_networks' is not loaded" in err


async def test_allow_list_is_listed_with_comments_and_covering_entries(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path, tmp_path: Path
) -> None:
    rn = await start(start_node, postfix)
    list_file = rules_dir / "lists" / "trusted_networks.txt"
    shipped = list_file.read_text()
    where = {"list": "trusted_networks", "file": str(list_file)}

    # the shipped list: every line a comment, so no entry
    status, body = await api(rn, "GET", "/api/allow")
    assert status == 200, body
    assert body == {
        "lists": [{**where, "count": 0, "invalid": 0}],
        "entries": [],
        "count": 0,
        "invalid": [],
    }

    for kind, value, comment in [
        ("ip", "192.0.2.7", "relay, ticket #1"),
        ("cidr", "198.51.100.0/24", "partner <b>net</b>"),
        ("ip", "2001:db8::25", ""),
    ]:
        status, body = await api(
            rn, "POST", "/api/allow", {"kind": kind, "value": value, "comment": comment}
        )
        assert (status, body["added"]) == (200, True), body
    status, body = await api(rn, "GET", "/api/allow")
    assert status == 200
    assert body["count"] == 3
    assert body["lists"] == [{**where, "count": 3, "invalid": 0}]
    first, second, third = body["entries"]
    assert first["added_at"].endswith("Z")
    assert first == {
        "entry": "192.0.2.7",
        "kind": "ip",
        "line": len(shipped.splitlines()) + 1,
        "comment": "relay, ticket #1",
        "added_by": "127.0.0.1",
        "added_at": first["added_at"],
        "active": True,
        **where,
    }
    assert (second["entry"], second["kind"], second["comment"]) == (
        "198.51.100.0/24",
        "cidr",
        "partner <b>net</b>",
    )
    assert (third["entry"], third["comment"], third["added_by"]) == (
        "2001:db8::25",
        None,
        "127.0.0.1",
    )

    # ?ip=: the entries covering one address, exact or a network holding it
    status, body = await api(rn, "GET", "/api/allow?ip=198.51.100.9")
    assert status == 200
    assert body["ip"] == "198.51.100.9"
    [covering] = body["entries"]
    assert (covering["entry"], covering["exact"], covering["comment"]) == (
        "198.51.100.0/24",
        False,
        "partner <b>net</b>",
    )
    status, body = await api(rn, "GET", "/api/allow?ip=%3A%3Affff%3A192.0.2.7")  # ::ffff:192.0.2.7
    assert (status, body["ip"]) == (200, "192.0.2.7")
    assert [(e["entry"], e["exact"]) for e in body["entries"]] == [("192.0.2.7", True)]
    status, body = await api(rn, "GET", "/api/allow?ip=2001:db8::25&list=trusted_networks")
    assert [(e["entry"], e["exact"]) for e in body["entries"]] == [("2001:db8::25", True)]
    status, body = await api(rn, "GET", "/api/allow?ip=203.0.113.1")
    assert (status, body["entries"], body["count"]) == (200, [], 0)

    # a hand edit not reloaded yet: listed but not in force; a line that is no entry is
    # reported with its line number, not fatal
    before = list_file.read_text()
    list_file.write_text(
        before + "203.0.113.0/24   # the office (by hand)\nnot-an-address  # oops\n10.0.0.1/8\n"
    )
    n = len(before.splitlines())
    status, body = await api(rn, "GET", "/api/allow?ip=203.0.113.5")
    assert status == 200, body
    [hand] = body["entries"]
    assert hand["entry"] == "203.0.113.0/24"
    assert (hand["comment"], hand["added_by"], hand["added_at"]) == (
        "the office (by hand)",
        None,
        None,
    )
    assert (hand["active"], hand["line"]) == (False, n + 1)
    assert [(b["line"], b["text"]) for b in body["invalid"]] == [
        (n + 2, "not-an-address  # oops"),
        (n + 3, "10.0.0.1/8"),
    ]
    assert "not an IP network" in body["invalid"][0]["error"]
    assert "host bits set" in body["invalid"][1]["error"]
    assert body["invalid"][0]["list"] == "trusted_networks"
    assert body["lists"] == [{**where, "count": 4, "invalid": 2}]

    # the command: a table, --ip, --json, and the lines that are not entries on stderr
    config = str(cli_config(rn, tmp_path))
    code, out, err = await cli("allow", "-c", config, "--list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"trusted_networks ({list_file}): 4 entries"
    assert lines[1].split() == ["ENTRY", "IN", "FORCE", "ADDED", "BY", "ADDED", "AT", "COMMENT"]
    assert lines[2].startswith("192.0.2.7 ")
    assert lines[2].split()[1:3] == ["yes", "127.0.0.1"]
    assert lines[2].endswith("  relay, ticket #1")
    assert lines[5].split() == ["203.0.113.0/24", "no", "-", "-", "the", "office", "(by", "hand)"]
    assert "in the file but not in the rules in force" in out
    assert f"{list_file}:{n + 2}: not an entry, not an IP network: 'not-an-address'" in err
    assert f"{list_file}:{n + 3}: not an entry, '10.0.0.1/8' has host bits set" in err
    list_file.write_text(before)

    code, out, err = await cli("allow", "-c", config, "--list", "--ip", "198.51.100.200")
    assert code == 0, err
    assert out.splitlines()[0] == f"trusted_networks ({list_file}): 1 entry covers 198.51.100.200"
    assert out.splitlines()[2].startswith("198.51.100.0/24 ")
    assert err == ""
    code, out, _ = await cli(
        "allow", "-c", config, "--list", "trusted_networks", "--ip", "203.0.113.1", "--json"
    )
    assert code == 0
    answer = json.loads(out)
    assert (answer["ip"], answer["entries"], answer["lists"][0]["count"]) == ("203.0.113.1", [], 3)
    code, out, _ = await cli("allow", "-c", config, "--list", "--ip", "203.0.113.1")
    assert (code, out) == (0, f"trusted_networks ({list_file}): no entry covers 203.0.113.1\n")
    code, out, err = await cli("allow", "-c", config, "--list", "--ip", "nope")
    assert (code, out) == (2, "")
    assert "ip: not an IP address: 'nope'" in err
    code, out, err = await cli("allow", "-c", config, "--list", "nope")
    assert (code, out) == (1, "")
    assert "'nope' is not loaded" in err
    code, out, err = await cli("allow", "-c", config, "--list", "10.0.0.0/8")
    assert (code, out) == (2, "")
    assert "--list takes a list name, not an address" in err
    for args in (["--ip", "192.0.2.7"], ["192.0.2.7", "--json"], ["192.0.2.7", "--list"], []):
        code, out, err = await cli("allow", "-c", config, *args)
        assert (code, out) == (2, ""), args
        assert err.startswith("mailmoat: allow: "), args

    # taken out: no longer listed
    status, body = await api(
        rn, "POST", "/api/allow/remove", {"kind": "cidr", "value": "198.51.100.0/24"}
    )
    assert (status, body["removed"]) == (200, True), body
    status, body = await api(rn, "GET", "/api/allow?ip=198.51.100.9")
    assert (status, body["entries"]) == (200, [])
    status, body = await api(rn, "GET", "/api/allow")
    assert [e["entry"] for e in body["entries"]] == ["192.0.2.7", "2001:db8::25"]

    # bad parameters are named; a list that is not there is a conflict
    for query, name in [
        ("ip=nope", "ip"),
        ("ip=10.0.0.0/8", "ip"),
        ("ip=", "ip"),
        ("ip=192.0.2.7&ip=192.0.2.8", "ip"),
        ("list=", "list"),
        ("address=192.0.2.7", "address"),
    ]:
        status, body = await api(rn, "GET", f"/api/allow?{query}")
        assert (status, body["parameter"]) == (400, name), query
        assert body["error"].startswith(f"{name}: "), body
    status, body = await api(rn, "GET", "/api/allow?list=nope")
    assert status == 409
    assert "'nope' is not loaded" in body["error"]

    # the token, as everywhere
    assert rn.node.admin_address is not None
    host, port = rn.node.admin_address

    def no_token() -> int:
        import http.client

        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/api/allow?ip=192.0.2.7")
            return conn.getresponse().status
        finally:
            conn.close()

    assert await trio.to_thread.run_sync(no_token) == 401
    failure = await rn.wait_for("admin.auth_failure", event__reason="missing token")
    assert (failure["url.path"], failure["http.request.method"]) == ("/api/allow", "GET")
    status, _ = await api(rn, "GET", "/api/allow", token="wrong-" + "0" * 30)
    assert status == 401
    failure = await rn.wait_for("admin.auth_failure", event__reason="wrong token")
    assert failure["url.path"] == "/api/allow"


# --------------------------------------------------------------------------- metrics


class FakeMetrics:
    def render(self) -> tuple[bytes, str]:
        return b"mailmoat_sessions_total 3\n", "text/plain; version=0.0.4; charset=utf-8"


async def test_metrics_route(
    postfix: PostfixInstance, start_node: StartNode, rules_dir: Path
) -> None:
    rn = await start(start_node, postfix)
    setattr(rn.node, "metrics", None)  # noqa: B010 - the attribute may not exist (yet)
    assert rn.node.admin_address is not None
    host, port = rn.node.admin_address
    status, _ = await api(rn, "GET", "/metrics")
    assert status == 404
    setattr(rn.node, "metrics", FakeMetrics())  # noqa: B010

    def get(token: str) -> tuple[int, str, bytes]:
        import http.client

        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type") or "", response.read()
        finally:
            conn.close()

    status, content_type, body = await trio.to_thread.run_sync(get, TOKEN)
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert body == b"mailmoat_sessions_total 3\n"
    status, _, _ = await trio.to_thread.run_sync(get, "wrong")
    assert status == 401


# --------------------------------------------------------------------------- no node


async def test_commands_say_when_the_node_cannot_be_asked(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    base = (
        node_config(1, admin=False)
        .replace("[node]\n", '[node]\ndata_dir = "data"\n')
        .replace("{cert}", "c.pem")
        .replace("{key}", "k.pem")
    )
    (tmp_path / "no-admin.toml").write_text(base)
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    free = sock.getsockname()[1]
    sock.close()  # bound, never listened: connecting is refused
    with_admin = base.replace(
        "[[listener]]",
        f'[admin]\nlisten = "127.0.0.1:{free}"\ntoken_file = "admin.token"\n\n[[listener]]',
        1,
    )
    (tmp_path / "down.toml").write_text(with_admin)
    for args in (("unban", "192.0.2.1"), ("allow", "192.0.2.1")):
        code, out, err = await cli(args[0], "-c", str(tmp_path / "no-admin.toml"), args[1])
        assert (code, out) == (2, ""), err
        assert "no [admin] section" in err
        code, out, err = await cli(args[0], "-c", str(tmp_path / "down.toml"), args[1])
        assert (code, out) == (2, ""), err
        assert f"cannot reach the admin API at 127.0.0.1:{free}" in err
    code, _, err = await cli("session", "-c", str(tmp_path / "down.toml"), "abc")
    assert code == 1
    assert "no journal at" in err
