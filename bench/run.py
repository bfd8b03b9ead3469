"""``make bench``: mailmoat side by side with its peers, in one run, on loopback.

Sections (``--only NAME[,NAME]``; ``--list`` shows them):

* ``smtp`` -- Postfix's ``smtp-source`` against ``smtp-sink`` directly, through
  HAProxy (TCP mode) and through mailmoat (``tls = "none"``), 1 KB and 1 MB
  messages, one message per session.  Prints sessions/s, MiB/s and the CPU
  time per message of the measured process (the sink for the direct row, the
  proxy otherwise), then the mailmoat/HAProxy ratios against the goals.
* ``rules`` -- the cost of the rule engine: ``RuleSet.evaluate()`` of one phase
  with 10, 100 and 1000 rules (in process, ``bench/rules_eval.py``), then
  ``smtp-source`` (1 KB, one message per session) through three mailmoat
  instances in front of one ``smtp-sink``: without ``[rules]``, with the
  shipped ``rules/`` and with 1000 generated rules spread over the SMTP phases
  (none of which fires on the bench traffic), runs interleaved.  Prints
  sessions/s and mailmoat CPU ms per session of each, and the cost against no
  rules (``1 - sessions_x/sessions_none``, ``cpu_x/cpu_none - 1``) against the
  goals (shipped < 10 %, 1000 rules < 25 %).  Exit status 1 if any run failed.
* ``imap`` -- a private Dovecot (``mailmoat.demo.dovecot``, plaintext IMAP)
  directly, through HAProxy (TCP mode) and through mailmoat (``tls = "none"``,
  backend ``client_identity = "imap-id"``), loaded by ``bench/imap_load.py``:
  logins/s (greeting, LOGIN, LOGOUT; 2000 sessions at concurrency 20) and
  FETCH MiB/s (LOGIN, SELECT, ``UID FETCH 1:* BODY.PEEK[]`` of 4 x 8 MiB,
  LOGOUT; 64 sessions at concurrency 6).  Every login must be tagged OK and
  every FETCH return every byte (sizes and end markers checked), else exit
  status 1.  Prints the CPU per login / per MiB of the measured process (all
  of Dovecot's processes for the direct row, the proxy otherwise) and of
  Dovecot, then the mailmoat/HAProxy ratios against the goals (logins/s
  >= 0.7, FETCH MiB/s >= 0.8).
* ``detection`` -- the cost of the login detectors: one private Dovecot, one
  private ``redis-server`` and three mailmoat instances in front of Dovecot
  (IMAP, ``tls = "none"``, no rules), identical but for ``[state]``:
  detection off, on with the memory store, on with Redis; loaded by
  ``bench/imap_load.py login``: 2000 sessions with every password right at
  concurrency 20, and 2000 with every 10th LOGIN a wrong password that must be
  answered NO at concurrency 60 (Dovecot delays each NO ~0.5 s), interleaved.
  Prints logins/s and mailmoat CPU ms per login of each (and redis-server's
  CPU, commands and reads per login), and the cost against detection off
  (``1 - logins_x/logins_off``, ``cpu_x/cpu_off - 1``) against the goals
  (memory < 15 %, Redis < 30 %).
* ``http`` -- ``wrk`` against a private nginx serving static files
  (``mailmoat.demo.nginx``, one worker) directly, a second nginx as a reverse
  proxy in front of it, mitmproxy (``mitmdump --mode reverse:...``, the Python
  peer; installed on first use into ``build/bench-mitm-venv``, its row says
  why when that fails) and mailmoat (one ``protocol = "http"`` listener):
  the 1 KiB ``/static/small.html`` at 32 connections and the 1 MiB
  ``/static/1mb.bin`` at 8, 10 s per run (``--http-duration``).  Every target
  is probed first (status 200 and every byte of both files); every run must
  have no wrk socket error, no non-2xx/3xx and whole bodies, else its row is
  flagged and the exit status is 1.  Prints req/s, MiB/s, latency p50/p99,
  CPU per request of the measured process (nginx's master and worker for
  the direct row, the proxy otherwise) and of the origin nginx, then
  mailmoat's req/s against the goals: >= 3x mitmproxy and >= 0.3x nginx
  as a reverse proxy (the goal's row; the ratio to nginx serving the files
  itself is printed as a reference).

Every process this script starts runs on 127.0.0.1, is bounded (fixed message
counts or durations, ``timeout`` on every client run) and is stopped in a ``finally``
(SIGTERM, then SIGKILL), also on Ctrl-C.  Results go to
``$BENCH_OUT/<section>-latest.json`` (default ``/tmp/mailmoat-bench``).

A new section is one more function ``section_x(ctx) -> dict`` registered in
:data:`SECTIONS`, using :class:`Stack` to start and stop its peers.

    python bench/run.py                      # everything, default sizes
    python bench/run.py --only smtp --repeats 1 --small-msgs 1000 --large-msgs 50
    python bench/run.py --conc1              # add concurrency-1 rows
    python bench/run.py --only rules         # rule cost; --rules-msgs 2000 --rules-repeats 5
    python bench/run.py --only imap          # --imap-logins 2000 --imap-fetches 24 ...
    python bench/run.py --only detection     # --detection-logins 2000 --detection-fail-every 10
    python bench/run.py --only http          # --http-duration 10 --http-conns 32 --http-no-mitm
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB = 1024
MB = 1024 * 1024
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])

# goals: mailmoat / HAProxy, concurrency 20 (see docs/benchmarks.md)
GOAL_SESSIONS_1K = 0.5
GOAL_MBPS_1M = 0.8

# binary -> Debian package that ships it
PACKAGES = {
    "smtp-source": "postfix",
    "smtp-sink": "postfix",
    "haproxy": "haproxy",
    "timeout": "coreutils",
    "redis-server": "redis-server",
    "wrk": "wrk",
}


class BenchError(Exception):
    """A setup problem reported as one line, without a traceback."""


# --------------------------------------------------------------------------- helpers


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise BenchError(f"${name} must be an integer, got {raw!r}") from None


def require_loopback(host: str) -> str:
    """Return ``host`` if it is an IPv4 loopback address, else refuse."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise BenchError(f"refusing target {host!r}: not an IP address") from None
    if not (addr.version == 4 and addr.is_loopback):
        raise BenchError(f"refusing target {host}: only IPv4 loopback (127.0.0.0/8) is allowed")
    return host


@contextlib.contextmanager
def demo_import(opts: Options, module: str) -> Iterator[None]:
    """Import from ``mailmoat.demo.<module>`` of the tree under test (``--src``);
    a failed import is a :class:`BenchError` that names the tree."""
    if str(opts.src) not in sys.path:
        sys.path.insert(0, str(opts.src))
    try:
        yield
    except ImportError as exc:
        raise BenchError(f"cannot import mailmoat.demo.{module} from {opts.src}: {exc}") from None


def find_binaries(names: list[str]) -> dict[str, str]:
    """Locate the tools a section needs; one clear message for all that are missing."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        path = shutil.which(name, path=SBIN_PATH)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        pkgs = sorted({PACKAGES.get(m, m) for m in missing})
        raise BenchError(
            f"missing {', '.join(missing)}: install with `apt-get install {' '.join(pkgs)}`"
        )
    return found


def free_port(host: str) -> int:
    # the kernel picks an unused port; it stays free until a peer binds it moments later
    with socket.create_server((host, 0)) as s:
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc/PID/stat (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # after "pid (comm) ": state is fields[0]; utime/stime are stat fields 14/15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 400) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""


def stop_process(popen: subprocess.Popen[bytes], grace: float = 5.0, group: bool = False) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; ``group`` signals the process group."""
    if popen.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(popen.pid, sig)
            else:
                popen.send_signal(sig)

    send(signal.SIGTERM)
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)


class Stack:
    """The peers of one section: started in order, always stopped in reverse."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_port(self, proc: Proc, host: str, port: int, seconds: float = 15.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not proc.alive():
                raise BenchError(
                    f"{proc.name} exited (status {proc.popen.returncode}) before opening "
                    f"{host}:{port}: {proc.log_tail()}"
                )
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                return
            time.sleep(0.05)
        raise BenchError(f"{proc.name} did not open {host}:{port} within {seconds:.0f} s")

    def stop_all(self) -> None:
        while self.procs:
            stop_process(self.procs.pop().popen)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def run_bounded(argv: list[str], seconds: int) -> tuple[int, float, float, str]:
    """Run a client under ``timeout``; returns (status, elapsed s, client CPU s, output).

    ``timeout`` puts itself and the client into their own process group, so on
    Ctrl-C (or any error) the whole group is signalled here, not left behind.
    """
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    popen = subprocess.Popen(
        ["timeout", "--kill-after=5", str(seconds), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": SBIN_PATH},
    )
    try:
        out, _ = popen.communicate(timeout=seconds + 15)
    finally:
        stop_process(popen, grace=2, group=True)
    elapsed = time.perf_counter() - t0
    return popen.returncode, elapsed, children_cpu() - cpu0, out.decode(errors="replace")


# --------------------------------------------------------------------------- context


@dataclass
class Options:
    host: str
    repeats: int
    small_msgs: int
    large_msgs: int
    small_msgs_c1: int
    large_msgs_c1: int
    conc: int
    conc1: bool
    run_timeout: int
    out_dir: Path
    python: str
    src: Path
    profile: Path | None
    profile_seconds: int
    rules_msgs: int
    rules_repeats: int
    imap_logins: int
    imap_login_conc: int
    imap_fetches: int
    imap_fetch_conc: int
    imap_msgs: int
    imap_msg_mib: int
    imap_identity: str
    detection_logins: int
    detection_conc: int
    detection_fail_every: int
    detection_mixed_conc: int
    http_duration: int
    http_conns: int
    http_large_conns: int
    http_threads: int
    http_mitm: bool
    http_mitm_venv: Path


@dataclass
class Context:
    opts: Options
    workdir: Path
    log: Callable[[str], None]


# --------------------------------------------------------------------------- SMTP


@dataclass
class Case:
    size: int
    conc: int
    msgs: int

    @property
    def label(self) -> str:
        return f"{self.size // MB} MB" if self.size >= MB else f"{self.size // KB} KB"


@dataclass
class Target:
    name: str
    port: int
    measured: Proc  # whose CPU is charged per message


@dataclass
class RunResult:
    target: str
    size: int
    conc: int
    msgs: int
    repeat: int
    ok: bool
    elapsed_s: float
    sessions_per_s: float
    mib_per_s: float
    cpu_ms_per_msg: float
    client_cpu_s: float
    error: str = ""


@dataclass
class Row:
    target: str
    measured: str
    size: int
    conc: int
    msgs: int
    runs_ok: int
    runs: int
    sessions_per_s: float | None
    mib_per_s: float | None
    cpu_ms_per_msg: float | None
    raw: list[RunResult] = field(default_factory=list)


def haproxy_config(host: str, port: int, sink_port: int) -> str:
    return f"""\
# written by bench/run.py: one TCP frontend -> smtp-sink
global
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client  120s
    timeout server  120s

frontend smtp_in
    bind {host}:{port}
    default_backend sink

backend sink
    server sink {host}:{sink_port}
"""


def mailmoat_config(host: str, port: int, sink_port: int, data_dir: Path) -> str:
    return f"""\
# written by bench/run.py
[node]
name = "bench"
data_dir = "{data_dir}"
drain_timeout = 2

[log]
events = "none"

[[listener]]
name = "bench-smtp"
protocol = "smtp"
listen = "{host}:{port}"
tls = "none"
backend = "sink"

[[backend]]
name = "sink"
address = "{host}:{sink_port}"
tls = "none"
"""


def smtp_source_argv(tool: str, host: str, port: int, case: Case) -> list[str]:
    return [
        tool,
        "-s",
        str(case.conc),
        "-m",
        str(case.msgs),
        "-l",
        str(case.size),
        "-M",
        "bench.example.org",  # HELO name: no lookup of the machine's hostname
        "-f",
        "bench@example.org",
        "-t",
        "sink@example.org",
        f"{require_loopback(host)}:{port}",
    ]


def measure(ctx: Context, tool: str, target: Target, case: Case, repeat: int) -> RunResult:
    host = ctx.opts.host
    argv = smtp_source_argv(tool, host, target.port, case)
    cpu0 = cpu_seconds(target.measured.pid)
    status, elapsed, client_cpu, out = run_bounded(argv, ctx.opts.run_timeout)
    cpu = cpu_seconds(target.measured.pid) - cpu0
    ok = status == 0 and "fatal:" not in out
    error = "" if ok else f"rc={status}: {' '.join(out.split())[:200]}"
    return RunResult(
        target=target.name,
        size=case.size,
        conc=case.conc,
        msgs=case.msgs,
        repeat=repeat,
        ok=ok,
        elapsed_s=round(elapsed, 3),
        sessions_per_s=round(case.msgs / elapsed, 1),
        mib_per_s=round(case.msgs * case.size / MB / elapsed, 2),
        cpu_ms_per_msg=round(cpu * 1000 / case.msgs, 3),
        client_cpu_s=round(client_cpu, 2),
        error=error,
    )


def smtp_cases(opts: Options) -> list[Case]:
    cases = [Case(KB, opts.conc, opts.small_msgs), Case(MB, opts.conc, opts.large_msgs)]
    if opts.conc1:
        cases += [Case(KB, 1, opts.small_msgs_c1), Case(MB, 1, opts.large_msgs_c1)]
    return cases


def start_smtp_stack(ctx: Context, stack: Stack, bins: dict[str, str]) -> list[Target]:
    host = ctx.opts.host
    sink_port = free_port(host)
    sink_argv = [bins["smtp-sink"]]
    if os.geteuid() == 0:
        sink_argv += ["-u", "nobody"]  # required when started as root
    sink_argv += ["-4", "-m", "1000", f"{host}:{sink_port}", "4096"]
    sink = stack.start("smtp-sink", sink_argv)
    stack.wait_port(sink, host, sink_port)

    ha_port = free_port(host)
    ha_cfg = ctx.workdir / "haproxy.cfg"
    ha_cfg.write_text(haproxy_config(host, ha_port, sink_port))
    check = subprocess.run(
        [bins["haproxy"], "-c", "-f", str(ha_cfg)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy rejected {ha_cfg}: {check.stdout}{check.stderr}".strip())
    haproxy = stack.start("haproxy", [bins["haproxy"], "-db", "-f", str(ha_cfg)])
    stack.wait_port(haproxy, host, ha_port)

    mm_port = free_port(host)
    data_dir = ctx.workdir / "mailmoat-data"
    data_dir.mkdir(exist_ok=True)
    mm_cfg = ctx.workdir / "mailmoat.toml"
    mm_cfg.write_text(mailmoat_config(host, mm_port, sink_port, data_dir))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ctx.opts.src), env.get("PYTHONPATH", "")) if p
    )
    mailmoat = stack.start(
        "mailmoat", [ctx.opts.python, "-m", "mailmoat.cli", "run", "-c", str(mm_cfg)], env=env
    )
    stack.wait_port(mailmoat, host, mm_port)

    ctx.log(
        f"smtp-sink pid {sink.pid} :{sink_port}, haproxy pid {haproxy.pid} :{ha_port}, "
        f"mailmoat pid {mailmoat.pid} :{mm_port} (work dir {ctx.workdir})"
    )
    return [
        Target("direct-sink", sink_port, sink),
        Target("haproxy", ha_port, haproxy),
        Target("mailmoat", mm_port, mailmoat),
    ]


def summarize(targets: list[Target], cases: list[Case], runs: list[RunResult]) -> list[Row]:
    rows: list[Row] = []
    for case in cases:
        for t in targets:
            mine = [
                r
                for r in runs
                if r.target == t.name and r.size == case.size and r.conc == case.conc
            ]
            good = [r for r in mine if r.ok]
            rows.append(
                Row(
                    target=t.name,
                    measured=t.measured.name,
                    size=case.size,
                    conc=case.conc,
                    msgs=case.msgs,
                    runs_ok=len(good),
                    runs=len(mine),
                    sessions_per_s=median([r.sessions_per_s for r in good]),
                    mib_per_s=median([r.mib_per_s for r in good]),
                    cpu_ms_per_msg=median([r.cpu_ms_per_msg for r in good]),
                    raw=mine,
                )
            )
    return rows


def ratio(rows: list[Row], size: int, conc: int, metric: str) -> float | None:
    def value(target: str) -> float | None:
        for r in rows:
            if r.target == target and r.size == size and r.conc == conc:
                v: float | None = getattr(r, metric)
                return v
        return None

    mm, ha = value("mailmoat"), value("haproxy")
    return round(mm / ha, 3) if mm is not None and ha else None


def fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(rows: list[Row], ratios: list[dict[str, Any]]) -> None:
    head = (
        "target",
        "size",
        "conc",
        "msgs",
        "ok",
        "sessions/s",
        "MiB/s",
        "CPU ms/msg",
        "CPU of",
    )
    table = [head]
    for r in rows:
        label = Case(r.size, r.conc, r.msgs).label
        table.append(
            (
                r.target,
                label,
                str(r.conc),
                str(r.msgs),
                f"{r.runs_ok}/{r.runs}",
                fmt(r.sessions_per_s, 0),
                fmt(r.mib_per_s, 1),
                fmt(r.cpu_ms_per_msg, 3),
                r.measured,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for n, line in enumerate(table):
        cells = zip(line, widths, strict=True)
        print(
            "  ".join(
                c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(cells)
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for q in ratios:
        verdict = "n/a" if q["ratio"] is None else ("MET" if q["met"] else "NOT met")
        print(
            f"mailmoat/haproxy {q['metric']} ({q['case']}): {fmt(q['ratio'], 2)}"
            f"  goal >= {q['goal']}  {verdict}"
        )


def profile_mailmoat(
    ctx: Context, tool: str, target: Target, case: Case, py_spy: str
) -> dict[str, Any]:
    """Attach py-spy to mailmoat during one extra (unmeasured) 1 KB run."""
    assert ctx.opts.profile is not None
    out = ctx.opts.profile
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--nonblocking",
            "--format",
            "raw",
            "--rate",
            "200",
            "--duration",
            str(ctx.opts.profile_seconds),
            "-o",
            str(out),
            "-p",
            str(target.measured.pid),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(1.0)  # let py-spy attach
        deadline = time.monotonic() + ctx.opts.profile_seconds
        loads = 0
        while time.monotonic() < deadline and spy.poll() is None:
            run_bounded(smtp_source_argv(tool, ctx.opts.host, target.port, case), 60)
            loads += 1
        spy.wait(ctx.opts.profile_seconds + 30)
    finally:
        stop_process(spy, grace=10)
    top = own_time_top(out) if out.exists() else []
    return {"file": str(out), "load_runs": loads, "top_own": top}


def own_time_top(collapsed: Path, n: int = 20) -> list[dict[str, Any]]:
    """Own-time (leaf function) shares from a py-spy ``--format raw`` (collapsed) file."""
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # "func (file.py:123)" -> "func (file.py)": rank functions, not lines
        leaf = re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1])
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return [{"frame": k, "share": round(v / total, 4)} for k, v in ranked] if total else []


def section_smtp(ctx: Context) -> dict[str, Any]:
    """SMTP: smtp-source -> smtp-sink direct / HAProxy TCP / mailmoat, 1 KB and 1 MB."""
    opts = ctx.opts
    bins = find_binaries(["smtp-source", "smtp-sink", "haproxy", "timeout"])
    cases = smtp_cases(opts)
    runs: list[RunResult] = []
    profile: dict[str, Any] | None = None
    with Stack(ctx.workdir) as stack:
        targets = start_smtp_stack(ctx, stack, bins)
        # warm-up: a few sessions per target (python imports, haproxy pools)
        for t in targets:
            run_bounded(
                smtp_source_argv(bins["smtp-source"], opts.host, t.port, Case(KB, 5, 50)), 30
            )
        for rep in range(1, opts.repeats + 1):
            for case in cases:
                # interleaved and rotated per repeat, so drift hits every target alike
                shift = (rep - 1) % len(targets)
                for t in targets[shift:] + targets[:shift]:
                    r = measure(ctx, bins["smtp-source"], t, case, rep)
                    runs.append(r)
                    ctx.log(
                        f"repeat {rep}/{opts.repeats} {t.name:<11} {case.label:>4} c{case.conc:<3}"
                        f" {r.sessions_per_s:8.0f} sess/s {r.mib_per_s:7.1f} MiB/s"
                        f" {r.cpu_ms_per_msg:7.3f} ms CPU/msg"
                        + ("" if r.ok else f"  FAILED {r.error}")
                    )
                    for p in stack.procs:
                        if not p.alive():
                            raise BenchError(f"{p.name} died during the run: {p.log_tail()}")
        if opts.profile is not None:
            py_spy = shutil.which(
                "py-spy", path=os.pathsep.join([str(Path(opts.python).parent), SBIN_PATH])
            )
            if py_spy is None:
                ctx.log("--profile: py-spy not found (pip install py-spy); skipped")
            else:
                ctx.log(f"profiling mailmoat for {opts.profile_seconds} s -> {opts.profile}")
                profile = profile_mailmoat(
                    ctx,
                    bins["smtp-source"],
                    targets[2],
                    Case(KB, opts.conc, opts.small_msgs),
                    py_spy,
                )
    rows = summarize(targets, cases, runs)
    ratios = [
        {
            "metric": "sessions/s",
            "case": f"1 KB, conc {opts.conc}",
            "ratio": (q := ratio(rows, KB, opts.conc, "sessions_per_s")),
            "goal": GOAL_SESSIONS_1K,
            "met": q is not None and q >= GOAL_SESSIONS_1K,
        },
        {
            "metric": "MiB/s",
            "case": f"1 MB, conc {opts.conc}",
            "ratio": (q := ratio(rows, MB, opts.conc, "mib_per_s")),
            "goal": GOAL_MBPS_1M,
            "met": q is not None and q >= GOAL_MBPS_1M,
        },
    ]
    print()
    print_table(rows, ratios)
    if profile is not None:
        print(f"\nmailmoat profile ({profile['file']}), top own time:")
        for item in profile["top_own"][:12]:
            print(f"  {item['share'] * 100:5.1f} %  {item['frame']}")
    return {
        "rows": [asdict(r) for r in rows],
        "ratios": ratios,
        "profile": profile,
        "tools": {k: v for k, v in bins.items()},
    }


# --------------------------------------------------------------------------- rules

SHIPPED_RULES = REPO / "rules"
RULE_COUNTS = (10, 100, 1000)  # evaluate() cost of one phase with this many rules
RULE_SET_SIZE = 1000  # the large rule set loaded into mailmoat
# goals: cost of rules in mailmoat's sessions/s against no rules (see docs/benchmarks.md)
GOAL_RULES_SHIPPED = 0.10
GOAL_RULES_1000 = 0.25


@dataclass
class RuleSetup:
    name: str  # "none", "shipped", "1000"
    paths: list[Path]
    rules: int = 0
    note: str = ""


def mailmoat_rules_config(
    host: str,
    port: int,
    sink_port: int,
    data_dir: Path,
    paths: list[Path],
    admin_port: int,
    token_file: Path,
) -> str:
    """:func:`mailmoat_config` plus ``[rules]`` (left out without paths) and ``[admin]``.

    The admin API (idle during the runs, on every instance alike) is only asked
    for the hit and evaluation-error counters of the rules after the runs.
    """
    text = mailmoat_config(host, port, sink_port, data_dir)
    if paths:
        text += "\n[rules]\npaths = [" + ", ".join(json.dumps(str(p)) for p in paths) + "]\n"
    text += (
        f'\n[admin]\nlisten = "{host}:{admin_port}"\ntoken_file = {json.dumps(str(token_file))}\n'
    )
    return text


def rule_counters(host: str, admin_port: int, token: str) -> list[dict[str, Any]]:
    """``GET /api/rules``: the loaded rules with their ``hits`` and ``errors``."""
    req = urllib.request.Request(
        f"http://{require_loopback(host)}:{admin_port}/api/rules",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise BenchError(f"admin API on :{admin_port}: {exc}") from None
    return list(body.get("rules", []))


def start_sink(ctx: Context, stack: Stack, bins: dict[str, str]) -> tuple[Proc, int]:
    host = ctx.opts.host
    sink_port = free_port(host)
    sink_argv = [bins["smtp-sink"]]
    if os.geteuid() == 0:
        sink_argv += ["-u", "nobody"]  # required when started as root
    sink_argv += ["-4", "-m", "1000", f"{host}:{sink_port}", "4096"]
    sink = stack.start("smtp-sink", sink_argv)
    stack.wait_port(sink, host, sink_port)
    return sink, sink_port


def rule_sets(ctx: Context, rules_eval: types.ModuleType) -> list[RuleSetup]:
    """None, the shipped ``rules/`` (or a stand-in when it has no rule file) and 1000 rules."""
    shipped = RuleSetup("shipped", [SHIPPED_RULES])
    if not sorted(SHIPPED_RULES.glob("*.toml")):
        standin = ctx.workdir / "rules-standin"
        standin.mkdir()
        rules_eval.write_standin_rules(standin)
        shipped.paths = [standin]
        shipped.note = (
            f"{SHIPPED_RULES} has no *.toml: measured a STAND-IN shipped set "
            "(bench/rules_eval.py STANDIN_RULES) instead"
        )
    generated = ctx.workdir / f"rules-{RULE_SET_SIZE}"
    generated.mkdir()
    rules_eval.write_session_rules(generated, RULE_SET_SIZE)
    return [RuleSetup("none", []), shipped, RuleSetup(str(RULE_SET_SIZE), [generated])]


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f} %"


def print_rules_report(
    eval_rows: list[dict[str, float]],
    empty_ns: float,
    setups: list[RuleSetup],
    session_us: dict[str, float],
    used_cache: bool,
    print_eval_table: Callable[[list[dict[str, float]], float], None],
    rows: list[Row],
    costs: list[dict[str, Any]],
    case: Case,
    repeats: int,
) -> None:
    print("\nevaluate() of one phase, N rules on smtp rcpt, none deciding (in process):")
    print_eval_table(eval_rows, empty_ns)
    print(
        "\nevaluate() over the phases of one bench session (connect, 5x command, helo, mail_from,"
        f" rcpt, data, close; in process{', per-session cache' if used_cache else ''}):"
    )
    for s in setups[1:]:
        print(f"  {s.name:<8} {s.rules:>5} rules  {session_us[s.name]:8.1f} µs/session")
    for s in setups:
        if s.note:
            print(f"NOTE: {s.note}")
    print(
        f"\nmailmoat (tls none, events none) <- smtp-source {case.label} x {case.msgs},"
        f" conc {case.conc}, one message per session; medians of {repeats}:"
    )
    head = ("rules", "loaded", "ok", "sessions/s", "CPU ms/session")
    table = [head]
    by_name = {r.target: r for r in rows}
    for s in setups:
        r = by_name[s.name]
        table.append(
            (
                s.name,
                str(s.rules),
                f"{r.runs_ok}/{r.runs}",
                fmt(r.sessions_per_s, 0),
                fmt(r.cpu_ms_per_msg, 3),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for n, line in enumerate(table):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for c in costs:
        verdict = {True: "MET", False: "NOT met", None: "n/a"}
        print(
            f"cost of {c['rules']:<8} rules vs none: sessions/s {pct(c['sessions_cost'])}"
            f" (paired per repeat {pct(c['sessions_cost_paired'])}) {verdict[c['sessions_met']]};"
            f" CPU/session {pct(c['cpu_cost'])}"
            f" (paired {pct(c['cpu_cost_paired'])}) {verdict[c['cpu_met']]};"
            f" goal < {c['goal'] * 100:.0f} %"
        )


def rule_costs(
    setups: list[RuleSetup], rows: list[Row], runs: list[RunResult]
) -> list[dict[str, Any]]:
    """``1 - sessions_x/sessions_none`` and ``cpu_x/cpu_none - 1``, of the medians and
    as the median of the per-repeat (adjacent runs) ratios."""
    by_name = {r.target: r for r in rows}
    base = by_name["none"]
    goals = {"shipped": GOAL_RULES_SHIPPED, str(RULE_SET_SIZE): GOAL_RULES_1000}

    def paired(name: str, metric: str) -> float | None:
        values: list[float] = []
        for rep in sorted({r.repeat for r in runs}):
            x = [r for r in runs if r.target == name and r.repeat == rep and r.ok]
            b = [r for r in runs if r.target == "none" and r.repeat == rep and r.ok]
            if x and b and getattr(b[0], metric):
                q = getattr(x[0], metric) / getattr(b[0], metric)
                values.append(1 - q if metric == "sessions_per_s" else q - 1)
        v = median(values)
        return None if v is None else round(v, 4)

    out: list[dict[str, Any]] = []
    for s in setups[1:]:
        row = by_name[s.name]
        sess = cpu = None
        if row.sessions_per_s is not None and base.sessions_per_s:
            sess = round(1 - row.sessions_per_s / base.sessions_per_s, 4)
        if row.cpu_ms_per_msg is not None and base.cpu_ms_per_msg:
            cpu = round(row.cpu_ms_per_msg / base.cpu_ms_per_msg - 1, 4)
        goal = goals[s.name]
        out.append(
            {
                "rules": s.name,
                "loaded": s.rules,
                "goal": goal,
                "sessions_cost": sess,
                "sessions_cost_paired": paired(s.name, "sessions_per_s"),
                "sessions_met": None if sess is None else sess < goal,
                "cpu_cost": cpu,
                "cpu_cost_paired": paired(s.name, "cpu_ms_per_msg"),
                "cpu_met": None if cpu is None else cpu < goal,
            }
        )
    return out


def section_rules(ctx: Context) -> dict[str, Any]:
    """Rules: evaluate() cost with 10/100/1000 rules; mailmoat sessions/s, no/shipped/1000 rules."""
    opts = ctx.opts
    bins = find_binaries(["smtp-source", "smtp-sink", "timeout"])
    # rules_eval (next to this file) imports mailmoat.policy: take it from --src
    for p in (str(REPO / "bench"), str(opts.src)):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        import rules_eval

        from mailmoat.policy import RuleErrors, load_rules
    except ImportError as exc:
        raise BenchError(f"cannot import mailmoat.policy from {opts.src}: {exc}") from None

    ctx.log(f"evaluate() of one phase with {'/'.join(map(str, RULE_COUNTS))} rules (in process)")
    eval_rows, empty_ns = rules_eval.eval_table(RULE_COUNTS)

    setups = rule_sets(ctx, rules_eval)
    predicted: dict[str, list[tuple[str, str, str]]] = {}
    session_us: dict[str, float] = {}
    used_cache = False
    for s in setups[1:]:
        try:
            loaded = load_rules(s.paths)
        except RuleErrors as exc:
            raise BenchError(f"the {s.name} rules ({s.paths[0]}) do not load:\n{exc}") from None
        s.rules = len(loaded.rules)
        predicted[s.name] = rules_eval.bench_matches(loaded)
        seconds, used_cache = rules_eval.session_cost(loaded)
        session_us[s.name] = round(seconds * 1e6, 1)
        for phase, rule_id, outcome in predicted[s.name]:
            ctx.log(f"{s.name}: {rule_id} matches the bench traffic in {phase} ({outcome})")
    for s in setups:
        if s.note:
            ctx.log(f"NOTE: {s.note}")

    case = Case(KB, opts.conc, opts.rules_msgs)
    token = secrets.token_hex(32)
    token_file = ctx.workdir / "admin.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(opts.src), env.get("PYTHONPATH", "")) if p)
    runs: list[RunResult] = []
    counters: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    with Stack(ctx.workdir) as stack:
        sink, sink_port = start_sink(ctx, stack, bins)
        targets: list[Target] = []
        admin_ports: dict[str, int] = {}
        for s in setups:
            port, admin_port = free_port(opts.host), free_port(opts.host)
            data_dir = ctx.workdir / f"data-{s.name}"
            data_dir.mkdir()
            cfg = ctx.workdir / f"mailmoat-{s.name}.toml"
            cfg.write_text(
                mailmoat_rules_config(
                    opts.host, port, sink_port, data_dir, s.paths, admin_port, token_file
                )
            )
            proc = stack.start(
                f"mailmoat-{s.name}",
                [opts.python, "-m", "mailmoat.cli", "run", "-c", str(cfg)],
                env=env,
            )
            stack.wait_port(proc, opts.host, port, seconds=120)  # 1000 rules compile first
            targets.append(Target(s.name, port, proc))
            admin_ports[s.name] = admin_port
        ctx.log(
            f"smtp-sink pid {sink.pid} :{sink_port}; "
            + ", ".join(f"mailmoat[{t.name}] pid {t.measured.pid} :{t.port}" for t in targets)
            + f" (work dir {ctx.workdir})"
        )
        for t in targets:  # warm-up: imports, first compiles, backend connections
            status, _, _, out = run_bounded(
                smtp_source_argv(bins["smtp-source"], opts.host, t.port, Case(KB, 5, 100)), 60
            )
            if status != 0 or "fatal:" in out:
                problems.append(f"warm-up against {t.name}: rc={status}: {' '.join(out.split())}")
        for rep in range(1, opts.rules_repeats + 1):
            # interleaved (none, shipped, 1000, ...) and rotated per repeat: drift hits all alike
            shift = (rep - 1) % len(targets)
            for t in targets[shift:] + targets[:shift]:
                r = measure(ctx, bins["smtp-source"], t, case, rep)
                runs.append(r)
                ctx.log(
                    f"repeat {rep}/{opts.rules_repeats} rules={t.name:<8}"
                    f" {r.sessions_per_s:7.0f} sess/s {r.cpu_ms_per_msg:7.3f} ms CPU/session"
                    + ("" if r.ok else f"  FAILED {r.error}")
                )
                if not r.ok:
                    problems.append(f"repeat {rep} against {t.name}: {r.error}")
                for proc in stack.procs:
                    if not proc.alive():
                        raise BenchError(f"{proc.name} died during the run: {proc.log_tail()}")
        for t in targets:
            counters[t.name] = rule_counters(opts.host, admin_ports[t.name], token)
            tail = t.measured.log_tail(2000)
            if "Traceback" in tail or "error" in tail.lower():
                problems.append(f"mailmoat[{t.name}] log: {tail[-400:]}")

    rows = summarize(targets, [case], runs)
    costs = rule_costs(setups, rows, runs)
    print_rules_report(
        eval_rows,
        empty_ns,
        setups,
        session_us,
        used_cache,
        rules_eval.print_eval_table,
        rows,
        costs,
        case,
        opts.rules_repeats,
    )
    matched = {
        name: [
            {k: rule[k] for k in ("id", "name", "phase", "action", "hits", "errors")}
            for rule in rules
            if rule.get("hits") or rule.get("errors")
        ]
        for name, rules in counters.items()
    }
    for name, hits in matched.items():
        for hit in hits:
            print(
                f"NOTE: {name}: rule {hit['id']} ({hit['phase']}, {hit['action']}) matched"
                f" {hit['hits']} times, {hit['errors']} evaluation errors, on bench traffic"
            )
    if not any(matched.values()):
        print("no rule matched the bench traffic and no rule had an evaluation error")
    sessions = sum(r.msgs for r in runs if r.ok)
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"all {len(runs)} runs ok: {sessions} sessions through mailmoat, smtp-source exit 0")
    return {
        "ok": not problems,
        "problems": problems,
        "evaluate_one_phase": {"rows": eval_rows, "empty_phase_ns": empty_ns},
        "evaluate_one_session_us": session_us,
        "evaluate_one_session_cache": used_cache,
        "rule_sets": [asdict(s) | {"paths": [str(p) for p in s.paths]} for s in setups],
        "predicted_matches": predicted,
        "rule_counters_matched": matched,
        "rows": [asdict(r) for r in rows],
        "costs": costs,
        "case": asdict(case),
        "repeats": opts.rules_repeats,
        "tools": dict(bins),
    }


# --------------------------------------------------------------------------- IMAP

# goals: mailmoat / HAProxy (see docs/benchmarks.md)
GOAL_IMAP_LOGINS = 0.7
GOAL_IMAP_FETCH = 0.8
IMAP_LOGIN_USERS = ("alice", "bob", "carol")  # rotated over the login sessions
IMAP_FETCH_USER = "bulk"  # its INBOX holds the big messages
IMAP_MARKER = "mailmoat-bench-end"  # last line of message n: "<marker> <n>"
IMAP_LOAD = REPO / "bench" / "imap_load.py"


@dataclass
class ImapTarget:
    name: str
    port: int
    measured: str  # whose CPU is charged per login / MiB
    cpu: Callable[[], float]


@dataclass
class ImapRun:
    target: str
    kind: str  # "login" or "fetch"
    repeat: int
    sessions: int
    ok: bool
    elapsed_s: float
    rate: float  # logins/s or MiB/s
    mib: float
    cpu_ms_per_op: float  # per login or per MiB, of the measured process
    dovecot_cpu_ms_per_op: float
    client_cpu_s: float
    error: str = ""


@dataclass
class ImapRow:
    target: str
    measured: str
    login_runs_ok: int
    login_runs: int
    fetch_runs_ok: int
    fetch_runs: int
    logins_per_s: float | None
    cpu_ms_per_login: float | None
    dovecot_ms_per_login: float | None
    fetch_mib_per_s: float | None
    cpu_ms_per_mib: float | None
    dovecot_ms_per_mib: float | None


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every process in group ``pgid``, plus the leader's reaped children.

    Dovecot is many processes (master, imap-login, auth, imap, log, ...); an
    ``imap`` process exits after ``service_count`` clients and its time then
    moves into the master's cutime/cstime, so the sum stays continuous.
    """
    ticks = 0
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:  # pgrp (stat field 5)
                continue
            ticks += int(fields[11]) + int(fields[12])
            if int(entry.name) == pgid:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def imap_haproxy_config(host: str, port: int, dovecot_port: int) -> str:
    return f"""\
# written by bench/run.py: one TCP frontend -> Dovecot's imap listener
global
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client  120s
    timeout server  120s

frontend imap_in
    bind {host}:{port}
    default_backend dovecot

backend dovecot
    server dovecot {host}:{dovecot_port}
"""


def imap_mailmoat_config(
    host: str, port: int, backend_port: int, data_dir: Path, identity: str
) -> str:
    return f"""\
# written by bench/run.py
[node]
name = "bench"
data_dir = "{data_dir}"
drain_timeout = 2

[log]
events = "none"

[[listener]]
name = "bench-imap"
protocol = "imap"
listen = "{host}:{port}"
tls = "none"
backend = "dovecot"

[[backend]]
name = "dovecot"
address = "{host}:{backend_port}"
tls = "none"
client_identity = "{identity}"
"""


def imap_message(n: int, size: int) -> bytes:
    """Message ``n`` of about ``size`` bytes: base64-looking lines, ends with the marker."""
    head = (
        f"From: Bench <bench@mailmoat.test>\r\n"
        f"To: {IMAP_FETCH_USER}@mailmoat.test\r\n"
        f"Subject: bench message {n}\r\n"
        f"Message-ID: <bench-{n}@mailmoat.test>\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: application/octet-stream\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    rng = secrets.SystemRandom()
    # 64 distinct 76-char lines, repeated: cheap to build, not one repeated line
    lines = [bytes(rng.choice(alphabet) for _ in range(76)) + b"\r\n" for _ in range(64)]
    block = b"".join(lines)
    body = block * max(1, (size - len(head)) // len(block))
    return head + body + f"{IMAP_MARKER} {n}\r\n".encode()


def imap_fetch_sizes(host: str, port: int, user: str, password: str) -> list[int]:
    """RFC822.SIZE of every message in ``user``'s INBOX, straight from Dovecot."""
    import imaplib

    try:
        with imaplib.IMAP4(require_loopback(host), port, timeout=30) as imap:
            imap.login(user, password)
            status, data = imap.select("INBOX", readonly=True)
            if status != "OK":
                raise BenchError(f"SELECT INBOX of {user}: {data!r}")
            status, data = imap.uid("FETCH", "1:*", "(RFC822.SIZE)")
            if status != "OK":
                raise BenchError(f"FETCH RFC822.SIZE of {user}: {data!r}")
            imap.logout()
    except (OSError, imaplib.IMAP4.error) as exc:
        raise BenchError(f"probing Dovecot on :{port}: {exc}") from None
    sizes = []
    for item in data:
        m = re.search(rb"RFC822\.SIZE (\d+)", item if isinstance(item, bytes) else b"")
        if m:
            sizes.append(int(m.group(1)))
    return sizes


def imap_load_argv(
    ctx: Context, kind: str, port: int, count: int, conc: int, expect: tuple[int, int]
) -> list[str]:
    users = {
        "login": [f"{u}:{u}pw" for u in IMAP_LOGIN_USERS],
        "fetch": [f"{IMAP_FETCH_USER}:{IMAP_FETCH_USER}pw"],
    }[kind]
    argv = [
        sys.executable,
        str(IMAP_LOAD),
        kind,
        "--host",
        require_loopback(ctx.opts.host),
        "--port",
        str(port),
        "--users",
        ",".join(users),
        "--count",
        str(count),
        "--conc",
        str(conc),
        "--session-timeout",
        str(min(60, ctx.opts.run_timeout)),
    ]
    if kind == "fetch":
        argv += ["--expect-msgs", str(expect[0]), "--expect-bytes", str(expect[1])]
        argv += ["--marker", IMAP_MARKER]
    return argv


def parse_load_output(out: str) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                doc: dict[str, Any] = json.loads(line)
                return doc
    return None


def measure_imap(
    ctx: Context,
    target: ImapTarget,
    dovecot_cpu: Callable[[], float],
    kind: str,
    repeat: int,
    expect: tuple[int, int],
) -> ImapRun:
    opts = ctx.opts
    count, conc = (
        (opts.imap_logins, opts.imap_login_conc)
        if kind == "login"
        else (opts.imap_fetches, opts.imap_fetch_conc)
    )
    argv = imap_load_argv(ctx, kind, target.port, count, conc, expect)
    cpu0, dv0 = target.cpu(), dovecot_cpu()
    status, wall, client_cpu, out = run_bounded(argv, opts.run_timeout)
    cpu, dv = target.cpu() - cpu0, dovecot_cpu() - dv0
    doc = parse_load_output(out)
    error = ""
    if doc is None:
        error = f"rc={status}, no result: {' '.join(out.split())[:300]}"
    elif status != 0 or doc.get("failed") or doc.get("ok") != count:
        error = (
            f"rc={status}: {doc.get('ok')}/{count} sessions ok, {doc.get('failed')} failed"
            f" {doc.get('error_kinds')}: {'; '.join(doc.get('errors', [])[:3])}"
        )
    elif kind == "fetch" and doc.get("bytes") != count * expect[1]:
        error = f"fetched {doc.get('bytes')} bytes, expected {count * expect[1]}"
    elapsed = float(doc["elapsed_s"]) if doc and doc.get("elapsed_s") else wall
    mib = (doc or {}).get("bytes", 0) / MB
    per = count if kind == "login" else max(mib, 1e-9)
    return ImapRun(
        target=target.name,
        kind=kind,
        repeat=repeat,
        sessions=count,
        ok=not error,
        elapsed_s=round(elapsed, 3),
        rate=round(count / elapsed if kind == "login" else mib / elapsed, 2),
        mib=round(mib, 1),
        cpu_ms_per_op=round(cpu * 1000 / per, 4),
        dovecot_cpu_ms_per_op=round(dv * 1000 / per, 4),
        client_cpu_s=round(client_cpu, 2),
        error=error,
    )


def summarize_imap(targets: list[ImapTarget], runs: list[ImapRun]) -> list[ImapRow]:
    rows = []
    for t in targets:
        login = [r for r in runs if r.target == t.name and r.kind == "login"]
        fetch = [r for r in runs if r.target == t.name and r.kind == "fetch"]
        lok = [r for r in login if r.ok]
        fok = [r for r in fetch if r.ok]
        rows.append(
            ImapRow(
                target=t.name,
                measured=t.measured,
                login_runs_ok=len(lok),
                login_runs=len(login),
                fetch_runs_ok=len(fok),
                fetch_runs=len(fetch),
                logins_per_s=median([r.rate for r in lok]),
                cpu_ms_per_login=median([r.cpu_ms_per_op for r in lok]),
                dovecot_ms_per_login=median([r.dovecot_cpu_ms_per_op for r in lok]),
                fetch_mib_per_s=median([r.rate for r in fok]),
                cpu_ms_per_mib=median([r.cpu_ms_per_op for r in fok]),
                dovecot_ms_per_mib=median([r.dovecot_cpu_ms_per_op for r in fok]),
            )
        )
    return rows


def imap_ratios(rows: list[ImapRow]) -> list[dict[str, Any]]:
    by = {r.target: r for r in rows}
    mm, ha = by["mailmoat"], by["haproxy"]

    def q(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    out: list[dict[str, Any]] = []
    for metric, attr, goal in (
        ("logins/s", "logins_per_s", GOAL_IMAP_LOGINS),
        ("FETCH MiB/s", "fetch_mib_per_s", GOAL_IMAP_FETCH),
    ):
        r = q(getattr(mm, attr), getattr(ha, attr))
        out.append({"metric": metric, "ratio": r, "goal": goal, "met": r is not None and r >= goal})
    for metric, attr in (
        ("CPU per login", "cpu_ms_per_login"),
        ("CPU per MiB", "cpu_ms_per_mib"),
    ):
        out.append({"metric": metric, "ratio": q(getattr(mm, attr), getattr(ha, attr))})
    return out


def print_imap_table(rows: list[ImapRow], ratios: list[dict[str, Any]], header: str) -> None:
    print(header)
    head = (
        "target",
        "ok",
        "logins/s",
        "CPU ms/login",
        "dovecot ms/login",
        "FETCH MiB/s",
        "CPU ms/MiB",
        "dovecot ms/MiB",
        "CPU of",
    )
    table = [head]
    for r in rows:
        table.append(
            (
                r.target,
                f"{r.login_runs_ok + r.fetch_runs_ok}/{r.login_runs + r.fetch_runs}",
                fmt(r.logins_per_s, 0),
                fmt(r.cpu_ms_per_login, 3),
                fmt(r.dovecot_ms_per_login, 3),
                fmt(r.fetch_mib_per_s, 1),
                fmt(r.cpu_ms_per_mib, 3),
                fmt(r.dovecot_ms_per_mib, 3),
                r.measured,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for n, line in enumerate(table):
        cells = zip(line, widths, strict=True)
        print(
            "  ".join(
                c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(cells)
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for q in ratios:
        if "goal" in q:
            verdict = "n/a" if q["ratio"] is None else ("MET" if q["met"] else "NOT met")
            print(
                f"mailmoat/haproxy {q['metric']}: {fmt(q['ratio'], 2)}"
                f"  goal >= {q['goal']}  {verdict}"
            )
        else:
            print(f"mailmoat/haproxy {q['metric']}: {fmt(q['ratio'], 1)}x")


def section_imap(ctx: Context) -> dict[str, Any]:
    """IMAP: logins/s and FETCH MiB/s, Dovecot direct / HAProxy TCP / mailmoat."""
    opts = ctx.opts
    bins = find_binaries(["haproxy", "timeout"])
    with demo_import(opts, "dovecot"):
        from mailmoat.demo.dovecot import DovecotError, DovecotInstance, DovecotPorts
        from mailmoat.demo.dovecot import dovecot_available as have_dovecot
    if not have_dovecot():
        raise BenchError(
            "missing dovecot: install with "
            "`apt-get install dovecot-core dovecot-imapd dovecot-lmtpd`"
        )
    if os.geteuid() != 0:
        raise BenchError("the imap section needs root (the private Dovecot runs as user dovecot)")
    host = opts.host
    # the dovecot user must reach its root below the (mode 0700) work dir
    os.chmod(ctx.workdir, 0o711)
    dv_imap, dv_proxy = free_port(host), free_port(host)
    dovecot = DovecotInstance(
        ctx.workdir / "dovecot",
        DovecotPorts(imap=dv_imap, proxy_imap=dv_proxy),
        host=host,
    )
    runs: list[ImapRun] = []
    problems: list[str] = []
    setup: dict[str, Any] = {}
    try:
        with Stack(ctx.workdir) as stack:
            try:
                dovecot.start()
            except DovecotError as exc:
                raise BenchError(f"dovecot did not start: {exc}") from None
            pgid = dovecot.master_pid
            assert pgid is not None

            def dovecot_cpu() -> float:
                return group_cpu_seconds(pgid)

            t0 = time.monotonic()
            size = opts.imap_msg_mib * MB
            for n in range(1, opts.imap_msgs + 1):
                dovecot.deliver(IMAP_FETCH_USER, imap_message(n, size))
            dovecot.wait_for_messages(IMAP_FETCH_USER, opts.imap_msgs)
            sizes = imap_fetch_sizes(host, dv_imap, IMAP_FETCH_USER, f"{IMAP_FETCH_USER}pw")
            if len(sizes) != opts.imap_msgs:
                raise BenchError(f"{IMAP_FETCH_USER}'s INBOX has {len(sizes)} messages")
            expect = (len(sizes), sum(sizes))
            setup = {"fetch_user": IMAP_FETCH_USER, "message_sizes": sizes}
            ctx.log(
                f"delivered {len(sizes)} messages ({sum(sizes) / MB:.1f} MiB) to"
                f" {IMAP_FETCH_USER} in {time.monotonic() - t0:.1f} s"
            )

            ha_port = free_port(host)
            ha_cfg = ctx.workdir / "haproxy.cfg"
            ha_cfg.write_text(imap_haproxy_config(host, ha_port, dv_imap))
            check = subprocess.run(
                [bins["haproxy"], "-c", "-f", str(ha_cfg)],
                capture_output=True,
                text=True,
                check=False,
            )
            if check.returncode != 0:
                raise BenchError(f"haproxy rejected {ha_cfg}: {check.stdout}{check.stderr}")
            haproxy = stack.start("haproxy", [bins["haproxy"], "-db", "-f", str(ha_cfg)])
            stack.wait_port(haproxy, host, ha_port)

            mm_port = free_port(host)
            data_dir = ctx.workdir / "mailmoat-data"
            data_dir.mkdir()
            mm_cfg = ctx.workdir / "mailmoat.toml"
            backend_port = dv_proxy if opts.imap_identity == "proxy-v2" else dv_imap
            mm_cfg.write_text(
                imap_mailmoat_config(host, mm_port, backend_port, data_dir, opts.imap_identity)
            )
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(opts.src), env.get("PYTHONPATH", "")) if p
            )
            mailmoat = stack.start(
                "mailmoat",
                [opts.python, "-m", "mailmoat.cli", "run", "-c", str(mm_cfg)],
                env=env,
            )
            stack.wait_port(mailmoat, host, mm_port)
            ctx.log(
                f"dovecot pid {pgid} :{dv_imap}, haproxy pid {haproxy.pid} :{ha_port},"
                f" mailmoat pid {mailmoat.pid} :{mm_port} (client_identity"
                f" {opts.imap_identity}, work dir {ctx.workdir})"
            )
            targets = [
                ImapTarget("direct-dovecot", dv_imap, "dovecot (all)", dovecot_cpu),
                ImapTarget("haproxy", ha_port, "haproxy", lambda: cpu_seconds(haproxy.pid)),
                ImapTarget("mailmoat", mm_port, "mailmoat", lambda: cpu_seconds(mailmoat.pid)),
            ]
            log_lines0 = len(dovecot.log_lines())

            def check_alive() -> None:
                for p in stack.procs:
                    if not p.alive():
                        raise BenchError(f"{p.name} died during the run: {p.log_tail()}")
                if not dovecot.is_running():
                    raise BenchError(f"dovecot died during the run: {dovecot.log_lines()[-5:]}")

            # warm-up: imports, Dovecot's imap processes and index/cache of the messages
            for t in targets:
                for kind, count, conc in (("login", 100, 5), ("fetch", 1, 1)):
                    argv = imap_load_argv(ctx, kind, t.port, count, conc, expect)
                    status, _, _, out = run_bounded(argv, opts.run_timeout)
                    if status != 0:
                        problems.append(
                            f"warm-up {kind} against {t.name}: rc={status}: "
                            + " ".join(out.split())[:300]
                        )
            check_alive()
            for rep in range(1, opts.repeats + 1):
                for kind in ("login", "fetch"):
                    # interleaved and rotated per repeat, so drift hits every target alike
                    shift = (rep - 1) % len(targets)
                    for t in targets[shift:] + targets[:shift]:
                        r = measure_imap(ctx, t, dovecot_cpu, kind, rep, expect)
                        runs.append(r)
                        unit = "logins/s" if kind == "login" else "MiB/s"
                        per = "login" if kind == "login" else "MiB"
                        ctx.log(
                            f"repeat {rep}/{opts.repeats} {t.name:<14} {kind:<5}"
                            f" {r.rate:8.1f} {unit:<8} {r.cpu_ms_per_op:7.3f} ms CPU/{per:<5}"
                            f" dovecot {r.dovecot_cpu_ms_per_op:7.3f}"
                            f" client {r.client_cpu_s:5.2f} s"
                            + ("" if r.ok else f"  FAILED {r.error}")
                        )
                        if not r.ok:
                            problems.append(f"repeat {rep} {kind} against {t.name}: {r.error}")
                        check_alive()
            tail = mailmoat.log_tail(4000)
            if "Traceback" in tail or "error" in tail.lower():
                problems.append(f"mailmoat log: {tail[-600:]}")
            dv_errors = [
                line
                for line in dovecot.log_lines()[log_lines0:]
                if "Error:" in line or "Fatal:" in line or "Panic:" in line
            ]
            if dv_errors:
                problems.append(
                    f"dovecot logged {len(dv_errors)} error(s) during the runs, first:"
                    f" {dv_errors[0]}"
                )
    finally:
        dovecot.stop()

    rows = summarize_imap(targets, runs)
    ratios = imap_ratios(rows)
    print()
    print_imap_table(
        rows,
        ratios,
        f"IMAP, medians of {opts.repeats}: {opts.imap_logins} x (greeting, LOGIN, LOGOUT)"
        f" at conc {opts.imap_login_conc}; {opts.imap_fetches} x (LOGIN, SELECT,"
        f" UID FETCH 1:* BODY.PEEK[] of {expect[0]} msgs = {expect[1] / MB:.1f} MiB, LOGOUT)"
        f" at conc {opts.imap_fetch_conc}; mailmoat client_identity {opts.imap_identity}",
    )
    total_logins = sum(r.sessions for r in runs if r.ok and r.kind == "login")
    total_mib = sum(r.mib for r in runs if r.ok and r.kind == "fetch")
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
    else:
        print(
            f"all {len(runs)} runs ok: {total_logins} logins tagged OK, {total_mib:.0f} MiB"
            " fetched with every size and end marker checked"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "rows": [asdict(r) for r in rows],
        "ratios": ratios,
        "runs": [asdict(r) for r in runs],
        "setup": setup | {"client_identity": opts.imap_identity},
        "tools": dict(bins) | {"load": str(IMAP_LOAD)},
    }


# --------------------------------------------------------------------------- detection

# goals: cost of detection against detection off, in logins/s (see docs/benchmarks.md)
GOAL_DETECTION = {"memory": 0.15, "redis": 0.30}
DETECTION_SETUPS = ("off", "memory", "redis")  # the three mailmoat instances
# the loads: "ok" (every password right: the rate) and "mixed" (every N-th wrong: the
# failure path; Dovecot 2.3 answers a wrong password only after ~0.5 s, see the docs)
DETECTION_LOADS = ("ok", "mixed")


@dataclass
class DetectionRun:
    target: str  # "off", "memory" or "redis"
    load: str  # "ok" or "mixed"
    repeat: int
    logins: int
    rejected: int  # of them, wrong passwords answered NO
    ok: bool
    elapsed_s: float
    logins_per_s: float
    cpu_ms_per_login: float  # mailmoat
    dovecot_ms_per_login: float
    redis_ms_per_login: float  # redis-server, whoever's run it is
    redis_cmds_per_login: float
    redis_reads_per_login: float  # socket reads of redis-server: about its round trips
    client_cpu_s: float
    error: str = ""


@dataclass
class DetectionRow:
    target: str
    load: str
    runs_ok: int
    runs: int
    logins_per_s: float | None
    cpu_ms_per_login: float | None
    dovecot_ms_per_login: float | None
    redis_ms_per_login: float | None
    redis_cmds_per_login: float | None
    redis_reads_per_login: float | None


def detection_state_config(name: str, redis_url: str) -> str:
    """The ``[state]`` table of one instance: detection off, memory store or Redis."""
    if name == "off":
        return "\n[state]\ndetection = false\n"
    if name == "memory":
        return '\n[state]\nbackend = "memory"\n'
    return f'\n[state]\nbackend = "redis"\nurl = "{redis_url}"\n'


def redis_info(host: str, port: int) -> dict[str, str]:
    """``INFO`` of the bench's own redis-server over a bare socket (RESP inline command)."""
    try:
        with socket.create_connection((require_loopback(host), port), 5) as s:
            s.sendall(b"INFO\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise BenchError(f"redis-server :{port} closed during INFO")
                data += chunk
                if not data.startswith(b"$"):
                    raise BenchError(f"redis-server :{port} INFO: {data[:120]!r}")
                head, sep, body = data.partition(b"\r\n")
                if sep and len(body) >= int(head[1:]) + 2:
                    break
    except OSError as exc:
        raise BenchError(f"redis-server :{port} INFO: {exc}") from None
    info: dict[str, str] = {}
    for line in body.decode(errors="replace").splitlines():
        key, colon, value = line.partition(":")
        if colon and not line.startswith("#"):
            info[key] = value
    return info


def redis_counters(host: str, port: int) -> tuple[float, float]:
    """(commands processed, socket reads processed) of redis-server so far."""
    info = redis_info(host, port)
    try:
        return float(info["total_commands_processed"]), float(info["total_reads_processed"])
    except (KeyError, ValueError):
        raise BenchError(f"redis-server :{port} INFO has no command/read counters") from None


def process_cpu(pid: int) -> Callable[[], float]:
    """A reader of one process's CPU seconds (bound now, not late like a loop's lambda)."""
    return lambda: cpu_seconds(pid)


def measure_detection(
    ctx: Context,
    target: ImapTarget,
    dovecot_cpu: Callable[[], float],
    redis_proc: Proc,
    redis_port: int,
    load: str,
    repeat: int,
) -> DetectionRun:
    opts = ctx.opts
    host = opts.host
    count = opts.detection_logins
    every = opts.detection_fail_every if load == "mixed" else 0
    conc = opts.detection_mixed_conc if load == "mixed" else opts.detection_conc
    expect_no = count // every if every else 0
    argv = imap_load_argv(ctx, "login", target.port, count, conc, (0, 0))
    argv += ["--fail-every", str(every)]
    cmds0, reads0 = redis_counters(host, redis_port)
    cpu0, dv0, rd0 = target.cpu(), dovecot_cpu(), cpu_seconds(redis_proc.pid)
    status, wall, client_cpu, out = run_bounded(argv, opts.run_timeout)
    cpu, dv = target.cpu() - cpu0, dovecot_cpu() - dv0
    rd = cpu_seconds(redis_proc.pid) - rd0
    cmds1, reads1 = redis_counters(host, redis_port)
    # the INFO of the first look is counted in the second one: one command, one read
    cmds, reads = cmds1 - cmds0 - 1, reads1 - reads0 - 1
    doc = parse_load_output(out)
    error = ""
    if doc is None:
        error = f"rc={status}, no result: {' '.join(out.split())[:300]}"
    elif status != 0 or doc.get("failed") or doc.get("ok") != count:
        error = (
            f"rc={status}: {doc.get('ok')}/{count} sessions ok, {doc.get('failed')} failed"
            f" {doc.get('error_kinds')}: {'; '.join(doc.get('errors', [])[:3])}"
        )
    elif doc.get("rejected") != expect_no:
        error = f"{doc.get('rejected')} LOGINs answered NO, expected {expect_no}"
    elapsed = float(doc["elapsed_s"]) if doc and doc.get("elapsed_s") else wall
    return DetectionRun(
        target=target.name,
        load=load,
        repeat=repeat,
        logins=count,
        rejected=int((doc or {}).get("rejected") or 0),
        ok=not error,
        elapsed_s=round(elapsed, 3),
        logins_per_s=round(count / elapsed, 2),
        cpu_ms_per_login=round(cpu * 1000 / count, 4),
        dovecot_ms_per_login=round(dv * 1000 / count, 4),
        redis_ms_per_login=round(rd * 1000 / count, 4),
        redis_cmds_per_login=round(cmds / count, 3),
        redis_reads_per_login=round(reads / count, 3),
        client_cpu_s=round(client_cpu, 2),
        error=error,
    )


def summarize_detection(runs: list[DetectionRun]) -> list[DetectionRow]:
    rows = []
    for load, name in [(load, name) for load in DETECTION_LOADS for name in DETECTION_SETUPS]:
        mine = [r for r in runs if r.target == name and r.load == load]
        if not mine:
            continue
        ok = [r for r in mine if r.ok]
        rows.append(
            DetectionRow(
                target=name,
                load=load,
                runs_ok=len(ok),
                runs=len(mine),
                logins_per_s=median([r.logins_per_s for r in ok]),
                cpu_ms_per_login=median([r.cpu_ms_per_login for r in ok]),
                dovecot_ms_per_login=median([r.dovecot_ms_per_login for r in ok]),
                redis_ms_per_login=median([r.redis_ms_per_login for r in ok]),
                redis_cmds_per_login=median([r.redis_cmds_per_login for r in ok]),
                redis_reads_per_login=median([r.redis_reads_per_login for r in ok]),
            )
        )
    return rows


def detection_costs(rows: list[DetectionRow], runs: list[DetectionRun]) -> list[dict[str, Any]]:
    """Per load: ``1 - logins_x/logins_off`` and ``cpu_x/cpu_off - 1`` (mailmoat's CPU per
    login), of the medians and as the median of the per-repeat ratios; for Redis also the
    CPU with redis-server's own per login added (for information)."""

    def paired(load: str, name: str, metric: str) -> float | None:
        values: list[float] = []
        for rep in sorted({r.repeat for r in runs}):
            here = [r for r in runs if r.load == load and r.repeat == rep and r.ok]
            x = [r for r in here if r.target == name]
            b = [r for r in here if r.target == "off"]
            if x and b and getattr(b[0], metric):
                q = getattr(x[0], metric) / getattr(b[0], metric)
                values.append(1 - q if metric == "logins_per_s" else q - 1)
        v = median(values)
        return None if v is None else round(v, 4)

    out: list[dict[str, Any]] = []
    loads = [load for load in DETECTION_LOADS if any(r.load == load for r in rows)]
    for load, (name, goal) in [(ld, item) for ld in loads for item in GOAL_DETECTION.items()]:
        by = {r.target: r for r in rows if r.load == load}
        base, row = by["off"], by[name]
        logins = cpu = cpu_with_redis = None
        if row.logins_per_s is not None and base.logins_per_s:
            logins = round(1 - row.logins_per_s / base.logins_per_s, 4)
        if row.cpu_ms_per_login is not None and base.cpu_ms_per_login:
            cpu = round(row.cpu_ms_per_login / base.cpu_ms_per_login - 1, 4)
            if name == "redis" and row.redis_ms_per_login is not None:
                cpu_with_redis = round(
                    (row.cpu_ms_per_login + row.redis_ms_per_login) / base.cpu_ms_per_login - 1, 4
                )
        out.append(
            {
                "load": load,
                "store": name,
                "goal": goal,
                "logins_cost": logins,
                "logins_cost_paired": paired(load, name, "logins_per_s"),
                # the mixed load's rate is bounded by Dovecot's ~0.5 s per wrong password
                "logins_met": None if logins is None or load != "ok" else logins < goal,
                "cpu_cost": cpu,
                "cpu_cost_paired": paired(load, name, "cpu_ms_per_login"),
                "cpu_met": None if cpu is None else cpu < goal,
                "cpu_cost_with_redis_server": cpu_with_redis,
            }
        )
    return out


def print_detection_report(
    rows: list[DetectionRow], costs: list[dict[str, Any]], opts: Options
) -> None:
    every = opts.detection_fail_every
    print(
        f"\nIMAP logins through mailmoat, detection off / on with the memory store / on with"
        f" Redis; {opts.detection_logins} x (greeting, LOGIN, LOGOUT); load ok: every password"
        f" right, conc {opts.detection_conc}"
        + (
            f"; load mixed: every {every}th LOGIN a wrong password (NO), conc"
            f" {opts.detection_mixed_conc} (Dovecot answers those after ~0.5 s)"
            if every
            else ""
        )
        + f"; medians of {opts.repeats}:"
    )
    head = (
        "load",
        "detection",
        "ok",
        "logins/s",
        "CPU ms/login",
        "dovecot ms/login",
        "redis ms/login",
        "redis cmds/login",
        "redis reads/login",
    )
    table = [head]
    for r in rows:
        table.append(
            (
                r.load,
                r.target,
                f"{r.runs_ok}/{r.runs}",
                fmt(r.logins_per_s, 0),
                fmt(r.cpu_ms_per_login, 3),
                fmt(r.dovecot_ms_per_login, 3),
                fmt(r.redis_ms_per_login, 3),
                fmt(r.redis_cmds_per_login, 2),
                fmt(r.redis_reads_per_login, 2),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for n, line in enumerate(table):
        cells = zip(line, widths, strict=True)
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    verdict = {True: "MET", False: "NOT met", None: "n/a"}
    for c in costs:
        extra = ""
        if c["cpu_cost_with_redis_server"] is not None:
            extra = f"; with redis-server's CPU {pct(c['cpu_cost_with_redis_server'])}"
        print(
            f"load {c['load']:<5} cost of detection, {c['store']:<6} vs off:"
            f" logins/s {pct(c['logins_cost'])}"
            f" (paired per repeat {pct(c['logins_cost_paired'])}) {verdict[c['logins_met']]};"
            f" CPU/login {pct(c['cpu_cost'])} (paired {pct(c['cpu_cost_paired'])})"
            f" {verdict[c['cpu_met']]}{extra}; goal < {c['goal'] * 100:.0f} %"
        )


def section_detection(ctx: Context) -> dict[str, Any]:
    """Detection: IMAP logins/s through mailmoat, detection off / memory store / Redis."""
    opts = ctx.opts
    bins = find_binaries(["redis-server", "timeout"])
    with demo_import(opts, "dovecot"):
        from mailmoat.demo.dovecot import DovecotError, DovecotInstance, DovecotPorts
        from mailmoat.demo.dovecot import dovecot_available as have_dovecot
    if not have_dovecot():
        raise BenchError(
            "missing dovecot: install with "
            "`apt-get install dovecot-core dovecot-imapd dovecot-lmtpd`"
        )
    if os.geteuid() != 0:
        raise BenchError("the detection section needs root (the private Dovecot runs as dovecot)")
    host = opts.host
    os.chmod(ctx.workdir, 0o711)  # the dovecot user must reach its root below the work dir
    dv_imap, dv_proxy = free_port(host), free_port(host)
    dovecot = DovecotInstance(
        ctx.workdir / "dovecot",
        DovecotPorts(imap=dv_imap, proxy_imap=dv_proxy),
        host=host,
        auth_failure_delay=0,  # wrong passwords answered at once, as right ones
    )
    runs: list[DetectionRun] = []
    problems: list[str] = []
    redis_keys = ""
    try:
        with Stack(ctx.workdir) as stack:
            try:
                dovecot.start()
            except DovecotError as exc:
                raise BenchError(f"dovecot did not start: {exc}") from None
            pgid = dovecot.master_pid
            assert pgid is not None

            def dovecot_cpu() -> float:
                return group_cpu_seconds(pgid)

            redis_port = free_port(host)
            redis_dir = ctx.workdir / "redis"
            redis_dir.mkdir()
            redis = stack.start(
                "redis-server",
                [
                    bins["redis-server"],
                    "--port",
                    str(redis_port),
                    "--bind",
                    host,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(redis_dir),
                ],
            )
            stack.wait_port(redis, host, redis_port)
            redis_url = f"redis://{host}:{redis_port}/0"

            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(opts.src), env.get("PYTHONPATH", "")) if p
            )
            targets: list[ImapTarget] = []
            mailmoats: dict[str, Proc] = {}
            for name in DETECTION_SETUPS:
                port = free_port(host)
                data_dir = ctx.workdir / f"data-{name}"
                data_dir.mkdir()
                cfg = ctx.workdir / f"mailmoat-{name}.toml"
                cfg.write_text(
                    imap_mailmoat_config(host, port, dv_imap, data_dir, "imap-id")
                    + detection_state_config(name, redis_url)
                )
                proc = stack.start(
                    f"mailmoat-{name}",
                    [opts.python, "-m", "mailmoat.cli", "run", "-c", str(cfg)],
                    env=env,
                )
                stack.wait_port(proc, host, port)
                mailmoats[name] = proc
                targets.append(ImapTarget(name, port, "mailmoat", process_cpu(proc.pid)))
            ctx.log(
                f"dovecot pid {pgid} :{dv_imap}, redis-server pid {redis.pid} :{redis_port}, "
                + ", ".join(
                    f"mailmoat[{t.name}] pid {mailmoats[t.name].pid} :{t.port}" for t in targets
                )
                + f" (work dir {ctx.workdir})"
            )
            log_lines0 = len(dovecot.log_lines())

            def check_alive() -> None:
                for p in stack.procs:
                    if not p.alive():
                        raise BenchError(f"{p.name} died during the run: {p.log_tail()}")
                if not dovecot.is_running():
                    raise BenchError(f"dovecot died during the run: {dovecot.log_lines()[-5:]}")

            # warm-up: imports, Dovecot's processes, the Redis connection, both login paths
            for t in targets:
                argv = imap_load_argv(ctx, "login", t.port, 200, 5, (0, 0))
                argv += ["--fail-every", str(opts.detection_fail_every)]
                status, _, _, out = run_bounded(argv, opts.run_timeout)
                if status != 0:
                    problems.append(
                        f"warm-up against {t.name}: rc={status}: " + " ".join(out.split())[:300]
                    )
            check_alive()
            loads = [ld for ld in DETECTION_LOADS if ld == "ok" or opts.detection_fail_every]
            for rep, load in [(rp, ld) for rp in range(1, opts.repeats + 1) for ld in loads]:
                # interleaved and rotated per repeat, so drift hits every setup alike
                shift = (rep - 1) % len(targets)
                for t in targets[shift:] + targets[:shift]:
                    r = measure_detection(ctx, t, dovecot_cpu, redis, redis_port, load, rep)
                    runs.append(r)
                    ctx.log(
                        f"repeat {rep}/{opts.repeats} {load:<5} detection={t.name:<6}"
                        f" {r.logins_per_s:7.1f} logins/s {r.cpu_ms_per_login:6.3f} ms CPU/login"
                        f" dovecot {r.dovecot_ms_per_login:6.3f} redis"
                        f" {r.redis_ms_per_login:6.3f} ms {r.redis_cmds_per_login:5.1f} cmds"
                        f" {r.redis_reads_per_login:5.2f} reads/login"
                        f" client {r.client_cpu_s:5.2f} s" + ("" if r.ok else f"  FAILED {r.error}")
                    )
                    if not r.ok:
                        problems.append(f"repeat {rep} {load} against {t.name}: {r.error}")
                    check_alive()
            redis_keys = redis_info(host, redis_port).get("db0", "")
            for name, proc in mailmoats.items():
                tail = proc.log_tail(4000)
                if "Traceback" in tail or "error" in tail.lower():
                    problems.append(f"mailmoat[{name}] log: {tail[-600:]}")
            dv_errors = [
                line
                for line in dovecot.log_lines()[log_lines0:]
                if "Error:" in line or "Fatal:" in line or "Panic:" in line
            ]
            if dv_errors:
                problems.append(
                    f"dovecot logged {len(dv_errors)} error(s) during the runs, first:"
                    f" {dv_errors[0]}"
                )
    finally:
        dovecot.stop()

    rows = summarize_detection(runs)
    # the Redis runs must really have gone to Redis (with on_failure = "open" a failing
    # Redis is silent here: events are off), and the others must not have
    for r in runs:
        if r.target == "redis" and r.redis_cmds_per_login < 1:
            problems.append(
                f"repeat {r.repeat} {r.load} against redis: {r.redis_cmds_per_login} Redis"
                " commands per login: did mailmoat[redis] fall back to its own memory?"
            )
        if r.target != "redis" and r.redis_cmds_per_login > 0.01:
            problems.append(f"repeat {r.repeat} {r.load} against {r.target} sent Redis commands")
    costs = detection_costs(rows, runs)
    print_detection_report(rows, costs, opts)
    if redis_keys:
        print(f"redis-server db0 after the runs: {redis_keys}")
    logins = sum(r.logins for r in runs if r.ok)
    rejected = sum(r.rejected for r in runs if r.ok)
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
    else:
        print(
            f"all {len(runs)} runs ok: {logins} logins through mailmoat, {logins - rejected}"
            f" tagged OK and {rejected} (wrong password) tagged NO, as expected"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "rows": [asdict(r) for r in rows],
        "costs": costs,
        "runs": [asdict(r) for r in runs],
        "setup": {
            "logins": opts.detection_logins,
            "conc": opts.detection_conc,
            "fail_every": opts.detection_fail_every,
            "mixed_conc": opts.detection_mixed_conc,
            "client_identity": "imap-id",
            "redis_db0_after": redis_keys,
        },
        "tools": dict(bins) | {"load": str(IMAP_LOAD)},
    }


# --------------------------------------------------------------------------- HTTP

# goals: mailmoat's requests/s of the small page (see docs/benchmarks.md)
GOAL_HTTP_VS_MITM = 3.0  # mailmoat / mitmproxy (the Python peer)
# mailmoat / nginx as a reverse proxy in front of the origin nginx: the goal's row (the
# same work as mailmoat); also printed against nginx serving the files itself (reference)
GOAL_HTTP_VS_NGINX = 0.3
MITM_VENV = REPO / "build" / "bench-mitm-venv"
MITM_INSTALL_SECONDS = 600
HTTP_TARGETS = ("nginx", "nginx-proxy", "mitmproxy", "mailmoat")
# wrk's own summary is text; this prints its totals, error counts and latency (µs) as JSON
WRK_SCRIPT = """\
-- written by bench/run.py: wrk's totals, errors and latency (microseconds) as one JSON line
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %.0f, "bytes": %.0f, "duration_us": %.0f, "connect": %.0f, "read": %.0f,'
    .. ' "write": %.0f, "status": %.0f, "timeout": %.0f, "p50_us": %.0f, "p90_us": %.0f,'
    .. ' "p99_us": %.0f, "max_us": %.0f, "mean_us": %.1f}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""
WRK_ERRORS = ("connect", "read", "write", "timeout", "status")
HTTP_MAX_HEADERS = 2048  # bytes of status line + headers per response a run may average


@dataclass
class HttpCase:
    name: str  # "small" or "1mb"
    path: str
    size: int  # body bytes
    conns: int
    threads: int

    @property
    def label(self) -> str:
        return f"{self.path} ({self.size // KB} KiB)" if self.size < MB else f"{self.path} (1 MiB)"


@dataclass
class HttpTarget:
    name: str
    port: int
    measured: str  # whose CPU is charged per request
    cpu: Callable[[], float]
    alive: Callable[[], bool]
    log_tail: Callable[[], str]
    error: str = ""  # set when it could not be started or probed: not measured


@dataclass
class HttpRun:
    target: str
    case: str
    repeat: int
    ok: bool  # wrk ran and reported no error of any kind
    requests: int
    duration_s: float
    req_per_s: float
    mib_per_s: float  # body bytes
    p50_ms: float
    p99_ms: float
    bytes_per_response: float
    cpu_us_per_req: float  # the measured process(es)
    origin_cpu_us_per_req: float  # the origin nginx
    client_cpu_s: float
    errors: dict[str, int] = field(default_factory=dict)
    error: str = ""


@dataclass
class HttpRow:
    target: str
    measured: str
    case: str
    runs_ok: int
    runs: int
    flagged: bool  # at least one run had errors (its figures still count if wrk reported)
    req_per_s: float | None
    mib_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_us_per_req: float | None
    origin_cpu_us_per_req: float | None
    note: str = ""


def http_cases(opts: Options) -> list[HttpCase]:
    return [
        HttpCase(
            "small",
            "/static/small.html",
            KB,
            opts.http_conns,
            min(opts.http_threads, opts.http_conns),
        ),
        HttpCase(
            "1mb",
            "/static/1mb.bin",
            MB,
            opts.http_large_conns,
            min(opts.http_threads, opts.http_large_conns),
        ),
    ]


def http_get(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One plain GET (http.client: no proxy from the environment); (status, body)."""
    conn = http.client.HTTPConnection(require_loopback(host), port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "mailmoat-bench"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_probe(host: str, port: int, expected: dict[str, bytes]) -> str:
    """'' if every path answers 200 with exactly the expected body, else what went wrong."""
    for path, body in expected.items():
        try:
            status, got = http_get(host, port, path)
        except (OSError, http.client.HTTPException) as exc:
            return f"GET {path}: {type(exc).__name__}: {exc}"
        if status != 200:
            return f"GET {path}: HTTP {status} {got[:120]!r}"
        if got != body:
            return f"GET {path}: {len(got)} bytes, not the {len(body)} bytes of the file"
    return ""


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def pip_reason(out: str) -> str:
    """The line of pip/venv output that says why it failed (not pip's index warnings)."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if ln.startswith("ERROR") or "Error" in ln]
    return ((errors or lines or ["no output"])[-1])[:200]


def ensure_mitmdump(ctx: Context) -> tuple[str | None, str]:
    """mitmdump from the bench's own venv, installing mitmproxy there the first time.

    Returns (path, "") or (None, why not).  mitmproxy is not a dependency of
    mailmoat: it lives in ``--http-mitm-venv`` (default ``build/bench-mitm-venv``,
    ignored by git), created with this interpreter's ``-m venv``.
    """
    opts = ctx.opts
    venv = opts.http_mitm_venv
    mitmdump = venv / "bin" / "mitmdump"
    if os.access(mitmdump, os.X_OK):
        return str(mitmdump), ""
    if not opts.http_mitm:
        return None, f"not installed ({mitmdump} missing; --http-no-mitm: no install tried)"
    ctx.log(f"mitmproxy: installing into {venv} (once; pip, at most {MITM_INSTALL_SECONDS} s)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    status, _, _, out = run_bounded([sys.executable, "-m", "venv", str(venv)], 120)
    if status != 0:
        return None, f"not installed (python -m venv failed, rc={status}: {pip_reason(out)})"
    pip = venv / "bin" / "pip"
    status, elapsed, _, out = run_bounded(
        [str(pip), "install", "--quiet", "--disable-pip-version-check", "mitmproxy"],
        MITM_INSTALL_SECONDS,
    )
    if status != 0 or not os.access(mitmdump, os.X_OK):
        return None, f"not installed (pip install mitmproxy failed, rc={status}: {pip_reason(out)})"
    ctx.log(f"mitmproxy: installed in {elapsed:.0f} s")
    return str(mitmdump), ""


def http_mailmoat_config(host: str, port: int, backend_port: int, data_dir: Path) -> str:
    # [journal] left at its default, as in the other sections' configs
    return f"""\
# written by bench/run.py
[node]
name = "bench"
data_dir = "{data_dir}"
drain_timeout = 2

[log]
events = "none"

[[backend]]
name = "web"
address = ["{host}:{backend_port}"]

[[listener]]
name = "web"
protocol = "http"
listen = ["{host}:{port}"]
backend = "web"
"""


def wrk_argv(
    wrk: str, script: Path, host: str, port: int, case: HttpCase, seconds: int
) -> list[str]:
    return [
        wrk,
        "-t",
        str(case.threads),
        "-c",
        str(case.conns),
        "-d",
        f"{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://{require_loopback(host)}:{port}{case.path}",
    ]


def measure_http(
    ctx: Context,
    wrk: str,
    script: Path,
    target: HttpTarget,
    case: HttpCase,
    repeat: int,
    origin_cpu: Callable[[], float],
    seconds: int,
) -> HttpRun:
    argv = wrk_argv(wrk, script, ctx.opts.host, target.port, case, seconds)
    cpu0, o0 = target.cpu(), origin_cpu()
    status, wall, client_cpu, out = run_bounded(argv, seconds + 30)
    cpu, ocpu = target.cpu() - cpu0, origin_cpu() - o0
    doc = parse_load_output(out)
    problems: list[str] = []
    errors: dict[str, int] = {}
    requests = 0
    duration = wall
    nbytes = 0
    p50 = p99 = 0.0
    if doc is None:
        problems.append(f"rc={status}, no result: {' '.join(out.split())[:300]}")
    else:
        requests = int(doc["requests"])
        nbytes = int(doc["bytes"])
        duration = max(float(doc["duration_us"]) / 1e6, 1e-6)
        p50, p99 = float(doc["p50_us"]) / 1000, float(doc["p99_us"]) / 1000
        errors = {k: int(doc[k]) for k in WRK_ERRORS}
        if status != 0:
            problems.append(f"wrk rc={status}")
        socket = {k: v for k, v in errors.items() if k != "status" and v}
        if socket:
            problems.append("socket errors " + ", ".join(f"{k} {v}" for k, v in socket.items()))
        if errors["status"]:
            problems.append(f"{errors['status']} non-2xx/3xx responses")
        if requests == 0:
            problems.append("no response")
        else:
            # every response must have carried the whole file (a 3xx or a short body would
            # not); wrk also counts the bytes of the responses still in flight when it stops
            low = requests * case.size
            high = (requests + case.conns) * (case.size + HTTP_MAX_HEADERS)
            if not low <= nbytes <= high:
                problems.append(
                    f"{nbytes / requests:.0f} bytes per response, expected {case.size}"
                    f" + headers (<= {HTTP_MAX_HEADERS})"
                )
    per_req = max(requests, 1)
    return HttpRun(
        target=target.name,
        case=case.name,
        repeat=repeat,
        ok=not problems,
        requests=requests,
        duration_s=round(duration, 3),
        req_per_s=round(requests / duration, 1),
        mib_per_s=round(requests * case.size / MB / duration, 1),
        p50_ms=round(p50, 3),
        p99_ms=round(p99, 3),
        bytes_per_response=round(nbytes / per_req, 1),
        cpu_us_per_req=round(cpu * 1e6 / per_req, 2),
        origin_cpu_us_per_req=round(ocpu * 1e6 / per_req, 2),
        client_cpu_s=round(client_cpu, 2),
        errors=errors,
        error="; ".join(problems),
    )


def summarize_http(
    targets: list[HttpTarget], cases: list[HttpCase], runs: list[HttpRun]
) -> list[HttpRow]:
    rows: list[HttpRow] = []
    for case in cases:
        for t in targets:
            mine = [r for r in runs if r.target == t.name and r.case == case.name]
            # a run with errors still counts when wrk measured something: the row is flagged
            measured = [r for r in mine if r.requests > 0]
            rows.append(
                HttpRow(
                    target=t.name,
                    measured=t.measured,
                    case=case.name,
                    runs_ok=sum(r.ok for r in mine),
                    runs=len(mine),
                    flagged=any(not r.ok for r in mine),
                    req_per_s=median([r.req_per_s for r in measured]),
                    mib_per_s=median([r.mib_per_s for r in measured]),
                    p50_ms=median([r.p50_ms for r in measured]),
                    p99_ms=median([r.p99_ms for r in measured]),
                    cpu_us_per_req=median([r.cpu_us_per_req for r in measured]),
                    origin_cpu_us_per_req=median([r.origin_cpu_us_per_req for r in measured]),
                    note=t.error,
                )
            )
    return rows


def http_ratios(rows: list[HttpRow]) -> list[dict[str, Any]]:
    by = {(r.target, r.case): r for r in rows}

    def q(peer: str, case: str, attr: str) -> tuple[float | None, bool]:
        mm, other = by.get(("mailmoat", case)), by.get((peer, case))
        if mm is None or other is None:
            return None, False
        a, b = getattr(mm, attr), getattr(other, attr)
        value = round(a / b, 3) if a is not None and b else None
        return value, mm.flagged or other.flagged

    out: list[dict[str, Any]] = []
    goals = (
        ("mitmproxy", GOAL_HTTP_VS_MITM, "goal"),
        ("nginx-proxy", GOAL_HTTP_VS_NGINX, "goal"),
        ("nginx", GOAL_HTTP_VS_NGINX, "reference"),
    )
    for peer, goal, kind in goals:
        value, flagged = q(peer, "small", "req_per_s")
        out.append(
            {
                "peer": peer,
                "metric": "req/s",
                "case": "small",
                "ratio": value,
                "goal": goal,
                "kind": kind,
                "met": value is not None and value >= goal and not flagged,
                "flagged": flagged,
            }
        )
    for peer in ("mitmproxy", "nginx-proxy", "nginx"):
        value, flagged = q(peer, "1mb", "mib_per_s")
        out.append(
            {"peer": peer, "metric": "MiB/s", "case": "1mb", "ratio": value, "flagged": flagged}
        )
    for case in ("small", "1mb"):
        value, flagged = q("nginx-proxy", case, "cpu_us_per_req")
        out.append(
            {
                "peer": "nginx-proxy",
                "metric": "CPU/req",
                "case": case,
                "ratio": value,
                "flagged": flagged,
            }
        )
    return out


def print_aligned(table: list[tuple[str, ...]], left: tuple[int, ...]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for n, line in enumerate(table):
        cells = zip(line, widths, strict=True)
        print(
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(cells)
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_http_report(
    rows: list[HttpRow],
    ratios: list[dict[str, Any]],
    cases: list[HttpCase],
    runs: list[HttpRun],
    opts: Options,
) -> None:
    for case in cases:
        big = case.size >= MB
        print(
            f"\n{case.label}: wrk -t{case.threads} -c{case.conns} -d{opts.http_duration}s,"
            f" medians of {opts.repeats}:"
        )
        head = (
            "target",
            "ok",
            "req/s",
            "MiB/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/MiB" if big else "CPU µs/req",
            "origin ms/MiB" if big else "origin µs/req",
            "CPU of",
        )
        scale = 1000.0 if big else 1.0
        table: list[tuple[str, ...]] = [head]
        for r in rows:
            if r.case != case.name:
                continue
            if r.note:
                table.append((r.target, "-", "-", "-", "-", "-", "-", "-", r.note))
                continue
            cpu = None if r.cpu_us_per_req is None else r.cpu_us_per_req / scale
            ocpu = None if r.origin_cpu_us_per_req is None else r.origin_cpu_us_per_req / scale
            table.append(
                (
                    r.target + (" !" if r.flagged else ""),
                    f"{r.runs_ok}/{r.runs}",
                    fmt(r.req_per_s, 0),
                    fmt(r.mib_per_s, 1),
                    fmt(r.p50_ms, 2),
                    fmt(r.p99_ms, 2),
                    fmt(cpu, 3 if big else 1),
                    fmt(ocpu, 3 if big else 1),
                    r.measured,
                )
            )
        print_aligned(table, (0, 8))
    bad = [run for run in runs if not run.ok]
    if bad:
        print("\n! = a run of that row had errors (its figures still count in the medians):")
        for run in bad:
            print(f"  {run.target} {run.case} repeat {run.repeat}: {run.error}")
    print()
    for q in ratios:
        flag = "  (FLAGGED: errors in the runs)" if q["flagged"] else ""
        name = f"mailmoat/{q['peer']} {q['metric']} ({q['case']})"
        if "goal" in q:
            verdict = "n/a" if q["ratio"] is None else ("MET" if q["met"] else "NOT met")
            if q["kind"] == "goal":
                print(f"{name}: {fmt(q['ratio'], 2)}  goal >= {q['goal']}  {verdict}{flag}")
            else:
                print(
                    f"{name}: {fmt(q['ratio'], 2)}  (reference, not the goal: this nginx serves"
                    f" the files itself; >= {q['goal']} {verdict}){flag}"
                )
        else:
            print(f"{name}: {fmt(q['ratio'], 2)}{flag}")


def section_http(ctx: Context) -> dict[str, Any]:
    """HTTP: wrk req/s, p50/p99 and MiB/s; nginx direct / nginx proxy / mitmproxy / mailmoat."""
    opts = ctx.opts
    host = opts.host
    bins = find_binaries(["wrk", "timeout"])
    with demo_import(opts, "nginx"):
        from mailmoat.demo.nginx import STATIC_FILES, NginxError, NginxInstance, nginx_available
    if not nginx_available():
        raise BenchError("missing nginx (/usr/sbin/nginx): install with `apt-get install nginx`")
    cases = http_cases(opts)
    expected = {c.path: STATIC_FILES[c.path.rsplit("/", 1)[1]]() for c in cases}
    script = ctx.workdir / "wrk-json.lua"
    script.write_text(WRK_SCRIPT)
    mitmdump, mitm_error = ensure_mitmdump(ctx)
    versions = {
        "wrk": tool_version([bins["wrk"], "-v"]),
        "nginx": tool_version(["/usr/sbin/nginx", "-v"]),
        "mitmproxy": tool_version([mitmdump, "--version"]) if mitmdump else mitm_error,
    }
    # as root the nginx workers run as nobody: they must reach their roots below the work dir
    os.chmod(ctx.workdir, 0o711)
    origin = NginxInstance(ctx.workdir / "nginx-origin", host=host)
    proxy = NginxInstance(ctx.workdir / "nginx-proxy", host=host, proxy_to=origin.address)
    runs: list[HttpRun] = []
    problems: list[str] = []
    targets: list[HttpTarget] = []
    try:
        with Stack(ctx.workdir) as stack:
            for inst in (origin, proxy):
                try:
                    inst.start()
                except NginxError as exc:
                    raise BenchError(f"nginx did not start: {exc}") from None

            def group_of(inst: Any) -> Callable[[], float]:
                pgid = inst.master_pid
                assert pgid is not None
                return lambda: group_cpu_seconds(pgid)

            def errors_of(inst: Any) -> Callable[[], str]:
                return lambda: " | ".join(inst.error_log_lines()[-5:])

            origin_cpu = group_of(origin)
            targets.append(
                HttpTarget(
                    "nginx",
                    origin.port,
                    "nginx (master+worker)",
                    origin_cpu,
                    origin.is_running,
                    errors_of(origin),
                )
            )
            targets.append(
                HttpTarget(
                    "nginx-proxy",
                    proxy.port,
                    "proxy nginx",
                    group_of(proxy),
                    proxy.is_running,
                    errors_of(proxy),
                )
            )
            # mitmproxy, if it could be installed
            mitm_port = free_port(host)
            mitm_target = HttpTarget(
                "mitmproxy",
                mitm_port,
                "mitmdump",
                lambda: 0.0,
                lambda: False,
                lambda: "",
                error=f"mitmproxy: {mitm_error}" if mitm_error else "",
            )
            if mitmdump:
                confdir = ctx.workdir / "mitmproxy"  # its CA lands here, not in ~/.mitmproxy
                proc = stack.start(
                    "mitmdump",
                    [
                        mitmdump,
                        "--mode",
                        f"reverse:http://{host}:{origin.port}",
                        "--listen-host",
                        host,
                        "-p",
                        str(mitm_port),
                        "-q",
                        "--set",
                        f"confdir={confdir}",
                    ],
                )
                mitm_target.cpu = group_of(types.SimpleNamespace(master_pid=proc.pid))
                mitm_target.alive, mitm_target.log_tail = proc.alive, proc.log_tail
                try:
                    stack.wait_port(proc, host, mitm_port, seconds=60)
                except BenchError as exc:
                    mitm_target.error = f"mitmproxy: did not start: {exc}"
            targets.append(mitm_target)
            # mailmoat
            mm_port = free_port(host)
            data_dir = ctx.workdir / "mailmoat-data"
            data_dir.mkdir()
            mm_cfg = ctx.workdir / "mailmoat.toml"
            mm_cfg.write_text(http_mailmoat_config(host, mm_port, origin.port, data_dir))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(opts.src), env.get("PYTHONPATH", "")) if p
            )
            mm = stack.start(
                "mailmoat", [opts.python, "-m", "mailmoat.cli", "run", "-c", str(mm_cfg)], env=env
            )
            mm_target = HttpTarget(
                "mailmoat",
                mm_port,
                "mailmoat",
                lambda: group_cpu_seconds(mm.pid),
                mm.alive,
                lambda: mm.log_tail(600),
            )
            try:
                stack.wait_port(mm, host, mm_port, seconds=60)
            except BenchError as exc:
                mm_target.error = f"mailmoat: {' '.join(str(exc).split())[:300]}"
            targets.append(mm_target)
            ctx.log(
                ", ".join(
                    f"{t.name} :{t.port}" + (f" ({t.error})" if t.error else "") for t in targets
                )
                + f" (work dir {ctx.workdir})"
            )
            # probe (status and every byte of both files), then a short warm-up
            for t in targets:
                if t.error:
                    continue
                why = http_probe(host, t.port, expected)
                if why:
                    t.error = f"{t.name}: probe failed: {why}"
                    continue
                status, _, _, out = run_bounded(
                    wrk_argv(
                        bins["wrk"],
                        script,
                        host,
                        t.port,
                        HttpCase("warm", cases[0].path, KB, 4, 1),
                        1,
                    ),
                    40,
                )
                if status != 0:
                    t.error = f"{t.name}: warm-up wrk rc={status}: {' '.join(out.split())[:200]}"
            # mitmproxy not installed is reported in its row, not a failure
            problems += [
                t.error for t in targets if t.error and not (t is mitm_target and mitm_error)
            ]
            live = [t for t in targets if not t.error]
            for rep in range(1, opts.repeats + 1):
                for case in cases:
                    # interleaved and rotated per repeat, so drift hits every target alike
                    shift = (rep - 1) % max(len(live), 1)
                    for t in live[shift:] + live[:shift]:
                        if t.error:
                            continue
                        r = measure_http(
                            ctx, bins["wrk"], script, t, case, rep, origin_cpu, opts.http_duration
                        )
                        runs.append(r)
                        ctx.log(
                            f"repeat {rep}/{opts.repeats} {t.name:<11} {case.name:<5}"
                            f" {r.req_per_s:8.0f} req/s {r.mib_per_s:7.1f} MiB/s"
                            f" p50 {r.p50_ms:6.2f} p99 {r.p99_ms:6.2f} ms"
                            f" {r.cpu_us_per_req:7.1f} µs CPU/req"
                            + ("" if r.ok else f"  ERRORS {r.error}")
                        )
                        if not t.alive():
                            t.error = f"{t.name}: died during the runs: {t.log_tail()}"
                            problems.append(t.error)
                        elif not origin.is_running():
                            raise BenchError(f"the origin nginx died: {errors_of(origin)()}")
            tail = mm.log_tail(4000)
            if "Traceback" in tail:
                problems.append(f"mailmoat log: {tail[-600:]}")
    finally:
        proxy.stop()
        origin.stop()

    rows = summarize_http(targets, cases, runs)
    ratios = http_ratios(rows)
    print_http_report(rows, ratios, cases, runs, opts)
    problems += [f"{r.target} {r.case} repeat {r.repeat}: {r.error}" for r in runs if not r.ok]
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
    else:
        n = sum(r.requests for r in runs if r.target == "mailmoat")
        print(f"all {len(runs)} runs ok: {n} requests through mailmoat, no wrk error")
    return {
        "ok": not problems,
        "problems": problems,
        "rows": [asdict(r) for r in rows],
        "ratios": ratios,
        "runs": [asdict(r) for r in runs],
        "setup": {
            "cases": [asdict(c) for c in cases],
            "duration_s": opts.http_duration,
            "nginx_worker_processes": 1,
            "nginx_proxy_buffering": True,
            "mitmproxy": mitm_error or "ok",
            "mitm_venv": str(opts.http_mitm_venv),
        },
        "tools": dict(bins) | {"versions": versions},
    }


# --------------------------------------------------------------------------- main

SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "smtp": section_smtp,
    "rules": section_rules,
    "imap": section_imap,
    "detection": section_detection,
    "http": section_http,
}


def parse_args(argv: list[str] | None) -> tuple[Options, list[str]]:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="mailmoat vs. direct and HAProxy on loopback (make bench).",
    )
    p.add_argument(
        "--only",
        default=os.environ.get("BENCH_ONLY", ""),
        help=f"comma-separated sections ({', '.join(SECTIONS)}); default all",
    )
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.add_argument(
        "--host",
        default=os.environ.get("BENCH_HOST", "127.0.0.1"),
        help="IPv4 loopback address to use (default 127.0.0.1)",
    )
    p.add_argument("--repeats", type=int, default=env_int("BENCH_REPEATS", 3))
    p.add_argument(
        "--conc",
        type=int,
        default=env_int("BENCH_CONC", 20),
        help="concurrent sessions (default 20)",
    )
    p.add_argument(
        "--small-msgs",
        type=int,
        default=env_int("BENCH_SMALL_MSGS", 5000),
        help="1 KB messages per run (default 5000)",
    )
    p.add_argument(
        "--large-msgs",
        type=int,
        default=env_int("BENCH_LARGE_MSGS", 300),
        help="1 MB messages per run (default 300)",
    )
    p.add_argument(
        "--conc1",
        action="store_true",
        default=bool(env_int("BENCH_CONC1", 0)),
        help="also run at concurrency 1",
    )
    p.add_argument("--small-msgs-c1", type=int, default=env_int("BENCH_SMALL_MSGS_C1", 1000))
    p.add_argument("--large-msgs-c1", type=int, default=env_int("BENCH_LARGE_MSGS_C1", 100))
    p.add_argument(
        "--run-timeout",
        type=int,
        default=env_int("BENCH_RUN_TIMEOUT", 120),
        help="seconds per client run (default 120)",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("BENCH_OUT", "/tmp/mailmoat-bench"),
        help="results directory (default $BENCH_OUT or /tmp/mailmoat-bench)",
    )
    p.add_argument(
        "--python",
        default=os.environ.get("BENCH_PYTHON", sys.executable),
        help="interpreter that runs mailmoat (default: this one)",
    )
    p.add_argument(
        "--src",
        default=os.environ.get("BENCH_SRC", str(REPO / "src")),
        help="mailmoat source tree put first on PYTHONPATH (default: this repo's src)",
    )
    p.add_argument(
        "--profile",
        default=os.environ.get("BENCH_PROFILE", ""),
        help="after measuring, py-spy mailmoat under 1 KB load into this file",
    )
    p.add_argument("--profile-seconds", type=int, default=env_int("BENCH_PROFILE_SECONDS", 15))
    p.add_argument(
        "--rules-msgs",
        type=int,
        default=env_int("BENCH_RULES_MSGS", 2000),
        help="rules section: 1 KB sessions per run (default 2000)",
    )
    p.add_argument(
        "--rules-repeats",
        type=int,
        default=env_int("BENCH_RULES_REPEATS", 5),
        help="rules section: repeats of (none, shipped, 1000 rules) (default 5)",
    )
    p.add_argument(
        "--imap-logins",
        type=int,
        default=env_int("BENCH_IMAP_LOGINS", 2000),
        help="imap section: login sessions per run (default 2000)",
    )
    p.add_argument(
        "--imap-login-conc",
        type=int,
        default=env_int("BENCH_IMAP_LOGIN_CONC", 20),
        help="imap section: concurrent login sessions (default 20)",
    )
    p.add_argument(
        "--imap-fetches",
        type=int,
        default=env_int("BENCH_IMAP_FETCHES", 64),
        help="imap section: FETCH sessions per run, each fetching the whole INBOX (default 64)",
    )
    p.add_argument(
        "--imap-fetch-conc",
        type=int,
        default=env_int("BENCH_IMAP_FETCH_CONC", 6),
        help="imap section: concurrent FETCH sessions (default 6)",
    )
    p.add_argument(
        "--imap-msgs",
        type=int,
        default=env_int("BENCH_IMAP_MSGS", 4),
        help="imap section: messages delivered to the FETCH user's INBOX (default 4)",
    )
    p.add_argument(
        "--imap-msg-mib",
        type=int,
        default=env_int("BENCH_IMAP_MSG_MIB", 8),
        help="imap section: size of each of those messages in MiB (default 8)",
    )
    p.add_argument(
        "--imap-identity",
        choices=("imap-id", "proxy-v2", "none"),
        default=os.environ.get("BENCH_IMAP_IDENTITY", "imap-id"),
        help="imap section: mailmoat's backend client_identity (default imap-id)",
    )
    p.add_argument(
        "--detection-logins",
        type=int,
        default=env_int("BENCH_DETECTION_LOGINS", 2000),
        help="detection section: login sessions per run (default 2000)",
    )
    p.add_argument(
        "--detection-conc",
        type=int,
        default=env_int("BENCH_DETECTION_CONC", 20),
        help="detection section: concurrent login sessions (default 20)",
    )
    p.add_argument(
        "--detection-fail-every",
        type=int,
        default=env_int("BENCH_DETECTION_FAIL_EVERY", 10),
        help="detection section: mixed load, every N-th login a wrong password;"
        " 0: no mixed load (default 10)",
    )
    p.add_argument(
        "--detection-mixed-conc",
        type=int,
        default=env_int("BENCH_DETECTION_MIXED_CONC", 60),
        help="detection section: concurrent sessions of the mixed load (default 60)",
    )
    p.add_argument(
        "--http-duration",
        type=int,
        default=env_int("BENCH_HTTP_DURATION", 10),
        help="http section: seconds per wrk run (default 10)",
    )
    p.add_argument(
        "--http-conns",
        type=int,
        default=env_int("BENCH_HTTP_CONNS", 32),
        help="http section: wrk connections for the small page (default 32)",
    )
    p.add_argument(
        "--http-large-conns",
        type=int,
        default=env_int("BENCH_HTTP_LARGE_CONNS", 8),
        help="http section: wrk connections for the 1 MB file (default 8)",
    )
    p.add_argument(
        "--http-threads",
        type=int,
        default=env_int("BENCH_HTTP_THREADS", 2),
        help="http section: wrk threads (default 2; at most the connections)",
    )
    p.add_argument(
        "--http-no-mitm",
        action="store_true",
        default=bool(env_int("BENCH_HTTP_NO_MITM", 0)),
        help="http section: do not install mitmproxy (its row is measured only if installed)",
    )
    p.add_argument(
        "--http-mitm-venv",
        default=os.environ.get("BENCH_HTTP_MITM_VENV", str(MITM_VENV)),
        help="http section: venv holding mitmproxy, created on first use"
        " (default build/bench-mitm-venv)",
    )
    a = p.parse_args(argv)
    if a.list:
        for name, fn in SECTIONS.items():
            print(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0]}")
        raise SystemExit(0)
    only = [s.strip() for s in a.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {', '.join(unknown)}; have {', '.join(SECTIONS)}")
    for name in (
        "repeats",
        "conc",
        "small_msgs",
        "large_msgs",
        "small_msgs_c1",
        "large_msgs_c1",
        "run_timeout",
        "profile_seconds",
        "rules_msgs",
        "rules_repeats",
        "imap_logins",
        "imap_login_conc",
        "imap_fetches",
        "imap_fetch_conc",
        "imap_msgs",
        "imap_msg_mib",
        "detection_logins",
        "detection_conc",
        "detection_mixed_conc",
        "http_duration",
        "http_conns",
        "http_large_conns",
        "http_threads",
    ):
        if getattr(a, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
    if (
        a.small_msgs > 1_000_000
        or a.large_msgs > 100_000
        or a.rules_msgs > 1_000_000
        or a.rules_repeats > 100
        or a.run_timeout > 3600
        or a.imap_logins > 1_000_000
        or a.imap_fetches > 10_000
        or a.imap_login_conc > 1000
        or a.imap_fetch_conc > 100
        or a.imap_msgs > 64
        or a.imap_msg_mib > 64
        or a.detection_logins > 1_000_000
        or a.detection_conc > 1000
        or a.detection_mixed_conc > 1000
        or not 0 <= a.detection_fail_every <= 1_000_000
        or a.http_duration > 600
        or a.http_conns > 1000
        or a.http_large_conns > 1000
        or a.http_threads > 64
    ):
        raise BenchError("refusing unbounded-looking sizes (msgs or --run-timeout too large)")
    opts = Options(
        host=require_loopback(a.host),
        repeats=a.repeats,
        small_msgs=a.small_msgs,
        large_msgs=a.large_msgs,
        small_msgs_c1=a.small_msgs_c1,
        large_msgs_c1=a.large_msgs_c1,
        conc=a.conc,
        conc1=a.conc1,
        run_timeout=a.run_timeout,
        out_dir=Path(a.out),
        python=a.python,
        src=Path(a.src).resolve(),
        profile=Path(a.profile) if a.profile else None,
        profile_seconds=a.profile_seconds,
        rules_msgs=a.rules_msgs,
        rules_repeats=a.rules_repeats,
        imap_logins=a.imap_logins,
        imap_login_conc=a.imap_login_conc,
        imap_fetches=a.imap_fetches,
        imap_fetch_conc=a.imap_fetch_conc,
        imap_msgs=a.imap_msgs,
        imap_msg_mib=a.imap_msg_mib,
        imap_identity=a.imap_identity,
        detection_logins=a.detection_logins,
        detection_conc=a.detection_conc,
        detection_fail_every=a.detection_fail_every,
        detection_mixed_conc=a.detection_mixed_conc,
        http_duration=a.http_duration,
        http_conns=a.http_conns,
        http_large_conns=a.http_large_conns,
        http_threads=a.http_threads,
        http_mitm=not a.http_no_mitm,
        http_mitm_venv=Path(a.http_mitm_venv).resolve(),
    )
    return opts, only


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt so every ``finally`` runs."""

    def handler(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        opts, sections = parse_args(argv)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    status = 0
    with sigterm_as_interrupt():
        for name in sections:
            workdir = Path(tempfile.mkdtemp(prefix=f"mailmoat-bench-{name}-"))
            ctx = Context(opts, workdir, log)
            try:
                log(f"section {name}")
                started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                result = SECTIONS[name](ctx)
                opts.out_dir.mkdir(parents=True, exist_ok=True)
                out = opts.out_dir / f"{name}-latest.json"
                doc = {
                    "section": name,
                    "started": started,
                    "machine": machine_info(),
                    "options": {k: str(v) for k, v in asdict(opts).items()},
                    **result,
                }
                out.write_text(json.dumps(doc, indent=2) + "\n")
                log(f"wrote {out}")
                if result.get("ok") is False:
                    print(f"bench: {name}: some runs failed (see above and {out})", file=sys.stderr)
                    status = 1
            except BenchError as exc:
                print(f"bench: {name}: {exc}", file=sys.stderr)
                status = 1
            except KeyboardInterrupt:
                print("bench: interrupted; peers stopped", file=sys.stderr)
                return 130
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
