"""A private, loopback-only Postfix instance living entirely inside one directory.

Used by ``mailmoat demo`` (a real MTA behind the proxy) and by the test-suite.
Synchronous on purpose (subprocess + pathlib): starting and stopping Postfix is
a setup step, not part of the proxy's event loop.

Layout under ``root`` (every path Postfix sees is absolute)::

    root/etc/{main.cf,master.cf,vmailbox}   configuration (``postfix -c root/etc``)
    root/spool/                              queue_directory (+ pid/master.pid)
    root/data/                               data_directory (master.lock, PRNG state)
    root/mail/<domain>/<user>/{new,cur,tmp}  Maildir delivery by virtual(8)
    root/log/postfix.log                     maillog_file, written by postlogd (no syslog)
    root/log/postfix-command.log             output of the ``postfix`` commands we run

Safety: the instance only listens on ``host`` (loopback), accepts mail for one
virtual domain and the listed users, refuses relaying, and every non-local
transport is ``error:`` (the ``smtp``/``relay``/``local`` services are not even
in master.cf), so nothing can leave the machine.

Machine requirements (Debian 12): ``apt-get install postfix`` ("No configuration"
is fine).  No ``/etc/postfix/main.cf`` is needed and none is created: when run
as root, ``postfix -c DIR`` accepts any configuration directory (the
``alternate_config_directories`` check only applies to unprivileged callers of
the set-gid commands), and ``postfix-script`` tolerates a missing default
``main.cf``.  The compiled-in defaults of ``daemon_directory``,
``shlib_directory`` and ``meta_directory`` are nevertheless written explicitly
so a machine's own ``/etc/postfix/main.cf`` can never leak into the instance.

Several instances may run side by side: each has its own queue directory (pid
file, public/private sockets, postlog socket), data directory (master.lock),
log file and ``syslog_name`` (``postfix-<smtp port>``).
"""

from __future__ import annotations

import collections
import contextlib
import grp
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from mailmoat.errors import MailmoatError

from ._maildir import log_lines, maildir_messages, wait_for_messages

__all__ = [
    "DAEMON_DIRECTORY",
    "POSTFIX_COMMAND",
    "LmtpPostfixInstance",
    "PostfixError",
    "PostfixInstance",
    "PostfixPorts",
    "find_free_port",
    "postfix_available",
]

POSTFIX_COMMAND = Path("/usr/sbin/postfix")
COMMAND_DIRECTORY = Path("/usr/sbin")
DAEMON_DIRECTORY = Path("/usr/lib/postfix/sbin")
SHLIB_DIRECTORY = Path("/usr/lib/postfix")
META_DIRECTORY = Path("/etc/postfix")
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
#: Unprivileged system user that owns the delivered Maildirs (virtual(8) static uid/gid).
DELIVERY_USER = "nobody"

_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
_POLL = 0.02


class PostfixError(MailmoatError):
    """The private Postfix instance could not be configured, started or used."""


def postfix_available() -> bool:
    """True when the Postfix binaries and the ``postfix`` system user exist."""
    if not POSTFIX_COMMAND.is_file() or not (DAEMON_DIRECTORY / "master").is_file():
        return False
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
        pwd.getpwnam(DELIVERY_USER)
    except KeyError:
        return False
    return True


_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=256)


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the kernel picks it).

    The kernel may hand out the same port again once the probe socket is
    closed, so ports returned recently are skipped: several calls in a row
    (one per listener of an instance) give distinct ports.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port
    raise OSError("no fresh free port found")  # pragma: no cover - needs a port famine


@dataclass(frozen=True)
class PostfixPorts:
    """TCP ports of the listeners; ``None`` leaves a listener out."""

    smtp: int
    submission: int | None = None
    smtps: int | None = None
    proxy_v2: int | None = None

    def given(self) -> dict[str, int]:
        """The configured listeners as ``{name: port}``."""
        ports = {
            "smtp": self.smtp,
            "submission": self.submission,
            "smtps": self.smtps,
            "proxy_v2": self.proxy_v2,
        }
        return {name: port for name, port in ports.items() if port is not None}


class PostfixInstance:
    """Configure, run and inspect a private Postfix under ``root``.

    ``start()`` writes the configuration, ``stop()`` (idempotent) shuts the
    master and all its children down.  Also a context manager.
    """

    def __init__(
        self,
        root: Path,
        ports: PostfixPorts,
        *,
        domain: str = "mailmoat.test",
        users: Sequence[str] = ("alice", "bob", "carol", "bulk"),
        cert_file: Path | None = None,
        key_file: Path | None = None,
        xclient_hosts: str = "127.0.0.0/8",
        message_size_limit: int = 60 * 1024 * 1024,
        sasl_path: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = Path(root).absolute()
        self.ports = ports
        self.domain = domain
        self.users = tuple(users)
        self.cert_file = None if cert_file is None else Path(cert_file).absolute()
        self.key_file = None if key_file is None else Path(key_file).absolute()
        self.xclient_hosts = xclient_hosts
        self.message_size_limit = message_size_limit
        self.sasl_path = sasl_path
        self.host = host
        if ports.smtps is not None and self.cert_file is None:
            raise ValueError("the smtps listener (implicit TLS) needs cert_file")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file given without cert_file")
        if sasl_path is not None and not sasl_path.startswith("/"):
            raise ValueError("sasl_path must be an absolute path (the Dovecot auth socket)")
        for user in self.users:
            if not user or any(c in user for c in "@/ \t\n") or user.startswith("."):
                raise ValueError(f"invalid user name {user!r}")
        for value in (domain, host, str(self.root), sasl_path or ""):
            if any(c.isspace() for c in value):
                raise ValueError(f"whitespace not allowed in {value!r}")
        if "\n" in xclient_hosts or "\r" in xclient_hosts:
            raise ValueError("xclient_hosts must be one line")

        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.log_dir = self.root / "log"
        self.log_path = self.log_dir / "postfix.log"
        self.command_log_path = self.log_dir / "postfix-command.log"
        self.syslog_name = f"postfix-{ports.smtp}"
        self._master_pid: int | None = None

    # ------------------------------------------------------------------ paths

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user`` (``root/mail/<domain>/<user>``)."""
        return self.mail_dir / self.domain / user

    def address(self, user: str) -> str:
        return f"{user}@{self.domain}"

    @property
    def master_pid(self) -> int | None:
        """PID of the running master process, if this object started one."""
        return self._master_pid

    # ---------------------------------------------------------- configuration

    def _listen(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    def main_cf(self) -> str:
        """The text of main.cf."""
        r = self.root
        tls = self.cert_file is not None
        key = self.key_file if self.key_file is not None else self.cert_file
        uid = pwd.getpwnam(DELIVERY_USER).pw_uid
        gid = pwd.getpwnam(DELIVERY_USER).pw_gid
        ipv6 = ":" in self.host
        lines = [
            "# Generated by mailmoat.demo.postfix: a private, loopback-only Postfix.",
            "# Nothing here can deliver off the box: all non-local transports are error:.",
            "compatibility_level = 3.6",
            "",
            "# --- everything under the instance root; compiled-in paths made explicit",
            f"queue_directory = {r}/spool",
            f"data_directory = {r}/data",
            f"command_directory = {COMMAND_DIRECTORY}",
            f"daemon_directory = {DAEMON_DIRECTORY}",
            f"shlib_directory = {SHLIB_DIRECTORY}",
            f"meta_directory = {META_DIRECTORY}",
            f"mail_owner = {MAIL_OWNER}",
            f"setgid_group = {SETGID_GROUP}",
            "multi_instance_enable = no",
            "multi_instance_wrapper =",
            "",
            "# --- logging to a file via the postlog service (no syslog)",
            f"syslog_name = {self.syslog_name}",
            f"maillog_file = {self.log_path}",
            f"maillog_file_prefixes = {self.log_dir}",
            "",
            "# --- identity, loopback only, no DNS",
            f"myhostname = mx.{self.domain}",
            f"mydomain = {self.domain}",
            "myorigin = $mydomain",
            "smtpd_banner = $myhostname ESMTP mailmoat test postfix",
            f"inet_interfaces = {self.host}",
            f"inet_protocols = {'ipv6' if ipv6 else 'ipv4'}",
            f"mynetworks = {'[::1]/128' if ipv6 else '127.0.0.1/32'}",
            "mydestination =",
            "relay_domains =",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            "append_dot_mydomain = no",
            "disable_dns_lookups = yes",
            "smtp_host_lookup = native",
            "# no reverse DNS for clients: names are 'unknown' unless XCLIENT NAME= says otherwise",
            "smtpd_peername_lookup = no",
            "smtpd_error_sleep_time = 0s",
            "# headers are never rewritten/added, even for loopback clients: a message",
            "# looks the same whether sent directly or through mailmoat (XCLIENT)",
            "local_header_rewrite_clients =",
            "",
            "# --- limits",
            f"message_size_limit = {self.message_size_limit}",
            "mailbox_size_limit = 0",
            "virtual_mailbox_limit = 0",
            "",
            "# --- final delivery: virtual domain -> Maildir, owned by an unprivileged user",
            f"virtual_mailbox_domains = {self.domain}",
            f"virtual_mailbox_base = {r}/mail",
            f"virtual_mailbox_maps = texthash:{r}/etc/vmailbox",
            f"virtual_uid_maps = static:{uid}",
            f"virtual_gid_maps = static:{gid}",
            f"virtual_minimum_uid = {uid}",
            "virtual_transport = virtual",
            "",
            "# --- nothing ever leaves the machine",
            "local_transport = error:5.1.1 local delivery disabled (mailmoat test postfix)",
            "default_transport = error:5.7.1 outbound delivery disabled (mailmoat test postfix)",
            "relay_transport = error:5.7.1 outbound delivery disabled (mailmoat test postfix)",
            "transport_maps =",
            "smtp_tls_security_level = none",
            "",
            "# --- port-25 policy: mail for the local domain only, unknown users 550",
            "smtpd_relay_restrictions = reject_unauth_destination",
            "smtpd_recipient_restrictions = reject_unlisted_recipient",
            "smtpd_reject_unlisted_recipient = yes",
            "unknown_virtual_mailbox_reject_code = 550",
            f"smtpd_authorized_xclient_hosts = {self.xclient_hosts}",
            "",
            "# --- TLS: offered, never required",
        ]
        if tls:
            lines += [
                f"smtpd_tls_cert_file = {self.cert_file}",
                f"smtpd_tls_key_file = {key}",
                "smtpd_tls_security_level = may",
                "smtpd_tls_loglevel = 1",
                "smtpd_tls_received_header = yes",
            ]
        else:
            lines += ["smtpd_tls_security_level = none"]
        lines += ["", "# --- SASL (only on submission/smtps, only when a Dovecot socket is given)"]
        if self.sasl_path is not None:
            lines += [
                "smtpd_sasl_type = dovecot",
                f"smtpd_sasl_path = {self.sasl_path}",
            ]
        lines += ["smtpd_sasl_auth_enable = no", ""]
        return "\n".join(lines)

    def master_cf(self) -> str:
        """The text of master.cf."""
        p = self.ports
        sasl = [
            "smtpd_sasl_auth_enable=yes",
            "smtpd_client_restrictions=permit_sasl_authenticated,reject",
            "smtpd_relay_restrictions=permit_sasl_authenticated,reject_unauth_destination",
        ]
        out = [
            "# Generated by mailmoat.demo.postfix: loopback listeners only, no chroot.",
            "# service type  private unpriv  chroot  wakeup  maxproc command + args",
        ]

        def smtpd(port: int, name: str | None, options: list[str]) -> None:
            out.append(f"{self._listen(port)} inet n - n - - smtpd")
            if name is not None:
                out.append(f"  -o syslog_name={self.syslog_name}/{name}")
            out.extend(f"  -o {option}" for option in options)

        smtpd(p.smtp, None, [])
        if p.submission is not None:
            smtpd(p.submission, "submission", sasl if self.sasl_path is not None else [])
        if p.smtps is not None:
            wrapper = ["smtpd_tls_wrappermode=yes"]
            smtpd(p.smtps, "smtps", wrapper + (sasl if self.sasl_path is not None else []))
        if p.proxy_v2 is not None:
            smtpd(p.proxy_v2, "proxy", ["smtpd_upstream_proxy_protocol=haproxy"])
        out += [
            "pickup    unix  n       -       n       60      1       pickup",
            "cleanup   unix  n       -       n       -       0       cleanup",
            "qmgr      unix  n       -       n       300     1       qmgr",
            "tlsmgr    unix  -       -       n       1000?   1       tlsmgr",
            "rewrite   unix  -       -       n       -       -       trivial-rewrite",
            "bounce    unix  -       -       n       -       0       bounce",
            "defer     unix  -       -       n       -       0       bounce",
            "trace     unix  -       -       n       -       0       bounce",
            "verify    unix  -       -       n       -       1       verify",
            "flush     unix  n       -       n       1000?   0       flush",
            "proxymap  unix  -       -       n       -       -       proxymap",
            "proxywrite unix -       -       n       -       1       proxymap",
            "showq     unix  n       -       n       -       -       showq",
            "error     unix  -       -       n       -       -       error",
            "retry     unix  -       -       n       -       -       error",
            "discard   unix  -       -       n       -       -       discard",
            "virtual   unix  -       n       n       -       -       virtual",
            "anvil     unix  -       -       n       -       1       anvil",
            "scache    unix  -       -       n       -       1       scache",
            "postlog   unix-dgram n  -       n       -       1       postlogd",
            "",
        ]
        return "\n".join(out)

    def vmailbox(self) -> str:
        """The texthash map of local users -> Maildir (trailing slash = Maildir)."""
        return "".join(f"{u}@{self.domain} {self.domain}/{u}/\n" for u in self.users)

    # ------------------------------------------------------------- lifecycle

    def _check_traversable(self) -> None:
        """Postfix daemons (user postfix) and virtual(8) (user nobody) must reach root."""
        ids = []
        for name in (MAIL_OWNER, DELIVERY_USER):
            pw = pwd.getpwnam(name)
            groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
            ids.append((name, pw.pw_uid, groups))
        for directory in [self.root, *self.root.parents]:
            st = directory.stat()
            for name, uid, groups in ids:
                if st.st_uid == uid:
                    ok = bool(st.st_mode & stat.S_IXUSR)
                elif st.st_gid in groups:
                    ok = bool(st.st_mode & stat.S_IXGRP)
                else:
                    ok = bool(st.st_mode & stat.S_IXOTH)
                if not ok:
                    raise PostfixError(
                        f"{directory} is not searchable by user {name!r} (mode "
                        f"{stat.filemode(st.st_mode)}): Postfix's daemons cannot reach "
                        f"{self.root}; put the instance root somewhere else (e.g. "
                        "tempfile.mkdtemp() under /tmp) or chmod o+x that directory"
                    )

    def _prepare(self) -> None:
        postfix_pw = pwd.getpwnam(MAIL_OWNER)
        delivery_pw = pwd.getpwnam(DELIVERY_USER)
        self.root.mkdir(parents=True, exist_ok=True)
        # Postfix's daemons run as user postfix, virtual(8) as nobody: both must
        # traverse root; nothing in it is secret (the TLS key lives elsewhere).
        os.chmod(self.root, 0o755)  # noqa: S103
        self._check_traversable()
        for directory in (self.config_dir, self.queue_dir, self.mail_dir, self.log_dir):
            directory.mkdir(exist_ok=True)
            os.chown(directory, 0, 0)
            os.chmod(directory, 0o755)  # noqa: S103 (root-owned, as postfix-script checks)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, postfix_pw.pw_uid, postfix_pw.pw_gid)
        os.chmod(self.data_dir, 0o700)
        # Maildirs: owned by the delivery user, pre-created so they exist before any mail.
        domain_dir = self.mail_dir / self.domain
        for directory in [domain_dir] + [
            self.maildir(u) / sub for u in self.users for sub in ("", "new", "cur", "tmp")
        ]:
            directory.mkdir(exist_ok=True)
            os.chown(directory, delivery_pw.pw_uid, delivery_pw.pw_gid)
            os.chmod(directory, 0o700 if directory != domain_dir else 0o755)
        for name, text in (
            ("main.cf", self.main_cf()),
            ("master.cf", self.master_cf()),
            ("vmailbox", self.vmailbox()),
        ):
            path = self.config_dir / name
            path.write_text(text, encoding="utf-8")
            os.chown(path, 0, 0)
            os.chmod(path, 0o644)
            # Postfix re-reads a configuration/table file that changed within the last
            # second until it is "stable" (dict_load_file: ~2 s of 300 ms naps).  Our
            # files are written in one go, so date them back.
            past = time.time() - 60
            os.utime(path, (past, past))
        self.log_path.touch()
        os.chmod(self.log_path, 0o600)

    def _postfix(self, command: str, timeout: float) -> None:
        """Run ``postfix -c <config_dir> <command>``; output goes to the command log.

        Output is sent to a file, not a pipe: the daemonised master must not
        inherit a pipe we wait on.
        """
        with self.command_log_path.open("ab") as out:
            out.write(f"--- postfix -c {self.config_dir} {command}\n".encode())
            out.flush()
            try:
                proc = subprocess.run(
                    [str(POSTFIX_COMMAND), "-c", str(self.config_dir), command],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                    env=_environment(),
                )
            except subprocess.TimeoutExpired as exc:
                raise PostfixError(
                    f"`postfix {command}` did not finish within {timeout:g}s\n{self._tails()}"
                ) from exc
        if proc.returncode != 0:
            raise PostfixError(
                f"`postfix -c {self.config_dir} {command}` failed with exit status "
                f"{proc.returncode}\n{self._tails()}"
            )

    def _tails(self, lines: int = 30) -> str:
        parts = []
        for path in (self.command_log_path, self.log_path):
            try:
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            if text:
                parts.append(f"--- last lines of {path}:\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) if parts else "(no log output)"

    def _read_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text(encoding="ascii")
            return int(text.split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 20) -> None:
        """Write the configuration, start Postfix and wait until every listener accepts.

        Raises ``PostfixError`` (with the tail of the logs) on failure; a
        half-started instance is stopped again.
        """
        if self._master_pid is not None:
            return
        if not postfix_available():
            raise PostfixError("postfix is not installed: apt-get install postfix")
        if os.geteuid() != 0:
            raise PostfixError("starting a Postfix instance needs root (the master runs as root)")
        deadline = time.monotonic() + timeout
        self._prepare()
        stale = self._read_pid()
        if stale is not None and _alive(stale):
            raise PostfixError(f"a Postfix master (pid {stale}) is already running in {self.root}")
        # `check` validates the configuration and creates the queue directories with
        # the right owners (post-install create-missing) -- then `start` may skip the
        # same, slow-ish integrity checks via the documented quick-start flag file.
        self._postfix("check", timeout)
        (self.queue_dir / "quick-start").touch()
        self._postfix("start", max(1.0, deadline - time.monotonic()))
        pid = self._read_pid()
        if pid is None:
            raise PostfixError(f"postfix started but wrote no pid file\n{self._tails()}")
        self._master_pid = pid
        try:
            for name, port in self.ports.given().items():
                self._wait_port(name, port, deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_port(self, name: str, port: int, deadline: float) -> None:
        """Wait until the master listens on ``port``.

        Looks at /proc/net/tcp rather than connecting, so no empty
        "connect from ... lost connection" sessions end up in the log.
        """
        while True:
            listening = _listening(self.host, port)
            if listening is None:  # no /proc: probe with a connection
                try:
                    with socket.create_connection((self.host, port), timeout=1):
                        listening = True
                except OSError:
                    listening = False
            if listening:
                return
            if self._master_pid is not None and not _alive(self._master_pid):
                raise PostfixError(f"the Postfix master exited during start-up\n{self._tails()}")
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"Postfix {name} listener {self.host}:{port} is not listening\n{self._tails()}"
                )
            time.sleep(_POLL)

    def stop(self, timeout: float = 20) -> None:
        """Stop the master and every Postfix process of this instance (idempotent).

        Sends SIGTERM to the master -- which is exactly what ``postfix stop``
        does -- but polls for its exit every 20 ms instead of ``postfix-script``'s
        1 s steps; the master's process group (it calls setsid()) is killed with
        SIGKILL if anything is left after ``timeout``.
        """
        pid = self._master_pid if self._master_pid is not None else self._read_pid()
        self._master_pid = None
        if pid is None or not _alive(pid) or not _is_postfix_master(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(_POLL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while _group_alive(pid) and time.monotonic() < end:
            time.sleep(_POLL)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ inspection

    def messages(self, user: str) -> list[Path]:
        """Delivered message files of ``user`` (Maildir new/ and cur/), oldest first."""
        return maildir_messages(self.maildir(user))

    def wait_for_messages(self, user: str, count: int, timeout: float = 20) -> list[Path]:
        """Poll until ``user`` has at least ``count`` messages; return them."""

        def failure(found: int) -> Exception:
            tail = "\n".join(self.log_lines()[-20:])
            return PostfixError(
                f"{self.address(user)}: {found} of {count} expected message(s) "
                f"arrived within {timeout:g}s; last log lines:\n{tail}"
            )

        return wait_for_messages(lambda: self.messages(user), count, timeout, failure)

    def log_lines(self) -> list[str]:
        """Lines of the instance's maillog_file so far."""
        return log_lines(self.log_path)

    def queue_empty(self) -> bool:
        """True when no message is queued (maildrop, incoming, active, deferred, hold)."""
        for queue in _QUEUES:
            for _dirpath, _dirnames, filenames in os.walk(self.queue_dir / queue):
                if filenames:
                    return False
        return True


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "MAIL_DEBUG")}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state, pgid) of ``pid`` from /proc, or None when it does not exist."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead: PID 1 may reap late)."""
    if Path("/proc/self/stat").exists():
        state = _proc_state(pid)
        return state is not None and state[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in process group ``pgid``."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                state = _proc_state(int(entry.name))
                if state is not None and state[1] == pgid and state[0] not in ("Z", "X"):
                    return True
    return False


def _listening(host: str, port: int) -> bool | None:
    """Whether a TCP socket listens on host:port per /proc/net/tcp{,6} (None: unknown)."""
    ipv6 = ":" in host
    table = Path("/proc/net/tcp6" if ipv6 else "/proc/net/tcp")
    try:
        rows = table.read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return None
    packed = socket.inet_pton(socket.AF_INET6 if ipv6 else socket.AF_INET, host)
    # /proc/net/tcp prints each 32-bit word of the address in host (little-endian) order
    want = "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, len(packed), 4))
    for row in rows:
        fields = row.split()
        local, state = fields[1], fields[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port and address in (want, "0" * len(want)):
            return True
    return False


def _is_postfix_master(pid: int) -> bool:
    """Guard against a recycled pid from a stale pid file."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return True  # no /proc: trust the pid file
    return exe.startswith(str(DAEMON_DIRECTORY / "master"))


class LmtpPostfixInstance(PostfixInstance):
    """A PostfixInstance whose virtual domain is delivered to Dovecot over LMTP.

    (``virtual_transport = lmtp:unix:<path>`` instead of virtual(8); the
    recipients are still checked against the instance's vmailbox map.)
    """

    def __init__(self, root: Path, ports: PostfixPorts, *, lmtp_path: Path, **options: Any):
        super().__init__(root, ports, **options)
        self.lmtp_path = Path(lmtp_path).absolute()

    def main_cf(self) -> str:
        text = super().main_cf()
        old = "virtual_transport = virtual\n"
        if old not in text:  # pragma: no cover - main_cf() always sets it
            raise PostfixError("main.cf has no virtual_transport line to replace")
        return text.replace(old, f"virtual_transport = lmtp:unix:{self.lmtp_path}\n")

    def master_cf(self) -> str:
        lmtp = "lmtp      unix  -       -       n       -       -       lmtp\n"
        return super().master_cf() + lmtp
