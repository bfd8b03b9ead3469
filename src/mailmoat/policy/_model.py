"""Values of the policy package: compiled rules, matches, verdicts, counters.

Contract: everything here is an immutable value except :class:`HitCounters`,
the one mutable object, which a :class:`~mailmoat.policy.RuleSet` owns and
hands over to its successor on reload (``carry_counters_from``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, final

from mailmoat.errors import MailmoatError, RuleError

from ._cel import Program

Action = Literal["allow", "reject", "deny", "tarpit", "score", "tag", "ban", "log"]
ACTIONS: Final[tuple[Action, ...]] = (
    "allow",
    "reject",
    "deny",
    "tarpit",
    "score",
    "tag",
    "ban",
    "log",
)
Outcome = Literal["pass", "allow", "reject", "deny", "tarpit", "ban"]
Severity = Literal["info", "low", "medium", "high", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = ("info", "low", "medium", "high", "critical")
Mode = Literal["enforce", "detect"]
MODES: Final[tuple[Mode, ...]] = ("enforce", "detect")

#: the reply a session sends when the deciding rule has none for its protocol;
#: ``tarpit``, ``allow`` and ``pass`` change no reply.  The IMAP session
#: prefixes the command tag (``reject``) or ``*`` (``deny``/``ban``).
DEFAULT_REPLIES: Final[Mapping[str, Mapping[str, str]]] = {
    "smtp": {
        "reject": "550 5.7.1 Rejected by policy",
        "deny": "554 5.7.1 Access denied",
        "ban": "554 5.7.1 Access denied",
    },
    "imap": {
        "reject": "NO [ALERT] Rejected by policy",
        "deny": "BYE Access denied",
        "ban": "BYE Access denied",
    },
    "http": {"reject": "403", "deny": "403", "ban": "403"},
}


@final
class RuleErrors(MailmoatError):
    """Every problem found while loading rule files (or a cases file)."""

    def __init__(self, errors: Sequence[RuleError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = tuple(errors)


@final
@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    name: str
    description: str
    phase: str
    protocols: frozenset[str]
    action: Action
    reply: Mapping[str, str]
    severity: Severity
    tags: tuple[str, ...]
    references: tuple[str, ...]
    #: points added by ``action = "score"`` (0 otherwise)
    score: int
    #: seconds, for ``action = "tarpit"`` (0 otherwise)
    tarpit: float
    #: seconds, for ``action = "ban"`` (0 otherwise)
    ban: float
    #: the rule's own mode; the rule set's mode may still be ``detect``
    mode: Mode
    enabled: bool
    source: str
    line: int | None
    #: the condition as written
    when: str
    #: the context fields the condition reads (dotted paths, in first-use order)
    reads: tuple[str, ...]
    #: named lists the condition uses
    lists: tuple[str, ...]
    program: Program
    #: ``(cel_variable, dotted_path, kind)`` the compiled program reads (see _expr.flatten_paths)
    variables: tuple[tuple[str, str, str], ...] = ()

    def __repr__(self) -> str:
        return f"CompiledRule({self.id!r}, {self.action!r}, {self.source}:{self.line})"


@final
@dataclass(frozen=True, slots=True)
class Scoring:
    """``[scoring]``: thresholds on the session's risk score (``None`` = unused)."""

    reject: int | None
    deny: int | None
    source: str
    line: int | None


@final
@dataclass(frozen=True, slots=True)
class Match:
    rule: CompiledRule
    #: the rule matched but was not enforced (detect mode, global or its own)
    detect_only: bool
    #: the values of the fields the condition read, by dotted name
    fields: Mapping[str, Any]


@final
@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of evaluating one phase."""

    #: the enforced outcome
    action: Outcome
    #: the rule that decided it; ``None`` for ``pass`` and for score thresholds
    rule: CompiledRule | None
    #: every rule that matched, in evaluation order (log, tag, score, detect-only too)
    matches: tuple[Match, ...]
    #: the deciding rule's reply for the protocol; ``None`` = :data:`DEFAULT_REPLIES`
    reply: str | None
    #: seconds to delay the reply (the largest matching tarpit), also with reject/deny
    delay: float
    #: seconds to ban ``client.ip`` for (``action == "ban"``)
    ban: float
    #: points added to the risk score by this evaluation
    score: int
    #: tags added by ``tag`` rules
    tags: tuple[str, ...]
    #: in detect mode: the action that enforcing the detect-only rules would have given
    would_have: Outcome | None
    #: ``"reject"``/``"deny"`` when a ``[scoring]`` threshold decided the verdict
    threshold: Literal["reject", "deny"] | None = None

    @property
    def blocked(self) -> bool:
        """The command (reject) or the session (deny, ban) is refused."""
        return self.action in ("reject", "deny", "ban")


PASS: Final = Verdict(
    action="pass",
    rule=None,
    matches=(),
    reply=None,
    delay=0.0,
    ban=0.0,
    score=0,
    tags=(),
    would_have=None,
)


def default_reply(protocol: str, action: str) -> str | None:
    """The reply for ``action`` when the deciding rule gave none (``None``: no change)."""
    return DEFAULT_REPLIES.get(protocol, {}).get(action)


@final
class HitCounters:
    """Matches and evaluation errors per rule id; outlives rule sets across reloads."""

    __slots__ = ("errors", "hits", "last_error")

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    def hit(self, rule_id: str) -> None:
        self.hits[rule_id] = self.hits.get(rule_id, 0) + 1

    def error(self, rule_id: str, message: str) -> None:
        self.errors[rule_id] = self.errors.get(rule_id, 0) + 1
        self.last_error[rule_id] = message
