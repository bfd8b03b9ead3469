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

Every process this script starts runs on 127.0.0.1, is bounded (fixed message
counts, ``timeout`` on every client run) and is stopped in a ``finally``
(SIGTERM, then SIGKILL), also on Ctrl-C.  Results go to
``$BENCH_OUT/<section>-latest.json`` (default ``/tmp/mailmoat-bench``).

A later section (IMAP logins/s, HTTP with wrk) is one more
function ``section_x(ctx) -> dict`` registered in :data:`SECTIONS`, using
:class:`Stack` to start and stop its peers.

    python bench/run.py                      # everything, default sizes
    python bench/run.py --only smtp --repeats 1 --small-msgs 1000 --large-msgs 50
    python bench/run.py --conc1              # add concurrency-1 rows
    python bench/run.py --only rules         # rule cost; --rules-msgs 2000 --rules-repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
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


# --------------------------------------------------------------------------- main

SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "smtp": section_smtp,
    "rules": section_rules,
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
    ):
        if getattr(a, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
    if (
        a.small_msgs > 1_000_000
        or a.large_msgs > 100_000
        or a.rules_msgs > 1_000_000
        or a.rules_repeats > 100
        or a.run_timeout > 3600
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
