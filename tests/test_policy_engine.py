"""Evaluating phases: actions, ordering, modes, scoring, counters, functions, lists."""

from __future__ import annotations

import bisect
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailmoat.policy import (
    DEFAULT_REPLIES,
    FIELDS,
    IpRanges,
    RuleSet,
    cidr,
    default_context,
    default_reply,
    glob,
    load_rules,
)


def rules(tmp_path: Path, text: str, *, mode: str = "enforce", name: str = "r.toml") -> RuleSet:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_rules([path], base_mode=mode)


def r(rid: str, when: str, action: str, phase: str = "auth", **extra: str) -> str:
    body = f'[[rule]]\nid = "{rid}"\nname = "{rid}"\nphase = "{phase}"\n'
    body += f"when = '{when}'\naction = \"{action}\"\n"
    body += "".join(f"{k} = {v}\n" for k, v in extra.items())
    return body + "\n"


def ctx(**fields: Any) -> dict[str, Any]:
    """default_context() with dotted overrides: ctx(**{"client.ip": "1.2.3.4"})."""
    c = default_context()
    for dotted, value in fields.items():
        *parents, leaf = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def ids(verdict: Any) -> list[str]:
    return [m.rule.id for m in verdict.matches]


def test_default_context_has_every_field_at_zero() -> None:
    c = default_context()
    assert c["client"]["geo"]["lat"] == 0.0
    assert c["smtp"]["rcpt_to"] == []
    assert c["http"]["headers"] == {}
    assert c["tls"]["active"] is False
    for name in FIELDS:
        node: Any = c
        for part in name.split("."):
            node = node[part]
    assert default_context()["smtp"]["rcpt_to"] is not c["smtp"]["rcpt_to"]


def test_phase_without_rules_passes(tmp_path: Path) -> None:
    rs = rules(tmp_path, r("R1", "true", "reject"))
    v = rs.evaluate("smtp", "helo", ctx())
    assert (v.action, v.rule, v.matches, v.blocked) == ("pass", None, (), False)


def test_reject_with_rule_reply_and_default(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r(
            "R1",
            "!tls.active",
            "reject",
            reply='{ smtp = "530 5.7.0 Must issue a STARTTLS command first" }',
        ).replace('phase = "auth"', 'phase = "auth"\nprotocols = ["smtp", "imap"]'),
    )
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, v.rule and v.rule.id, v.reply, v.blocked) == (
        "reject",
        "R1",
        "530 5.7.0 Must issue a STARTTLS command first",
        True,
    )
    v = rs.evaluate("imap", "auth", ctx())
    assert (v.action, v.reply) == ("reject", None)
    assert default_reply("imap", "reject") == "NO [ALERT] Rejected by policy"
    assert rs.evaluate("smtp", "auth", ctx(tls__active=True)).action == "pass"


def test_default_replies_table() -> None:
    assert DEFAULT_REPLIES["smtp"] == {
        "reject": "550 5.7.1 Rejected by policy",
        "deny": "554 5.7.1 Access denied",
        "ban": "554 5.7.1 Access denied",
    }
    assert DEFAULT_REPLIES["imap"]["deny"] == "BYE Access denied"
    assert DEFAULT_REPLIES["http"]["ban"] == "403"
    assert default_reply("smtp", "tarpit") is None


def test_first_deciding_rule_wins_and_ends(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r("L1", "true", "log")
        + r("D1", "true", "deny")
        + r("R1", "true", "reject")
        + r("L2", "true", "log"),
    )
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, v.rule and v.rule.id) == ("deny", "D1")
    assert ids(v) == ["L1", "D1"]
    assert rs.stats() == {"L1": 1, "D1": 1, "R1": 0, "L2": 0}


def test_allow_ends_the_phase(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        '[[list]]\nname = "trusted"\nkind = "cidr"\nitems = ["10.0.0.0/8"]\n\n'
        + r("A1", "client.ip in lists.trusted", "allow")
        + r("R1", "true", "reject"),
    )
    v = rs.evaluate("smtp", "auth", ctx(client__ip="10.2.3.4"))
    assert (v.action, ids(v), v.blocked) == ("allow", ["A1"], False)
    v = rs.evaluate("smtp", "auth", ctx(client__ip="11.2.3.4"))
    assert (v.action, ids(v)) == ("reject", ["R1"])


def test_ban(tmp_path: Path) -> None:
    rs = rules(tmp_path, r("B1", "login.failures_ip >= 10", "ban", ban='"1h"'))
    v = rs.evaluate("smtp", "auth", ctx(login__failures_ip=10))
    assert (v.action, v.ban, v.blocked) == ("ban", 3600.0, True)
    assert rs.evaluate("smtp", "auth", ctx(login__failures_ip=9)).action == "pass"


def test_tarpit_score_tag_continue(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r("T1", "true", "tarpit", tarpit='"2s"')
        + r("S1", "true", "score", score="3")
        + r("G1", "true", "tag", tags='["a", "b"]')
        + r("T2", "true", "tarpit", tarpit='"500ms"')
        + r("S2", "true", "score", score="4"),
    )
    v = rs.evaluate("smtp", "auth", ctx())
    assert ids(v) == ["T1", "S1", "G1", "T2", "S2"]
    assert (v.action, v.delay, v.score, v.tags) == ("tarpit", 2.0, 7, ("a", "b"))
    assert v.rule is not None
    assert v.rule.id == "T1"
    assert v.blocked is False


def test_tarpit_then_reject_keeps_delay(tmp_path: Path) -> None:
    rs = rules(tmp_path, r("T1", "true", "tarpit", tarpit='"10s"') + r("R1", "true", "reject"))
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, v.delay, v.rule and v.rule.id) == ("reject", 10.0, "R1")


def test_scoring_thresholds(tmp_path: Path) -> None:
    rs = rules(
        tmp_path, "[scoring]\nreject = 10\ndeny = 20\n\n" + r("S1", "true", "score", score="5")
    )
    assert rs.evaluate("smtp", "auth", ctx(), risk_score=4).action == "pass"
    v = rs.evaluate("smtp", "auth", ctx(), risk_score=5)
    assert (v.action, v.threshold, v.rule, v.score) == ("reject", "reject", None, 5)
    v = rs.evaluate("smtp", "auth", ctx(), risk_score=15)
    assert (v.action, v.threshold) == ("deny", "deny")


def test_scoring_does_not_override_allow(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        "[scoring]\nreject = 1\n\n"
        + r("S1", "true", "score", score="5")
        + r("A1", "true", "allow"),
    )
    assert rs.evaluate("smtp", "auth", ctx()).action == "allow"


def test_risk_score_field_is_the_argument(tmp_path: Path) -> None:
    rs = rules(tmp_path, r("R1", "risk.score > 7", "reject"))
    assert rs.evaluate("smtp", "auth", ctx(risk__score=100)).action == "pass"
    assert rs.evaluate("smtp", "auth", ctx(), risk_score=8).action == "reject"


def test_detect_mode_global(tmp_path: Path) -> None:
    rs = rules(tmp_path, r("L1", "true", "log") + r("R1", "true", "reject"), mode="detect")
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, v.would_have, v.rule) == ("pass", "reject", None)
    assert [(m.rule.id, m.detect_only) for m in v.matches] == [("L1", True), ("R1", True)]


def test_detect_mode_per_rule_continues_evaluation(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r("D1", "true", "deny", mode='"detect"') + r("T1", "true", "tarpit", tarpit='"1s"'),
    )
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, v.would_have, v.delay) == ("tarpit", "deny", 1.0)
    assert [(m.rule.id, m.detect_only) for m in v.matches] == [("D1", True), ("T1", False)]
    rs = rules(tmp_path, r("R1", "true", "reject", mode='"detect"') + r("R2", "true", "reject"))
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, v.would_have, v.rule and v.rule.id) == ("reject", None, "R2")


def test_detect_score_would_cross_threshold(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        "[scoring]\nreject = 5\n\n" + r("S1", "true", "score", score="5", mode='"detect"'),
    )
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, v.score, v.would_have) == ("pass", 0, "reject")


def test_has_indexing_by_protocol_and_phase(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r("R1", "true", "reject")
        + r("R2", "true", "reject", phase="helo", protocols='["smtp"]')
        + r("R3", "true", "reject", phase="data", enabled="false"),
    )
    assert [rs.has(p, "auth") for p in ("smtp", "imap", "http")] == [True, True, True]
    assert (rs.has("smtp", "helo"), rs.has("imap", "helo"), rs.has("smtp", "data")) == (
        True,
        False,
        False,
    )
    assert rs.evaluate("imap", "helo", ctx()).action == "pass"
    assert [x.id for x in rs.rules_for("smtp", "helo")] == ["R2"]


def test_counters_survive_reload(tmp_path: Path) -> None:
    old = rules(tmp_path, r("R1", "true", "log") + r("R2", "true", "log"))
    old.evaluate("smtp", "auth", ctx())
    old.evaluate("smtp", "auth", ctx())
    new = rules(tmp_path, r("R1", "true", "log") + r("R3", "true", "log"), name="s.toml")
    new.carry_counters_from(old)
    new.evaluate("smtp", "auth", ctx())
    assert new.stats() == {"R1": 3, "R3": 1}
    assert old.stats() == {"R1": 3, "R2": 2}


def test_runtime_error_is_no_match_and_counted(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r("E1", 'client.port + "x" == "y"', "reject")
        + r("E2", "smtp.helo", "reject")
        + r("E3", 'http.headers["host"] == "x"', "reject")
        + r("L1", "true", "log"),
    )
    v = rs.evaluate("smtp", "auth", ctx())
    assert (v.action, ids(v)) == ("pass", ["L1"])
    assert rs.error_stats() == {"E1": 1, "E2": 1, "E3": 1}
    assert rs.stats()["E1"] == 0
    assert "not bool" in rs.counters.last_error["E2"]


def test_fields_read_recorded_in_match(tmp_path: Path) -> None:
    rs = rules(tmp_path, r("R1", 'client.geo.country == "KP" && !tls.active', "reject"))
    assert rs.rules[0].reads == ("client.geo.country", "tls.active")
    v = rs.evaluate("smtp", "auth", ctx(client__geo__country="KP"))
    assert dict(v.matches[0].fields) == {"client.geo.country": "KP", "tls.active": False}


def test_ipv4_mapped_client_ip_is_normalized(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        '[[list]]\nname = "bad"\nkind = "ip"\nitems = ["192.0.2.7"]\n\n'
        + r("R1", 'client.ip == "192.0.2.7"', "log")
        + r("R2", "client.ip in lists.bad", "log")
        + r("R3", 'cidr(client.ip, "192.0.2.0/24")', "log"),
    )
    v = rs.evaluate("smtp", "auth", ctx(client__ip="::ffff:192.0.2.7"))
    assert ids(v) == ["R1", "R2", "R3"]
    assert v.matches[0].fields == {"client.ip": "192.0.2.7"}


def test_cidr_function() -> None:
    assert cidr("10.1.2.3", "10.0.0.0/8") is True
    assert cidr("::ffff:10.1.2.3", "10.0.0.0/8") is True
    assert cidr("11.1.2.3", "10.0.0.0/8") is False
    assert cidr("2001:db8::1", "2001:db8::/32") is True
    assert cidr("2001:db8::1", "10.0.0.0/8") is False
    assert cidr("not-an-ip", "10.0.0.0/8") is False
    assert cidr("10.1.2.3", "10.0.0.0/33") is False
    assert cidr(5, "10.0.0.0/8") is False
    assert cidr("10.0.0.1", "10.0.0.1") is True


def test_glob_function() -> None:
    assert glob("mail.example.org", "*.example.org") is True
    assert glob("MAIL.example.org", "mail.*") is False
    assert glob("a1", "a?") is True
    assert glob("ab", "a[!b]") is False
    assert glob("a\nb", "a*b") is True
    assert glob(3, "*") is False


def test_glob_and_cidr_in_conditions(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r(
            "H1",
            r'glob(smtp.helo, "[0-9]*.[0-9]*.[0-9]*.[0-9]*")',
            "tarpit",
            phase="helo",
            tarpit='"5s"',
        )
        + r("H2", 'client.ip.cidr("198.51.100.0/24")', "log", phase="helo"),
    )
    v = rs.evaluate("smtp", "helo", ctx(smtp__helo="1.2.3.4", client__ip="198.51.100.9"))
    assert (ids(v), v.delay) == (["H1", "H2"], 5.0)


def test_list_kinds(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        '[[list]]\nname = "d"\nkind = "domain"\nitems = ["example.org", "*.spam.test"]\n'
        '[[list]]\nname = "j"\nkind = "ja4"\nitems = ["t13d1516h2_8daaf6152771_e5627efa2ab1"]\n'
        '[[list]]\nname = "s"\nkind = "string"\nitems = ["Foo"]\n\n'
        + r("D", "smtp.mail_from in lists.d", "log")
        + r("J", "tls.ja4 in lists.j", "log")
        + r("S", "smtp.helo in lists.s", "log")
        + r("R", "smtp.rcpt_to.exists(x, x in lists.d)", "log"),
    )
    d, j, s = rs.lists["d"], rs.lists["j"], rs.lists["s"]
    assert ("a@Example.ORG." in d, "x.y.spam.test" in d, "spam.test" in d, "org" in d) == (
        True,
        True,
        False,
        False,
    )
    assert "t13d1516h2_8daaf6152771_e5627efa2ab1" in j
    assert ("Foo" in s, "foo" in s) == (True, False)
    v = rs.evaluate(
        "smtp",
        "auth",
        ctx(smtp__mail_from="u@example.org", smtp__helo="Foo", smtp__rcpt_to=["a@b.spam.test"]),
    )
    assert ids(v) == ["D", "S", "R"]


def test_ip_ranges_merge_and_lookup_boundaries() -> None:
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25")]
    nets.append(ipaddress.ip_network("2001:db8::/64"))
    ranges = IpRanges(nets)
    starts, ends = ranges.ranges(4)
    assert (starts, ends) == (
        [int(ipaddress.ip_address("10.0.0.0"))],
        [int(ipaddress.ip_address("10.0.1.255"))],
    )
    assert len(ranges) == 2
    assert ("10.0.0.0" in ranges, "10.0.1.255" in ranges, "10.0.2.0" in ranges) == (
        True,
        True,
        False,
    )
    assert ("9.255.255.255" in ranges, "2001:db8::ffff" in ranges, "2001:db9::" in ranges) == (
        False,
        True,
        False,
    )


def test_big_cidr_list_is_one_bisect_per_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100k disjoint /30 networks: 10.x.y.(4k)/30, every other block
    lines = [f"{ipaddress.IPv4Address(0x0A000000 + 8 * i)}/30" for i in range(100_000)]
    (tmp_path / "big.txt").write_text("\n".join(lines), encoding="utf-8")
    rs = rules(
        tmp_path,
        '[[list]]\nname = "big"\nkind = "cidr"\nfile = "big.txt"\n\n'
        + r("B", "client.ip in lists.big", "reject"),
    )
    assert len(rs.lists["big"]) == 100_000
    calls: list[int] = []
    real = bisect.bisect_right

    def counting(a: list[int], x: int) -> int:
        calls.append(len(a))
        return real(a, x)

    monkeypatch.setattr(bisect, "bisect_right", counting)
    last = ipaddress.IPv4Address(0x0A000000 + 8 * 99_999 + 3)
    assert rs.evaluate("smtp", "auth", ctx(client__ip=str(last))).action == "reject"
    assert rs.evaluate("smtp", "auth", ctx(client__ip=str(last + 1))).action == "pass"
    assert rs.evaluate("smtp", "auth", ctx(client__ip="10.0.0.4")).action == "pass"
    assert calls == [100_000, 100_000, 100_000]


def test_bad_ip_and_non_string_never_match_lists(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        '[[list]]\nname = "n"\nkind = "cidr"\nitems = ["0.0.0.0/0", "::/0"]\n\n'
        + r("B", "client.ip in lists.n", "reject"),
    )
    assert rs.evaluate("smtp", "auth", ctx(client__ip="")).action == "pass"
    assert rs.evaluate("smtp", "auth", ctx(client__ip="garbage")).action == "pass"
    assert rs.evaluate("smtp", "auth", ctx(client__ip="2001:db8::1")).action == "reject"


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.sampled_from(["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "1.2.3.4"]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    overrides=st.dictionaries(st.sampled_from(sorted(FIELDS)), _VALUES, max_size=8),
    drop=st.sets(st.sampled_from(["client", "smtp", "tls", "auth", "login"]), max_size=2),
    risk=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_random_contexts_never_raise(
    tmp_path: Path, overrides: dict[str, Any], drop: set[str], risk: int
) -> None:
    rs = _fuzz_rules(tmp_path)
    c = default_context()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    for ns in drop:
        c[ns] = None if len(ns) % 2 else "oops"
    v = rs.evaluate("smtp", "auth", c, risk_score=risk)
    assert v.action in ("pass", "allow", "reject", "deny", "tarpit", "ban")


_FUZZ: dict[str, RuleSet] = {}


def _fuzz_rules(tmp_path: Path) -> RuleSet:
    if "rs" not in _FUZZ:
        _FUZZ["rs"] = rules(
            tmp_path,
            "[scoring]\nreject = 10\n\n"
            '[[list]]\nname = "n"\nkind = "cidr"\nitems = ["10.0.0.0/8"]\n\n'
            + r("F1", "client.ip in lists.n && client.port > 1024", "log")
            + r("F2", 'glob(smtp.helo, "*.test") || smtp.rcpt_count > 50', "score", score="5")
            + r("F3", 'smtp.rcpt_to.exists(x, x.endsWith("@x.test"))', "tarpit", tarpit='"1s"')
            + r(
                "F4",
                'login.failures_ip * 2 > 10 && auth.user.lowerAscii() != ""',
                "ban",
                ban='"1m"',
            )
            + r("F5", 'cidr(client.ip, "2001:db8::/32") && risk.score > 3', "reject")
            + r("F6", "client.geo.lat / 0.0 > 1.0 || has(http.headers.host)", "log"),
        )
    return _FUZZ["rs"]


def test_only_read_fields_reach_cel_and_maps_stay_whole(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r("H1", "has(http.headers.host)", "log", phase="request")
        + r(
            "H2", 'http.headers["x-a"] == "1" && session.phase == "request"', "log", phase="request"
        )
        + r("H3", 'client.geo.city == ""', "log", phase="request"),
    )
    c = ctx(http__headers={"x-a": "1"})
    del c["client"]["geo"]
    v = rs.evaluate("http", "request", c)
    assert ids(v) == ["H2", "H3"]
    assert "geo" not in c["client"]
    assert c["session"]["phase"] == ""
    c["http"]["headers"]["host"] = "mail.example.org"
    assert ids(rs.evaluate("http", "request", c)) == ["H1", "H2", "H3"]


def test_flattened_conditions_keep_cel_semantics(tmp_path: Path) -> None:
    """Each field is its own CEL variable; objects, map keys and has() still work."""
    rs = rules(
        tmp_path,
        r("H1", 'has(client.geo.city) && client.geo.city == ""', "log", phase="request")
        + r("H2", 'has(http.headers.host) && http.headers.host == "mx.example"', "log", "request")
        + r("H3", "!has(http.headers.cookie)", "log", "request")
        + r("H4", 'client.geo != {} && client.geo.country == "DE"', "log", "request")
        + r("H5", 'size(http.form) == 0 && http.method == "POST"', "log", "request"),
    )
    sparse = {"http": {"method": "POST", "headers": {"host": "mx.example"}}, "client": {}}
    v = rs.evaluate("http", "request", sparse)
    assert ids(v) == ["H1", "H2", "H3", "H5"]
    sparse["client"] = {"geo": {"country": "DE"}}
    assert ids(rs.evaluate("http", "request", sparse)) == ["H1", "H2", "H3", "H4", "H5"]
    assert rs.error_stats() == {}


def test_session_cache_sees_changes_made_in_place_and_survives_reload(
    tmp_path: Path,
) -> None:
    from mailmoat.policy import EvalCache

    rs = rules(tmp_path, r("T", 'smtp.rcpt_to.exists(x, x == "trap@x.org")', "reject", "rcpt"))
    cache = EvalCache()
    c: dict[str, Any] = {"smtp": {"rcpt_to": ["a@x.org"]}}
    assert rs.evaluate("smtp", "rcpt", c, cache=cache).action == "pass"
    c["smtp"]["rcpt_to"].append("trap@x.org")  # the session appends in place
    v = rs.evaluate("smtp", "rcpt", c, cache=cache)
    assert v.action == "reject"
    assert v.matches[0].fields == {"smtp.rcpt_to": ["a@x.org", "trap@x.org"]}
    # a new rule set (a reload) starts the cache afresh: no stale variable or function
    other = rules(
        tmp_path, r("U", 'smtp.rcpt_to.exists(x, x == "b@x.org")', "reject", "rcpt"), name="o.toml"
    )
    c["smtp"]["rcpt_to"] = ["b@x.org"]
    assert other.evaluate("smtp", "rcpt", c, cache=cache).action == "reject"
    assert rs.evaluate("smtp", "rcpt", c, cache=cache).action == "pass"


def test_ipv4_mapped_client_ip_matches_ipv4_rules(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        r("M", 'client.ip == "192.0.2.1" && cidr(client.ip, "192.0.2.0/24")', "deny", "connect"),
    )
    v = rs.evaluate("smtp", "connect", {"client": {"ip": "::ffff:192.0.2.1"}})
    assert v.action == "deny"
    assert v.matches[0].fields == {"client.ip": "192.0.2.1"}
