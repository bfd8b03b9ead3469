"""The rule sets shipped in ``rules/``: they load, their cases pass, and the cases have teeth.

``rules/*.toml`` is what the demo and the default configuration load, so besides
running ``rules/tests/`` (what ``mailmoat rules test rules/ rules/tests/`` does)
this module checks that every rule carries its metadata, that every rule has a
case that fires it and one that does not, that disabling any rule or moving a
threshold makes the shipped cases fail (so they cannot pass vacuously), and
that the normal traffic of the test suite and the demo passes every phase.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailmoat.policy import (
    CaseReport,
    CaseResult,
    default_context,
    load_rules,
    run_cases,
)

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"
CASES = RULES / "tests"
TRUSTED_CASES = CASES / "trusted-networks"
DETECT_CASES = CASES / "detect-mode"
RULE_FILES = sorted(RULES.glob("*.toml"))
CASE_FILES = sorted(CASES.glob("*.toml"))

ID_SCHEME = re.compile(r"MM-[A-Z]+-\d{4}")
REFERENCE = re.compile(
    r"https://\S+"  # RFCs, postfix.org, attack.mitre.org, ...
    r"|CVE-\d{4}-\d{4,}"
    r"|RFC ?\d+"
    r"|T\d{4}(?:\.\d{3})?"  # MITRE ATT&CK technique ids
)
SEVERITIES = ("info", "low", "medium", "high", "critical")


# --- helpers ------------------------------------------------------------------


def copy_rules(tmp_path: Path, *, trusted: bool = False) -> Path:
    """A copy of ``rules/`` (without its tests); ``trusted``: with the fixture list."""
    target = tmp_path / "rules"
    shutil.copytree(RULES, target, ignore=shutil.ignore_patterns("tests"))
    if trusted:
        for name in ("trusted_networks.txt", "blocked_ja4.txt"):
            shutil.copy(TRUSTED_CASES / name, target / "lists")
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} must occur exactly once in {path}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def rule_file_of(rule_id: str) -> Path:
    for path in RULE_FILES:
        if f'id = "{rule_id}"' in path.read_text(encoding="utf-8"):
            return path
    raise AssertionError(f"no shipped rule {rule_id}")


def raw_rules() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in RULE_FILES:
        with path.open("rb") as f:
            data = tomllib.load(f)
        for entry in data.get("rule", []):
            yield path, entry


def shipped_ids() -> list[str]:
    return [entry["id"] for _, entry in raw_rules()]


def run_all(rules: Path, trusted_rules: Path, *, check: bool = True) -> list[CaseResult]:
    """Every shipped case in enforce mode: rules/tests/ and rules/tests/trusted-networks/."""
    reports = [
        run_cases(load_rules([rules]), CASES),
        run_cases(load_rules([trusted_rules]), TRUSTED_CASES),
    ]
    if check:
        for report in reports:
            assert report.ok, report.render()
    return [r for report in reports for r in report.results]


def context(**namespaces: dict[str, Any]) -> dict[str, Any]:
    ctx = default_context()
    for name, values in namespaces.items():
        ctx[name].update(values)
    return ctx


def check(report: CaseReport) -> None:
    assert report.results, "no cases were run"
    assert report.ok, report.render()


# --- loading and metadata -----------------------------------------------------


def test_rule_files_are_shipped() -> None:
    assert [p.name for p in RULE_FILES] == [
        "10-allowlist.toml",
        "20-tls-policy.toml",
        "30-smtp-hygiene.toml",
        "40-login-abuse.toml",
        "50-account-takeover.toml",
        "60-tls-mitm.toml",
    ]
    assert CASE_FILES


def test_shipped_rules_load() -> None:
    rules = load_rules([RULES])
    assert rules.files == tuple(RULE_FILES)
    assert [r.id for r in rules.rules] == shipped_ids()
    assert all(r.enabled for r in rules.rules)
    # the MITM / downgrade findings ship in detect mode, the rest enforce
    for r in rules.rules:
        assert r.mode == ("detect" if r.id.startswith("MM-MITM-") else "enforce"), r.id
    assert rules.scoring is None, "a shipped [scoring] table would clash with the admin's own"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_each_rule_file_loads_on_its_own(path: Path) -> None:
    """An admin can drop any shipped file without breaking the others."""
    assert load_rules([path]).rules


def test_trusted_list_ships_without_active_entries() -> None:
    """Loopback included: the tests and the demo connect from 127.0.0.1."""
    rules = load_rules([RULES])
    assert rules.lists["trusted_networks"].items == ()
    verdict = rules.evaluate("smtp", "connect", context(client={"ip": "127.0.0.1"}))
    assert verdict.action == "pass"
    assert not verdict.matches


def test_commented_trusted_network_examples_are_valid(tmp_path: Path) -> None:
    """Uncommenting an example in lists/trusted_networks.txt gives a loadable list."""
    rules = copy_rules(tmp_path)
    list_file = rules / "lists" / "trusted_networks.txt"
    example = re.compile(r"^#\s+([0-9A-Fa-f:.]+(?:/\d+)?)\s+#")
    lines = list_file.read_text(encoding="utf-8").splitlines()
    examples = [m.group(1) for line in lines if (m := example.match(line))]
    assert {"127.0.0.0/8", "::1", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(examples)
    uncommented = [example.sub(r"\1  #", line) for line in lines]
    list_file.write_text("\n".join(uncommented) + "\n", encoding="utf-8")
    loaded = load_rules([rules])
    assert loaded.lists["trusted_networks"].items == tuple(examples)
    verdict = loaded.evaluate("imap", "connect", context(client={"ip": "::ffff:192.168.7.7"}))
    assert verdict.action == "allow"


@pytest.mark.parametrize(
    ("path", "entry"),
    list(raw_rules()),
    ids=lambda v: v["id"] if isinstance(v, dict) else v.name,
)
def test_rule_metadata(path: Path, entry: dict[str, Any]) -> None:
    rid = entry["id"]
    assert ID_SCHEME.fullmatch(rid), f"{path.name}: {rid} does not follow MM-<AREA>-NNNN"
    for key in ("name", "description", "severity", "tags", "references"):
        assert entry.get(key), f"{rid}: {key} is missing or empty"
    assert entry["severity"] in SEVERITIES
    assert len(entry["description"]) >= 80, f"{rid}: the description should explain the rule"
    for ref in entry["references"]:
        assert REFERENCE.fullmatch(ref), f"{rid}: reference {ref!r} is not a URL or an id"


# --- the shipped cases --------------------------------------------------------


@pytest.mark.parametrize("cases", CASE_FILES, ids=lambda p: p.name)
def test_shipped_cases_pass(cases: Path) -> None:
    check(run_cases(load_rules([RULES]), cases))


def test_shipped_cases_directory_passes() -> None:
    """What ``mailmoat rules test rules/ rules/tests/`` runs."""
    report = run_cases(load_rules([RULES]), CASES)
    check(report)
    assert report.files == tuple(CASE_FILES)
    # the allow and blocked-JA4 lists are empty as shipped: only the fixture cases fire them
    assert report.unexercised == ("MM-NET-0001", "MM-MITM-0005")


def test_trusted_network_cases_pass(tmp_path: Path) -> None:
    report = run_cases(load_rules([copy_rules(tmp_path, trusted=True)]), TRUSTED_CASES)
    check(report)
    assert "MM-NET-0001" not in report.unexercised
    assert "MM-MITM-0005" not in report.unexercised


def test_detect_mode_cases_pass() -> None:
    """``mailmoat rules test --mode detect rules/ rules/tests/detect-mode/``."""
    check(run_cases(load_rules([RULES], base_mode="detect"), DETECT_CASES))


def test_every_rule_has_a_positive_and_a_negative_case(tmp_path: Path) -> None:
    rules = load_rules([RULES])
    results = run_all(RULES, copy_rules(tmp_path, trusted=True))
    for rule in rules.rules:
        positive = [r for r in results if rule.id in r.matched]
        negative = [
            r
            for r in results
            if r.phase == rule.phase
            and r.protocol in rule.protocols
            and r.expect_rules is not None
            and rule.id not in r.expect_rules
        ]
        assert positive, f"{rule.id}: no case makes it match"
        assert negative, f"{rule.id}: no case of its phase shows it not matching"


# --- the cases can fail -------------------------------------------------------


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    cases = tmp_path / "wrong.toml"
    cases.write_text(
        """
[[case]]
name = "right: clear-text AUTH is refused"
protocol = "smtp"
phase = "auth"
context = { tls = { active = false } }
expect_rules = ["MM-TLS-0001"]
expect_verdict = "reject"

[[case]]
name = "deliberately wrong: clear-text AUTH passes"
protocol = "smtp"
phase = "auth"
context = { tls = { active = false } }
expect_rules = []
expect_verdict = "pass"

[[case]]
name = "deliberately wrong: the 10th failure is only tarpitted"
protocol = "imap"
phase = "login"
context = { auth = { result = "failure" }, login = { failures_ip = 10 } }
expect_verdict = "tarpit"
""",
        encoding="utf-8",
    )
    report = run_cases(load_rules([RULES]), cases)
    assert not report.ok
    assert (report.passed, report.failed) == (1, 2)
    text = report.render()
    assert "FAIL " in text
    assert "deliberately wrong: clear-text AUTH passes" in text
    assert "got verdict:      reject (by MM-TLS-0001)" in text
    assert "got verdict:      ban (by MM-LOGIN-0001)" in text
    assert text.endswith("\nFAILED\n")


@pytest.mark.parametrize("rule_id", shipped_ids())
def test_disabling_any_rule_fails_the_cases(tmp_path: Path, rule_id: str) -> None:
    """Every rule is load-bearing: with it disabled, some shipped case fails."""
    rules = copy_rules(tmp_path / "a")
    trusted = copy_rules(tmp_path / "b", trusted=True)
    name = rule_file_of(rule_id).name
    for copy in (rules, trusted):
        edit(copy / name, f'id = "{rule_id}"\n', f'id = "{rule_id}"\nenabled = false\n')
    results = run_all(rules, trusted, check=False)
    assert any(not r.ok for r in results), f"disabling {rule_id} went unnoticed"


BOUNDARY_MUTATIONS = [
    ("60-tls-mitm.toml", "'auth.result == \"success\" && login.new_ja4'", "'login.new_ja4'"),
    ("60-tls-mitm.toml", "'auth.result == \"failure\" && tls.shared_ja4'", "'tls.shared_ja4'"),
    ("30-smtp-hygiene.toml", "smtp.rcpt_count > 100", "smtp.rcpt_count > 101"),
    ("30-smtp-hygiene.toml", "smtp.rcpt_count > 100", "smtp.rcpt_count >= 100"),
    ("30-smtp-hygiene.toml", "smtp.errors >= 10", "smtp.errors >= 11"),
    ("30-smtp-hygiene.toml", "smtp.errors >= 10", "smtp.errors >= 9"),
    ("30-smtp-hygiene.toml", "smtp.errors >= 3", "smtp.errors >= 4"),
    ("30-smtp-hygiene.toml", "smtp.errors >= 3", "smtp.errors >= 2"),
    ("30-smtp-hygiene.toml", '"pregreet", ', ""),
    ("30-smtp-hygiene.toml", '!smtp.helo.startsWith("[") && ', ""),
    ("40-login-abuse.toml", "login.failures_ip >= 10", "login.failures_ip >= 11"),
    ("40-login-abuse.toml", "login.failures_ip >= 10", "login.failures_ip >= 9"),
    ("40-login-abuse.toml", "login.distinct_users_ip >= 20", "login.distinct_users_ip >= 21"),
    ("40-login-abuse.toml", "login.distinct_users_ip >= 20", "login.distinct_users_ip >= 19"),
    ("40-login-abuse.toml", "login.failures_ip >= 3", "login.failures_ip >= 4"),
    ("40-login-abuse.toml", "login.failures_ip >= 3", "login.failures_ip >= 2"),
    (
        "40-login-abuse.toml",
        'auth.result == "failure" && login.distinct_users_ip',
        "login.distinct_users_ip",
    ),
    ("20-tls-policy.toml", "'!tls.active'", "'!tls.active && false'"),
    ("50-account-takeover.toml", "login.distinct_users_ip >= 5", "login.distinct_users_ip >= 6"),
    ("50-account-takeover.toml", "login.distinct_ips_user >= 20", "login.distinct_ips_user >= 21"),
    ("50-account-takeover.toml", "login.travel_kmh > 1000.0'", "login.travel_kmh > 900.0'"),
    ("50-account-takeover.toml", "login.new_country || ", ""),
    ("50-account-takeover.toml", "client.reputation <= -40", "client.reputation <= -41"),
]


@pytest.mark.parametrize(
    ("name", "old", "new"), BOUNDARY_MUTATIONS, ids=[f"{o}->{n}" for _, o, n in BOUNDARY_MUTATIONS]
)
def test_moving_a_threshold_fails_the_cases(tmp_path: Path, name: str, old: str, new: str) -> None:
    """The cases pin each threshold from both sides."""
    rules = copy_rules(tmp_path / "a")
    trusted = copy_rules(tmp_path / "b", trusted=True)
    edit(rules / name, old, new)
    results = run_all(rules, trusted, check=False)
    assert any(not r.ok for r in results), f"{old!r} -> {new!r} went unnoticed"


@pytest.mark.parametrize("version", ["SSLv3", "TLSv1", "TLSv1.1"])
def test_dropping_an_old_tls_version_fails_the_cases(tmp_path: Path, version: str) -> None:
    rules = copy_rules(tmp_path / "a")
    trusted = copy_rules(tmp_path / "b", trusted=True)
    path = rules / "20-tls-policy.toml"
    text = path.read_text(encoding="utf-8")
    old = '["SSLv3", "TLSv1", "TLSv1.1"]'
    assert text.count(old) == 2
    kept = ", ".join(f'"{v}"' for v in ("SSLv3", "TLSv1", "TLSv1.1") if v != version)
    path.write_text(text.replace(old, f"[{kept}]"), encoding="utf-8")
    results = run_all(rules, trusted, check=False)
    assert any(not r.ok for r in results)


def test_emptying_the_trusted_fixture_fails_the_trusted_cases(tmp_path: Path) -> None:
    rules = copy_rules(tmp_path, trusted=True)
    (rules / "lists" / "trusted_networks.txt").write_text("# nothing\n", encoding="utf-8")
    report = run_cases(load_rules([rules]), TRUSTED_CASES)
    assert not report.ok
    assert report.failed == sum(1 for r in report.results if r.expect_verdict == "allow")


# --- semantics the case format cannot show ------------------------------------


def test_allow_list_ends_the_connect_phase(tmp_path: Path) -> None:
    """A later connect-phase rule never sees a trusted client (allow ends the phase)."""
    rules = copy_rules(tmp_path, trusted=True)
    (rules / "99-probe.toml").write_text(
        '[[rule]]\nid = "MM-TEST-0001"\nname = "deny-everyone"\nphase = "connect"\n'
        "when = 'true'\naction = \"deny\"\n",
        encoding="utf-8",
    )
    loaded = load_rules([rules])
    for ip in ("10.9.8.7", "::ffff:10.9.8.7", "::1", "2001:db8:100::1"):
        verdict = loaded.evaluate("smtp", "connect", context(client={"ip": ip}))
        assert verdict.action == "allow", ip
        assert [m.rule.id for m in verdict.matches] == ["MM-NET-0001"]
        assert verdict.matches[0].fields == {"client.ip": ip.removeprefix("::ffff:")}
    verdict = loaded.evaluate("smtp", "connect", context(client={"ip": "::ffff:203.0.113.1"}))
    assert verdict.action == "deny"
    assert verdict.rule is not None
    assert verdict.rule.id == "MM-TEST-0001"


def test_per_rule_detect_mode(tmp_path: Path) -> None:
    """``mode = "detect"`` on one shipped rule: reported, not enforced, the rest still is."""
    rules = copy_rules(tmp_path)
    edit(
        rules / "40-login-abuse.toml",
        'id = "MM-LOGIN-0001"\n',
        'id = "MM-LOGIN-0001"\nmode = "detect"\n',
    )
    loaded = load_rules([rules])
    verdict = loaded.evaluate(
        "imap",
        "login",
        context(auth={"user": "admin", "result": "failure"}, login={"failures_ip": 10}),
    )
    assert [(m.rule.id, m.detect_only) for m in verdict.matches] == [
        ("MM-LOGIN-0001", True),
        ("MM-LOGIN-0003", False),
    ]
    assert verdict.action == "tarpit"
    assert verdict.delay == 2.0
    assert verdict.ban == 0.0
    assert verdict.would_have == "ban"


def test_actions_carry_the_documented_parameters() -> None:
    by_id = {r.id: r for r in load_rules([RULES]).rules}
    assert by_id["MM-SMTP-0003"].tarpit == by_id["MM-LOGIN-0003"].tarpit == 2.0
    assert by_id["MM-SMTP-0004"].ban == 600.0
    assert by_id["MM-LOGIN-0001"].ban == by_id["MM-LOGIN-0002"].ban == 3600.0
    assert by_id["MM-SMTP-0005"].score == 2
    assert by_id["MM-SMTP-0001"].reply == {"smtp": "452 4.5.3 Too many recipients"}
    assert by_id["MM-SMTP-0002"].reply == {"smtp": "421 4.7.0 Too many errors"}
    # session-ending replies must be 421/554 (RFC 5321 §3.8); login bans use the defaults
    for rule in by_id.values():
        if rule.action in ("deny", "ban"):
            assert all(r[:3] in ("421", "554") for p, r in rule.reply.items() if p == "smtp")
    assert by_id["MM-LOGIN-0001"].reply == by_id["MM-LOGIN-0002"].reply == {}


# --- normal traffic passes ----------------------------------------------------

Phase = tuple[str, str, dict[str, Any]]


def smtp_session(helo: str, *, tls: bool, user: str = "") -> list[Phase]:
    tls_ctx = {"active": True, "version": "TLSv1.3"} if tls else {}
    base: dict[str, Any] = {"client": {"ip": "127.0.0.1", "port": 40000}, "tls": tls_ctx}
    phases: list[Phase] = [("connect", "connect", {})]
    if tls:
        phases.append(("tls", "tls", {}))
    phases.append(("helo", "helo", {"smtp": {"helo": helo, "command": "EHLO"}}))
    auth: dict[str, Any] = {}
    if user:
        auth = {"mechanism": "PLAIN", "user": user}
        phases.append(("auth", "auth", {"smtp": {"helo": helo}, "auth": auth}))
        auth = {**auth, "result": "success"}
        login = {"failures_ip": 0, "distinct_users_ip": 1}
        phases.append(("login", "login", {"smtp": {"helo": helo}, "auth": auth, "login": login}))
    mail = {"helo": helo, "mail_from": "a@example.org"}
    phases.append(("mail_from", "mail_from", {"smtp": mail, "auth": auth}))
    rcpts: list[str] = []
    for n in range(1, 6):
        rcpts.append(f"u{n}@example.net")
        smtp = {**mail, "rcpt_to": list(rcpts), "rcpt_count": n}
        phases.append((f"command RCPT {n}", "command", {"smtp": {**smtp, "command": "RCPT"}}))
        phases.append((f"rcpt {n}", "rcpt", {"smtp": smtp}))
    done = {**mail, "rcpt_to": rcpts, "rcpt_count": 5, "data": {"size": 1200}}
    phases.append(("data", "data", {"smtp": done, "auth": auth}))
    # a typo or two (unknown user, a 5xx from the backend) is normal
    phases.append(("command after 2 errors", "command", {"smtp": {**done, "errors": 2}}))
    close = {"session": {"close_reason": "client_quit"}, "smtp": {**done, "errors": 2}}
    phases.append(("close", "close", close))
    return [(label, phase, _over(base, extra)) for label, phase, extra in phases]


def _over(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = context(**base)
    for name, values in extra.items():
        out[name].update(values)
    return out


NORMAL_TRAFFIC: dict[str, Callable[[], list[Phase]]] = {
    "submission, STARTTLS, AUTH": lambda: smtp_session("localhost", tls=True, user="alice"),
    "MX over TLS, IP-literal HELO": lambda: smtp_session("[127.0.0.1]", tls=True),
    "MX in plain text, host-name HELO": lambda: smtp_session("client.example.org", tls=False),
}


@pytest.mark.parametrize("kind", NORMAL_TRAFFIC)
def test_normal_smtp_traffic_is_never_blocked_or_delayed(kind: str) -> None:
    rules = load_rules([RULES])
    for label, phase, ctx in NORMAL_TRAFFIC[kind]():
        verdict = rules.evaluate("smtp", phase, ctx)
        assert verdict.action == "pass", (label, verdict)
        assert not verdict.matches, (label, [m.rule.id for m in verdict.matches])


@pytest.mark.parametrize("protocol", ["imap", "http"])
def test_normal_imap_and_webmail_logins_pass(protocol: str) -> None:
    rules = load_rules([RULES])
    tls = {"active": True, "version": "TLSv1.2"}
    for phase, extra in (
        ("connect", {}),
        ("tls", {}),
        ("auth", {"auth": {"mechanism": "LOGIN", "user": "alice"}}),
        (
            "login",
            {
                "auth": {"mechanism": "LOGIN", "user": "alice", "result": "failure"},
                "login": {"failures_ip": 1, "failures_user": 1, "distinct_users_ip": 1},
            },
        ),
        (
            "login",
            {
                "auth": {"mechanism": "LOGIN", "user": "alice", "result": "success"},
                "login": {"failures_ip": 1, "failures_user": 1, "distinct_users_ip": 1},
            },
        ),
        ("command", {"imap": {"tag": "a2", "command": "SELECT"}}),
        ("close", {"session": {"close_reason": "client_quit"}}),
    ):
        ctx = context(client={"ip": "::ffff:127.0.0.1"}, tls=tls, **extra)
        verdict = rules.evaluate(protocol, phase, ctx)
        assert verdict.action == "pass", (phase, verdict)
        assert verdict.delay == 0.0
