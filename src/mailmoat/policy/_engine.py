"""Evaluating a phase: the :class:`RuleSet` and its verdicts (DESIGN.md §5).

Theory of operation.  At construction the enabled rules are indexed by
``(protocol, phase)``; each bucket also remembers which context namespaces and
which Python-implemented functions its conditions use.  :meth:`RuleSet.evaluate`
looks the bucket up (a phase without rules costs one dict lookup and returns a
shared ``pass`` verdict), builds ONE ``cel.Context`` holding only those
namespaces and functions, then executes the bucket's programs in order on that
context.  Converting Python values into CEL costs about 2.5 µs per dict entry
(far more than running a typical condition), so each namespace is first
projected onto the fields the bucket's conditions read: a phase whose rules
read ``client.ip`` and ``tls.active`` converts two values, not the ~60 of a
full context.  The projection is complete by construction: the loader records
every path a condition touches (a whole object when it is indexed or passed
to a function).

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
from ._fields import FIELDS, default_context, read_path
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


#: which part of a namespace to copy into CEL: ``True`` = the whole value
_Projection = dict[str, "_Projection | bool"]


@final
@dataclass(frozen=True, slots=True)
class _Bucket:
    rules: tuple[CompiledRule, ...]
    #: namespace -> the fields of it that the bucket's conditions read
    roots: tuple[tuple[str, _Projection | bool], ...]
    functions: tuple[tuple[str, Callable[..., Any]], ...]


def _add_path(tree: _Projection, parts: list[str]) -> None:
    head, rest = parts[0], parts[1:]
    if not rest:
        tree[head] = True
        return
    node = tree.get(head)
    if node is True:
        return  # the whole subtree is copied already
    if not isinstance(node, dict):
        node = tree[head] = {}
    _add_path(node, rest)


def _field_of(path: str) -> str:
    """``http.headers.host`` -> ``http.headers``: a map is copied whole (``has()`` must see it)."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in FIELDS:
            return ".".join(parts[:i])
    return path


def _project(value: Any, spec: _Projection | bool, default: Any) -> Any:
    """The part of ``value`` that ``spec`` names; absent keys take their zero value."""
    if spec is True or not isinstance(spec, dict) or not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, sub in spec.items():
        zero = default.get(key) if isinstance(default, Mapping) else None
        item = value.get(key, zero)
        out[key] = _project(item, sub, zero)
    return out


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
            tree: _Projection = {}
            functions: dict[str, Callable[..., Any]] = {}
            for rule in bucket_rules:
                for path in rule.reads:
                    _add_path(tree, _field_of(path).split("."))
                if rule.lists:
                    tree["lists"] = True
                for name in rule.program.functions():
                    if name in EXTRA_FUNCTIONS:
                        functions[name] = EXTRA_FUNCTIONS[name] or in_list
            self._index[key] = _Bucket(
                tuple(bucket_rules), tuple(tree.items()), tuple(functions.items())
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
        values: dict[str, Any] = {}
        ctx = Context()
        for root, spec in bucket.roots:
            if root == "lists":
                value: Any = self._handles
            elif root == "risk":
                value = {"score": risk_score}
            else:
                default = self._defaults[root]
                value = context.get(root)
                value = _project(default if value is None else value, spec, default)
                if root == "client":
                    value = _normalize_client(value)
                elif root == "session" and isinstance(value, Mapping) and "phase" in value:
                    value = {**value, "phase": phase}
            try:
                ctx.add_variable(root, value)
            except (ValueError, TypeError):
                continue  # rules reading it fail with an evaluation error, counted
            values[root] = value
        for name, function in bucket.functions:
            ctx.add_function(name, function)

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
            matches.append(Match(rule, detect, {p: read_path(values, p) for p in rule.reads}))
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
