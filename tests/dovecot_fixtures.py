"""pytest fixtures for a real, private, rootless Dovecot (see ``mailmoat.demo.dovecot``).

Plain (synchronous) pytest fixtures; import them into a conftest next to the
Postfix ones (they use ``postfix_tls`` from ``postfix_fixtures`` by name)::

    from dovecot_fixtures import dovecot, postfix_sasl

- ``dovecot``: one instance for the whole session on loopback with imap
  (STARTTLS), imaps (implicit TLS), lmtp and proxy_imap (PROXY protocol)
  listeners; the certificate is the session's ``postfix_tls`` one (trustme CA,
  mx.mailmoat.test / localhost / 127.0.0.1), so ``postfix_client_context``
  verifies it.
- ``postfix_sasl``: a session Postfix (smtp + submission + smtps) that
  authenticates with that Dovecot (``smtpd_sasl_type = dovecot``) and delivers
  the domain's mail to it over LMTP: mail sent to Postfix shows up in
  ``dovecot.messages(user)`` and over IMAP.

Dovecot missing is a test *failure*, not a skip: the e2e tests are part of CI.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailmoat.demo.dovecot import DovecotInstance, DovecotPorts, dovecot_available
from mailmoat.demo.postfix import (
    LmtpPostfixInstance,
    PostfixInstance,
    PostfixPorts,
    find_free_port,
    postfix_available,
)
from postfix_fixtures import POSTFIX_MISSING, PostfixTLS

__all__ = [
    "DOVECOT_MISSING",
    "LmtpPostfixInstance",
    "dovecot",
    "dovecot_all_ports",
    "postfix_sasl",
]

DOVECOT_MISSING = (
    "dovecot is not installed: run .ci/run or apt-get install dovecot-imapd dovecot-lmtpd"
)


def _require_dovecot() -> None:
    if not dovecot_available():
        pytest.fail(DOVECOT_MISSING, pytrace=False)


def _new_root(prefix: str) -> Path:
    # Not pytest's tmp_path: its parents are mode 0700, and the dovecot and
    # postfix users must be able to reach the root.
    return Path(tempfile.mkdtemp(prefix=prefix))


def dovecot_all_ports() -> DovecotPorts:
    """Free ports for every listener."""
    return DovecotPorts(
        imap=find_free_port(),
        imaps=find_free_port(),
        lmtp=find_free_port(),
        proxy_imap=find_free_port(),
    )


@pytest.fixture(scope="session")
def dovecot(postfix_tls: PostfixTLS) -> Iterator[DovecotInstance]:
    """The session's Dovecot: imap + imaps + lmtp + proxy_imap on 127.0.0.1."""
    _require_dovecot()
    root = _new_root("mailmoat-dovecot-")
    instance = DovecotInstance(
        root,
        dovecot_all_ports(),
        cert_file=postfix_tls.cert_file,
        key_file=postfix_tls.key_file,
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix_sasl(dovecot: DovecotInstance, postfix_tls: PostfixTLS) -> Iterator[PostfixInstance]:
    """A session Postfix (smtp + submission + smtps) with SASL and delivery via ``dovecot``."""
    if not postfix_available():
        pytest.fail(POSTFIX_MISSING, pytrace=False)
    root = _new_root("mailmoat-postfix-sasl-")
    instance = LmtpPostfixInstance(
        root,
        PostfixPorts(smtp=find_free_port(), submission=find_free_port(), smtps=find_free_port()),
        lmtp_path=dovecot.lmtp_socket_path,
        domain=dovecot.domain,
        users=tuple(dovecot.users),
        cert_file=postfix_tls.cert_file,
        key_file=postfix_tls.key_file,
        sasl_path=str(dovecot.auth_socket_path),
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
