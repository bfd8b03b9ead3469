"""Evaluating a phase: the :class:`RuleSet` and its verdicts (DESIGN.md §5).

Theory of operation.  At construction the enabled rules are indexed by
``(protocol, phase)``; each bucket also remembers the CEL variables its
conditions read and the Python-implemented functions they call.  The loader
rewrote every condition so that each context field it reads is one top-level
variable (``client.ip`` -> ``_client__ip``, see ``_expr.flatten_paths``).
:meth:`RuleSet.evaluate` looks the bucket up (a phase without rules costs one
dict lookup and returns a shared ``pass`` verdict), fetches the value of each
of the bucket's variables from the session's context, and adds to the CEL
context only those that changed since the session's previous phase (the
context lives in the session's :class:`EvalCache`).  Converting a Python value
into CEL costs microseconds (a string about 2 µs, a dict about 3 µs per entry),
far more than running a typical condition (about 0.3 µs), so this is where the
time goes; a command phase whose rules read ``smtp.errors`` re-adds one int
when the count changed and nothing otherwise.

Semantics, in rule order (file-name order, then file order):

- ``allow`` ends evaluation (verdict ``allow``);
- the first ``reject``/``deny``/``ban`` decides and ends evaluation;
- ``tarpit`` records a delay (the largest one wins) and continues;
- ``score`` adds points, ``tag`` adds its tags, ``log`` only matches: all continue;
- afterwards, if nothing decided (``pass`` or ``tarpit``), the ``[scoring]``
  thresholds apply to ``risk_score + score``: deny first, then reject.

A rule in detect mode (its own ``mode = "detect"`` or the rule set's) is
recorded as a :class:`Match` with ``detect_only=True`` and changes nothing;
``Verdict.would_have`` says what the outcome would have been had the
detect-only rules been enforced (``None`` when it would be the same).

An evaluation error (type mismatch, missing key, a non-bool result) counts as
no match; it is counted per rule (:meth:`RuleSet.error_stats`) and never
raised.  Counters live in a :class:`HitCounters` that a reloaded rule set
takes over with :meth:`RuleSet.carry_counters_from`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast, final

from cel.stdlib import STDLIB_FUNCTIONS

from ._cel import EVALUATION_ERRORS, Context
from ._fields import FIELDS, default_context, read_path, zero_value
from ._functions import NamedList, cidr, glob, make_in_list, normalize_ip
from ._model import (
    PASS,
    CompiledRule,
    HitCounters,
    Match,
    Mode,
    Outcome,
    Scoring,
    Verdict,
)

_STRING_EXTENSIONS: Final = (
    "lowerAscii",
    "upperAscii",
    "trim",
    "split",
    "join",
    "replace",
    "substring",
    "indexOf",
    "lastIndexOf",
    "charAt",
)

#: functions implemented in Python, by name (``in_list`` is bound per rule set)
EXTRA_FUNCTIONS: Final[Mapping[str, Callable[..., Any] | None]] = {
    "cidr": cidr,
    "glob": glob,
    "in_list": None,
    **{name: STDLIB_FUNCTIONS[name] for name in _STRING_EXTENSIONS},
}

_DECISIVE: Final = frozenset({"allow", "reject", "deny", "ban"})


_MISSING: Final = object()


@final
@dataclass(frozen=True, slots=True)
class _Var:
    """One CEL variable of a bucket: a field, a map field or an object, by path."""

    name: str
    path: str
    parts: tuple[str, ...]
    kind: str  # "field" | "map" | "object"
    zero: Any


@final
@dataclass(frozen=True, slots=True)
class _Bucket:
    rules: tuple[CompiledRule, ...]
    variables: tuple[_Var, ...]
    functions: tuple[tuple[str, Callable[..., Any]], ...]
    uses_lists: bool


@final
class EvalCache:
    """One session's CEL context, kept across its phases.

    Converting a value into CEL costs microseconds, so a session keeps one
    context and the engine re-adds only the variables whose value changed
    since the last phase.  The cache belongs to one rule set: after a reload
    it starts afresh (the functions bound to the old lists go with it).
    """

    __slots__ = ("context", "functions", "last", "owner")

    def __init__(self) -> None:
        self.owner: object = None
        self.context = Context()
        self.last: dict[str, Any] = {}
        self.functions: set[str] = set()

    def reset(self, owner: object) -> None:
        self.owner = owner
        self.context = Context()
        self.last = {}
        self.functions = set()


def _fetch(context: Mapping[str, Any], var: _Var, defaults: Mapping[str, Any]) -> Any:
    node: Any = context
    for part in var.parts:
        if not isinstance(node, Mapping):
            node = None
            break
        node = node.get(part, _MISSING)
        if node is _MISSING:
            node = None
            break
    if var.kind == "object":
        default = read_path(defaults, var.path)
        return _merge(default, node)
    if node is None:
        return zero_value_of(var.zero)
    return node


def _merge(default: Any, value: Any) -> Any:
    """``value`` over ``default``, recursively (absent keys take their zero value)."""
    if not isinstance(default, Mapping):
        return default if value is None else value
    if not isinstance(value, Mapping):
        return {k: _merge(d, None) for k, d in default.items()}
    merged = {k: _merge(d, value.get(k)) for k, d in default.items()}
    merged.update((k, v) for k, v in value.items() if k not in default)
    return merged


def zero_value_of(zero: Any) -> Any:
    return type(zero)() if isinstance(zero, list | dict) else zero


def _snapshot(value: Any) -> Any:
    """What to compare next time: lists and maps may be changed in place by the session."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return None  # objects and maps are re-added every time (rare in conditions)
    return value


@final
class RuleSet:
    """A compiled, immutable set of rules plus its (mutable) hit counters."""

    def __init__(
        self,
        rules: Iterable[CompiledRule],
        *,
        lists: Mapping[str, NamedList] | None = None,
        scoring: Scoring | None = None,
        files: tuple[Path, ...] = (),
        mode: Mode = "enforce",
        counters: HitCounters | None = None,
    ) -> None:
        self.rules: tuple[CompiledRule, ...] = tuple(rules)
        self.lists: Mapping[str, NamedList] = dict(lists or {})
        self.scoring = scoring
        self.files = files
        self.mode: Mode = mode
        self.counters = counters if counters is not None else HitCounters()
        self._defaults = default_context()
        self._handles = {name: name for name in self.lists}
        in_list = make_in_list(dict(self.lists))
        grouped: dict[tuple[str, str], list[CompiledRule]] = {}
        for rule in self.rules:
            if rule.enabled:
                for protocol in sorted(rule.protocols):
                    grouped.setdefault((protocol, rule.phase), []).append(rule)
        self._index: dict[tuple[str, str], _Bucket] = {}
        for key, bucket_rules in grouped.items():
            variables: dict[str, _Var] = {}
            functions: dict[str, Callable[..., Any]] = {}
            uses_lists = False
            for rule in bucket_rules:
                for name, path, kind in rule.variables:
                    if name not in variables:
                        field = FIELDS.get(path)
                        zero = zero_value(field.type) if field is not None else None
                        variables[name] = _Var(name, path, tuple(path.split(".")), kind, zero)
                uses_lists = uses_lists or bool(rule.lists)
                for name in rule.program.functions():
                    if name in EXTRA_FUNCTIONS:
                        functions[name] = EXTRA_FUNCTIONS[name] or in_list
            self._index[key] = _Bucket(
                tuple(bucket_rules),
                tuple(variables.values()),
                tuple(functions.items()),
                uses_lists,
            )

    def __repr__(self) -> str:
        return f"<RuleSet {len(self.rules)} rules, {len(self.lists)} lists, mode={self.mode}>"

    def has(self, protocol: str, phase: str) -> bool:
        """Whether any enabled rule applies to ``protocol`` in ``phase``."""
        return (protocol, phase) in self._index

    def rules_for(self, protocol: str, phase: str) -> tuple[CompiledRule, ...]:
        bucket = self._index.get((protocol, phase))
        return bucket.rules if bucket is not None else ()

    def carry_counters_from(self, old: RuleSet) -> None:
        """Take over ``old``'s counters (call on reload, before the swap)."""
        self.counters = old.counters

    def stats(self) -> dict[str, int]:
        """Matches per rule id, every loaded rule included (0 if it never matched)."""
        hits = self.counters.hits
        return {rule.id: hits.get(rule.id, 0) for rule in self.rules}

    def error_stats(self) -> dict[str, int]:
        """Evaluation errors per rule id, rules without errors left out."""
        errors = self.counters.errors
        return {rule.id: errors[rule.id] for rule in self.rules if rule.id in errors}

    def evaluate(
        self,
        protocol: str,
        phase: str,
        context: Mapping[str, Any],
        *,
        risk_score: int = 0,
        cache: EvalCache | None = None,
    ) -> Verdict:
        """Run the rules of ``(protocol, phase)`` against ``context``.

        ``context`` is the nested dict of :func:`default_context` as the session
        filled it in (a missing namespace falls back to its zero values).
        ``risk.score`` in conditions is ``risk_score``, the session's score
        before this phase; ``session.phase`` is ``phase``.
        """
        bucket = self._index.get((protocol, phase))
        if bucket is None:
            return PASS
        if cache is None:
            cache = EvalCache()
        if cache.owner is not self:
            cache.reset(self)
        ctx = cache.context
        last = cache.last
        defaults = self._defaults
        values: dict[str, Any] = {}
        for var in bucket.variables:
            path = var.path
            if path == "risk.score":
                value: Any = risk_score
            elif path == "session.phase":
                value = phase
            else:
                value = _fetch(context, var, defaults)
                if path == "client.ip" and isinstance(value, str) and value[:7] == "::ffff:":
                    value = normalize_ip(value)
                elif var.kind == "object" and path == "client":
                    value = _normalize_client(value)
                elif var.kind == "object" and path == "session":
                    value = {**value, "phase": phase}
            values[path] = value
            snap = _snapshot(value)
            if snap is None or last.get(var.name, _MISSING) != snap:
                try:
                    ctx.add_variable(var.name, value)
                except (ValueError, TypeError):
                    last.pop(var.name, None)
                    continue  # rules reading it fail with an evaluation error, counted
                if snap is not None:
                    last[var.name] = snap
        if bucket.uses_lists and "lists" not in last:
            ctx.add_variable("lists", self._handles)
            last["lists"] = True
        for name, function in bucket.functions:
            if name not in cache.functions:
                ctx.add_function(name, function)
                cache.functions.add(name)

        counters = self.counters
        global_detect = self.mode == "detect"
        matches: list[Match] = []
        action: Outcome = "pass"
        decider: CompiledRule | None = None
        delay = 0.0
        score = 0
        tags: list[str] = []
        would: Outcome = "pass"
        would_score = 0
        would_done = False
        any_detect = False
        for rule in bucket.rules:
            try:
                result = rule.program.execute(ctx)
            except EVALUATION_ERRORS as exc:
                counters.error(rule.id, f"{exc.__class__.__name__}: {exc}")
                continue
            if result is not True:
                if result is not False:
                    counters.error(rule.id, f"condition gave {type(result).__name__}, not bool")
                continue
            counters.hit(rule.id)
            detect = global_detect or rule.mode == "detect"
            any_detect = any_detect or detect
            matches.append(Match(rule, detect, _evidence(rule, values, context, defaults)))
            kind = rule.action
            if not would_done:
                if kind in _DECISIVE:
                    would = cast(Outcome, kind)
                    would_done = True
                elif kind == "tarpit" and would == "pass":
                    would = "tarpit"
                elif kind == "score":
                    would_score += rule.score
            if detect:
                continue
            if kind in _DECISIVE:
                action = cast(Outcome, kind)
                decider = rule
                break
            if kind == "tarpit":
                if rule.tarpit > delay:
                    delay = rule.tarpit
                    decider = rule
                action = "tarpit"
            elif kind == "score":
                score += rule.score
            elif kind == "tag":
                tags.extend(t for t in rule.tags if t not in tags)

        threshold: Literal["reject", "deny"] | None = None
        if action in ("pass", "tarpit") and self.scoring is not None:
            threshold = _threshold(self.scoring, risk_score + score)
            if threshold is not None:
                action = threshold
                decider = None
        would_have: Outcome | None = None
        if any_detect:
            if would in ("pass", "tarpit") and self.scoring is not None:
                would = _threshold(self.scoring, risk_score + would_score) or would
            if would != action:
                would_have = would
        if not matches and action == "pass":
            return PASS
        reply = None
        if decider is not None and action != "tarpit":
            reply = decider.reply.get(protocol)
        return Verdict(
            action=action,
            rule=decider,
            matches=tuple(matches),
            reply=reply,
            delay=delay,
            ban=decider.ban if decider is not None and action == "ban" else 0.0,
            score=score,
            tags=tuple(tags),
            would_have=would_have,
            threshold=threshold,
        )


def _evidence(
    rule: CompiledRule,
    values: Mapping[str, Any],
    context: Mapping[str, Any],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """The values of the fields the condition read, by dotted name."""
    out: dict[str, Any] = {}
    for path in rule.reads:
        if path in values:
            value = values[path]
        else:  # a key below a map field, or a field below an object variable
            value = read_path(context, path)
            if value is None:
                value = read_path(defaults, path)
        out[path] = list(value) if isinstance(value, list) else value
    return out


def _threshold(scoring: Scoring, total: int) -> Literal["reject", "deny"] | None:
    if scoring.deny is not None and total >= scoring.deny:
        return "deny"
    if scoring.reject is not None and total >= scoring.reject:
        return "reject"
    return None


def _normalize_client(value: Any) -> Any:
    """``client.ip`` as IPv4 when the socket gave an IPv4-mapped IPv6 address."""
    if isinstance(value, Mapping):
        ip = value.get("ip")
        if isinstance(ip, str) and ip[:7].lower() == "::ffff:":
            return {**value, "ip": normalize_ip(ip)}
    return value
