"""A private, loopback-only, rootless Dovecot instance living entirely inside one directory.

The IMAP counterpart of :mod:`mailmoat.demo.postfix`: used by the test-suite
(and usable by ``mailmoat demo``) as a real IMAP server behind the proxy, as
the SASL authority of a private Postfix (``smtpd_sasl_type = dovecot``) and as
its final delivery agent (LMTP).  Synchronous on purpose (subprocess +
pathlib): starting and stopping Dovecot is a setup step, not part of the
proxy's event loop.

Layout under ``root`` (every path Dovecot sees is absolute)::

    root/etc/{dovecot.conf,users}            configuration, passwd-file users
    root/etc/{cert.pem,key.pem}              private copies of the TLS files (if given)
    root/run/                                base_dir: master.pid, login/, auth and LMTP sockets
    root/run/auth-client-postfix             SASL socket for Postfix (mode 0666)
    root/run/lmtp                            LMTP socket (mode 0666)
    root/state/                              state_dir
    root/log/dovecot.log                     log_path + info_log_path (no syslog)
    root/log/dovecot-stderr.log              the master's own stdout/stderr
    root/mail/<domain>/<user>/Maildir/       mail_location (``mail_root`` changes it)

Rootless: the master is started as root's child but with the uid/gid of the
``dovecot`` system user (``setpriv --reuid/--regid --init-groups``), in the
foreground (``-F``) and in a session of its own.  Every service then runs as
that user, which is why every ``user``/``chroot`` setting is made to match
and the sockets meant for Postfix are world-accessible (mode 0666: a master
that is not root cannot chown them to ``postfix``).  The instance only
listens on ``host`` and knows one domain.

Users are a passwd-file with ``{PLAIN}`` passwords, so every mechanism
(PLAIN, LOGIN, CRAM-MD5) works; ``alice`` and ``alice@<domain>`` are the
same login (``auth_default_realm``).  Plaintext authentication is allowed
without TLS: mailmoat terminates TLS and talks to Dovecot in the clear on
loopback.  ``login_trusted_networks`` lets a trusted peer (mailmoat) pass
the client's address with ``ID ("x-originating-ip" ...)``, and the optional
``proxy_imap`` listener expects a PROXY protocol header (``haproxy = yes``)
from ``haproxy_trusted_networks``; either way the login line in the log
shows the client address as ``rip=``.

Machine requirements (Debian 12): ``apt-get install dovecot-core
dovecot-imapd dovecot-lmtpd`` (the ``dovecot`` system user comes with
dovecot-core) and util-linux's ``setpriv``.  The system's own
``/etc/dovecot`` is never read.

Several instances may run side by side: each has its own base_dir,
state_dir, ``instance_name`` and log file.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from mailmoat.errors import MailmoatError

from ._maildir import log_lines, maildir_messages, wait_for_messages
from ._process import ManagedProcess

# Process helpers shared with the Postfix instance (same /proc based checks).
from .postfix import _alive, _group_alive, _listening, _proc_state

__all__ = [
    "DEFAULT_USERS",
    "DOVECOT_COMMAND",
    "DOVECOT_USER",
    "DovecotError",
    "DovecotInstance",
    "DovecotPorts",
    "dovecot_available",
]

DOVECOT_COMMAND = Path("/usr/sbin/dovecot")
SETPRIV_COMMAND = Path("/usr/bin/setpriv")
MODULE_DIRECTORY = Path("/usr/lib/dovecot")
#: Unprivileged system user every process of the instance runs as.
DOVECOT_USER = "dovecot"
DEFAULT_USERS: Mapping[str, str] = MappingProxyType(
    {"alice": "alicepw", "bob": "bobpw", "carol": "carolpw", "bulk": "bulkpw"}
)

_POLL = 0.02


class DovecotError(MailmoatError):
    """The private Dovecot instance could not be configured, started or used."""


def dovecot_available() -> bool:
    """True when Dovecot (IMAP + LMTP), ``setpriv`` and the ``dovecot`` user exist."""
    needed = (
        DOVECOT_COMMAND,
        SETPRIV_COMMAND,
        MODULE_DIRECTORY / "imap",
        MODULE_DIRECTORY / "imap-login",
        MODULE_DIRECTORY / "lmtp",
    )
    if not all(path.is_file() for path in needed):
        return False
    try:
        pwd.getpwnam(DOVECOT_USER)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class DovecotPorts:
    """TCP ports of the listeners; ``None`` leaves a listener out.

    ``proxy_imap`` is a plain IMAP listener that expects a PROXY protocol
    (v1 or v2) header first (``haproxy = yes``).  The LMTP unix socket always
    exists; ``lmtp`` adds a TCP listener.
    """

    imap: int | None = None
    imaps: int | None = None
    lmtp: int | None = None
    proxy_imap: int | None = None

    def given(self) -> dict[str, int]:
        """The configured listeners as ``{name: port}``."""
        ports = {
            "imap": self.imap,
            "imaps": self.imaps,
            "lmtp": self.lmtp,
            "proxy_imap": self.proxy_imap,
        }
        return {name: port for name, port in ports.items() if port is not None}


class DovecotInstance(ManagedProcess):
    """Configure, run and inspect a private, rootless Dovecot under ``root``.

    ``start()`` writes the configuration and waits for every listener,
    ``stop()`` (idempotent) shuts the master and all its children down.
    Also a context manager.
    """

    def __init__(
        self,
        root: Path,
        ports: DovecotPorts,
        *,
        domain: str = "mailmoat.test",
        users: Mapping[str, str] = DEFAULT_USERS,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        login_trusted_networks: str = "127.0.0.0/8",
        haproxy_trusted_networks: str = "127.0.0.0/8",
        host: str = "127.0.0.1",
        mail_root: Path | None = None,
        auth_failure_delay: int = 0,
    ) -> None:
        self.root = Path(root).absolute()
        self.ports = ports
        self.domain = domain
        self.users = dict(users)
        self.cert_file = None if cert_file is None else Path(cert_file).absolute()
        self.key_file = None if key_file is None else Path(key_file).absolute()
        self.login_trusted_networks = login_trusted_networks
        self.haproxy_trusted_networks = haproxy_trusted_networks
        self.host = host
        self.auth_failure_delay = auth_failure_delay
        if ports.imaps is not None and self.cert_file is None:
            raise ValueError("the imaps listener (implicit TLS) needs cert_file")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file given without cert_file")
        if auth_failure_delay < 0:
            raise ValueError("auth_failure_delay must be >= 0")
        for user, password in self.users.items():
            if not user or any(c in user for c in "@/:% \t\r\n") or user.startswith("."):
                raise ValueError(f"invalid user name {user!r}")
            if any(c in password for c in ":\r\n"):
                raise ValueError(f"password of {user!r} may not contain ':' or line breaks")
        for value in (domain, host, str(self.root), str(mail_root or "")):
            if any(c.isspace() or c in "\"'{}#<" for c in value):
                raise ValueError(f"whitespace or config syntax not allowed in {value!r}")
        for value in (login_trusted_networks, haproxy_trusted_networks):
            if any(c in value for c in "\r\n{}#"):
                raise ValueError(f"invalid network list {value!r}")

        self.config_dir = self.root / "etc"
        self.config_path = self.config_dir / "dovecot.conf"
        self.passwd_path = self.config_dir / "users"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.log_dir = self.root / "log"
        self.log_path = self.log_dir / "dovecot.log"
        self.stderr_path = self.log_dir / "dovecot-stderr.log"
        #: Maildir++ under ``<home>/Maildir`` unless ``mail_root`` asks for
        #: Postfix's layout (``<mail_root>/<domain>/<user>/`` is the Maildir).
        self.postfix_layout = mail_root is not None
        self.mail_dir = Path(mail_root).absolute() if mail_root is not None else self.root / "mail"
        self.instance_name = f"mailmoat-dovecot-{self.root.name}"
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ paths

    @property
    def auth_socket_path(self) -> Path:
        """SASL socket for Postfix (``smtpd_sasl_type = dovecot``, ``smtpd_sasl_path``)."""
        return self.base_dir / "auth-client-postfix"

    @property
    def lmtp_socket_path(self) -> Path:
        """LMTP socket for delivery (Postfix: ``virtual_transport = lmtp:unix:<path>``)."""
        return self.base_dir / "lmtp"

    def home(self, user: str) -> Path:
        """The home directory of ``user`` (Dovecot's index and state files live here)."""
        return self.mail_dir / self.domain / user

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user``."""
        home = self.home(user)
        return home if self.postfix_layout else home / "Maildir"

    def address(self, user: str) -> str:
        return f"{user}@{self.domain}"

    @property
    def master_pid(self) -> int | None:
        """PID of the running master process, if this object started one."""
        return None if self._process is None else self._process.pid

    # ---------------------------------------------------------- configuration

    def dovecot_conf(self) -> str:
        """The text of dovecot.conf."""
        p = self.ports
        tls = self.cert_file is not None
        home = f"{self.mail_dir}/%d/%n"
        location = "maildir:~" if self.postfix_layout else "maildir:~/Maildir"

        def listener(name: str, port: int | None, *options: str) -> list[str]:
            # port 0 disables a listener, including the built-in imap/imaps on 143/993
            lines = [f"  inet_listener {name} {{", f"    address = {self.host}"]
            lines += [f"    port = {port or 0}", *(f"    {o}" for o in options), "  }"]
            return lines

        lines = [
            "# Generated by mailmoat.demo.dovecot: a private, rootless, loopback-only Dovecot.",
            "# Every process runs as the dovecot system user; nothing is read from /etc/dovecot.",
            f"base_dir = {self.base_dir}",
            f"state_dir = {self.state_dir}",
            f"instance_name = {self.instance_name}",
            "protocols = imap lmtp",
            f"listen = {self.host}",
            "",
            "# --- logging to one file, no syslog",
            f"log_path = {self.log_path}",
            f"info_log_path = {self.log_path}",
            f"debug_log_path = {self.log_path}",
            "auth_verbose = yes",
            "# the default login_log_format_elements include rip= / lip=",
            "",
            "# --- rootless: one uid for everything",
            f"default_internal_user = {DOVECOT_USER}",
            f"default_internal_group = {DOVECOT_USER}",
            f"default_login_user = {DOVECOT_USER}",
            "first_valid_uid = 1",
            "first_valid_gid = 1",
            "",
            "# --- authentication: passwd-file, plaintext passwords (CRAM-MD5 needs them)",
            "auth_mechanisms = plain login cram-md5",
            "# mailmoat terminates TLS; the loopback hop to Dovecot is plaintext",
            "disable_plaintext_auth = no",
            f"auth_default_realm = {self.domain}",
            "auth_username_format = %Lu",
            "auth_cache_size = 0",
            f"auth_failure_delay = {self.auth_failure_delay} secs",
            "",
            "# --- who may pass the client's address: ID x-originating-ip, PROXY protocol",
            f"login_trusted_networks = {self.login_trusted_networks}",
            f"haproxy_trusted_networks = {self.haproxy_trusted_networks}",
            "",
            "# --- TLS",
        ]
        if tls:
            lines += [
                "ssl = yes",
                f"ssl_cert = <{self.config_dir}/cert.pem",
                f"ssl_key = <{self.config_dir}/key.pem",
                "ssl_min_protocol = TLSv1.2",
            ]
        else:
            lines += ["ssl = no"]
        lines += [
            "",
            "# --- mail: Maildir per user, all owned by the dovecot user",
            f"mail_location = {location}",
            "mail_fsync = never",
            "",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN username_format=%u {self.passwd_path}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = username_format=%u {self.passwd_path}",
            f"  default_fields = uid={DOVECOT_USER} gid={DOVECOT_USER} home={home}",
            "}",
            "",
            "# --- services: process reuse for speed (login and imap processes serve many",
            "# clients; all users share one uid), no chroot (a non-root master cannot)",
            "default_process_limit = 250",
            "default_client_limit = 2000",
            "service imap-login {",
            "  chroot =",
            "  service_count = 0",
            "  process_min_avail = 1",
            *listener("imap", p.imap),
            *listener("imaps", p.imaps, "ssl = yes"),
            *listener("imap_haproxy", p.proxy_imap, "haproxy = yes"),
            "}",
            "service imap {",
            "  service_count = 100",
            "}",
            "service lmtp {",
            "  unix_listener lmtp {",
            "    mode = 0666",
            "  }",
        ]
        if p.lmtp is not None:
            lines += listener("lmtp", p.lmtp)
        lines += [
            "}",
            "service auth {",
            "  user = $default_internal_user",
            "  # for Postfix's smtpd (user postfix): a non-root master cannot chown it",
            "  unix_listener auth-client-postfix {",
            "    mode = 0666",
            "  }",
            "}",
            "service auth-worker {",
            "  user = $default_internal_user",
            "}",
            "service anvil {",
            "  chroot =",
            "  # no auth penalty (up to 15 s of delay per failing IP): every test client",
            "  # and mailmoat itself come from 127.0.0.1 (documented way to turn it off)",
            "  unix_listener anvil-auth-penalty {",
            "    mode = 0",
            "  }",
            "}",
            "service stats {",
            "  unix_listener stats-writer {",
            "    mode = 0666",
            "  }",
            "}",
            "protocol imap {",
            "  mail_max_userip_connections = 500",
            "}",
            "protocol lmtp {",
            f"  postmaster_address = postmaster@{self.domain}",
            "}",
            "",
        ]
        return "\n".join(lines)

    def passwd_file(self) -> str:
        """The passwd-file: ``user@domain:{PLAIN}password::::::`` per user."""
        return "".join(
            f"{self.address(user)}:{{PLAIN}}{password}::::::\n"
            for user, password in self.users.items()
        )

    # ------------------------------------------------------------- lifecycle

    def _check_traversable(self, uid: int, gids: set[int]) -> None:
        for directory in [self.root, *self.root.parents, self.mail_dir, *self.mail_dir.parents]:
            with contextlib.suppress(FileNotFoundError):
                st = directory.stat()
                if st.st_uid == uid:
                    ok = bool(st.st_mode & stat.S_IXUSR)
                elif st.st_gid in gids:
                    ok = bool(st.st_mode & stat.S_IXGRP)
                else:
                    ok = bool(st.st_mode & stat.S_IXOTH)
                if not ok:
                    raise DovecotError(
                        f"{directory} is not searchable by user {DOVECOT_USER!r} (mode "
                        f"{stat.filemode(st.st_mode)}): put the instance root somewhere else "
                        "(e.g. tempfile.mkdtemp() under /tmp) or chmod o+x that directory"
                    )

    def _prepare(self) -> None:
        pw = pwd.getpwnam(DOVECOT_USER)
        uid, gid = pw.pw_uid, pw.pw_gid
        gids = {gid, *os.getgrouplist(DOVECOT_USER, gid)}
        self.root.mkdir(parents=True, exist_ok=True)
        # Postfix (user postfix) must reach the sockets in root/run; nothing secret
        # is world-readable (users file and key are 0600/0640).
        os.chmod(self.root, 0o755)  # noqa: S103
        self._check_traversable(uid, gids)

        def owned(path: Path, mode: int) -> None:
            os.chown(path, uid, gid)
            os.chmod(path, mode)

        for directory in (self.config_dir, self.base_dir, self.state_dir, self.log_dir):
            directory.mkdir(exist_ok=True)
            owned(directory, 0o755)
        # a stale master.pid of a dead instance would only produce a warning; drop it
        (self.base_dir / "master.pid").unlink(missing_ok=True)
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        if not self.postfix_layout:
            owned(self.mail_dir, 0o755)
        domain_dir = self.mail_dir / self.domain
        domain_dir.mkdir(exist_ok=True)
        owned(domain_dir, 0o755)
        for user in self.users:
            for directory in [self.home(user), self.maildir(user)] + [
                self.maildir(user) / sub for sub in ("new", "cur", "tmp")
            ]:
                directory.mkdir(exist_ok=True)
                owned(directory, 0o700)
        if self.cert_file is not None:
            cert = self.config_dir / "cert.pem"
            key = self.config_dir / "key.pem"
            # private copies: the originals may be readable by root only
            shutil.copyfile(self.cert_file, cert)
            shutil.copyfile(self.key_file or self.cert_file, key)
            owned(cert, 0o644)
            owned(key, 0o600)
        for path, text, mode in (
            (self.config_path, self.dovecot_conf(), 0o644),
            (self.passwd_path, self.passwd_file(), 0o600),
        ):
            path.write_text(text, encoding="utf-8")
            owned(path, mode)
        for path in (self.log_path, self.stderr_path):
            path.touch()
            owned(path, 0o600)

    def start(self, timeout: float = 20) -> None:
        """Write the configuration, start Dovecot and wait until every listener is up.

        Raises ``DovecotError`` (with the tail of the logs) on failure; a
        half-started instance is stopped again.
        """
        if self._process is not None:
            return
        if not dovecot_available():
            raise DovecotError(
                "dovecot is not installed: apt-get install dovecot-imapd dovecot-lmtpd"
            )
        if os.geteuid() != 0:
            raise DovecotError("starting a Dovecot instance needs root (to become user dovecot)")
        deadline = time.monotonic() + timeout
        self._prepare()
        self._launch(
            [
                str(SETPRIV_COMMAND),
                f"--reuid={DOVECOT_USER}",
                f"--regid={DOVECOT_USER}",
                "--init-groups",
                str(DOVECOT_COMMAND),
                "-F",
                "-c",
                str(self.config_path),
            ],
            deadline,
        )

    def _wait_ready(self, deadline: float) -> None:
        """Wait for the listeners (via /proc/net/tcp: no empty sessions in the log)."""
        pending_ports = dict(self.ports.given())
        pending_sockets = [self.auth_socket_path, self.lmtp_socket_path]
        while True:
            pending_sockets = [p for p in pending_sockets if not p.is_socket()]
            for name, port in list(pending_ports.items()):
                listening = _listening(self.host, port)
                if listening is None:
                    with contextlib.suppress(OSError):
                        socket.create_connection((self.host, port), timeout=1).close()
                        listening = True
                if listening:
                    del pending_ports[name]
            if not pending_ports and not pending_sockets:
                return
            assert self._process is not None
            if self._process.poll() is not None:
                raise DovecotError(
                    f"dovecot exited during start-up (status {self._process.returncode})\n"
                    f"{self._tails()}"
                )
            if time.monotonic() > deadline:
                what = [f"{n} {self.host}:{p}" for n, p in pending_ports.items()]
                what += [str(p) for p in pending_sockets]
                raise DovecotError(
                    f"Dovecot is not listening on {', '.join(what)}\n{self._tails()}"
                )
            time.sleep(_POLL)

    def _tails(self, lines: int = 30) -> str:
        parts = []
        for path in (self.stderr_path, self.log_path):
            try:
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            if text:
                parts.append(f"--- last lines of {path}:\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) if parts else "(no log output)"

    def stop(self, timeout: float = 20) -> None:
        """Stop the master and every process of this instance (idempotent).

        SIGTERM to the master: it stops its services (clients included,
        ``shutdown_clients = yes``) and its log process, then sleeps a fixed
        second before removing master.pid and exiting (its log process
        lingers until then).  Once nothing but the master and the log process
        is left there is nothing to wait for, so the master gets SIGKILL then
        (stop takes ~0.05 s instead of ~1.1 s; the log process drains and
        exits on EOF) and master.pid is removed here.  Anything left after
        ``timeout`` is SIGKILLed too.
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
            if process.returncode is None and _only_master_and_log(pgid, process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
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
        (self.base_dir / "master.pid").unlink(missing_ok=True)

    def is_running(self) -> bool:
        """True while the master this object started is alive."""
        return self._process is not None and _alive(self._process.pid)

    # ------------------------------------------------------------ delivery

    def deliver(self, user: str, message: bytes, *, sender: str = "seed@mailmoat.test") -> None:
        """Deliver ``message`` to ``user``'s INBOX over the LMTP socket (waits for the save)."""
        if self._process is None:
            raise DovecotError("the Dovecot instance is not running")
        try:
            with smtplib.LMTP(str(self.lmtp_socket_path), timeout=20) as client:
                refused = client.sendmail(sender, [self.address(user)], message)
        except smtplib.SMTPException as exc:
            raise DovecotError(
                f"LMTP delivery to {self.address(user)} failed: {exc}\n{self._tails(10)}"
            ) from exc
        if refused:
            raise DovecotError(f"LMTP refused {self.address(user)}: {refused}")

    # ------------------------------------------------------------ inspection

    def messages(self, user: str) -> list[Path]:
        """Delivered message files of ``user`` (Maildir new/ and cur/), oldest first."""
        return maildir_messages(self.maildir(user))

    def wait_for_messages(self, user: str, count: int, timeout: float = 20) -> list[Path]:
        """Poll until ``user`` has at least ``count`` messages; return them."""

        def failure(found: int) -> Exception:
            tail = "\n".join(self.log_lines()[-20:])
            return DovecotError(
                f"{self.address(user)}: {found} of {count} expected message(s) "
                f"arrived within {timeout:g}s; last log lines:\n{tail}"
            )

        return wait_for_messages(lambda: self.messages(user), count, timeout, failure)

    def log_lines(self) -> list[str]:
        """Lines of the instance's log file so far."""
        return log_lines(self.log_path)


def _only_master_and_log(pgid: int, master: int) -> bool:
    """True when the master's group holds nothing but the master and its log process.

    The log process only exits once the master is gone (EOF on its pipes).
    """
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) == master:
                continue
            state = _proc_state(int(entry.name))
            # an unreaped (zombie) child counts: the master reaps them all before
            # its final sleep, so nobody is left for PID 1 to reap but the log
            if state is None or state[1] != pgid:
                continue
            try:
                comm = Path(f"/proc/{entry.name}/comm").read_text(encoding="ascii").strip()
            except OSError:
                continue
            if comm != "log":
                return False
    return True
