"""Cost of ``RuleSet.evaluate()`` for one phase (figures, not a test).

Loads 10, 100 and 1000 rules, all on the SMTP ``rcpt`` phase, with a mix of
realistic conditions (field comparisons, ``cidr``, ``glob``, list membership
against a 10k-entry CIDR list, macros over ``smtp.rcpt_to``), none of which
decides, so every evaluation runs every rule.  Prints the median of several
repeats in µs per evaluation and per rule, and the cost of a phase that has
no rules.

    PYTHONPATH=src python bench/rules_eval.py

``bench/run.py --only rules`` imports this module for the same table and for
the rule sets it loads into a running mailmoat: :func:`write_session_rules`
(N rules spread over the SMTP phases as a real rule set would be, none of
them matching the bench traffic) and :func:`write_standin_rules` (a small
stand-in for the shipped ``rules/`` when that folder has no rule file).
:func:`bench_matches` and :func:`session_cost` replay the phases of one
``smtp-source`` session in process, through the public API only
(``load_rules``, ``RuleSet.evaluate``, ``default_context``).
"""

from __future__ import annotations

import ipaddress
import statistics
import tempfile
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailmoat import policy
from mailmoat.policy import RuleSet, default_context, load_rules

CONDITIONS = (
    "client.ip in lists.blocked && !tls.active",
    'cidr(client.ip, "203.0.113.0/24")',
    'glob(smtp.helo, "*.dynamic.*") && smtp.rcpt_count > 5',
    "smtp.rcpt_count > 100",
    'smtp.rcpt_to.exists(r, r.endsWith("@spamtrap.test"))',
    'client.geo.country in ["KP", "IR"] && client.asn.number != 64496',
    'smtp.mail_from == "" && smtp.rcpt_count > 1',
    "login.failures_ip > 20 || risk.score > 50",
)

COUNTS = (10, 100, 1000)


def write_rules(directory: Path, count: int) -> Path:
    nets = [f"{ipaddress.IPv4Address(0xC6336400 + 16 * i)}/28" for i in range(10_000)]
    (directory / "blocked.txt").write_text("\n".join(nets), encoding="utf-8")
    parts = ['[[list]]\nname = "blocked"\nkind = "cidr"\nfile = "blocked.txt"\n']
    for i in range(count):
        cond = CONDITIONS[i % len(CONDITIONS)]
        parts.append(
            f'[[rule]]\nid = "B-{i:04d}"\nname = "bench-{i}"\nphase = "rcpt"\n'
            f'protocols = ["smtp"]\nwhen = \'{cond}\'\naction = "log"\n'
        )
    path = directory / f"bench-{count}.toml"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def context() -> dict[str, Any]:
    c = default_context()
    c["client"]["ip"] = "198.51.100.7"
    c["client"]["geo"]["country"] = "DE"
    c["smtp"]["helo"] = "mail.example.org"
    c["smtp"]["mail_from"] = "alice@example.org"
    c["smtp"]["rcpt_to"] = ["bob@example.net", "carol@example.net"]
    c["smtp"]["rcpt_count"] = 2
    c["tls"]["active"] = True
    return c


def measure(
    rules: RuleSet, phase: str, number: int, repeat: int = 7, *, cached: bool = False
) -> float:
    """Median seconds per evaluate().

    ``cached``: pass one ``EvalCache`` to every call, as a session does across its
    phases (the context is then converted once, not per call); only when the
    package exports one, else the same as uncached.
    """
    ctx = context()
    cache_cls = getattr(policy, "EvalCache", None)
    if cached and cache_cls is not None:
        cache = cache_cls()
        timer = timeit.Timer(lambda: rules.evaluate("smtp", phase, ctx, risk_score=3, cache=cache))
    else:
        timer = timeit.Timer(lambda: rules.evaluate("smtp", phase, ctx, risk_score=3))
    return statistics.median(t / number for t in timer.repeat(repeat=repeat, number=number))


def eval_table(counts: Sequence[int] = COUNTS) -> tuple[list[dict[str, float]], float]:
    """Rows ``{rules, us_per_eval, us_per_rule, us_per_eval_cached}`` and the
    empty-phase cost in ns (``cached``: see :func:`measure`)."""
    rows: list[dict[str, float]] = []
    empty = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            sub = Path(tmp) / str(count)
            sub.mkdir()
            rules = load_rules([write_rules(sub, count)])
            assert rules.evaluate("smtp", "rcpt", context()).action == "pass"
            number = max(20, 20_000 // count)
            per_eval = measure(rules, "rcpt", number=number)
            per_eval_cached = measure(rules, "rcpt", number=number, cached=True)
            rows.append(
                {
                    "rules": count,
                    "us_per_eval": round(per_eval * 1e6, 2),
                    "us_per_rule": round(per_eval * 1e6 / count, 3),
                    "us_per_eval_cached": round(per_eval_cached * 1e6, 2),
                }
            )
            if not empty:
                empty = measure(rules, "helo", number=200_000) * 1e9
    return rows, round(empty, 1)


def print_eval_table(rows: list[dict[str, float]], empty_ns: float) -> None:
    cached = "EvalCache" in dir(policy)
    print(f"{'rules':>6} {'µs/eval':>10} {'µs/rule':>9}" + (f" {'µs/eval cached':>15}" * cached))
    for row in rows:
        print(
            f"{row['rules']:>6.0f} {row['us_per_eval']:>10.1f} {row['us_per_rule']:>9.2f}"
            + (f" {row['us_per_eval_cached']:>15.1f}" * cached)
        )
    print(f"phase without rules: {empty_ns:.0f} ns per evaluate()")
    if cached:
        print("(cached: one EvalCache over the calls, as within a session: no context conversion)")


# --------------------------------------------------------------------------- a whole session

#: how a rule set of N rules is spread over the SMTP phases (weights, sum 1000):
#: most on the envelope and the client address, few on ``command`` (it runs on
#: every command), some on ``tls``/``data``/``close``.
PHASE_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("connect", 150),
    ("tls", 50),
    ("helo", 180),
    ("mail_from", 220),
    ("rcpt", 280),
    ("data", 60),
    ("command", 20),
    ("close", 40),
)

#: the phases one ``smtp-source`` session (EHLO, MAIL, one RCPT, DATA, QUIT,
#: ``tls = "none"``) goes through, in order: ``command`` runs before each command's own phase
SESSION_PHASES: tuple[str, ...] = (
    "connect",
    "command",
    "helo",
    "command",
    "mail_from",
    "command",
    "rcpt",
    "command",
    "data",
    "command",
    "close",
)

# per phase: condition templates, ``{n}`` a per-rule number, ``{a}`` an octet.
# None of them is true for the bench traffic (127.0.0.1, HELO bench.example.org,
# MAIL FROM bench@example.org, one RCPT sink@example.org, no TLS, 1 KB).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "connect": (
        'cidr(client.ip, "198.19.{a}.0/24")',
        "client.ip in lists.blocked",
        'client.ip == "203.0.113.{a}"',
        'client.geo.country == "K{c}" && !(client.ip in lists.trusted)',
        "client.reputation < -{m}",
        "client.asn.number == {asn} && client.ip in lists.blocked",
    ),
    "tls": (
        'tls.version == "TLSv1" || tls.version == "TLSv1.1"',
        "tls.ja4 in lists.bad_ja4",
        'tls.fallback_scsv && cidr(client.ip, "198.19.{a}.0/24")',
        'tls.sni != "" && tls.sni.endsWith(".bad{n}.test")',
    ),
    "helo": (
        'smtp.helo == "host{n}.spam.test"',
        'glob(smtp.helo, "*.dyn{n}.*")',
        'smtp.helo.endsWith(".bulk{n}.test")',
        "smtp.helo in lists.bad_domains",
        'smtp.helo.matches("^(localhost|unknown{n})$")',
        'cidr(client.ip, "198.19.{a}.0/24") && smtp.helo != "mx{n}.partner.test"',
        'smtp.helo.lowerAscii().startsWith("ylmf{n}")',
    ),
    "mail_from": (
        'smtp.mail_from == "bounce{n}@spam.test"',
        'smtp.mail_from.endsWith("@sender{n}.test")',
        "smtp.mail_from in lists.bad_domains",
        'glob(smtp.mail_from, "*@*.bulk{n}.test")',
        'smtp.mail_from == "" && client.ip in lists.blocked',
        'smtp.mail_from.endsWith("@example.org") && cidr(client.ip, "198.19.{a}.0/24")',
    ),
    "rcpt": (
        'smtp.rcpt_to.exists(r, r == "trap{n}@example.net")',
        'smtp.rcpt_to.exists(r, r.endsWith("@rcpt{n}.test"))',
        "smtp.rcpt_count > {m}",
        "smtp.rcpt_to.exists(r, r in lists.spamtraps)",
        "client.ip in lists.blocked && smtp.rcpt_count > 1",
        'cidr(client.ip, "198.19.{a}.0/24") && smtp.mail_from.endsWith("@sender{n}.test")',
        "smtp.rcpt_to.exists(r, r in lists.bad_domains) || smtp.mail_from in lists.bad_domains",
        'glob(smtp.helo, "*.dyn{n}.*") && smtp.rcpt_count > 3',
    ),
    "data": (
        "smtp.data.size > {big}",
        'smtp.data.bare_lf && smtp.mail_from.endsWith("@sender{n}.test")',
        "smtp.data.size > 5000000 && client.ip in lists.blocked",
        'smtp.data.bare_cr && cidr(client.ip, "198.19.{a}.0/24")',
    ),
    "command": (
        'smtp.command in ["VRFY", "EXPN"] && !(client.ip in lists.trusted)',
        "smtp.errors > {m}",
        'smtp.command == "ETRN" && cidr(client.ip, "198.19.{a}.0/24")',
        'smtp.command == "NOOP" && smtp.errors > 2',
    ),
    "close": (
        'session.close_reason == "pregreet" && client.ip in lists.blocked',
        "smtp.errors > {m}",
        'session.close_reason == "timeout" && smtp.rcpt_count > {m}',
        "smtp.rcpt_count > 50 && smtp.data.size == 0",
    ),
}


def _spread(count: int) -> list[tuple[str, int]]:
    """``count`` split over :data:`PHASE_WEIGHTS` (largest remainder)."""
    total = sum(w for _, w in PHASE_WEIGHTS)
    exact = [(phase, count * w / total) for phase, w in PHASE_WEIGHTS]
    shares = [(phase, int(x)) for phase, x in exact]
    left = count - sum(n for _, n in shares)
    by_rest = sorted(range(len(exact)), key=lambda i: exact[i][1] - shares[i][1], reverse=True)
    for i in by_rest[:left]:
        shares[i] = (shares[i][0], shares[i][1] + 1)
    return shares


def _write_lists(directory: Path) -> str:
    """List files for :func:`write_session_rules`; returns their ``[[list]]`` tables."""
    # 4096 networks in 198.18.0.0/16, 2000 domains, 1000 trap addresses
    (directory / "blocked.txt").write_text(
        "\n".join(f"198.18.{i // 16}.{(i % 16) * 16}/28" for i in range(4096)) + "\n",
        encoding="utf-8",
    )
    (directory / "bad-domains.txt").write_text(
        "\n".join(f"spam{i}.test\n*.bulk{i}.test" for i in range(1000)) + "\n", encoding="utf-8"
    )
    (directory / "spamtraps.txt").write_text(
        "\n".join(f"trap{i}@traps.test" for i in range(1000)) + "\n", encoding="utf-8"
    )
    return """\
[[list]]
name = "blocked"
kind = "cidr"
file = "blocked.txt"

[[list]]
name = "trusted"
kind = "cidr"
items = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "2001:db8:100::/48"]

[[list]]
name = "bad_domains"
kind = "domain"
file = "bad-domains.txt"

[[list]]
name = "spamtraps"
kind = "string"
file = "spamtraps.txt"

[[list]]
name = "bad_ja4"
kind = "ja4"
items = ["t13d1516h2_8daaf6152771_e5627efa2ab1", "t12d1209h2_d34a8e72043a_b39be8c56a14"]
"""


def write_session_rules(directory: Path, count: int) -> Path:
    """``count`` rules over the SMTP phases (:data:`PHASE_WEIGHTS`) plus lists, in one file.

    Actions cycle through log, score and reject (log and score on ``close``);
    no condition is true for the bench traffic, so none fires and every rule
    of a phase is evaluated.
    """
    parts = [f"# written by bench/rules_eval.py: {count} rules, none matching the bench\n"]
    parts.append(_write_lists(directory))
    n = 0
    for phase, share in _spread(count):
        templates = TEMPLATES[phase]
        for k in range(share):
            values = {
                "n": n,
                "a": n % 254 + 1,
                "c": chr(ord("A") + n % 26),
                "m": 50 + n % 50,
                "asn": 64512 + n,
                "big": 20_000_000 + n,
            }
            cond = templates[k % len(templates)].format(**values)
            action = ("log", "score", "reject")[n % (2 if phase in ("close", "tls") else 3)]
            extra = ""
            if action == "score":
                extra = f"score = {1 + n % 5}\n"
            elif action == "reject" and n % 2:
                extra = 'reply = { smtp = "550 5.7.1 Rejected by local policy" }\n'
            smtp_only = phase not in ("connect", "tls", "command", "close")
            parts.append(
                f'[[rule]]\nid = "BENCH-{phase.upper()}-{n:04d}"\nname = "bench-{phase}-{k}"\n'
                f'phase = "{phase}"\n'
                + ('protocols = ["smtp"]\n' if smtp_only else "")
                + f"when = '{cond}'\naction = \"{action}\"\n{extra}"
                + f'severity = "{("low", "medium", "high")[n % 3]}"\n'
                + (f'tags = ["bench", "phase.{phase}"]\n' if n % 4 == 0 else "")
            )
            n += 1
    path = directory / f"50-bench-{count}.toml"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


STANDIN_RULES = """\
# written by bench/rules_eval.py: a stand-in for the shipped rules/ (which had no *.toml)
[scoring]
reject = 10
deny = 20

[[list]]
name = "drop"
kind = "cidr"
items = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]

[[list]]
name = "traps"
kind = "domain"
items = ["spamtrap.test", "*.traps.test"]

[[rule]]
id = "MM-CONN-0001"
name = "drop-listed-networks"
phase = "connect"
when = 'client.ip in lists.drop'
action = "deny"
severity = "high"

[[rule]]
id = "MM-CONN-0002"
name = "log-bad-reputation"
phase = "connect"
when = 'client.reputation < -50'
action = "log"

[[rule]]
id = "MM-HELO-0001"
name = "tarpit-bare-ip-helo"
phase = "helo"
protocols = ["smtp"]
when = '''
smtp.helo.matches("^[0-9.]+$") || smtp.helo.startsWith("[") ||
  glob(smtp.helo, "*.dynamic.*")
'''
action = "tarpit"
tarpit = "5s"

[[rule]]
id = "MM-HELO-0002"
name = "score-localhost-helo"
phase = "helo"
protocols = ["smtp"]
when = 'smtp.helo == "localhost" || glob(smtp.helo, "*.localdomain")'
action = "score"
score = 5

[[rule]]
id = "MM-AUTH-0001"
name = "auth-before-starttls"
phase = "auth"
protocols = ["smtp"]
when = '!tls.active'
action = "reject"
reply = { smtp = "530 5.7.0 Must issue a STARTTLS command first" }

[[rule]]
id = "MM-LOGIN-0001"
name = "ban-password-guessing"
phase = "login"
when = 'login.failures_ip >= 10 && !(client.ip in lists.drop)'
action = "ban"
ban = "1h"

[[rule]]
id = "MM-LOGIN-0002"
name = "score-user-spraying"
phase = "login"
when = 'login.distinct_users_ip >= 5'
action = "score"
score = 10

[[rule]]
id = "MM-MAIL-0001"
name = "score-null-sender-after-pregreet"
phase = "mail_from"
protocols = ["smtp"]
when = 'smtp.mail_from == "" && smtp.pregreet'
action = "score"
score = 10

[[rule]]
id = "MM-RCPT-0001"
name = "too-many-recipients"
phase = "rcpt"
protocols = ["smtp"]
when = 'smtp.rcpt_count > 100'
action = "reject"
reply = { smtp = "452 4.5.3 Too many recipients" }

[[rule]]
id = "MM-RCPT-0002"
name = "ban-spamtrap-senders"
phase = "rcpt"
protocols = ["smtp"]
when = 'smtp.rcpt_to.exists(r, r in lists.traps)'
action = "ban"
ban = "1d"

[[rule]]
id = "MM-CMD-0001"
name = "refuse-vrfy-expn"
phase = "command"
protocols = ["smtp"]
when = 'smtp.command in ["VRFY", "EXPN"]'
action = "reject"
reply = { smtp = "502 5.5.1 Command not implemented" }

[[rule]]
id = "MM-CMD-0002"
name = "deny-after-many-errors"
phase = "command"
protocols = ["smtp"]
when = 'smtp.errors >= 10'
action = "deny"

[[rule]]
id = "MM-CLOSE-0001"
name = "ban-pregreet"
phase = "close"
when = 'session.close_reason == "pregreet"'
action = "ban"
ban = "1h"
"""


def write_standin_rules(directory: Path) -> Path:
    """About a dozen realistic rules over connect..close, as a shipped set might be."""
    path = directory / "50-standin.toml"
    path.write_text(STANDIN_RULES, encoding="utf-8")
    return path


def bench_contexts() -> list[tuple[str, dict[str, Any]]]:
    """(phase, context) for each phase of one ``smtp-source`` session through mailmoat.

    Field values as the session fills them in (docs/rules.md, *Context fields*):
    127.0.0.1, EHLO bench.example.org, MAIL FROM bench@example.org, one RCPT
    sink@example.org, no TLS, a 1 KB message, QUIT.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    c = default_context()
    c["session"].update(protocol="smtp", listener="bench-smtp", id="0" * 20)
    c["client"].update(ip="127.0.0.1", port=40000)
    smtp = c["smtp"]
    verbs = iter(("EHLO", "MAIL", "RCPT", "DATA", "QUIT"))
    args = {"EHLO": "bench.example.org", "MAIL": "FROM:<bench@example.org>"}
    args |= {"RCPT": "TO:<sink@example.org>", "DATA": "", "QUIT": ""}
    for phase in SESSION_PHASES:
        if phase == "command":
            verb = next(verbs)
            smtp.update(command=verb, args=args[verb])
        elif phase == "helo":
            smtp["helo"] = "bench.example.org"
        elif phase == "mail_from":
            smtp["mail_from"] = "bench@example.org"
        elif phase == "rcpt":
            smtp.update(rcpt_to=["sink@example.org"], rcpt_count=1)
        elif phase == "data":
            smtp["data"]["size"] = 1100
        elif phase == "close":
            c["session"]["close_reason"] = "client_quit"
        c["session"]["phase"] = phase
        out.append((phase, _copy(c)))
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def bench_matches(rules: RuleSet) -> list[tuple[str, str, str]]:
    """(phase, rule id, outcome) of every rule that matches the bench traffic in process."""
    found: list[tuple[str, str, str]] = []
    for phase, ctx in bench_contexts():
        verdict = rules.evaluate("smtp", phase, ctx)
        for m in verdict.matches:
            outcome = verdict.action if m.rule is verdict.rule else m.rule.action
            found.append((phase, m.rule.id, outcome))
    return found


def session_cost(rules: RuleSet, repeat: int = 5, budget: float = 0.3) -> tuple[float, bool]:
    """Median seconds to evaluate every phase of one bench session, and whether a
    per-session ``EvalCache`` was used (as mailmoat's sessions do, when the
    package exports one; otherwise every ``evaluate()`` starts from scratch)."""
    steps = bench_contexts()
    cache_cls = getattr(policy, "EvalCache", None)

    def one_session() -> None:
        if cache_cls is None:
            for phase, ctx in steps:
                rules.evaluate("smtp", phase, ctx)
        else:
            cache = cache_cls()
            for phase, ctx in steps:
                rules.evaluate("smtp", phase, ctx, cache=cache)

    timer = timeit.Timer(one_session)
    number, took = timer.autorange()
    number = max(1, int(number * budget / max(took, 1e-9)))
    runs = timer.repeat(repeat=repeat, number=number)
    return statistics.median(t / number for t in runs), cache_cls is not None


def main() -> None:
    rows, empty_ns = eval_table()
    print_eval_table(rows, empty_ns)


if __name__ == "__main__":
    main()
