"""Two mailmoat nodes sharing one real redis-server, in front of the real Postfix.

A ban taken on node A is enforced by node B; Redis killed mid-test: mail
keeps flowing through the node, a state.degraded alert says so, and once
Redis is back (same port) detection resumes without a restart.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest
import trio

from conftest import StartNode
from mailmoat.demo.postfix import PostfixInstance
from test_rules_smtp import TOKEN, node_config
from test_smtp_e2e import make_message, unique, wait_for_subject
from test_state_store import RedisServer

pytestmark = pytest.mark.e2e

BAN_RULE = """
[[rule]]
id = "R-BAN"
name = "ban-me"
phase = "helo"
when = 'smtp.helo == "banme.example"'
action = "ban"
ban = "1h"
"""


def redis_config(port: int, url: str, data: str) -> str:
    text = node_config(port).replace('[node]\nname = "rules"', f'[node]\nname = "{data}"')
    text = text.replace("drain_timeout = 2", f'drain_timeout = 2\ndata_dir = "{data}"')
    return text + f'\n[state]\nbackend = "redis"\nurl = "{url}"\ntimeout = 0.3\n'


async def test_ban_on_node_a_holds_on_node_b_and_redis_outage_fails_open(
    postfix: PostfixInstance, start_node: StartNode, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "50-test.toml").write_text(BAN_RULE)
        (tmp_path / "admin.token").write_text(TOKEN + "\n")
        a = await start_node(redis_config(postfix.ports.smtp, redis.url, "node-a"))
        b = await start_node(redis_config(postfix.ports.smtp, redis.url, "node-b"))

        def helo(port: int, name: str) -> int:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                return s.ehlo(name)[0]

        def greeting(port: int) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                return sock.makefile("rb").readline()

        assert await trio.to_thread.run_sync(helo, a.port("smtp"), "banme.example") == 554
        await a.wait_for("client.ban")
        # node B never saw this client misbehave: the ban comes from Redis
        assert (await trio.to_thread.run_sync(greeting, b.port("smtp"))).startswith(b"554 5.7.1")
        await b.wait_for("client.banned")

        # lift it (through node B), then take Redis away: mail still flows
        assert await b.node.store.unban("127.0.0.1")
        redis.kill()
        subject = unique("redis-down")

        def send(port: int) -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                return s.sendmail("a@example.org", ["alice@mailmoat.test"], make_message(subject))

        assert await trio.to_thread.run_sync(send, a.port("smtp")) == {}
        await wait_for_subject(postfix, "alice", subject)
        alert = await a.wait_for("state.degraded")
        assert alert["event.kind"] == "alert"
        assert alert["state.on_failure"] == "open"

        # Redis back on the same port: the next try after retry_after recovers
        redis.start()
        with trio.fail_after(20):
            while not a.events.find("state.recovered"):
                await trio.to_thread.run_sync(helo, a.port("smtp"), "fine.example")
                await trio.sleep(0.5)
        assert await trio.to_thread.run_sync(helo, a.port("smtp"), "banme.example") == 554
        assert (await trio.to_thread.run_sync(greeting, b.port("smtp"))).startswith(b"554 5.7.1")
    finally:
        redis.kill()
