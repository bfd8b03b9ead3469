"""Loading rule files (DESIGN.md §5) into a :class:`~mailmoat.policy.RuleSet`.

Contract: :func:`load_rules` either returns a complete rule set or raises
:class:`~mailmoat.policy.RuleErrors` with *every* problem in every file, each
a :class:`~mailmoat.errors.RuleError` located as ``file:line`` with the fix in
the message.  Nothing is dropped silently: an unknown key, a bad CIDR, a list
file that is missing, a field that does not exist are all errors.  This is
the only module of the package that reads files.

Order: each path is a file or a directory whose ``*.toml`` files are taken
in file-name order (not recursively); rules keep file order.  ``[[list]]``
and ``[scoring]`` are global: a list defined in one file is usable from every
file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, cast, final

from mailmoat.errors import RuleError

from ._cel import compile_expression, syntax_error_position
from ._engine import EXTRA_FUNCTIONS, RuleSet
from ._expr import NATIVE_FUNCTIONS, analyze, flatten_paths, rewrite_list_membership
from ._fields import PHASES, PROTOCOLS
from ._functions import LIST_KINDS, ListKind, NamedList, build_list
from ._model import ACTIONS, MODES, SEVERITIES, CompiledRule, Mode, RuleErrors, Scoring

RULE_KEYS: Final = (
    "id",
    "name",
    "description",
    "phase",
    "protocols",
    "when",
    "action",
    "reply",
    "severity",
    "tags",
    "references",
    "score",
    "tarpit",
    "ban",
    "mode",
    "enabled",
)
LIST_KEYS: Final = ("name", "kind", "file", "items")
SCORING_KEYS: Final = ("reject", "deny")
TOP_KEYS: Final = ("rule", "list", "scoring")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LIST_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_REPLY_FORMS: Final = {
    "smtp": (re.compile(r"[2-5]\d\d(?:[ -].*)?"), "a reply code and text, like '550 5.7.1 No'"),
    "imap": (re.compile(r"(?:OK|NO|BAD|BYE)\b.*"), "a response like 'NO [ALERT] No'"),
    "http": (re.compile(r"[1-5]\d\d(?: .*)?"), "a status code, like '403'"),
}
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*[.=]")

FUNCTIONS: Final = NATIVE_FUNCTIONS | frozenset(EXTRA_FUNCTIONS)


def parse_duration(value: object) -> float:
    """Seconds from ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"1d"``; ``ValueError`` if not."""
    if not isinstance(value, str) or (m := _DURATION.fullmatch(value.strip())) is None:
        raise ValueError(
            f'bad duration {value!r}: write a number and a unit, like "500ms", "10s", '
            '"5m", "1h" or "1d"'
        )
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"bad duration {value!r}: must be more than zero")
    return seconds


@final
class Locator:
    """Lines of ``[[table]]`` headers and ``key =`` assignments in a TOML text.

    ``tomllib`` keeps no positions, so the source is scanned once; multi-line
    strings are skipped so that a ``key = ...`` inside a condition is not
    mistaken for an assignment.
    """

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.tables: dict[tuple[str, int], int] = {}
        self.keys: dict[tuple[str, int, str], int] = {}
        counts: dict[str, int] = {}
        current = ("", 0)
        in_string: str | None = None
        for lineno, line in enumerate(self.lines, start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            if m := _HEADER.match(line):
                name = m.group(2)
                if m.group(1) == "[[":
                    counts[name] = counts.get(name, -1) + 1
                    current = (name, counts[name])
                else:
                    current = (name, 0)
                self.tables.setdefault(current, lineno)
            elif m := _KEY.match(line):
                self.keys.setdefault((current[0], current[1], m.group(1)), lineno)
                rest = line[m.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_string = quote
                        break

    def line(self, table: str, index: int = 0, key: str | None = None) -> int | None:
        if key is not None and (found := self.keys.get((table, index, key))) is not None:
            return found
        return self.tables.get((table, index))

    def find(self, text: str, start: int | None) -> int | None:
        """The first line at or after ``start`` that contains ``text``."""
        first = (start or 1) - 1
        for offset, line in enumerate(self.lines[first:]):
            if text in line:
                return first + offset + 1
        return start

    def value_starts_on_next_line(self, line: int | None) -> bool:
        """The key on ``line`` opens a multi-line string that starts on the next line."""
        if line is None:
            return False
        rest = self.lines[line - 1].split("=", 1)[-1].strip()
        return rest in ('"""', "'''")


@final
class _File:
    """Error collector for one rule file."""

    def __init__(self, path: Path, text: str, errors: list[RuleError]) -> None:
        self.path = path
        self.name = str(path)
        self.loc = Locator(text)
        self.errors = errors

    def error(
        self,
        message: str,
        table: str,
        index: int = 0,
        key: str | None = None,
        rule_id: str | None = None,
    ) -> None:
        self.errors.append(RuleError(message, self.name, self.loc.line(table, index, key), rule_id))

    def at(self, message: str, line: int | None, rule_id: str | None = None) -> None:
        self.errors.append(RuleError(message, self.name, line, rule_id))


def _expand(paths: Sequence[Path], errors: list[RuleError]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.toml") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            errors.append(RuleError("no such rule file or directory", str(path)))
    return files


def _read(path: Path, errors: list[RuleError]) -> tuple[str, dict[str, Any]] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(RuleError(f"cannot read the rule file: {exc}", str(path)))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE.search(str(exc))
        errors.append(
            RuleError(
                f"TOML syntax error: {_TOML_LINE.sub('', str(exc)).strip()}",
                str(path),
                int(m.group(1)) if m else None,
            )
        )
        return None
    return text, data


def load_rules(paths: Sequence[Path], *, base_mode: str = "enforce") -> RuleSet:
    """Compile every rule file under ``paths``; :class:`RuleErrors` lists all problems.

    ``base_mode`` is the node's mode (``[node] mode``): ``"detect"`` makes every
    rule detect-only.
    """
    if base_mode not in MODES:
        raise ValueError(f"base_mode must be one of {MODES}, not {base_mode!r}")
    errors: list[RuleError] = []
    files = _expand(paths, errors)
    parsed: list[tuple[_File, dict[str, Any]]] = []
    for path in files:
        if (read := _read(path, errors)) is not None:
            text, data = read
            parsed.append((_File(path, text, errors), data))

    lists: dict[str, NamedList] = {}
    list_sites: dict[str, str] = {}
    scoring: Scoring | None = None
    for f, data in parsed:
        for key in data:
            if key not in TOP_KEYS:
                f.error(
                    f"unknown table or key {key!r}; a rule file has [[rule]], [[list]] "
                    "and [scoring]",
                    key,
                )
        for index, entry in enumerate(_array(f, data, "list")):
            named = _load_list(f, index, entry)
            if named is None:
                continue
            if named.name in lists:
                f.error(
                    f"duplicate list name {named.name!r} (first defined at "
                    f"{list_sites[named.name]})",
                    "list",
                    index,
                    "name",
                )
                continue
            lists[named.name] = named
            list_sites[named.name] = f"{f.name}:{named.line}"
        if "scoring" in data:
            if scoring is not None:
                f.error(
                    f"a second [scoring] table (the first is at {scoring.source}:{scoring.line});"
                    " keep one",
                    "scoring",
                )
            else:
                scoring = _load_scoring(f, data["scoring"])

    rules: list[CompiledRule] = []
    rule_sites: dict[str, str] = {}
    for f, data in parsed:
        for index, entry in enumerate(_array(f, data, "rule")):
            rule = _load_rule(f, index, entry, lists)
            if rule is None:
                continue
            if rule.id in rule_sites:
                f.error(
                    f"duplicate rule id {rule.id!r} (first defined at {rule_sites[rule.id]});"
                    " ids must be unique across all rule files",
                    "rule",
                    index,
                    "id",
                    rule.id,
                )
                continue
            rule_sites[rule.id] = f"{f.name}:{rule.line}"
            rules.append(rule)

    if errors:
        raise RuleErrors(errors)
    return RuleSet(
        rules,
        lists=lists,
        scoring=scoring,
        files=tuple(files),
        mode="detect" if base_mode == "detect" else "enforce",
    )


def _array(f: _File, data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        f.error(f"{key!r} must be an array of tables: write [[{key}]]", key)
        return []
    return value


def _unknown_keys(
    f: _File, entry: Mapping[str, Any], table: str, index: int, allowed: Sequence[str]
) -> None:
    rule_id = entry.get("id") if table == "rule" and isinstance(entry.get("id"), str) else None
    for key in entry:
        if key not in allowed:
            f.error(
                f"unknown key {key!r} in [[{table}]]; allowed keys: {', '.join(allowed)}"
                if table != "scoring"
                else f"unknown key {key!r} in [scoring]; allowed keys: {', '.join(allowed)}",
                table,
                index,
                key,
                rule_id,
            )


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _load_scoring(f: _File, value: object) -> Scoring | None:
    if not isinstance(value, dict):
        f.error("[scoring] must be a table", "scoring")
        return None
    _unknown_keys(f, value, "scoring", 0, SCORING_KEYS)
    thresholds: dict[str, int | None] = {}
    ok = True
    for key in SCORING_KEYS:
        v = value.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            f.error(f"[scoring] {key} must be a whole number above 0, not {v!r}", "scoring", 0, key)
            ok = False
        thresholds[key] = v
    if not any(thresholds.values()) and ok:
        f.error("[scoring] needs reject, deny or both", "scoring")
        ok = False
    reject, deny = thresholds["reject"], thresholds["deny"]
    if ok and reject is not None and deny is not None and deny < reject:
        f.error(
            f"[scoring] deny ({deny}) is below reject ({reject}); deny is the stronger threshold",
            "scoring",
            0,
            "deny",
        )
        ok = False
    return Scoring(reject, deny, f.name, f.loc.line("scoring")) if ok else None


def _load_list(f: _File, index: int, entry: Mapping[str, Any]) -> NamedList | None:
    _unknown_keys(f, entry, "list", index, LIST_KEYS)
    line = f.loc.line("list", index)
    name, kind = entry.get("name"), entry.get("kind")
    ok = True
    if not isinstance(name, str) or not _LIST_NAME.fullmatch(name):
        f.error(
            f"[[list]] name must be a lower-case identifier (used as lists.NAME), not {name!r}",
            "list",
            index,
            "name",
        )
        ok = False
    if kind not in LIST_KINDS:
        f.error(
            f"[[list]] kind must be one of {', '.join(LIST_KINDS)}, not {kind!r}",
            "list",
            index,
            "kind",
        )
        ok = False
    has_file, has_items = "file" in entry, "items" in entry
    if has_file == has_items:
        f.error('[[list]] needs exactly one of file = "..." or items = [...]', "list", index)
        return None
    items: list[tuple[str, int | None]] = []
    source = f.name
    if has_items:
        raw = entry["items"]
        if not _str_list(raw):
            f.error("[[list]] items must be an array of non-empty strings", "list", index, "items")
            return None
        items_line = f.loc.line("list", index, "items")
        items = [(item, f.loc.find(item, items_line)) for item in raw]
    else:
        raw_file = entry["file"]
        if not isinstance(raw_file, str) or not raw_file:
            f.error("[[list]] file must be a path", "list", index, "file")
            return None
        list_path = Path(raw_file)
        if not list_path.is_absolute():
            list_path = f.path.parent / list_path
        source = str(list_path)
        try:
            text = list_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            f.error(
                f"cannot read the list file {str(list_path)!r}: {exc.__class__.__name__}: "
                f"{getattr(exc, 'strerror', None) or exc} (paths are relative to the rule file)",
                "list",
                index,
                "file",
            )
            return None
        for lineno, raw_line in enumerate(text.splitlines(), start=1):
            item = raw_line.split("#", 1)[0].strip()
            if item:
                items.append((item, lineno))
    if not ok:
        return None
    named, problems = build_list(cast(str, name), cast(ListKind, kind), items, source, line)
    for message, item_line in problems:
        f.errors.append(RuleError(message, source, item_line))
    return None if problems else named


def _load_rule(
    f: _File, index: int, entry: Mapping[str, Any], lists: Mapping[str, NamedList]
) -> CompiledRule | None:
    raw_id = entry.get("id")
    rule_id = raw_id if isinstance(raw_id, str) else None
    before = len(f.errors)

    def err(message: str, key: str | None = None) -> None:
        f.error(message, "rule", index, key, rule_id)

    _unknown_keys(f, entry, "rule", index, RULE_KEYS)
    for key in ("id", "name", "phase", "when", "action"):
        if key not in entry:
            err(f"[[rule]] is missing the required key {key!r}")
    if "id" in entry and (rule_id is None or not _ID.fullmatch(rule_id)):
        err(
            f"id must be letters, digits, '.', '_' or '-' (like \"MM-TLS-0001\"), not {raw_id!r}",
            "id",
        )
    for key in ("name", "description", "when"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
            err(f"{key} must be a non-empty string", key)

    def enum(key: str, allowed: Sequence[str], default: str | None = None) -> str:
        value = entry.get(key, default)
        if key in entry and value not in allowed:
            err(f"{key} must be one of {', '.join(allowed)}, not {value!r}", key)
        return cast(str, value)

    phase = enum("phase", PHASES)
    action = enum("action", ACTIONS)
    severity = enum("severity", SEVERITIES, "medium")
    mode = enum("mode", MODES, "enforce")

    protocols = entry.get("protocols", list(PROTOCOLS))
    if not _str_list(protocols) or not protocols or any(p not in PROTOCOLS for p in protocols):
        err(
            f"protocols must be a non-empty array of {', '.join(PROTOCOLS)}, not {protocols!r}",
            "protocols",
        )
        protocols = []
    for key in ("tags", "references"):
        if key in entry and not _str_list(entry[key]):
            err(f"{key} must be an array of non-empty strings", key)
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        err(f"enabled must be true or false, not {enabled!r}", "enabled")

    reply = entry.get("reply", {})
    if not isinstance(reply, dict):
        err('reply must be a table like { smtp = "550 5.7.1 No", imap = "NO No" }', "reply")
        reply = {}
    for proto, text in reply.items():
        if proto not in PROTOCOLS:
            err(f"reply for unknown protocol {proto!r}; protocols: {', '.join(PROTOCOLS)}", "reply")
            continue
        form, example = _REPLY_FORMS[proto]
        if not isinstance(text, str) or "\r" in text or "\n" in text or not form.fullmatch(text):
            err(f"reply.{proto} must be {example} on one line, not {text!r}", "reply")
        elif proto not in protocols and protocols:
            err(f"reply.{proto} is given but the rule does not apply to {proto}", "reply")
    if reply and action not in ("reject", "deny", "ban") and action in ACTIONS:
        err(f"reply is only used by reject, deny and ban; action {action!r} sends none", "reply")

    score = 0
    tarpit = ban = 0.0
    if action == "score":
        raw_score = entry.get("score")
        if raw_score is None:
            err('action "score" needs score = N (a whole number above 0)', None)
        elif not isinstance(raw_score, int) or isinstance(raw_score, bool) or raw_score <= 0:
            err(f"score must be a whole number above 0, not {raw_score!r}", "score")
        else:
            score = raw_score
    for key, needed_by in (("tarpit", "tarpit"), ("ban", "ban")):
        if action == needed_by:
            if key not in entry:
                err(f'action {needed_by!r} needs {key} = "DURATION" (like "10s" or "1h")')
                continue
            try:
                seconds = parse_duration(entry[key])
            except ValueError as exc:
                err(str(exc), key)
                continue
            if key == "tarpit":
                tarpit = seconds
            else:
                ban = seconds
    for key in ("score", "tarpit", "ban"):
        if key in entry and action != key and action in ACTIONS:
            err(f"{key} is only used with action = {key!r}; this rule's action is {action!r}", key)

    program = None
    variables: tuple[tuple[str, str, str], ...] = ()
    reads: tuple[str, ...] = ()
    used_lists: tuple[str, ...] = ()
    when = entry.get("when")
    if isinstance(when, str) and when.strip():
        when_line = f.loc.line("rule", index, "when")
        first_line = (when_line or 0) + (1 if f.loc.value_starts_on_next_line(when_line) else 0)
        try:
            compile_expression(when)
        except ValueError as exc:
            line, column, message = syntax_error_position(exc)
            f.at(
                f"CEL syntax error in when (line {line}, column {column}): {message}",
                first_line + line - 1 if when_line else None,
                rule_id,
            )
        else:
            analysis = analyze(when, FUNCTIONS, lists)
            for problem in analysis.problems:
                f.at(
                    f"in when: {problem.message}",
                    first_line + problem.line_offset if when_line else None,
                    rule_id,
                )
            if not analysis.problems:
                rewritten, variables = flatten_paths(rewrite_list_membership(when))
                try:
                    program = compile_expression(rewritten)
                except ValueError as exc:  # pragma: no cover - a bug in the rewrite
                    f.at(f"internal error rewriting the condition: {exc}", when_line, rule_id)
                reads = tuple(analysis.reads)
                used_lists = tuple(analysis.lists)

    if len(f.errors) > before or program is None:
        return None
    return CompiledRule(
        id=cast(str, rule_id),
        name=cast(str, entry["name"]),
        description=cast(str, entry.get("description", "")),
        phase=phase,
        protocols=frozenset(protocols),
        action=cast(Any, action),
        reply=dict(reply),
        severity=cast(Any, severity),
        tags=tuple(entry.get("tags", ())),
        references=tuple(entry.get("references", ())),
        score=score,
        tarpit=tarpit,
        ban=ban,
        mode=cast(Mode, mode),
        enabled=cast(bool, enabled),
        source=f.name,
        line=f.loc.line("rule", index),
        when=cast(str, when),
        reads=reads,
        lists=used_lists,
        program=program,
        variables=variables,
    )
