"""Prometheus metrics counted from events (docs/metrics.md): unit tests and one node end to end."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from conftest import StartNode
from mailmoat.demo.postfix import PostfixInstance
from mailmoat.events import Emitter, NodeMetrics
from test_admin_api import node_config
from test_smtp_e2e import DOMAIN, make_message, unique

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: NodeMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def series(got: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in got if n == name]


SMTP = {"session.protocol": "smtp", "session.listener": "smtp", "session.id": "s1"}


def event(
    action: str, kind: str = "session", outcome: str = "unknown", **fields: Any
) -> dict[str, Any]:
    return {
        "event.action": action,
        "event.kind": kind,
        "event.outcome": outcome,
        **SMTP,
        **{k.replace("__", "."): v for k, v in fields.items()},
    }


def feed(metrics: NodeMetrics, *events: Mapping[str, Any]) -> None:
    for e in events:
        metrics(e)


def test_sessions_are_counted_by_close_reason_with_active_gauge_and_duration() -> None:
    m = NodeMetrics()
    feed(
        m,
        event("session.open"),
        event("session.open"),
        event("session.open", session__protocol="imap", session__listener="imaps"),
        event(
            "session.close",
            outcome="failure",
            session__close_reason="policy_deny",
            session__duration_ms=1500.0,
        ),
        event(
            "session.close",
            outcome="success",
            session__close_reason="client_quit",
            session__duration_ms=20.0,
        ),
    )
    got = samples(m)
    base = {"protocol": "smtp", "listener": "smtp"}
    assert (
        value(got, "mailmoat_sessions_total", **base, outcome="failure", close_reason="policy_deny")
        == 1
    )
    assert (
        value(got, "mailmoat_sessions_total", **base, outcome="success", close_reason="client_quit")
        == 1
    )
    assert value(got, "mailmoat_sessions_active", **base) == 0
    assert value(got, "mailmoat_sessions_active", protocol="imap", listener="imaps") == 1
    h = "mailmoat_session_duration_seconds"
    assert value(got, h + "_count", **base) == 2
    assert value(got, h + "_sum", **base) == pytest.approx(1.52)
    assert value(got, h + "_bucket", **base, le="0.025") == 1
    assert value(got, h + "_bucket", **base, le="1.0") == 1
    assert value(got, h + "_bucket", **base, le="2.5") == 2
    assert value(got, h + "_bucket", **base, le="600.0") == 2
    # a close without its open (a node restarted) never drives the gauge below 0
    feed(m, event("session.close", outcome="failure", session__close_reason="shutdown"))
    assert value(samples(m), "mailmoat_sessions_active", **base) == 0


def test_verdicts_bans_and_thresholds_by_rule() -> None:
    m = NodeMetrics()
    feed(
        m,
        event("rule.match", "verdict", "failure", rule__id="T-HELO", verdict__action="deny"),
        event("rule.match", "verdict", "failure", rule__id="T-HELO", verdict__action="deny"),
        event("rule.match", "verdict", "success", rule__id="T-LOG", verdict__action="log"),
        event("client.banned", "verdict", "failure", verdict__action="deny"),
        event("client.banned", "verdict", "failure", verdict__action="detect"),
        event("risk.threshold", "verdict", "failure", risk__score=80, verdict__action="reject"),
        event("client.ban", "verdict", "success", rule__id="T-BAN", ban__seconds=600.0),
        event("client.ban", "verdict", "success", rule__id=None, ban__seconds=600.0),
    )
    got = samples(m)
    v = "mailmoat_verdicts_total"
    assert value(got, v, rule_id="T-HELO", action="deny") == 2
    assert value(got, v, rule_id="T-LOG", action="log") == 1
    assert value(got, v, rule_id="ban-list", action="deny") == 1
    assert value(got, v, rule_id="ban-list", action="detect") == 1
    assert value(got, v, rule_id="risk-threshold", action="reject") == 1
    assert len(series(got, v)) == 5
    assert value(got, "mailmoat_bans_total", rule_id="T-BAN") == 1
    assert value(got, "mailmoat_bans_total", rule_id="none") == 1


def test_auth_attempts_by_protocol_and_outcome_never_by_user() -> None:
    m = NodeMetrics()
    user = "alice.secret-user@example.org"
    feed(
        m,
        event("auth.attempt", outcome="success", auth__user=user, auth__mechanism="PLAIN"),
        event("auth.attempt", outcome="failure", auth__user=user, auth__mechanism="PLAIN"),
        event("auth.attempt", outcome="failure", auth__user="bob", auth__mechanism="LOGIN"),
        event("auth.attempt", outcome="failure", session__protocol="imap", auth__user=user),
    )
    got = samples(m)
    a = "mailmoat_auth_attempts_total"
    assert value(got, a, protocol="smtp", outcome="success") == 1
    assert value(got, a, protocol="smtp", outcome="failure") == 2
    assert value(got, a, protocol="imap", outcome="failure") == 1
    assert user.encode() not in m.render()[0]
    assert b"bob" not in m.render()[0]


def test_tls_handshakes_by_leg_version_and_outcome() -> None:
    m = NodeMetrics()
    feed(
        m,
        event("tls.handshake", outcome="success", tls__leg="client", tls__version="TLSv1.3"),
        event("tls.handshake", outcome="success", tls__leg="client", tls__version="TLSv1.3"),
        event("tls.handshake", outcome="success", tls__leg="backend", tls__version="TLSv1.2"),
        # a refused handshake has no negotiated version
        event("tls.handshake", outcome="failure", tls__leg="client", error__message="no"),
        event("tls.handshake", outcome="success", tls__leg="sideways", tls__version="TLSv1.3"),
    )
    got = samples(m)
    t = "mailmoat_tls_handshakes_total"
    assert value(got, t, leg="client", version="TLSv1.3", outcome="success") == 2
    assert value(got, t, leg="backend", version="TLSv1.2", outcome="success") == 1
    assert value(got, t, leg="client", version="none", outcome="failure") == 1
    assert value(got, t, leg="other", version="TLSv1.3", outcome="success") == 1


def test_handshake_and_backend_connect_latencies() -> None:
    m = NodeMetrics()
    feed(
        m,
        event("tls.handshake", outcome="success", tls__leg="client", tls__handshake_ms=3.2),
        event("tls.handshake", outcome="success", tls__leg="client", tls__handshake_ms=40.0),
        event("tls.handshake", outcome="failure", tls__leg="backend", tls__handshake_ms=0.4),
        event("tls.handshake", outcome="success", tls__leg="client"),  # untimed: counted only
        event("session.close", session__close_reason="client_quit", backend__connect_ms=0.8),
        event("session.close", session__close_reason="backend_unavailable"),  # never connected
    )
    got = samples(m)
    h = "mailmoat_tls_handshake_seconds"
    assert value(got, f"{h}_count", leg="client", outcome="success") == 2
    assert value(got, f"{h}_sum", leg="client", outcome="success") == pytest.approx(0.0432)
    assert value(got, f"{h}_bucket", leg="client", outcome="success", le="0.005") == 1
    assert value(got, f"{h}_bucket", leg="client", outcome="success", le="0.05") == 2
    assert value(got, f"{h}_count", leg="backend", outcome="failure") == 1
    c = "mailmoat_backend_connect_seconds"
    assert value(got, f"{c}_count", protocol="smtp", listener="smtp") == 1
    assert value(got, f"{c}_bucket", protocol="smtp", listener="smtp", le="0.001") == 1


def test_http_requests_by_status_with_their_latency() -> None:
    m = NodeMetrics()
    m.observe_http_request("web", 200, 0.004)
    m.observe_http_request("web", 200, 0.2)
    m.observe_http_request("web", 502, 2.0)
    m.observe_http_request("web", 400, float("nan"))  # counted, not timed
    m.observe_http_request("web", "x" * 500, 0.1)  # type: ignore[arg-type]  # bounded
    got = samples(m)
    r, d = "mailmoat_http_requests_total", "mailmoat_http_request_duration_seconds"
    assert value(got, r, listener="web", status="200") == 2
    assert value(got, r, listener="web", status="502") == 1
    assert value(got, r, listener="web", status="400") == 1
    assert value(got, r, listener="web", status="other") == 1
    assert value(got, f"{d}_count", listener="web") == 4
    assert value(got, f"{d}_bucket", listener="web", le="0.005") == 1
    assert value(got, "mailmoat_metrics_errors_total") == 0


def test_journal_drops_are_summed_and_alerts_counted() -> None:
    m = NodeMetrics()
    assert value(samples(m), "mailmoat_journal_dropped_events_total") == 0  # there before any drop
    feed(
        m,
        event("journal.dropped", "alert", "failure", journal__dropped=7),
        event("journal.dropped", "alert", "failure", journal__dropped=3),
        event("tls.starttls_injection", "alert", "failure"),
        event("smtp.message", outcome="success"),  # not an alert
    )
    got = samples(m)
    assert value(got, "mailmoat_journal_dropped_events_total") == 10
    assert value(got, "mailmoat_alerts_total", action="journal.dropped") == 2
    assert value(got, "mailmoat_alerts_total", action="tls.starttls_injection") == 1
    assert len(series(got, "mailmoat_alerts_total")) == 2


def test_rule_reloads_by_trigger_and_outcome_and_loaded_rules() -> None:
    m = NodeMetrics()
    audit = {"session.protocol": None, "session.listener": None}
    feed(
        m,
        {
            **event("rules.reload", "audit", "success", rules__trigger="start", rules__count=5),
            **audit,
        },
        {
            **event("rules.reload", "audit", "failure", rules__trigger="sighup", rules__count=5),
            **audit,
        },
        {
            **event("rules.reload", "audit", "success", rules__trigger="admin", rules__count=7),
            **audit,
        },
        {
            **event("rules.reload", "audit", "success", rules__trigger="sighup", rules__count=7),
            **audit,
        },
    )
    got = samples(m)
    r = "mailmoat_rules_reloads_total"
    assert value(got, r, trigger="start", outcome="success") == 1
    assert value(got, r, trigger="sighup", outcome="failure") == 1
    assert value(got, r, trigger="sighup", outcome="success") == 1
    assert value(got, r, trigger="admin", outcome="success") == 1
    assert value(got, "mailmoat_rules_loaded") == 7


def test_label_values_are_bounded() -> None:
    m = NodeMetrics()
    for i in range(1200):
        m(event("rule.match", "verdict", "failure", rule__id=f"R-{i}", verdict__action="deny"))
    m(event("rule.match", "verdict", "failure", rule__id="R-0", verdict__action="deny"))
    m(event("rule.match", "verdict", "failure", rule__id="x" * 1000, verdict__action="deny"))
    got = samples(m)
    v = "mailmoat_verdicts_total"
    assert len(series(got, v)) == 501  # 500 rule ids and "other"
    assert value(got, v, rule_id="R-0", action="deny") == 2
    assert value(got, v, rule_id="R-499", action="deny") == 1
    assert value(got, v, rule_id="R-500", action="deny") is None
    assert value(got, v, rule_id="other", action="deny") == 701
    # closed sets: an unheard-of close reason or outcome is "other", never a new series each time
    for i in range(50):
        m(
            event(
                "session.close",
                outcome=f"weird-{i}",
                session__close_reason=f"made_up_{i}",
                session__protocol=["not", "a", "string"],
            )
        )
    got = samples(m)
    assert series(got, "mailmoat_sessions_total") == [
        {"protocol": "other", "listener": "smtp", "outcome": "other", "close_reason": "other"}
    ]
    assert (
        value(
            got,
            "mailmoat_sessions_total",
            protocol="other",
            listener="smtp",
            outcome="other",
            close_reason="other",
        )
        == 50
    )


def test_a_smaller_cap_applies_per_label() -> None:
    m = NodeMetrics(max_label_values=2)
    for trigger in ("start", "sighup", "watch", "admin"):
        m(event("rules.reload", "audit", "success", rules__trigger=trigger, rules__count=1))
    got = samples(m)
    assert {s["trigger"] for s in series(got, "mailmoat_rules_reloads_total")} == {
        "start",
        "sighup",
        "other",
    }


class Exploding(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("boom")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("boom")

    def __len__(self) -> int:
        return 1


def test_a_malformed_event_never_raises_and_is_counted() -> None:
    m = NodeMetrics()
    bad: list[Any] = [
        None,
        {},
        {"event.action": 5},
        Exploding(),
        event("journal.dropped", "alert", "failure", journal__dropped="many"),
    ]
    for e in bad:
        m(e)
    # odd values inside an otherwise good event: counted, the odd field ignored
    m(
        event(
            "session.close",
            outcome="success",
            session__close_reason="client_quit",
            session__duration_ms="x",
        )
    )
    m(
        event(
            "session.close",
            outcome="success",
            session__close_reason="client_quit",
            session__duration_ms=float("nan"),
        )
    )
    m(event("rules.reload", "audit", "success", rules__trigger="start", rules__count=True))
    got = samples(m)
    assert value(got, "mailmoat_metrics_errors_total") == 5
    assert value(got, "mailmoat_journal_dropped_events_total") == 0
    assert (
        value(
            got,
            "mailmoat_sessions_total",
            protocol="smtp",
            listener="smtp",
            outcome="success",
            close_reason="client_quit",
        )
        == 2
    )
    # no duration was observed
    assert series(got, "mailmoat_session_duration_seconds_count") == []
    assert value(got, "mailmoat_rules_loaded") == 0


def test_each_node_has_its_own_registry() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    emitter = Emitter("n1", [a])
    emitter.emit("auth.attempt", {"session.protocol": "smtp"}, outcome="failure", session_id="s")
    assert (
        value(samples(a), "mailmoat_auth_attempts_total", protocol="smtp", outcome="failure") == 1
    )
    assert series(samples(b), "mailmoat_auth_attempts_total") == []
    assert (
        REGISTRY.get_sample_value(
            "mailmoat_auth_attempts_total", {"protocol": "smtp", "outcome": "failure"}
        )
        is None
    )


# --------------------------------------------------------------------------- end to end

RULES = """
[[rule]]
id = "T-HELO"
name = "bad-helo"
phase = "helo"
when = 'glob(smtp.helo, "*.bad.example")'
action = "deny"
"""


@pytest.mark.e2e
async def test_a_node_counts_its_sessions_and_verdicts(
    postfix: PostfixInstance, start_node: StartNode, tmp_path: Path
) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "50-test.toml").write_text(RULES)
    rn = await start_node(node_config(postfix.ports.smtp, admin=False))
    assert rn.node.metrics is not None
    port = rn.port("smtp")

    def refused() -> int:
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
        try:
            code, _ = s.ehlo("host.bad.example")
        finally:
            s.close()
        return code

    def clean() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=20) as s:
            return s.sendmail(f"a@{DOMAIN}", [f"alice@{DOMAIN}"], make_message(unique("metrics")))

    assert await trio.to_thread.run_sync(refused) == 554
    await rn.wait_for("session.close", session__close_reason="policy_deny")
    assert await trio.to_thread.run_sync(clean) == {}
    await rn.wait_for("session.close", session__close_reason="client_quit")

    got = samples(rn.node.metrics)
    s = "mailmoat_sessions_total"
    base = {"protocol": "smtp", "listener": "smtp"}
    assert value(got, s, **base, outcome="failure", close_reason="policy_deny") == 1
    assert value(got, s, **base, outcome="success", close_reason="client_quit") == 1
    assert len(series(got, s)) == 2
    assert value(got, "mailmoat_verdicts_total", rule_id="T-HELO", action="deny") == 1
    assert value(got, "mailmoat_sessions_active", **base) == 0
    assert value(got, "mailmoat_session_duration_seconds_count", **base) == 2
    # both sessions reached Postfix: two timed backend connections
    assert value(got, "mailmoat_backend_connect_seconds_count", **base) == 2
    assert value(got, "mailmoat_rules_reloads_total", trigger="start", outcome="success") == 1
    assert value(got, "mailmoat_rules_loaded") == 1
