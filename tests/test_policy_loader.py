"""Loading rule files: every error names file:line and the fix; ordering; lists."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mailmoat.errors import RuleError
from mailmoat.policy import RuleErrors, RuleSet, load_rules, parse_duration


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def rule(rid: str = "R1", when: str = "!tls.active", **extra: str) -> str:
    lines = [
        "[[rule]]",
        f'id = "{rid}"',
        f'name = "n-{rid}"',
        f'phase = "{extra.pop("phase", "auth")}"',
        f"when = '{when}'",
        f'action = "{extra.pop("action", "reject")}"',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


def errors_of(paths: list[Path]) -> list[RuleError]:
    with pytest.raises(RuleErrors) as info:
        load_rules(paths)
    return list(info.value.errors)


def only_error(paths: list[Path]) -> RuleError:
    errs = errors_of(paths)
    assert len(errs) == 1, [str(e) for e in errs]
    return errs[0]


def test_valid_file_loads_with_lines_and_defaults(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule("R1") + rule("R2", action="log"))
    rs = load_rules([f])
    assert isinstance(rs, RuleSet)
    r1, r2 = rs.rules
    assert (r1.id, r1.line, r1.source) == ("R1", 1, str(f))
    assert r2.line == 8
    assert r1.protocols == frozenset({"smtp", "imap", "http"})
    assert r1.severity == "medium"
    assert r1.mode == "enforce"
    assert r1.enabled is True
    assert r1.reads == ("tls.active",)


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule() + "[[rule]]\nid = \n")
    err = only_error([f])
    assert (err.path, err.line) == (str(f), 9)
    assert "TOML syntax error" in err.message


def test_unknown_key_lists_allowed(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule(sevrity='"high"'))
    err = only_error([f])
    assert err.line == 7
    assert err.rule_id == "R1"
    assert "unknown key 'sevrity'" in err.message
    assert "severity" in err.message.split("allowed keys:")[1]
    assert str(err) == f"{f}:7: {err.message}"


def test_unknown_top_level_table(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", "[[rules]]\nid = 'x'\n")
    err = only_error([f])
    assert err.line == 1
    assert "unknown table or key 'rules'" in err.message


def test_missing_required_keys_are_all_reported(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", '[[rule]]\nid = "R1"\nname = "x"\n')
    errs = errors_of([f])
    messages = sorted(e.message for e in errs)
    assert messages == [
        "[[rule]] is missing the required key 'action'",
        "[[rule]] is missing the required key 'phase'",
        "[[rule]] is missing the required key 'when'",
    ]
    assert all(e.line == 1 and e.rule_id == "R1" for e in errs)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("phase", '"authh"', "phase must be one of connect, tls, helo"),
        ("action", '"drop"', "action must be one of allow, reject, deny, tarpit"),
        ("severity", '"urgent"', "severity must be one of info, low, medium, high, critical"),
        ("mode", '"audit"', "mode must be one of enforce, detect"),
        ("protocols", '["smtp", "pop3"]', "protocols must be a non-empty array of smtp, imap"),
    ],
)
def test_bad_enum_values(tmp_path: Path, key: str, value: str, expected: str) -> None:
    body = rule(**{key: value}) if key not in ("phase", "action") else rule(**{key: value[1:-1]})
    f = write(tmp_path / "a.toml", body)
    err = only_error([f])
    assert expected in err.message
    assert err.line == {"phase": 4, "action": 6}.get(key, 7)


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    a = write(tmp_path / "10-a.toml", rule("R1"))
    b = write(tmp_path / "20-b.toml", rule("R2") + rule("R1"))
    err = only_error([tmp_path])
    assert (err.path, err.line, err.rule_id) == (str(b), 9, "R1")
    assert f"duplicate rule id 'R1' (first defined at {a}:1)" in err.message


def test_cel_syntax_error_points_into_multiline_condition(tmp_path: Path) -> None:
    f = write(
        tmp_path / "a.toml",
        """
        [[rule]]
        id = "R1"
        name = "x"
        phase = "auth"
        when = '''
        !tls.active &&
          auth.user ==
        '''
        action = "reject"
        """,
    )
    err = only_error([f])
    assert err.line == 8
    assert err.message.startswith("CEL syntax error in when (line 3, column 1)")
    assert "Syntax error" in err.message


def test_unknown_field_names_known_ones(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule(when='client.ipp == "1.2.3.4"'))
    err = only_error([f])
    assert err.line == 5
    assert err.message == (
        "in when: unknown field 'client.ipp'; known fields under client: ip, port, "
        "geo.country, geo.city, geo.lat, geo.lon, asn.number, asn.org, reputation, banned"
    )


def test_unknown_field_on_line_of_multiline_condition(tmp_path: Path) -> None:
    f = write(
        tmp_path / "a.toml",
        "[[rule]]\nid = 'R1'\nname = 'x'\nphase = 'auth'\n"
        "when = '''\n!tls.active &&\n  smtp.data.sise > 5\n'''\naction = 'log'\n",
    )
    err = only_error([f])
    assert err.line == 7
    assert "unknown field 'smtp.data.sise'; known fields under smtp.data: size, bare_lf" in (
        err.message
    )


def test_unknown_top_level_name_and_string_literals_ignored(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule(when='clent.ip == "client.ipp"'))
    err = only_error([f])
    assert "unknown name 'clent'" in err.message


def test_macro_variables_are_not_unknown_names(tmp_path: Path) -> None:
    cond = 'smtp.rcpt_to.exists(r, r.endsWith(".ru")) && smtp.rcpt_to.all(x, size(x) < 300)'
    cond += ' && smtp.rcpt_to.filter(y, y != "").map(z, z + "!").size() > 0'
    f = write(tmp_path / "a.toml", rule(when=cond))
    (r,) = load_rules([f]).rules
    assert r.reads == ("smtp.rcpt_to",)


def test_has_and_map_fields(tmp_path: Path) -> None:
    cond = 'has(http.headers.host) && http.headers["x-forwarded-for"] != "" && has(client.geo)'
    f = write(tmp_path / "a.toml", rule(when=cond))
    (r,) = load_rules([f]).rules
    assert r.reads == ("http.headers.host", "http.headers", "client.geo")


def test_method_on_leaf_is_not_a_field_but_attribute_is(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule(when="client.ip.port == 1"))
    err = only_error([f])
    assert "'client.ip' is a string, it has no field 'port'" in err.message


def test_unknown_function(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule(when='cidrr(client.ip, "10.0.0.0/8")'))
    err = only_error([f])
    assert err.message.startswith("in when: unknown function 'cidrr'; functions are: ")
    assert "cidr, " in err.message


def test_bad_cidr_literal_in_condition(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule(when='cidr(client.ip, "10.0.0.0/33")'))
    err = only_error([f])
    assert err.line == 5
    assert "cidr(): not an IP network: '10.0.0.0/33'" in err.message


def test_cidr_literal_with_host_bits_suggests_network(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule(when='client.ip.cidr("10.1.2.3/8")'))
    err = only_error([f])
    assert "write '10.0.0.0/8'" in err.message


def test_lists_inline_and_from_file(tmp_path: Path) -> None:
    write(tmp_path / "lists" / "tor.txt", "# tor exits\n1.2.3.4\n\n5.6.7.0/24  # a net\n")
    f = write(
        tmp_path / "a.toml",
        """
        [[list]]
        name = "tor"
        kind = "cidr"
        file = "lists/tor.txt"

        [[list]]
        name = "vip"
        kind = "user"
        items = ["Alice@example.org"]
        """
        + rule(when="client.ip in lists.tor || auth.user in lists.vip"),
    )
    rs = load_rules([f])
    assert rs.lists["tor"].items == ("1.2.3.4", "5.6.7.0/24")
    assert rs.lists["tor"].source == str(tmp_path / "lists" / "tor.txt")
    assert "5.6.7.200" in rs.lists["tor"]
    assert "alice@EXAMPLE.org" in rs.lists["vip"]
    assert rs.rules[0].lists == ("tor", "vip")


def test_bad_cidr_in_list_file_names_the_list_file_line(tmp_path: Path) -> None:
    lst = write(tmp_path / "nets.txt", "10.0.0.0/8\n# c\n10.0.0.0/33\n")
    f = write(tmp_path / "a.toml", '[[list]]\nname = "n"\nkind = "cidr"\nfile = "nets.txt"\n')
    err = only_error([f])
    assert (err.path, err.line) == (str(lst), 3)
    assert "list 'n': not an IP network: '10.0.0.0/33'" in err.message


def test_bad_item_in_inline_list_names_its_line(tmp_path: Path) -> None:
    f = write(
        tmp_path / "a.toml",
        '[[list]]\nname = "n"\nkind = "ip"\nitems = [\n  "10.0.0.1",\n  "10.0.0.300",\n]\n',
    )
    err = only_error([f])
    assert err.line == 6
    assert "10.0.0.300" in err.message


def test_missing_list_file(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", '[[list]]\nname = "n"\nkind = "ip"\nfile = "nope.txt"\n')
    err = only_error([f])
    assert err.line == 4
    assert "cannot read the list file" in err.message
    assert "nope.txt" in err.message


def test_unknown_list_name(tmp_path: Path) -> None:
    f = write(
        tmp_path / "a.toml",
        '[[list]]\nname = "tor"\nkind = "ip"\nitems = []\n\n'
        + rule(when="client.ip in lists.torr"),
    )
    err = only_error([f])
    assert err.line == 10
    assert err.message == "in when: unknown list 'lists.torr'; lists: tor"


def test_list_used_on_its_own_is_an_error(tmp_path: Path) -> None:
    f = write(
        tmp_path / "a.toml",
        '[[list]]\nname = "tor"\nkind = "ip"\nitems = []\n\n' + rule(when="size(lists.tor) > 0"),
    )
    err = only_error([f])
    assert "lists.tor used on its own" in err.message


def test_ambiguous_in_needs_parentheses(tmp_path: Path) -> None:
    f = write(
        tmp_path / "a.toml",
        '[[list]]\nname = "tor"\nkind = "ip"\nitems = []\n\n'
        + rule(when="smtp.helo == client.ip in lists.tor"),
    )
    err = only_error([f])
    assert "parenthesize the left side of 'in lists.tor'" in err.message


@pytest.mark.parametrize(
    ("extra", "expected", "line"),
    [
        ({"action": "tarpit", "tarpit": '"10 s"'}, "bad duration '10 s'", 7),
        ({"action": "ban", "ban": '"1w"'}, "bad duration '1w'", 7),
        ({"action": "tarpit"}, "action 'tarpit' needs tarpit = \"DURATION\"", 1),
        ({"action": "score"}, 'action "score" needs score = N', 1),
        ({"action": "score", "score": "0"}, "score must be a whole number above 0, not 0", 7),
        ({"action": "reject", "score": "5"}, "score is only used with action = 'score'", 7),
        ({"reply": '{ smtp = "Go away" }'}, "reply.smtp must be a reply code and text", 7),
        ({"reply": '{ pop3 = "-ERR" }'}, "reply for unknown protocol 'pop3'", 7),
        ({"enabled": '"yes"'}, "enabled must be true or false", 7),
        (
            {"action": "log", "reply": '{ smtp = "550 No" }'},
            "reply is only used by reject, deny and ban; action 'log' sends none",
            7,
        ),
    ],
)
def test_action_parameters(tmp_path: Path, extra: dict[str, str], expected: str, line: int) -> None:
    f = write(tmp_path / "a.toml", rule(**extra))
    err = only_error([f])
    assert expected in err.message
    assert err.line == line


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("10s") == 10.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("1h") == 3600.0
    with pytest.raises(ValueError, match="more than zero"):
        parse_duration("0s")


def test_two_scoring_tables(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", "[scoring]\nreject = 10\n")
    b = write(tmp_path / "b.toml", "# more\n[scoring]\ndeny = 20\n")
    err = only_error([tmp_path])
    assert (err.path, err.line) == (str(b), 2)
    assert f"a second [scoring] table (the first is at {a}:1)" in err.message


def test_scoring_deny_below_reject(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", "[scoring]\nreject = 10\ndeny = 5\n")
    err = only_error([f])
    assert err.line == 3
    assert "deny (5) is below reject (10)" in err.message


def test_all_errors_collected_across_files(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", rule("R1", when="client.ipp") + rule("R2", action="drop"))
    write(tmp_path / "b.toml", "x = = 1\n")
    errs = errors_of([tmp_path])
    assert [(Path(e.path or "").name, e.line) for e in errs] == [
        ("b.toml", 1),
        ("a.toml", 5),
        ("a.toml", 13),
    ]


def test_missing_path(tmp_path: Path) -> None:
    err = only_error([tmp_path / "nope"])
    assert err.message == "no such rule file or directory"


def test_order_is_file_name_then_file_order(tmp_path: Path) -> None:
    write(tmp_path / "20-b.toml", rule("B1") + rule("B2"))
    write(tmp_path / "10-a.toml", rule("A2") + rule("A1"))
    write(tmp_path / "sub" / "00-ignored.toml", rule("X"))
    write(tmp_path / "notes.txt", "not a rule file")
    extra = write(tmp_path / "extra.toml.in", rule("E1"))
    rs = load_rules([tmp_path, extra])
    assert [r.id for r in rs.rules] == ["A2", "A1", "B1", "B2", "E1"]
    assert [p.name for p in rs.files] == ["10-a.toml", "20-b.toml", "extra.toml.in"]


def test_detect_base_mode_and_bad_mode(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", rule())
    assert load_rules([f], base_mode="detect").mode == "detect"
    with pytest.raises(ValueError, match="base_mode"):
        load_rules([f], base_mode="audit")


def test_examples_in_docs_load(tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "rules.md").read_text(encoding="utf-8")
    block = doc.split("## Examples", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    write(tmp_path / "lists" / "bad-ja4.txt", "t13d1516h2_8daaf6152771_e5627efa2ab1\n")
    rs = load_rules([write(tmp_path / "examples.toml", block)])
    assert len(rs.rules) >= 6
    assert rs.scoring is not None


def test_docs_field_table_matches_schema() -> None:
    """docs/rules.md lists exactly the schema's fields, with their types and phases."""
    from mailmoat.policy import FIELDS
    from mailmoat.policy._fields import PHASES

    doc = (Path(__file__).parent.parent / "docs" / "rules.md").read_text(encoding="utf-8")
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    documented: dict[str, tuple[str, str]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) != 5:
            continue  # another table
        documented[cells[0].strip("`")] = (cells[1], cells[3])
    for name, f in FIELDS.items():
        phases = "all" if f.phases == PHASES else ", ".join(f.phases)
        assert documented.get(name) == (f.type, phases), name
