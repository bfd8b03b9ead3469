"""Reputation of a source: falls with failures, refusals and bans; recovers with time.

Contract: :meth:`Reputation.ops_for` gives the operations that read an
address's reputation (one round trip, at connect), :meth:`Reputation.score`
turns their results into ``client.reputation`` (0 = nothing known,
negative = bad), and :meth:`Reputation.note` gives the operations recording
one bad event.  The counts live in sliding windows, so the score recovers on
its own: a failed login weighs 1 for a day, a policy refusal 3 for a day, a
ban 20 for a week.  The address's network (IPv6 /64) counts at half weight,
so a sprayer hopping within its /64 is not a stranger.
"""

from __future__ import annotations

from typing import Final, Literal, final

from mailmoat.state.ops import Count, Op, Peek, normalize_ip

from .login import prefix_of

Event = Literal["failure", "refusal", "ban"]
#: event -> (weight, window seconds)
WEIGHTS: Final[dict[str, tuple[int, float]]] = {
    "failure": (1, 86400.0),
    "refusal": (3, 86400.0),
    "ban": (20, 7 * 86400.0),
}


@final
class Reputation:
    def __init__(self, v6_prefix: int = 64) -> None:
        self.v6_prefix = v6_prefix

    def _keys(self, ip: str) -> list[tuple[str, str, float, int]]:
        addr = normalize_ip(ip)
        net = prefix_of(addr, self.v6_prefix)
        keys = []
        for event, (weight, window) in WEIGHTS.items():
            keys.append((f"rep:{event}:ip:{addr}", event, window, weight * 2))
            if net != addr:
                keys.append((f"rep:{event}:pfx:{net}", event, window, weight))
        return keys

    def ops_for(self, ip: str) -> list[Op]:
        """Read the counts behind ``ip``'s reputation."""
        return [Peek(key, window) for key, _, window, _ in self._keys(ip)]

    def score(self, ip: str, results: list[object]) -> int:
        """``client.reputation`` from the results of :meth:`ops_for` (half-points rounded down)."""
        total = 0
        for (_, _, _, weight), value in zip(self._keys(ip), results, strict=False):
            if isinstance(value, int):
                total += weight * value
        return -(total // 2)

    def note(self, ip: str, event: Event) -> list[Op]:
        """Record one bad event of ``ip``."""
        return [Count(key, window) for key, kind, window, _ in self._keys(ip) if kind == event]
