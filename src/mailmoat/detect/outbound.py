"""Outbound volume per authenticated user: the compromised-account signal.

Contract: for each message an authenticated user submits, :meth:`Outbound.ops`
records its recipients (count and distinct domains over ``window``, an hour
by default) and reads the user's baseline; :meth:`Outbound.assess` turns the
results into ``smtp.user_rcpt_rate`` (recipients in the window, this message
included), ``smtp.user_domains`` and ``smtp.user_burst``, and gives the
updated baseline to store.

The baseline is the highest hourly recipient count the user has reached
outside a burst, decaying slowly (2 % per message) so one busy day does not
raise the bar forever.  A burst is a rate above ``burst_factor`` times the
baseline and above ``min_burst`` recipients, once the user has sent
``learning_messages`` messages (before that, nothing is a burst).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, final

from mailmoat.state.ops import Count, Distinct, GetProfile, Op, PutProfile

DEFAULT_WINDOW: Final = 3600.0


@final
@dataclass(frozen=True, slots=True)
class OutboundFacts:
    rcpt_rate: int = 0
    domains: int = 0
    burst: bool = False
    baseline: float = 0.0

    def fields(self) -> dict[str, Any]:
        return {
            "user_rcpt_rate": self.rcpt_rate,
            "user_domains": self.domains,
            "user_burst": self.burst,
        }


@final
class Outbound:
    def __init__(
        self,
        *,
        window: float = DEFAULT_WINDOW,
        burst_factor: float = 5.0,
        min_burst: int = 50,
        learning_messages: int = 20,
    ) -> None:
        self.window = window
        self.burst_factor = burst_factor
        self.min_burst = min_burst
        self.learning_messages = learning_messages

    def ops(self, user: str, recipients: list[str], count: int | None = None) -> list[Op]:
        """``count``: recipients of the message when more than ``recipients`` lists."""
        who = user.casefold()
        ops: list[Op] = [
            Count(f"out:rcpt:{who}", self.window, max(1, count or len(recipients))),
            GetProfile(f"out:base:{who}"),
        ]
        domains = {r.rpartition("@")[2].casefold() for r in recipients if "@" in r}
        ops.extend(Distinct(f"out:dom:{who}", d, self.window) for d in sorted(domains)[:100])
        return ops

    def assess(self, results: list[Any]) -> tuple[OutboundFacts, Mapping[str, Any]]:
        rate = int(results[0]) if results and isinstance(results[0], int) else 0
        profile: dict[str, Any] = dict(results[1]) if len(results) > 1 and results[1] else {}
        domains = max((int(r) for r in results[2:] if isinstance(r, int)), default=0)
        baseline = float(profile.get("base", 0.0))
        messages = int(profile.get("n", 0))
        learning = messages < self.learning_messages
        burst = (
            not learning and rate > self.min_burst and rate > self.burst_factor * max(baseline, 1.0)
        )
        if not burst:
            baseline = max(baseline * 0.98, float(rate))
        new = {"base": round(baseline, 2), "n": messages + 1}
        return OutboundFacts(rate, domains, burst, baseline), new

    def save(self, user: str, profile: Mapping[str, Any]) -> list[Op]:
        return [PutProfile(f"out:base:{user.casefold()}", dict(profile), 90 * 86400.0)]
