"""Prometheus metrics of one node, counted from its events (docs/metrics.md).

:class:`NodeMetrics` is an event sink: the emitter hands it every event and it
turns the few that matter into counters, gauges and histograms in a
:class:`~prometheus_client.CollectorRegistry` of its own (never the global
one, so that several nodes in one process do not share numbers).  The admin
API serves :meth:`NodeMetrics.render` on ``/metrics``.

A sink must never raise and never block: a malformed event is counted in
``mailmoat_metrics_errors_total`` and otherwise ignored, and every label
value is bounded.  Values from a closed set (outcomes, close reasons, TLS
legs) map anything else to ``other``; open-ended values (rule ids, listener
names, TLS versions, actions) are kept for the first :data:`MAX_LABEL_VALUES`
distinct values of each label of each metric and become ``other`` beyond, so
that no client can grow the node's memory by sending odd input.  No label
ever carries a user name, an address or a session id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from . import reasons

#: distinct values one label of one metric may take before the rest is ``other``
MAX_LABEL_VALUES: Final = 500
#: a label value longer than this is ``other`` (rule ids and names are short)
MAX_LABEL_LENGTH: Final = 128
OTHER: Final = "other"
NONE: Final = "none"

OUTCOMES: Final = frozenset({"success", "failure", "unknown"})
TLS_LEGS: Final = frozenset({"client", "backend"})
#: every ``session.close_reason`` the protocol sessions and drivers set
#: (docs/events.md), plus ``unknown`` (a session that set none)
CLOSE_REASONS: Final = reasons.ALL
#: seconds: from a refused pregreeter (milliseconds) to a long IMAP IDLE
SESSION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
#: seconds: a loopback connect (well under a millisecond) to a backend that
#: answers late; a TLS handshake from a LAN client to one over a slow link
CONNECT_BUCKETS: Final = (0.0005, 0.001, 0.0025, *SESSION_BUCKETS[:11])  # ... 10 s


def _number(value: object) -> float | None:
    """A finite, non-negative number, or ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0:
        return None
    return number


@final
class _Bounded:
    """Label values with a cap on how many distinct ones each label keeps."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: dict[str, set[str]] = {}

    def closed(self, value: object, allowed: frozenset[str]) -> str:
        if value is None or value == "":
            return NONE
        return value if isinstance(value, str) and value in allowed else OTHER

    def open(self, key: str, value: object) -> str:
        if value is None or value == "":
            return NONE
        if isinstance(value, bool) or not isinstance(value, str | int):
            return OTHER
        text = str(value)
        if len(text) > MAX_LABEL_LENGTH:
            return OTHER
        seen = self.seen.setdefault(key, set())
        if text in seen:
            return text
        if len(seen) >= self.cap:
            return OTHER
        seen.add(text)
        return text


@final
class NodeMetrics:
    """An event sink that keeps the node's Prometheus metrics."""

    def __init__(self, *, max_label_values: int = MAX_LABEL_VALUES) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = _Bounded(max_label_values)
        self._active: dict[tuple[str, str], int] = {}
        r = self.registry

        # every metric in this node's own registry, labels as varargs
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: Sequence[float], *labels: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.sessions = counter(
            "mailmoat_sessions",
            "Sessions ended, by protocol, listener, outcome and close reason",
            "protocol",
            "listener",
            "outcome",
            "close_reason",
        )
        self.sessions_active = gauge(
            "mailmoat_sessions_active",
            "Sessions open now, by protocol and listener",
            "protocol",
            "listener",
        )
        self.session_duration = histogram(
            "mailmoat_session_duration_seconds",
            "How long sessions lasted, from accept to close",
            SESSION_BUCKETS,
            "protocol",
            "listener",
        )
        self.backend_connect = histogram(
            "mailmoat_backend_connect_seconds",
            "How long connecting to the backend took (TCP, PROXY header, implicit TLS)",
            CONNECT_BUCKETS,
            "protocol",
            "listener",
        )
        self.tls_handshake_time = histogram(
            "mailmoat_tls_handshake_seconds",
            "How long TLS handshakes took, by leg (client or backend) and outcome",
            CONNECT_BUCKETS,
            "leg",
            "outcome",
        )
        self.http_requests = counter(
            "mailmoat_http_requests",
            "Requests an http listener answered, by listener and status sent to the client",
            "listener",
            "status",
        )
        self.http_request_duration = histogram(
            "mailmoat_http_request_duration_seconds",
            "From a request's head to the end of its answer (backend time included)",
            CONNECT_BUCKETS,
            "listener",
        )
        self.verdicts = counter(
            "mailmoat_verdicts",
            "Verdicts by rule and what was done (rule.match, client.banned, risk.threshold)",
            "rule_id",
            "action",
        )
        self.auth_attempts = counter(
            "mailmoat_auth_attempts",
            "Login attempts relayed to the backend, by protocol and outcome",
            "protocol",
            "outcome",
        )
        self.tls_handshakes = counter(
            "mailmoat_tls_handshakes",
            "TLS handshakes by leg (client or backend), version and outcome",
            "leg",
            "version",
            "outcome",
        )
        self.journal_dropped = counter(
            "mailmoat_journal_dropped_events",
            "Events the journal writer could not take (its queue was full)",
        )
        self.rules_reloads = counter(
            "mailmoat_rules_reloads",
            "Rule loads and reloads by trigger and outcome",
            "trigger",
            "outcome",
        )
        self.rules_loaded = gauge(
            "mailmoat_rules_loaded",
            "Rules in force (after a failed reload: the previous set, still in force)",
        )
        self.alerts = counter(
            "mailmoat_alerts",
            "Alert events (event.kind alert) by action",
            "action",
        )
        self.bans = counter(
            "mailmoat_bans",
            "Client addresses banned, by the rule that decided the ban",
            "rule_id",
        )
        self.errors = counter(
            "mailmoat_metrics_errors",
            "Events the metrics sink could not count (malformed)",
        )
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "session.open": self._session_open,
            "session.close": self._session_close,
            "rule.match": self._rule_match,
            "client.banned": self._client_banned,
            "risk.threshold": self._risk_threshold,
            "client.ban": self._client_ban,
            "auth.attempt": self._auth_attempt,
            "tls.handshake": self._tls_handshake,
            "journal.dropped": self._journal_dropped,
            "rules.reload": self._rules_reload,
        }

    # ------------------------------------------------------------------ the sink

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            action = event.get("event.action")
            if not isinstance(action, str):
                raise TypeError("event.action is not a string")  # noqa: TRY301 - counted below
            handler = self._handlers.get(action)
            if handler is not None:
                handler(event)
            if event.get("event.kind") == "alert":
                self.alerts.labels(self._labels.open("alerts.action", action)).inc()
        except Exception:  # noqa: BLE001 - a sink never raises: count it and go on
            self.errors.inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ------------------------------------------------------------------ handlers

    def observe_http_request(self, listener: str, status: int, seconds: float) -> None:
        """One request an http listener answered (called by the driver: a
        request that passes is not an event, so this is the one figure that
        does not come through :meth:`__call__`)."""
        try:
            name = self._labels.open("http.listener", listener)
            code = self._labels.open("http.status", status)
            self.http_requests.labels(name, code).inc()
            if math.isfinite(seconds) and seconds >= 0:
                self.http_request_duration.labels(name).observe(seconds)
        except Exception:  # noqa: BLE001 - like a sink: never raise into the proxy
            self.errors.inc()

    def _where(self, key: str, event: Mapping[str, Any]) -> tuple[str, str]:
        return (
            self._labels.open(f"{key}.protocol", event.get("session.protocol")),
            self._labels.open(f"{key}.listener", event.get("session.listener")),
        )

    def _outcome(self, event: Mapping[str, Any]) -> str:
        return self._labels.closed(event.get("event.outcome"), OUTCOMES)

    def _session_open(self, event: Mapping[str, Any]) -> None:
        where = self._where("sessions_active", event)
        self._active[where] = self._active.get(where, 0) + 1
        self.sessions_active.labels(*where).set(self._active[where])

    def _session_close(self, event: Mapping[str, Any]) -> None:
        where = self._where("sessions_active", event)
        if self._active.get(where, 0) > 0:  # never below 0 for a close without an open
            self._active[where] -= 1
            self.sessions_active.labels(*where).set(self._active[where])
        protocol, listener = self._where("sessions", event)
        reason = self._labels.closed(event.get("session.close_reason"), CLOSE_REASONS)
        self.sessions.labels(protocol, listener, self._outcome(event), reason).inc()
        ms = _number(event.get("session.duration_ms"))
        if ms is not None:
            self.session_duration.labels(*self._where("duration", event)).observe(ms / 1000)
        ms = _number(event.get("backend.connect_ms"))
        if ms is not None:
            self.backend_connect.labels(*self._where("connect", event)).observe(ms / 1000)

    def _verdict(self, rule_id: object, event: Mapping[str, Any]) -> None:
        self.verdicts.labels(
            self._labels.open("verdicts.rule_id", rule_id),
            self._labels.open("verdicts.action", event.get("verdict.action")),
        ).inc()

    def _rule_match(self, event: Mapping[str, Any]) -> None:
        self._verdict(event.get("rule.id"), event)

    def _client_banned(self, event: Mapping[str, Any]) -> None:
        self._verdict("ban-list", event)

    def _risk_threshold(self, event: Mapping[str, Any]) -> None:
        self._verdict("risk-threshold", event)

    def _client_ban(self, event: Mapping[str, Any]) -> None:
        self.bans.labels(self._labels.open("bans.rule_id", event.get("rule.id"))).inc()

    def _auth_attempt(self, event: Mapping[str, Any]) -> None:
        protocol = self._labels.open("auth.protocol", event.get("session.protocol"))
        self.auth_attempts.labels(protocol, self._outcome(event)).inc()

    def _tls_handshake(self, event: Mapping[str, Any]) -> None:
        leg = self._labels.closed(event.get("tls.leg"), TLS_LEGS)
        outcome = self._outcome(event)
        self.tls_handshakes.labels(
            leg, self._labels.open("tls.version", event.get("tls.version")), outcome
        ).inc()
        ms = _number(event.get("tls.handshake_ms"))
        if ms is not None:
            self.tls_handshake_time.labels(leg, outcome).observe(ms / 1000)

    def _journal_dropped(self, event: Mapping[str, Any]) -> None:
        dropped = _number(event.get("journal.dropped"))
        if dropped is None:
            raise TypeError("journal.dropped is not a count")
        self.journal_dropped.inc(dropped)

    def _rules_reload(self, event: Mapping[str, Any]) -> None:
        self.rules_reloads.labels(
            self._labels.open("rules.trigger", event.get("rules.trigger")), self._outcome(event)
        ).inc()
        count = _number(event.get("rules.count"))
        if count is not None:
            self.rules_loaded.set(count)
