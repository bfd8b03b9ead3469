"""Cost of ``RuleSet.evaluate()`` for one phase (figures, not a test).

Loads 10, 100 and 1000 rules, all on the SMTP ``rcpt`` phase, with a mix of
realistic conditions (field comparisons, ``cidr``, ``glob``, list membership
against a 10k-entry CIDR list, macros over ``smtp.rcpt_to``), none of which
decides, so every evaluation runs every rule.  Prints the median of several
repeats in µs per evaluation and per rule, and the cost of a phase that has
no rules.

    PYTHONPATH=src python bench/rules_eval.py
"""

from __future__ import annotations

import ipaddress
import statistics
import tempfile
import timeit
from pathlib import Path

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


def context() -> dict[str, object]:
    c = default_context()
    c["client"]["ip"] = "198.51.100.7"
    c["client"]["geo"]["country"] = "DE"
    c["smtp"]["helo"] = "mail.example.org"
    c["smtp"]["mail_from"] = "alice@example.org"
    c["smtp"]["rcpt_to"] = ["bob@example.net", "carol@example.net"]
    c["smtp"]["rcpt_count"] = 2
    c["tls"]["active"] = True
    return c


def measure(rules: RuleSet, phase: str, number: int, repeat: int = 7) -> float:
    """Median seconds per evaluate()."""
    ctx = context()
    timer = timeit.Timer(lambda: rules.evaluate("smtp", phase, ctx, risk_score=3))
    return statistics.median(t / number for t in timer.repeat(repeat=repeat, number=number))


def main() -> None:
    print(f"{'rules':>6} {'µs/eval':>10} {'µs/rule':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for count in (10, 100, 1000):
            sub = Path(tmp) / str(count)
            sub.mkdir()
            rules = load_rules([write_rules(sub, count)])
            assert rules.evaluate("smtp", "rcpt", context()).action == "pass"
            per_eval = measure(rules, "rcpt", number=max(20, 20_000 // count))
            print(f"{count:>6} {per_eval * 1e6:>10.1f} {per_eval * 1e6 / count:>9.2f}")
            if count == 10:
                empty = measure(rules, "helo", number=200_000)
        print(f"phase without rules: {empty * 1e9:.0f} ns per evaluate()")


if __name__ == "__main__":
    main()
