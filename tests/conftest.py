"""Shared fixtures: a real Postfix (postfix_fixtures), mailmoat nodes run in-process."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from dovecot_fixtures import dovecot, postfix_sasl  # noqa: F401 - fixtures are used by name
from geoip_fixtures import geoip_dbs  # noqa: F401 - fixtures are used by name
from mailmoat.app import Node, run_node
from mailmoat.config import load_config
from mailmoat.events import MemorySink
from nginx_fixtures import fresh_nginx, nginx, webapp  # noqa: F401 - fixtures are used by name
from postfix_fixtures import (  # noqa: F401 - fixtures are used by name
    fresh_postfix,
    postfix,
    postfix_ca,
    postfix_client_context,
    postfix_tls,
)


@dataclass(frozen=True)
class MailmoatTLS:
    cert: Path
    key: Path
    ca: trustme.CA

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def mailmoat_tls(tmp_path_factory: pytest.TempPathFactory) -> MailmoatTLS:
    """mailmoat's own client-facing certificate, from a CA of its own."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", "mx.mailmoat.test")
    d = tmp_path_factory.mktemp("mailmoat-tls")
    cert, key = d / "cert.pem", d / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    return MailmoatTLS(cert, key, ca)


@dataclass
class RunningNode:
    node: Node
    events: MemorySink

    def port(self, listener: str) -> int:
        return self.node.bound[listener][0].port

    async def wait_for(self, action: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """Wait for the newest event ``action`` matching ``match`` (``a__b`` is ``a.b``)."""
        with trio.fail_after(timeout):
            while True:
                found = self.events.find(action, **match)
                if found:
                    return found[-1]
                await trio.sleep(0.02)


StartNode = Callable[[str], Awaitable[RunningNode]]


@pytest.fixture
def start_node(nursery: trio.Nursery, tmp_path: Path, mailmoat_tls: MailmoatTLS) -> StartNode:
    """Start a node from config text; ``{cert}`` / ``{key}`` are filled in."""

    async def start(text: str) -> RunningNode:
        if "data_dir" not in text:
            # the node's state snapshot goes to data_dir: never the system's /var/lib/mailmoat
            text = text.replace("[node]\n", '[node]\ndata_dir = "data"\n', 1)
        assert "data_dir" in text, "a test config needs a [node] table"
        path = tmp_path / "mailmoat.toml"
        path.write_text(
            text.replace("{cert}", str(mailmoat_tls.cert)).replace("{key}", str(mailmoat_tls.key))
        )
        config = load_config(path)
        sink = MemorySink()
        node: Node = await nursery.start(
            functools.partial(run_node, config, extra_sinks=[sink], handle_signals=False)
        )
        return RunningNode(node, sink)

    return start
