"""``mailmoat rules test RULES CASES``: data-driven rule tests (the logic, not the CLI).

A cases file (TOML, or JSON with the same shape; a file or a directory of
``*.toml``/``*.json`` taken in file-name order) holds ``[[case]]`` entries::

    [[case]]
    name = "AUTH before STARTTLS is refused"
    protocol = "smtp"
    phase = "auth"
    context = { tls = { active = false }, auth = { mechanism = "PLAIN" } }
    risk_score = 0                       # optional
    expect_rules = ["MM-TLS-0001"]       # exact ids of the matched rules, in order
    expect_verdict = "reject"            # Verdict.action

``context`` is merged over :func:`default_context`; a field that is not in the
schema, or a value of the wrong type, is an error (a typo in a test must not
make it pass).  Contract: :func:`run_cases` raises
:class:`~mailmoat.policy.RuleErrors` (``file:line``) for a bad cases file and
otherwise returns a :class:`CaseReport`; evaluating cases does not touch the
rule set's hit counters.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, final

from mailmoat.errors import RuleError

from ._engine import RuleSet
from ._fields import FIELDS, OBJECTS, PHASES, PROTOCOLS, FieldType, default_context
from ._loader import Locator
from ._model import HitCounters, RuleErrors, Verdict

CASE_KEYS: Final = (
    "name",
    "description",
    "protocol",
    "phase",
    "context",
    "risk_score",
    "expect_rules",
    "expect_verdict",
)
VERDICTS: Final = ("pass", "allow", "reject", "deny", "tarpit", "ban")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


@final
@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    source: str
    line: int | None
    protocol: str
    phase: str
    verdict: Verdict
    expect_rules: tuple[str, ...] | None
    expect_verdict: str | None
    #: human-readable differences; empty when the case passed
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def matched(self) -> tuple[str, ...]:
        return tuple(m.rule.id for m in self.verdict.matches)


@final
@dataclass(frozen=True, slots=True)
class CaseReport:
    files: tuple[Path, ...]
    rule_count: int
    results: tuple[CaseResult, ...]
    #: ids of enabled rules that no case matched
    unexercised: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.passed

    def render(self) -> str:
        lines = [
            f"Rules: {self.rule_count} loaded",
            f"Cases: {len(self.results)} from {len(self.files)} file(s): "
            + ", ".join(str(f) for f in self.files),
            "",
            "Results",
            "=======",
            "",
            f"Passed: {self.passed}",
            f"Failed: {self.failed}",
        ]
        failures = [r for r in self.results if not r.ok]
        if failures:
            lines += ["", "Failures", "========"]
            for r in failures:
                where = f"{r.source}:{r.line}" if r.line is not None else r.source
                lines += ["", f"FAIL {where}: {r.name} ({r.protocol}/{r.phase})"]
                lines += [f"  {p}" for p in r.problems]
        if self.unexercised:
            lines += ["", "Rules no case matched: " + ", ".join(self.unexercised)]
        lines += ["", "OK" if self.ok else "FAILED"]
        return "\n".join(lines) + "\n"


def _case_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".toml", ".json") and p.is_file())
    if path.is_file():
        return [path]
    raise RuleErrors([RuleError("no such cases file or directory", str(path))])


def _parse(path: Path, errors: list[RuleError]) -> tuple[list[Any], Locator | None, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(RuleError(f"cannot read the cases file: {exc}", str(path)))
        return [], None, ""
    data: Any
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.append(RuleError(f"JSON syntax error: {exc.msg}", str(path), exc.lineno))
            return [], None, text
        locator = None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            m = _TOML_LINE.search(str(exc))
            message = _TOML_LINE.sub("", str(exc)).strip()
            errors.append(
                RuleError(
                    f"TOML syntax error: {message}", str(path), int(m.group(1)) if m else None
                )
            )
            return [], None, text
        locator = Locator(text)
    cases = data if isinstance(data, list) else data.get("case") if isinstance(data, dict) else None
    extra = [k for k in data if k != "case"] if isinstance(data, dict) else []
    if extra:
        errors.append(RuleError(f"unknown key(s) {extra}; a cases file holds [[case]]", str(path)))
    if not isinstance(cases, list) or not cases:
        errors.append(RuleError("no [[case]] entries", str(path)))
        return [], locator, text
    return cases, locator, text


def _json_line(text: str, name: object, index: int) -> int | None:
    if isinstance(name, str):
        needle = json.dumps(name)
        for lineno, line in enumerate(text.splitlines(), start=1):
            if '"name"' in line and needle in line:
                return lineno
    return None


_PY_TYPES: Final[Mapping[FieldType, tuple[type, ...]]] = {
    "string": (str,),
    "int": (int,),
    "double": (float, int),
    "bool": (bool,),
    "list(string)": (list,),
    "map(string,string)": (dict,),
}


def _merge_context(given: Any, problems: list[str]) -> dict[str, Any]:
    context = default_context()

    def walk(node: Mapping[str, Any], prefix: str, target: dict[str, Any]) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in FIELDS:
                typ = FIELDS[path].type
                ok = isinstance(value, _PY_TYPES[typ]) and not (
                    typ in ("int", "double") and isinstance(value, bool)
                )
                if typ == "list(string)" and ok:
                    ok = all(isinstance(v, str) for v in value)
                if typ == "map(string,string)" and ok:
                    ok = all(isinstance(v, str) for v in value.values())
                if not ok:
                    problems.append(f"context field {path} is a {typ}, not {value!r}")
                    continue
                target[key] = float(value) if typ == "double" else value
            elif path in OBJECTS and isinstance(value, Mapping):
                walk(value, path + ".", target[key])
            else:
                problems.append(f"unknown context field {path!r}")

    if not isinstance(given, Mapping):
        problems.append("context must be a table of fields")
        return context
    walk(given, "", context)
    return context


def run_cases(rules: RuleSet, cases_path: Path) -> CaseReport:
    """Evaluate every case of ``cases_path`` against ``rules`` and compare."""
    errors: list[RuleError] = []
    files = _case_files(cases_path)
    # evaluate on a twin that shares nothing mutable with the live rule set
    twin = RuleSet(
        rules.rules,
        lists=rules.lists,
        scoring=rules.scoring,
        files=rules.files,
        mode=rules.mode,
        counters=HitCounters(),
    )
    prepared: list[tuple[str, int | None, Mapping[str, Any], dict[str, Any]]] = []
    for path in files:
        cases, locator, text = _parse(path, errors)
        for index, case in enumerate(cases):
            if not isinstance(case, dict):
                errors.append(RuleError(f"case #{index + 1} must be a table", str(path)))
                continue
            line = (
                locator.line("case", index)
                if locator is not None
                else _json_line(text, case.get("name"), index)
            )
            problems: list[str] = []
            for key in case:
                if key not in CASE_KEYS:
                    problems.append(f"unknown key {key!r}; allowed keys: {', '.join(CASE_KEYS)}")
            name = case.get("name")
            if not isinstance(name, str) or not name:
                problems.append("name must be a non-empty string")
            if case.get("protocol") not in PROTOCOLS:
                problems.append(f"protocol must be one of {', '.join(PROTOCOLS)}")
            if case.get("phase") not in PHASES:
                problems.append(f"phase must be one of {', '.join(PHASES)}")
            risk = case.get("risk_score", 0)
            if not isinstance(risk, int) or isinstance(risk, bool):
                problems.append("risk_score must be a whole number")
            if "expect_rules" not in case and "expect_verdict" not in case:
                problems.append("a case needs expect_rules, expect_verdict or both")
            expect_rules = case.get("expect_rules")
            if expect_rules is not None and not (
                isinstance(expect_rules, list) and all(isinstance(r, str) for r in expect_rules)
            ):
                problems.append("expect_rules must be an array of rule ids")
            elif expect_rules is not None:
                known = {r.id for r in rules.rules}
                unknown = [r for r in expect_rules if r not in known]
                if unknown:
                    problems.append(f"expect_rules names rules that are not loaded: {unknown}")
            if "expect_verdict" in case and case["expect_verdict"] not in VERDICTS:
                problems.append(f"expect_verdict must be one of {', '.join(VERDICTS)}")
            context = _merge_context(case.get("context", {}), problems)
            for problem in problems:
                errors.append(RuleError(f"case {name!r}: {problem}", str(path), line))
            if not problems:
                prepared.append((str(path), line, case, context))
    if errors:
        raise RuleErrors(errors)

    results: list[CaseResult] = []
    for source, line, case, context in prepared:
        verdict = twin.evaluate(
            case["protocol"], case["phase"], context, risk_score=case.get("risk_score", 0)
        )
        want_rules = tuple(case["expect_rules"]) if "expect_rules" in case else None
        want_verdict = case.get("expect_verdict")
        got_rules = tuple(m.rule.id for m in verdict.matches)
        diffs: list[str] = []
        if want_rules is not None and got_rules != want_rules:
            diffs.append(f"expected rules: {list(want_rules)}")
            diffs.append(f"matched rules:  {list(got_rules)}")
            if missing := [r for r in want_rules if r not in got_rules]:
                diffs.append(f"  not matched: {', '.join(missing)}")
            if extra := [r for r in got_rules if r not in want_rules]:
                diffs.append(f"  unexpected:  {', '.join(extra)}")
            errors_now = twin.error_stats()
            for rid in missing:
                if rid in errors_now:
                    last = twin.counters.last_error.get(rid, "")
                    diffs.append(f"  {rid} failed to evaluate: {last}")
        if want_verdict is not None and verdict.action != want_verdict:
            decided = f" (by {verdict.rule.id})" if verdict.rule is not None else ""
            if verdict.threshold is not None:
                decided = f" (by the [scoring] {verdict.threshold} threshold)"
            diffs.append(f"expected verdict: {want_verdict}")
            diffs.append(f"got verdict:      {verdict.action}{decided}")
        results.append(
            CaseResult(
                name=case["name"],
                source=source,
                line=line,
                protocol=case["protocol"],
                phase=case["phase"],
                verdict=verdict,
                expect_rules=want_rules,
                expect_verdict=want_verdict,
                problems=tuple(diffs),
            )
        )
    hits = twin.stats()
    unexercised = tuple(r.id for r in rules.rules if r.enabled and hits.get(r.id, 0) == 0)
    return CaseReport(tuple(files), len(rules.rules), tuple(results), unexercised)
