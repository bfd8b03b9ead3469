"""pytest fixtures for the webmail backends (see ``mailmoat.demo.webapp`` / ``.nginx``).

Plain (synchronous) pytest fixtures; import them into a conftest next to the
Postfix and Dovecot ones::

    from nginx_fixtures import fresh_nginx, nginx, webapp

- ``webapp``: the login application in a subprocess of its own, started once
  per session on a free loopback port (~0.2 s; readiness: the process writes
  its bound port once it listens).  ``webapp.address`` / ``webapp.url(path)``.
- ``nginx``: a session nginx (``NginxInstance(webapp=...)``) on a free
  loopback port: ``/static/`` from disk, everything else proxied to
  ``webapp`` (~0.06 s to start).  Its access log is shared by every test
  of the session: match entries by something unique (a query marker).
- ``fresh_nginx``: a factory for extra, per-test instances (keywords go to
  ``NginxInstance``: ``proxy_to=``, ``webapp=``, ...), stopped and removed
  at the end of the test.

nginx missing is a *skip* with the reason below (CI installs it); the
webapp needs nothing but Python.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from mailmoat.demo.nginx import NginxInstance, nginx_available
from mailmoat.demo.webapp import WebAppProcess

__all__ = [
    "NGINX_MISSING",
    "NginxFactory",
    "fresh_nginx",
    "nginx",
    "webapp",
]

NGINX_MISSING = "nginx is not installed (/usr/sbin/nginx): run .ci/run or apt-get install nginx"


class NginxFactory(Protocol):
    def __call__(self, **options: Any) -> NginxInstance: ...


def _require_nginx() -> None:
    if not nginx_available():
        pytest.skip(NGINX_MISSING)


def _new_root() -> Path:
    # Not pytest's tmp_path: its parents are mode 0700, and nginx's workers
    # (user nobody when the tests run as root) must reach the static files.
    return Path(tempfile.mkdtemp(prefix="mailmoat-nginx-"))


@pytest.fixture(scope="session")
def webapp() -> Iterator[WebAppProcess]:
    """The session's login application, in a subprocess on 127.0.0.1."""
    process = WebAppProcess()
    try:
        process.start()
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="session")
def nginx(webapp: WebAppProcess) -> Iterator[NginxInstance]:
    """The session's nginx on 127.0.0.1: ``/static/`` plus a reverse proxy to ``webapp``."""
    _require_nginx()
    root = _new_root()
    instance = NginxInstance(root, webapp=webapp.address)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_nginx() -> Iterator[NginxFactory]:
    """Factory for extra started instances, stopped and removed after the test."""
    _require_nginx()
    started: list[tuple[NginxInstance, Path]] = []

    def factory(**options: Any) -> NginxInstance:
        root = _new_root()
        try:
            instance = NginxInstance(root, **options)
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
