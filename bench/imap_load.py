"""A cheap, bounded IMAP load generator for ``bench/run.py --only imap``.

One process, one ``selectors`` loop over non-blocking sockets (no imaplib, no
asyncio): the client shares two cores with Dovecot and the proxy, so it must
cost little.

    python bench/imap_load.py login --port P --users alice:alicepw,bob:bobpw --count 2000 --conc 20
    python bench/imap_load.py fetch --port P --users bulk:bulkpw --count 24 --conc 6 \\
        --expect-msgs 4 --expect-bytes 33554432 --marker mailmoat-bench-end
    python bench/imap_load.py login --port P --users alice:alicepw --count 2000 --fail-every 10

``login``: per session greeting, ``a LOGIN user pass``, wait for the tagged
OK, ``b LOGOUT``, wait for its tagged OK and for the server to close.  With
``--fail-every N`` every N-th session (session N-1, 2N-1, ...) sends a wrong
password instead and its LOGIN must be answered with a tagged NO (counted as
``rejected``); it then logs out the same way.

``fetch``: greeting, ``a LOGIN``, wait for OK, then pipelined
``s SELECT INBOX`` / ``f UID FETCH 1:* BODY.PEEK[]``, after ``f OK``
``z LOGOUT`` (not pipelined: Dovecot 2.3.19 sometimes drops the last few
hundred bytes of a big FETCH when LOGOUT is pipelined behind it and the
reader is not fast, also without any proxy); every
literal byte is counted (not kept) and the last bytes of each literal must
end with ``<marker> <n>`` (the n-th message), every tag must be OK and the
server must close.

Prints one JSON object (``ok``, ``failed``, ``elapsed_s`` from the first
connect to the last close, ``bytes``, ``errors`` ...) and exits 1 if any
session failed.  Every session has a timeout.  Only IPv4 loopback targets
are accepted.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import selectors
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TAIL = 64  # bytes kept of the end of every literal (marker check)
MAX_LINE = 64 * 1024
RECV_SIZE = 1024 * 1024
EOF = b""  # script step: the server closes


class SessionError(Exception):
    """One session went wrong; the message is its kind plus a detail."""


@dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    rejected: int = 0  # sessions whose LOGIN was (as expected) answered NO
    bytes: int = 0
    literals: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


class Session:
    """One connection running a script of (bytes to send, tag to wait for) steps.

    Tag ``*`` is the greeting; :data:`EOF` waits for the server to close.
    Lines and literals are split in place; literal bytes are only counted.
    """

    __slots__ = (
        "connected",
        "deadline",
        "index",
        "line",
        "lit_bytes",
        "lit_left",
        "no_tag",
        "port",
        "script",
        "sock",
        "step",
        "tails",
    )

    def __init__(
        self,
        index: int,
        script: list[tuple[bytes, bytes]],
        deadline: float,
        no_tag: bytes | None = None,
    ) -> None:
        self.index = index
        self.script = script
        self.no_tag = no_tag  # the tag that must be answered NO (a wrong password), if any
        self.step = 0
        self.deadline = deadline
        self.line = bytearray()
        self.lit_left = 0
        self.lit_bytes = 0
        self.tails: list[bytes] = []
        self.connected = False
        self.port = 0
        # a load client, not mailmoat: its own non-blocking socket for connect_ex()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # noqa: TID251
        self.sock.setblocking(False)

    def feed(self, buf: bytearray, n: int) -> bool:
        """Process ``buf[:n]``; True once the script is done but for the EOF."""
        pos = 0
        while pos < n:
            if self.lit_left:
                left = self.lit_left
                take = min(left, n - pos)
                if left - take < TAIL:  # part of this chunk is in the literal's last TAIL bytes
                    self.tails[-1] = (
                        self.tails[-1] + bytes(buf[pos + max(0, left - TAIL) : pos + take])
                    )[-TAIL:]
                self.lit_left = left - take
                self.lit_bytes += take
                pos += take
                continue
            i = buf.find(b"\n", pos, n)
            if i < 0:
                self.line += buf[pos:n]
                if len(self.line) > MAX_LINE:
                    raise SessionError(f"line_too_long: {bytes(self.line[:80])!r}")
                break
            self.line += buf[pos : i + 1]
            pos = i + 1
            line = bytes(self.line)
            self.line.clear()
            self.on_line(line)
        return self.script[self.step][1] == EOF

    def on_line(self, line: bytes) -> None:
        if line.endswith(b"}\r\n"):
            j = line.rfind(b"{")
            try:
                self.lit_left = int(line[j + 1 : -3].rstrip(b"+"))
            except ValueError:
                raise SessionError(f"bad_literal: {line[:80]!r}") from None
            self.tails.append(b"")
        tag = self.script[self.step][1]
        if tag == EOF:
            raise SessionError(f"after_logout: {line[:120]!r}")
        if tag == b"*":
            if not line.startswith(b"* OK"):
                raise SessionError(f"greeting: {line[:120]!r}")
        elif not line.startswith(tag + b" "):
            return  # untagged or continuation: not what this step waits for
        elif tag == self.no_tag:
            if not line.startswith(tag + b" NO"):
                raise SessionError(f"not_no_{tag.decode()}: {line[:120]!r}")
        elif not line.startswith(tag + b" OK"):
            raise SessionError(f"not_ok_{tag.decode()}: {line[:120]!r}")
        self.step += 1
        send = self.script[self.step][0]
        if send:
            self.sock.sendall(send)  # a few hundred bytes into an empty socket buffer

    def connect_done(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise SessionError(f"connect: {errno.errorcode.get(err, err)}")
        self.connected = True
        self.port = self.sock.getsockname()[1]

    def closed(self) -> None:
        if self.script[self.step][1] != EOF:
            raise SessionError(
                f"closed_early: EOF waiting for {self.script[self.step][1]!r} after"
                f" {len(self.tails)} literal(s), {self.lit_bytes} literal bytes"
                f" ({self.lit_left} left of the current one)"
            )

    def check_fetch(self, msgs: int, size: int, marker: bytes) -> None:
        if len(self.tails) != msgs:
            raise SessionError(f"wrong_count: {len(self.tails)} literals, expected {msgs}")
        if self.lit_bytes != size:
            raise SessionError(f"wrong_size: {self.lit_bytes} literal bytes, expected {size}")
        for n, tail in enumerate(self.tails, 1):
            if not tail.rstrip(b"\r\n").endswith(b"%s %d" % (marker, n)):
                raise SessionError(f"wrong_content: literal {n} ends {tail[-40:]!r}")


def run(args: argparse.Namespace) -> tuple[Stats, float]:
    users = [
        (u.encode(), p.encode())
        for u, _, p in (pair.partition(":") for pair in args.users.split(","))
    ]
    fetch = args.mode == "fetch"
    marker = args.marker.encode()
    stats = Stats()
    sel = selectors.DefaultSelector()
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    active: dict[int, Session] = {}
    started = 0

    def wrong(i: int) -> bool:
        return not fetch and args.fail_every > 0 and i % args.fail_every == args.fail_every - 1

    def script(i: int) -> list[tuple[bytes, bytes]]:
        user, password = users[i % len(users)]
        if wrong(i):
            password += b"-wrong"
        login = b"a LOGIN " + user + b" " + password + b"\r\n"
        if fetch:
            # LOGOUT only after "f OK": Dovecot 2.3 sometimes closes without flushing the
            # last bytes of a big FETCH when LOGOUT is pipelined behind it (see the docs)
            rest = b"s SELECT INBOX\r\nf UID FETCH 1:* BODY.PEEK[]\r\n"
            return [
                (b"", b"*"),
                (login, b"a"),
                (rest, b"s"),
                (b"", b"f"),
                (b"z LOGOUT\r\n", b"z"),
                (b"", EOF),
            ]
        return [(b"", b"*"), (login, b"a"), (b"b LOGOUT\r\n", b"b"), (b"", EOF)]

    def finish(s: Session, exc: BaseException | None) -> None:
        sel.unregister(s.sock)
        s.sock.close()
        del active[s.index]
        if exc is None:
            stats.ok += 1
            if s.no_tag is not None:
                stats.rejected += 1
            stats.bytes += s.lit_bytes
            stats.literals += len(s.tails)
            return
        stats.failed += 1
        kind = str(exc).split(":", 1)[0] if isinstance(exc, SessionError) else type(exc).__name__
        stats.kinds[kind] += 1
        if len(stats.errors) < 10:
            stats.errors.append(
                f"session {s.index} (step {s.step}, local port {s.port}): {kind}: {exc}"
            )

    def start() -> None:
        nonlocal started
        s = Session(
            started,
            script(started),
            time.monotonic() + args.session_timeout,
            b"a" if wrong(started) else None,
        )
        started += 1
        active[s.index] = s
        rc = s.sock.connect_ex((args.host, args.port))
        sel.register(s.sock, selectors.EVENT_WRITE, s)
        if rc not in (0, errno.EINPROGRESS):
            finish(s, SessionError(f"connect: {errno.errorcode.get(rc, rc)}"))

    t0 = time.perf_counter()
    next_check = time.monotonic() + 0.5
    while started < args.count or active:
        while started < args.count and len(active) < args.conc:
            start()
        for key, _ in sel.select(0.5):
            s = key.data
            try:
                if not s.connected:
                    s.connect_done()
                    sel.modify(s.sock, selectors.EVENT_READ, s)
                    continue
                n = s.sock.recv_into(view, RECV_SIZE)
                if n == 0:
                    s.closed()
                    if fetch:
                        s.check_fetch(args.expect_msgs, args.expect_bytes, marker)
                    finish(s, None)
                    continue
                s.feed(buf, n)
            except BlockingIOError:
                continue
            except (SessionError, OSError) as exc:
                finish(s, exc)
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.5
            for s in [s for s in active.values() if s.deadline < now]:
                finish(s, SessionError(f"timeout: {args.session_timeout:g} s"))
    return stats, time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/imap_load.py", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("login", "fetch"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--users", required=True, help="user:password[,user:password...], rotated")
    p.add_argument("--count", type=int, required=True, help="sessions in all")
    p.add_argument("--conc", type=int, default=20, help="sessions at a time")
    p.add_argument("--session-timeout", type=float, default=60.0)
    p.add_argument("--expect-msgs", type=int, default=0, help="fetch: messages in INBOX")
    p.add_argument("--expect-bytes", type=int, default=0, help="fetch: literal bytes per session")
    p.add_argument("--marker", default="mailmoat-bench-end", help="fetch: message end marker")
    p.add_argument(
        "--fail-every",
        type=int,
        default=0,
        help="login: every N-th session sends a wrong password and expects NO (0: never)",
    )
    args = p.parse_args(argv)
    addr = ipaddress.ip_address(args.host)
    if not (addr.version == 4 and addr.is_loopback):
        p.error(f"refusing target {args.host}: only IPv4 loopback")
    if not (1 <= args.count <= 1_000_000 and 1 <= args.conc <= 1000):
        p.error("--count must be 1..1000000 and --conc 1..1000")
    if not 0 <= args.fail_every <= 1_000_000:
        p.error("--fail-every must be 0..1000000")
    if args.mode == "fetch" and args.fail_every:
        p.error("--fail-every is for login only")
    if args.mode == "fetch" and (args.expect_msgs < 1 or args.expect_bytes < 1):
        p.error("fetch needs --expect-msgs and --expect-bytes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stats, elapsed = run(args)
    result: dict[str, Any] = {
        "mode": args.mode,
        "count": args.count,
        "conc": args.conc,
        "ok": stats.ok,
        "failed": stats.failed,
        "rejected": stats.rejected,
        "elapsed_s": round(elapsed, 4),
        "bytes": stats.bytes,
        "literals": stats.literals,
        "error_kinds": dict(stats.kinds),
        "errors": stats.errors,
    }
    print(json.dumps(result))
    return 0 if stats.failed == 0 and stats.ok == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
