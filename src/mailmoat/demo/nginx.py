"""A private, loopback-only nginx instance living entirely inside one directory.

The HTTP counterpart of :mod:`mailmoat.demo.postfix` and
:mod:`mailmoat.demo.dovecot`: a real web server for the webmail proxy's
tests, for ``mailmoat demo`` and for the benchmark (direct nginx,
nginx-as-proxy and mailmoat side by side).  Synchronous on purpose
(subprocess + pathlib): starting and stopping nginx is a setup step, not
part of the proxy's event loop.

Three shapes, chosen by the constructor:

``NginxInstance(root, webapp=addr)``
    The webmail front: ``/static/`` from disk, everything else proxied to
    the login application (:mod:`mailmoat.demo.webapp`) at ``addr``.
``NginxInstance(root, proxy_to=addr)``
    A plain reverse proxy: ``location /`` sends everything (WebSocket
    upgrades included) to ``addr`` -- e.g. another instance, for the
    benchmark's nginx-in-front-of-nginx.
``NginxInstance(root)``
    A static server: ``/static/`` only, anything else is ``404``.

Static files (written by ``start()``): ``/static/small.html`` (1 KiB of
HTML, :data:`SMALL_HTML`) and ``/static/1mb.bin`` (``pattern_bytes(1 MiB)``,
the webapp's deterministic download pattern).

Proxying: HTTP/1.1 to the upstream with a keep-alive pool; request bodies
are streamed (``proxy_request_buffering off``), responses are buffered in
memory only (``proxy_max_temp_file_size 0``) unless ``proxy_buffering`` is
False; ``/download`` and ``/ws`` are never buffered.  ``Upgrade`` and
``Connection: upgrade`` are passed on when the client asks for an upgrade
(and ``Connection`` is dropped otherwise, which keeps upstream connections
alive).  Added request headers: ``X-Forwarded-For`` (appended, nginx's
``$proxy_add_x_forwarded_for``), ``Forwarded`` (``for=...;proto=...``
appended to the client's), ``X-Real-IP``, ``X-Forwarded-Proto``,
``X-Forwarded-Host`` and ``X-Request-ID`` (``$request_id``, also in the
access log).  ``Host`` is the client's.  Hop-by-hop headers nginx drops:
``Connection``, ``Keep-Alive``, ``TE``, ``Transfer-Encoding`` (re-framed),
``Expect`` and ``Upgrade`` unless upgrading; headers merely *named* in
``Connection`` are passed on (that is nginx).

Layout under ``root``::

    root/conf/nginx.conf                     configuration (``nginx -p root/ -c ...``)
    root/html/static/{small.html,1mb.bin}    static files
    root/logs/access.log                     one JSON object per line (``escape=json``)
    root/logs/error.log                      error log (``notice``), also ``-e`` at start-up
    root/logs/nginx-stderr.log               the master's own stdout/stderr
    root/run/nginx.pid                       pid file
    root/tmp/{client_body,proxy,...}         temp paths (created by nginx)

The master runs in the foreground (``daemon off``) in a session of its own,
as the current user.  As root, the workers run as ``nobody``
(``user nobody <its group>;``), so ``root`` must be searchable by that
user (``tempfile.mkdtemp()`` under /tmp plus the ``0755`` set here is; a
pytest ``tmp_path`` is not).  Unprivileged, there is no ``user`` directive
and everything runs as the caller.  Nothing under /etc/nginx, /var/log/nginx
or /var/lib/nginx is read or written.  Every timeout is bounded (see
:meth:`NginxInstance.nginx_conf`).

Machine requirements (Debian 12): ``apt-get install nginx`` (``nginx-light``
is enough; the system's nginx service need not run).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailmoat.config import Address
from mailmoat.errors import MailmoatError

from ._process import ManagedProcess
from .postfix import _alive, _group_alive, _listening, _proc_state, find_free_port
from .webapp import pattern_bytes

__all__ = [
    "ACCESS_LOG_FIELDS",
    "NGINX_COMMAND",
    "SMALL_HTML",
    "STATIC_FILES",
    "NginxError",
    "NginxInstance",
    "nginx_available",
]

NGINX_COMMAND = Path("/usr/sbin/nginx")
#: Unprivileged user the workers run as when the master is root.
WORKER_USER = "nobody"

#: Fields of an access log entry (``access_log()`` dicts); the numeric ones are ints.
ACCESS_LOG_FIELDS = (
    "time",
    "remote_addr",
    "request",
    "status",
    "body_bytes_sent",
    "request_length",
    "request_time",
    "http_x_forwarded_for",
    "http_host",
    "request_id",
    "upstream_addr",
    "upstream_status",
)
_INT_FIELDS = ("status", "body_bytes_sent", "request_length")


def _small_html() -> bytes:
    head = (
        b'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        b"<title>mailmoat static</title></head>\n<body>\n<h1>mailmoat static test page</h1>\n"
    )
    lines = b"".join(b"<p>line %02d of the static page</p>\n" % i for i in range(1, 22))
    tail = b"</body></html>\n"
    padding = 1024 - len(head) - len(lines) - len(tail) - len(b"<!--  -->\n")
    assert padding >= 0
    return head + lines + b"<!-- " + b"." * padding + b" -->\n" + tail


#: The bytes of ``/static/small.html`` (exactly 1 KiB).
SMALL_HTML = _small_html()
#: ``/static/<name>`` -> a function giving its content.
STATIC_FILES: dict[str, Callable[[], bytes]] = {
    "small.html": lambda: SMALL_HTML,
    "1mb.bin": lambda: pattern_bytes(1 << 20),
}

_POLL = 0.01
_LOG_FORMAT = (
    "{"
    + ",".join(
        f'"{name}":"${"time_iso8601" if name == "time" else name}"' for name in ACCESS_LOG_FIELDS
    )
    + "}"
)


class NginxError(MailmoatError):
    """The private nginx instance could not be configured, started or used."""


def nginx_available() -> bool:
    """True when the nginx binary is installed and executable."""
    return NGINX_COMMAND.is_file() and os.access(NGINX_COMMAND, os.X_OK)


def _address(value: Address | tuple[str, int], what: str) -> Address:
    address = value if isinstance(value, Address) else Address(value[0], int(value[1]))
    if not 0 < address.port < 65536:
        raise ValueError(f"{what}: port {address.port} out of range")
    if not address.host or any(c.isspace() or c in ";{}'\"#$\\" for c in address.host):
        raise ValueError(f"{what}: invalid host {address.host!r}")
    return address


class NginxInstance(ManagedProcess):
    """Configure, run and inspect a private nginx under ``root``.

    ``start()`` writes the configuration and static files and waits until
    the port listens; ``stop()`` (idempotent) shuts the master and its
    workers down.  Also a context manager.  ``port`` defaults to a free
    port chosen now.  ``worker_processes`` may be a number or ``"auto"``.
    """

    def __init__(
        self,
        root: Path,
        *,
        webapp: Address | tuple[str, int] | None = None,
        proxy_to: Address | tuple[str, int] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        worker_processes: int | str = 1,
        worker_connections: int = 1024,
        proxy_buffering: bool = True,
        upstream_keepalive: int = 32,
    ) -> None:
        if webapp is not None and proxy_to is not None:
            raise ValueError("give webapp= or proxy_to=, not both")
        if worker_processes != "auto" and not (
            isinstance(worker_processes, int) and worker_processes > 0
        ):
            raise ValueError("worker_processes must be a positive int or 'auto'")
        if worker_connections < 16 or upstream_keepalive < 0:
            raise ValueError("worker_connections must be >= 16, upstream_keepalive >= 0")
        self.root = Path(root).absolute()
        for value in (str(self.root), host):
            if any(c.isspace() or c in ";{}'\"#$\\" for c in value):
                raise ValueError(f"whitespace or config syntax not allowed in {value!r}")
        self.webapp = None if webapp is None else _address(webapp, "webapp")
        self.proxy_to = None if proxy_to is None else _address(proxy_to, "proxy_to")
        self.host = host
        self.port = find_free_port(host) if port is None else port
        self.worker_processes = worker_processes
        self.worker_connections = worker_connections
        self.proxy_buffering = proxy_buffering
        self.upstream_keepalive = upstream_keepalive

        self.config_dir = self.root / "conf"
        self.config_path = self.config_dir / "nginx.conf"
        self.html_dir = self.root / "html"
        self.static_dir = self.html_dir / "static"
        self.log_dir = self.root / "logs"
        self.access_log_path = self.log_dir / "access.log"
        self.error_log_path = self.log_dir / "error.log"
        self.stderr_path = self.log_dir / "nginx-stderr.log"
        self.run_dir = self.root / "run"
        self.pid_path = self.run_dir / "nginx.pid"
        self.temp_dir = self.root / "tmp"
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ facts

    @staticmethod
    def available() -> bool:
        """True when nginx is installed (see :func:`nginx_available`)."""
        return nginx_available()

    @property
    def address(self) -> Address:
        """Where clients connect (``proxy_to=`` of another instance, a mailmoat backend)."""
        return Address(self.host, self.port)

    def url(self, path: str = "/") -> str:
        return f"http://{self.address}{path}"

    @property
    def master_pid(self) -> int | None:
        """PID of the running master process, if this object started one."""
        return None if self._process is None else self._process.pid

    def static_path(self, name: str) -> Path:
        """The file served as ``/static/<name>``."""
        return self.static_dir / name

    def process_ids(self) -> list[int]:
        """PIDs of the master and its workers (its process group), zombies excluded."""
        if self._process is None:
            return []
        return _group_members(self._process.pid)

    def is_running(self) -> bool:
        """True while the master this object started is alive."""
        return self._process is not None and _alive(self._process.pid)

    # ---------------------------------------------------------- configuration

    def _worker_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        entry = pwd.getpwnam(WORKER_USER)
        return f"{WORKER_USER} {grp.getgrgid(entry.pw_gid).gr_name}"

    def _listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _proxy_block(
        self, *, buffering: bool, read_timeout: str = "60s", indent: str = "            "
    ) -> list[str]:
        lines = [
            "proxy_pass http://mailmoat_upstream;",
            "proxy_http_version 1.1;",
            "proxy_set_header Host $mailmoat_host;",
            "proxy_set_header Upgrade $http_upgrade;",
            "# 'upgrade' for a WebSocket; empty (not sent) otherwise: upstream keep-alive",
            "proxy_set_header Connection $mailmoat_connection;",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "proxy_set_header Forwarded $mailmoat_forwarded;",
            "proxy_set_header X-Real-IP $remote_addr;",
            "proxy_set_header X-Forwarded-Proto $scheme;",
            "proxy_set_header X-Forwarded-Host $http_host;",
            "proxy_set_header X-Request-ID $request_id;",
            "proxy_request_buffering off;",
            f"proxy_buffering {'on' if buffering else 'off'};",
            "proxy_max_temp_file_size 0;",
            "proxy_connect_timeout 5s;",
            "proxy_send_timeout 60s;",
            f"proxy_read_timeout {read_timeout};",
        ]
        return [indent + line for line in lines]

    def nginx_conf(self) -> str:
        """The text of nginx.conf."""
        user = self._worker_user()
        upstream = self.webapp or self.proxy_to
        temp_paths = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        lines = [
            "# Generated by mailmoat.demo.nginx: a private, loopback-only nginx.",
            "# Nothing under /etc/nginx, /var/log/nginx or /var/lib/nginx is used.",
            "daemon off;",
            "master_process on;",
            f"worker_processes {self.worker_processes};",
        ]
        if user is not None:
            lines.append(f"user {user};")
        lines += [
            f"pid {self.pid_path};",
            f"lock_file {self.run_dir}/nginx.lock;",
            f"error_log {self.error_log_path} notice;",
            "",
            "events {",
            f"    worker_connections {self.worker_connections};",
            "}",
            "",
            "http {",
            "    types {",
            "        text/html html htm;",
            "        text/plain txt;",
            "        text/css css;",
            "        application/javascript js;",
            "        application/json json;",
            "        application/octet-stream bin;",
            "    }",
            "    default_type application/octet-stream;",
            "    sendfile on;",
            "    tcp_nodelay on;",
            "    server_tokens off;",
            "",
            "    # one JSON object per line; numbers are strings too ($status can be 000)",
            f"    log_format mailmoat_json escape=json '{_LOG_FORMAT}';",
            f"    access_log {self.access_log_path} mailmoat_json;",
            "",
            *(f"    {name}_temp_path {self.temp_dir}/{name};" for name in temp_paths),
            "",
            "    # bounded timeouts everywhere, no body size limit (uploads are tested)",
            "    client_max_body_size 0;",
            "    client_header_timeout 30s;",
            "    client_body_timeout 60s;",
            "    send_timeout 60s;",
            "    keepalive_timeout 30s;",
            "    keepalive_requests 10000;",
            "    reset_timedout_connection on;",
            "",
            "    map $http_upgrade $mailmoat_connection {",
            "        default upgrade;",
            "        '' '';",
            "    }",
            "    map $http_host $mailmoat_host {",
            "        '' $host;",
            "        default $http_host;",
            "    }",
            "    # RFC 7239: an IPv6 node is quoted and bracketed",
            "    map $remote_addr $mailmoat_forwarded_node {",
            "        ~^[0-9.]+$ 'for=$remote_addr';",
            "        ~^[0-9A-Fa-f:.]+$ 'for=\"[$remote_addr]\"';",
            "        default 'for=unknown';",
            "    }",
            "    map $http_forwarded $mailmoat_forwarded {",
            "        '' '$mailmoat_forwarded_node;proto=$scheme';",
            "        default '$http_forwarded, $mailmoat_forwarded_node;proto=$scheme';",
            "    }",
            "",
        ]
        if upstream is not None:
            lines += [
                "    # idle upstream connections are closed by nginx (30 s) before the backend",
                "    # does (the webapp waits 60 s): no request is sent on a closing connection",
                "    upstream mailmoat_upstream {",
                f"        server {upstream} max_fails=0;",
                f"        keepalive {self.upstream_keepalive};" if self.upstream_keepalive else "",
                "        keepalive_timeout 30s;" if self.upstream_keepalive else "",
                "    }",
                "",
            ]
        lines += [
            "    server {",
            f"        listen {self._listen()};",
            "        server_name localhost;",
            f"        root {self.html_dir};",
            "",
        ]
        if self.proxy_to is not None:
            lines += [
                "        location / {",
                *self._proxy_block(buffering=self.proxy_buffering),
                "        }",
            ]
        else:
            lines += [
                "        location /static/ {",
                "            try_files $uri =404;",
                "        }",
            ]
            if self.webapp is not None:
                lines += [
                    "        location / {",
                    *self._proxy_block(buffering=self.proxy_buffering),
                    "        }",
                    "        location = /download {",
                    *self._proxy_block(buffering=False),
                    "        }",
                    "        location = /ws {",
                    *self._proxy_block(buffering=False, read_timeout="300s"),
                    "        }",
                ]
            else:
                lines += [
                    "        location / {",
                    "            return 404;",
                    "        }",
                ]
        lines += ["    }", "}", ""]
        return "\n".join(lines)

    # ------------------------------------------------------------- lifecycle

    def _check_traversable(self) -> None:
        entry = pwd.getpwnam(WORKER_USER)
        gids = {entry.pw_gid, *os.getgrouplist(WORKER_USER, entry.pw_gid)}
        for directory in [self.root, *self.root.parents]:
            st = directory.stat()
            if st.st_uid == entry.pw_uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid in gids:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                raise NginxError(
                    f"{directory} is not searchable by user {WORKER_USER!r} (the workers; mode "
                    f"{stat.filemode(st.st_mode)}): put the instance root somewhere else "
                    "(e.g. tempfile.mkdtemp() under /tmp) or chmod o+x that directory"
                )

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # the workers (user nobody when we are root) read html/ and write tmp/*
        os.chmod(self.root, 0o755)  # noqa: S103 - nothing secret in here
        if os.geteuid() == 0:
            self._check_traversable()
        for directory in (
            self.config_dir,
            self.html_dir,
            self.static_dir,
            self.log_dir,
            self.run_dir,
            self.temp_dir,
        ):
            directory.mkdir(exist_ok=True)
            os.chmod(directory, 0o755)  # noqa: S103
        for name, content in STATIC_FILES.items():
            path = self.static_path(name)
            data = content()
            if not path.is_file() or path.stat().st_size != len(data) or path.read_bytes() != data:
                path.write_bytes(data)
            os.chmod(path, 0o644)
        self.config_path.write_text(self.nginx_conf(), encoding="utf-8")
        self.pid_path.unlink(missing_ok=True)
        for path in (self.access_log_path, self.error_log_path, self.stderr_path):
            path.touch()

    def start(self, timeout: float = 10) -> None:
        """Write configuration and files, start nginx and wait until the port listens.

        Raises ``NginxError`` (with the tail of the logs) on failure; a
        half-started instance is stopped again.
        """
        if self._process is not None:
            return
        if not nginx_available():
            raise NginxError(f"nginx is not installed ({NGINX_COMMAND}): apt-get install nginx")
        deadline = time.monotonic() + timeout
        self._prepare()
        self._launch(
            [
                str(NGINX_COMMAND),
                "-p",
                f"{self.root}/",
                "-e",
                str(self.error_log_path),
                "-c",
                str(self.config_path),
            ],
            deadline,
        )

    def _wait_ready(self, deadline: float) -> None:
        """Wait for the listening socket (and a worker to serve it)."""
        process = self._process
        assert process is not None
        while True:
            listening = _listening(self.host, self.port)
            if listening is None:
                with contextlib.suppress(OSError):
                    socket.create_connection((self.host, self.port), timeout=1).close()
                    listening = True
            if listening and len(self.process_ids()) > 1:
                return
            if process.poll() is not None:
                raise NginxError(
                    f"nginx exited during start-up (status {process.returncode})\n{self._tails()}"
                )
            if time.monotonic() > deadline:
                raise NginxError(f"nginx is not listening on {self.address}\n{self._tails()}")
            time.sleep(_POLL)

    def _tails(self, lines: int = 30) -> str:
        parts = []
        for path in (self.stderr_path, self.error_log_path):
            try:
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            if text:
                parts.append(f"--- last lines of {path}:\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) if parts else "(no log output)"

    def stop(self, timeout: float = 10) -> None:
        """Stop the master and its workers (idempotent).

        SIGTERM is nginx's fast shutdown (open connections, WebSockets
        included, are closed, not drained); whatever is left of the process
        group after ``timeout`` is SIGKILLed.
        """
        process, self._process = self._process, None
        if process is None:
            return
        pgid = process.pid  # start_new_session: the master leads its own group
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(pgid):
                break
            time.sleep(_POLL)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _group_alive(pgid) and time.monotonic() < end:
                process.poll()
                time.sleep(_POLL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        self.pid_path.unlink(missing_ok=True)

    # ------------------------------------------------------------ inspection

    def access_log(self) -> list[dict[str, Any]]:
        """Complete access log entries so far, oldest first.

        Each is a dict with :data:`ACCESS_LOG_FIELDS`; ``status``,
        ``body_bytes_sent`` and ``request_length`` are ints,
        ``request_time`` a float, the rest strings (``""`` when the value
        is absent, e.g. no ``X-Forwarded-For``).  nginx writes an entry once
        the response is sent, so a client may see the response before its
        entry exists: use :meth:`wait_for_access`.
        """
        try:
            data = self.access_log_path.read_bytes()
        except FileNotFoundError:
            return []
        entries = []
        for line in data.split(b"\n")[:-1]:  # the last piece is incomplete (or empty)
            entry: dict[str, Any] = json.loads(line)
            for name in _INT_FIELDS:
                with contextlib.suppress(ValueError):
                    entry[name] = int(entry[name])
            with contextlib.suppress(ValueError):
                entry["request_time"] = float(entry["request_time"])
            entries.append(entry)
        return entries

    def wait_for_access(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 5
    ) -> dict[str, Any]:
        """The newest access log entry for which ``match`` is true, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [entry for entry in self.access_log() if match(entry)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                tail = self.access_log()[-5:]
                raise NginxError(f"no matching access log entry in {timeout:g}s; last: {tail}")
            time.sleep(_POLL)

    def error_log_lines(self) -> list[str]:
        """Lines of the error log so far."""
        try:
            return self.error_log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []


def _group_members(pgid: int) -> list[int]:
    members = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                state = _proc_state(int(entry.name))
                if state is not None and state[1] == pgid and state[0] not in ("Z", "X"):
                    members.append(int(entry.name))
    return sorted(members)
