"""The node writes every event to the journal in data_dir (real Postfix behind it)."""

from __future__ import annotations

import smtplib
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
