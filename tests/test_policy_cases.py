"""The `mailmoat rules test` runner: passing and failing reports, bad cases files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from mailmoat.policy import RuleErrors, RuleSet, load_rules, run_cases

RULES = """
[[rule]]
id = "MM-TLS-0001"
name = "auth-before-starttls"
phase = "auth"
protocols = ["smtp"]
when = '!tls.active'
action = "reject"

[[rule]]
id = "MM-LOG-0001"
name = "log-auth"
phase = "auth"
when = 'auth.user != ""'
action = "log"

[[rule]]
id = "MM-UNUSED"
name = "never"
phase = "data"
when = 'smtp.data.size > 100000000'
action = "deny"
"""


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    return load_rules([tmp_path / "rules.toml"])


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def test_passing_cases(tmp_path: Path, rules: RuleSet) -> None:
    cases = write(
        tmp_path / "cases.toml",
        """
        [[case]]
        name = "plain AUTH is refused"
        protocol = "smtp"
        phase = "auth"
        context = { auth = { user = "alice", mechanism = "PLAIN" } }
        expect_rules = ["MM-TLS-0001"]
        expect_verdict = "reject"

        [[case]]
        name = "AUTH under TLS passes"
        protocol = "smtp"
        phase = "auth"
        context = { tls = { active = true }, auth = { user = "alice" } }
        expect_rules = ["MM-LOG-0001"]
        expect_verdict = "pass"
        """,
    )
    report = run_cases(rules, cases)
    assert report.ok
    assert (report.passed, report.failed) == (2, 0)
    assert report.unexercised == ("MM-UNUSED",)
    text = report.render()
    assert "Passed: 2\nFailed: 0\n" in text
    assert "Rules no case matched: MM-UNUSED" in text
    assert text.endswith("\nOK\n")
    assert rules.stats() == {"MM-TLS-0001": 0, "MM-LOG-0001": 0, "MM-UNUSED": 0}


def test_failing_case_report_shows_diff(tmp_path: Path, rules: RuleSet) -> None:
    cases = write(
        tmp_path / "cases.toml",
        """
        [[case]]
        name = "ok"
        protocol = "imap"
        phase = "auth"
        context = {}
        expect_verdict = "pass"

        [[case]]
        name = "wrong expectation"
        protocol = "smtp"
        phase = "auth"
        context = { auth = { user = "bob" } }
        expect_rules = ["MM-LOG-0001"]
        expect_verdict = "pass"
        """,
    )
    report = run_cases(rules, cases)
    assert not report.ok
    assert (report.passed, report.failed) == (1, 1)
    failed = report.results[1]
    assert failed.line == 8
    assert failed.matched == ("MM-TLS-0001",)
    assert failed.problems == (
        "expected rules: ['MM-LOG-0001']",
        "matched rules:  ['MM-TLS-0001']",
        "  not matched: MM-LOG-0001",
        "  unexpected:  MM-TLS-0001",
        "expected verdict: pass",
        "got verdict:      reject (by MM-TLS-0001)",
    )
    text = report.render()
    assert f"FAIL {cases}:8: wrong expectation (smtp/auth)\n  expected rules:" in text
    assert text.endswith("\nFAILED\n")


def test_json_cases_and_directory(tmp_path: Path, rules: RuleSet) -> None:
    d = tmp_path / "cases"
    d.mkdir()
    (d / "b.json").write_text(
        json.dumps(
            {
                "case": [
                    {
                        "name": "json case",
                        "protocol": "smtp",
                        "phase": "auth",
                        "context": {"tls": {"active": True}},
                        "expect_rules": [],
                    }
                ]
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    write(
        d / "a.toml",
        '[[case]]\nname = "t"\nprotocol = "smtp"\nphase = "data"\nexpect_verdict = "pass"\n',
    )
    report = run_cases(rules, d)
    assert [r.name for r in report.results] == ["t", "json case"]
    assert report.ok


@pytest.mark.parametrize(
    ("body", "message", "line"),
    [
        (
            'name = "x"\nprotocol = "smtp"\nphase = "auth"\ncontext = { client = { ipp = "1" } }\n'
            'expect_verdict = "pass"\n',
            "case 'x': unknown context field 'client.ipp'",
            2,
        ),
        (
            'name = "x"\nprotocol = "smtp"\nphase = "auth"\ncontext = { tls = { active = 1 } }\n'
            'expect_verdict = "pass"\n',
            "case 'x': context field tls.active is a bool, not 1",
            2,
        ),
        (
            'name = "x"\nprotocol = "smtp"\nphase = "auth"\n',
            "case 'x': a case needs expect_rules, expect_verdict or both",
            2,
        ),
        (
            'name = "x"\nprotocol = "smtp"\nphase = "auth"\nexpect_rules = ["NOPE"]\n',
            "case 'x': expect_rules names rules that are not loaded: ['NOPE']",
            2,
        ),
        (
            'name = "x"\nprotocol = "smtp"\nphase = "auth"\nexpect_verdict = "drop"\n',
            "case 'x': expect_verdict must be one of pass, allow, reject, deny, tarpit, ban",
            2,
        ),
        ('name = "x"\nprotocol = \n', "TOML syntax error", 4),
    ],
)
def test_bad_cases_file(tmp_path: Path, rules: RuleSet, body: str, message: str, line: int) -> None:
    cases = write(tmp_path / "c.toml", "# cases\n[[case]]\n" + body)
    with pytest.raises(RuleErrors) as info:
        run_cases(rules, cases)
    (err,) = info.value.errors
    assert message in err.message
    assert (err.path, err.line) == (str(cases), line)


def test_json_syntax_error_line(tmp_path: Path, rules: RuleSet) -> None:
    cases = write(tmp_path / "c.json", '{\n "case": [\n  {"name": }\n ]\n}\n')
    with pytest.raises(RuleErrors) as info:
        run_cases(rules, cases)
    (err,) = info.value.errors
    assert err.line == 3
    assert err.message.startswith("JSON syntax error")
