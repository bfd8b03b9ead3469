"""The node writes every event to the journal in data_dir (real Postfix behind it)."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conftest import StartNode
from mailmoat.demo.postfix import PostfixInstance
from mailmoat.events.journal import EventFilter, Journal
from test_smtp_e2e import DOMAIN, base_config, make_message, unique

pytestmark = pytest.mark.e2e


async def test_a_session_is_in_the_journal(
    postfix: PostfixInstance, start_node: StartNode, tmp_path: Path
) -> None:
    rn = await start_node(base_config(postfix))
    port = rn.port("smtp")
    subject = unique("journal")

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=20) as s:
            s.sendmail(f"a@{DOMAIN}", [f"alice@{DOMAIN}"], make_message(subject))

    await trio.to_thread.run_sync(send)
    close = await rn.wait_for("session.close")
    journal = Journal(tmp_path / "data" / "journal")
    with trio.fail_after(10):
        while not (events := journal.session(close["session.id"])) or (
            events[-1]["event.action"] != "session.close"
        ):
            await trio.sleep(0.1)  # the writer flushes a batch at a time
    actions = [e["event.action"] for e in events]
    assert actions[0] == "session.open"
    assert "smtp.message" in actions
    assert events[-1] == close
    # the node's own events too, and the filters work on the live segment
    assert list(journal.query(EventFilter(action="rules.reload")))
    assert list(journal.query(EventFilter(ip="127.0.0.0/8", action="session.close")))


async def test_mailmoat_events_command(
    postfix: PostfixInstance, start_node: StartNode, tmp_path: Path
) -> None:
    """``mailmoat events`` reads the running node's journal: table, --json, filters."""
    rn = await start_node(base_config(postfix))
    port = rn.port("smtp")

    def session(helo: str) -> None:
        with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=20) as s:
            s.sendmail(f"a@{DOMAIN}", [f"alice@{DOMAIN}"], make_message(unique("cli")))

    await trio.to_thread.run_sync(session, "client.example.org")
    close = await rn.wait_for("session.close")
    config = str(tmp_path / "mailmoat.toml")

    def events(*args: str) -> tuple[int, str, str]:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from mailmoat.cli import main; raise SystemExit(main())",
                "events",
                "-c",
                config,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
        )
        return done.returncode, done.stdout, done.stderr

    with trio.fail_after(20):
        while True:
            code, out, err = await trio.to_thread.run_sync(events, "--json", "--since", "1h")
            assert code == 0, err
            lines = [json.loads(line) for line in out.splitlines()]
            if any(e["event.action"] == "session.close" for e in lines):
                break
            await trio.sleep(0.2)
    assert any(e.get("session.id") == close["session.id"] for e in lines)
    code, table, _ = await trio.to_thread.run_sync(events, "--ip", "127.0.0.1")
    assert code == 0
    assert close["session.id"] in table
    assert "session.close" in table
    # filters that match nothing, and a refused session shows up with --blocked
    code, none, _ = await trio.to_thread.run_sync(events, "--ip", "192.0.2.0/24")
    assert (code, none) == (0, "")
    code, blocked, _ = await trio.to_thread.run_sync(events, "--blocked", "--json")
    assert code == 0
    assert all(json.loads(line)["event.action"] != "smtp.message" for line in blocked.splitlines())
    # bad input: one line, exit 2, no traceback
    code, _, err = await trio.to_thread.run_sync(events, "--since", "yesterday-ish")
    assert code == 2
    assert "is not a time" in err
    assert "Traceback" not in err
    code, _, err = await trio.to_thread.run_sync(events, "--ip", "not-an-ip")
    assert code == 2
    assert "Traceback" not in err
