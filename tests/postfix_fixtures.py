"""pytest fixtures for a real, private Postfix (see ``mailmoat.demo.postfix``).

Plain (synchronous) pytest fixtures; import them into a conftest with
``from postfix_fixtures import *`` or ``pytest_plugins = ["postfix_fixtures"]``.

- ``postfix``: one instance for the whole session, listening on loopback with
  smtp, submission (STARTTLS), smtps (implicit TLS) and proxy_v2 (PROXY
  protocol) ports, TLS certificate from a trustme CA.
- ``postfix_ca``: that trustme CA; ``postfix_client_context``: an
  ``ssl.SSLContext`` trusting it.
- ``fresh_postfix``: a factory for extra, per-test instances (~0.2 s each to
  start), stopped and removed at the end of the test.

Postfix missing is a test *failure*, not a skip: the e2e tests are part of CI.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import trustme

from mailmoat.demo.postfix import (
    PostfixInstance,
    PostfixPorts,
    find_free_port,
    postfix_available,
)

__all__ = [
    "POSTFIX_MISSING",
    "PostfixFactory",
    "PostfixTLS",
    "all_ports",
    "fresh_postfix",
    "postfix",
    "postfix_ca",
    "postfix_client_context",
    "postfix_tls",
]

POSTFIX_MISSING = "postfix is not installed: run .ci/run or apt-get install postfix"
SERVER_NAMES = ("mx.mailmoat.test", "localhost", "127.0.0.1")


@dataclass(frozen=True)
class PostfixTLS:
    """The server certificate files Postfix uses, and the CA that signed them."""

    ca: trustme.CA
    cert_file: Path
    key_file: Path
    ca_file: Path


class PostfixFactory(Protocol):
    def __call__(
        self, ports: PostfixPorts | None = None, *, tls: bool = False, **options: Any
    ) -> PostfixInstance: ...


def _require_postfix() -> None:
    if not postfix_available():
        pytest.fail(POSTFIX_MISSING, pytrace=False)


def _new_root() -> Path:
    # Not pytest's tmp_path: its parents are mode 0700, and Postfix's daemons
    # (user postfix) and virtual(8) (user nobody) must be able to reach the root.
    return Path(tempfile.mkdtemp(prefix="mailmoat-postfix-"))


def all_ports() -> PostfixPorts:
    """Free ports for every listener."""
    return PostfixPorts(
        smtp=find_free_port(),
        submission=find_free_port(),
        smtps=find_free_port(),
        proxy_v2=find_free_port(),
    )


@pytest.fixture(scope="session")
def postfix_ca() -> trustme.CA:
    """The test CA that signs the Postfix server certificate."""
    return trustme.CA(organization_name="mailmoat test CA")


@pytest.fixture(scope="session")
def postfix_tls(postfix_ca: trustme.CA) -> Iterator[PostfixTLS]:
    """A server certificate for mx.mailmoat.test, localhost and 127.0.0.1, as files."""
    directory = Path(tempfile.mkdtemp(prefix="mailmoat-postfix-tls-"))
    try:
        server = postfix_ca.issue_cert(*SERVER_NAMES)
        cert_file = directory / "cert.pem"
        key_file = directory / "key.pem"
        ca_file = directory / "ca.pem"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        key_file.touch(mode=0o600)
        server.private_key_pem.write_to_path(str(key_file))
        postfix_ca.cert_pem.write_to_path(str(ca_file))
        yield PostfixTLS(postfix_ca, cert_file, key_file, ca_file)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix_client_context(postfix_ca: trustme.CA) -> ssl.SSLContext:
    """A client-side SSL context that verifies the Postfix certificate."""
    context = ssl.create_default_context()
    postfix_ca.configure_trust(context)
    return context


@pytest.fixture(scope="session")
def postfix(postfix_tls: PostfixTLS) -> Iterator[PostfixInstance]:
    """The session's Postfix: smtp + submission + smtps + proxy_v2 on 127.0.0.1."""
    _require_postfix()
    root = _new_root()
    instance = PostfixInstance(
        root, all_ports(), cert_file=postfix_tls.cert_file, key_file=postfix_tls.key_file
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_postfix(postfix_tls: PostfixTLS) -> Iterator[PostfixFactory]:
    """Factory for extra started instances, stopped and removed after the test.

    ``fresh_postfix()`` gives smtp only; pass ``ports=`` for more listeners,
    ``tls=True`` for the session certificate, other keywords go to
    ``PostfixInstance``.
    """
    _require_postfix()
    started: list[tuple[PostfixInstance, Path]] = []

    def factory(
        ports: PostfixPorts | None = None, *, tls: bool = False, **options: Any
    ) -> PostfixInstance:
        if tls:
            options.setdefault("cert_file", postfix_tls.cert_file)
            options.setdefault("key_file", postfix_tls.key_file)
        root = _new_root()
        try:
            instance = PostfixInstance(
                root, ports or PostfixPorts(smtp=find_free_port()), **options
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        started.append((instance, root))
        instance.start()
        return instance

    try:
        yield factory
    finally:
        for instance, root in started:
            instance.stop()
            shutil.rmtree(root, ignore_errors=True)
