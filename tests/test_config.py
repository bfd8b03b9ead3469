"""Config validation: every problem reported as file:line: message, exit status 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MailmoatTLS
from mailmoat.cli import main
from mailmoat.config import ConfigErrors, load_config, parse_address

GOOD = """\
[node]
name = "edge-1"
data_dir = "data"

[tls]
cert = "{cert}"
key = "{key}"
min_version = "1.2"

[[listener]]
name = "submission"
protocol = "smtp"
listen = ["0.0.0.0:587", "[::]:587"]
tls = "starttls"
require_tls = true
backend = "postfix"

[[backend]]
name = "postfix"
address = "127.0.0.1:10587"
"""


def write(tmp_path: Path, text: str, tls: MailmoatTLS) -> Path:
    p = tmp_path / "mailmoat.toml"
    p.write_text(text.replace("{cert}", str(tls.cert)).replace("{key}", str(tls.key)))
    return p


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    return [str(e) for e in info.value.errors]


def test_good_config_loads(tmp_path: Path, mailmoat_tls: MailmoatTLS) -> None:
    cfg = load_config(write(tmp_path, GOOD, mailmoat_tls))
    assert cfg.node.name == "edge-1"
    assert cfg.node.data_dir == tmp_path / "data"
    (lc,) = cfg.listeners
    assert [str(a) for a in lc.listen] == ["0.0.0.0:587", "[::]:587"]
    assert lc.require_tls is True
    assert cfg.backends["postfix"].address[0].port == 10587


def test_unknown_key_names_file_and_line(tmp_path: Path, mailmoat_tls: MailmoatTLS) -> None:
    text = GOOD.replace("require_tls = true", "require_tls = true\nrequire_tsl = true")
    p = write(tmp_path, text, mailmoat_tls)
    (err,) = errors_of(p)
    line = text.splitlines().index("require_tsl = true") + 1
    assert err.startswith(f"{p}:{line}: unknown key 'require_tsl' in [listener]")
    assert "allowed keys" in err


def test_bad_address_and_missing_cert_all_reported(
    tmp_path: Path, mailmoat_tls: MailmoatTLS
) -> None:
    text = GOOD.replace('"127.0.0.1:10587"', '"127.0.0.1:99999"').replace(
        'cert = "{cert}"', 'cert = "/nonexistent/cert.pem"'
    )
    p = write(tmp_path, text, mailmoat_tls)
    errs = errors_of(p)
    addr_line = text.splitlines().index('address = "127.0.0.1:99999"') + 1
    cert_line = text.splitlines().index('cert = "/nonexistent/cert.pem"') + 1
    assert f"{p}:{addr_line}: bad port in '127.0.0.1:99999'" in errs[0]
    assert any(
        e.startswith(f"{p}:{cert_line}: certificate file '/nonexistent/cert.pem' does not exist")
        for e in errs
    )


def test_undefined_backend_and_toml_syntax(tmp_path: Path, mailmoat_tls: MailmoatTLS) -> None:
    p = write(tmp_path, GOOD.replace('backend = "postfix"', 'backend = "dovecot"'), mailmoat_tls)
    (err,) = errors_of(p)
    assert "backend 'dovecot' is not defined by any [[backend]] (known: 'postfix')" in err
    p.write_text("[node]\nname = \n")
    (err,) = errors_of(p)
    assert err.startswith(f"{p}:2: TOML syntax error")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1.2.3.4", "expected 'host:port'"),
        ("::1:25", "write IPv6 in brackets"),
        ("[::1]25", "write IPv6 as"),
        ("example.org:25", "is not an IP address"),
        ("1.2.3.4:0", "expected a number from 1 to 65535"),
    ],
)
def test_parse_address_errors(value: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        parse_address(value, allow_names=False)


def test_require_tls_without_tls_and_reserved_sections(
    tmp_path: Path, mailmoat_tls: MailmoatTLS
) -> None:
    text = GOOD.replace('tls = "starttls"', 'tls = "none"') + '\n[geoip]\ncity = "x.mmdb"\n'
    p = write(tmp_path, text, mailmoat_tls)
    errs = errors_of(p)
    assert any("require_tls = true needs tls = 'starttls' or 'implicit'" in e for e in errs)
    assert any("city database" in e and "x.mmdb' does not exist" in e for e in errs)


def test_rules_admin_state_sections(tmp_path: Path, mailmoat_tls: MailmoatTLS) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "admin.token").write_text("a" * 32 + "\n")
    text = GOOD + (
        '\n[rules]\npaths = ["rules/"]\nwatch = true\n'
        '\n[admin]\nlisten = "127.0.0.1:9099"\ntoken_file = "admin.token"\n'
        '\n[state]\nbackend = "memory"\nmax_bans = 10\n'
    )
    cfg = load_config(write(tmp_path, text, mailmoat_tls))
    assert cfg.rules.paths == (tmp_path / "rules",)
    assert cfg.rules.watch
    assert cfg.admin is not None
    assert (cfg.admin.listen.host, cfg.admin.listen.port) == ("127.0.0.1", 9099)
    assert cfg.admin.token_file == tmp_path / "admin.token"
    assert cfg.state.max_bans == 10


def test_rules_admin_state_errors_name_line_and_fix(
    tmp_path: Path, mailmoat_tls: MailmoatTLS
) -> None:
    (tmp_path / "short.token").write_text("abc\n")
    text = GOOD + (
        '\n[rules]\npaths = ["missing/"]\nwatch = "yes"\n'
        '\n[admin]\nlisten = "0.0.0.0:9099"\ntoken_file = "short.token"\n'
        '\n[state]\nbackend = "redis"\n'
        "\n[scoring]\ndeny = 10\n"
    )
    p = write(tmp_path, text, mailmoat_tls)
    errs = errors_of(p)
    lines = text.splitlines()

    def line_of(fragment: str) -> int:
        return next(i for i, x in enumerate(lines, 1) if x.startswith(fragment))

    expected = {
        line_of("paths ="): "does not exist (a file or a folder of *.toml)",
        line_of("watch ="): "watch must be a bool",
        line_of('listen = "0.0.0.0'): "listens on loopback only",
        line_of('token_file = "short'): "shorter than 16 characters",
        line_of('backend = "redis"'): 'backend = "redis" needs url = "redis://',
        line_of("[scoring]"): "[scoring] belongs in a rule file",
    }
    for line, fragment in expected.items():
        assert any(e.startswith(f"{p}:{line}: ") and fragment in e for e in errs), (
            line,
            fragment,
            errs,
        )


def test_check_validates_the_rules(
    tmp_path: Path, mailmoat_tls: MailmoatTLS, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-a.toml").write_text(
        '[[rule]]\nid = "A-1"\nname = "a"\nphase = "helo"\nwhen = "smtp.helo == \'x\'"\n'
        'action = "reject"\n'
    )
    p = write(tmp_path, GOOD + '\n[rules]\npaths = ["rules/"]\n', mailmoat_tls)
    assert main(["check", "-c", str(p)]) == 0
    assert "OK: 1 rule(s) in 1 file(s)" in capsys.readouterr().out
    (rules / "20-b.toml").write_text(
        '[[rule]]\nid = "B-1"\nname = "b"\nphase = "helo"\nwhen = "smtp.helox == \'x\'"\n'
        'action = "reject"\n'
    )
    assert main(["check", "-c", str(p)]) == 1
    err = capsys.readouterr().err
    assert f"mailmoat: {rules / '20-b.toml'}:5:" in err
    assert "unknown field 'smtp.helox'" in err
    assert "Traceback" not in err


def test_rules_test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-a.toml").write_text(
        '[[rule]]\nid = "A-1"\nname = "a"\nphase = "helo"\n'
        'when = \'smtp.helo == "bad.example"\'\naction = "reject"\n'
    )
    cases = tmp_path / "cases.toml"
    cases.write_text(
        '[[case]]\nname = "bad helo"\nprotocol = "smtp"\nphase = "helo"\n'
        'context = { smtp = { helo = "bad.example" } }\n'
        'expect_rules = ["A-1"]\nexpect_verdict = "reject"\n'
        '\n[[case]]\nname = "good helo"\nprotocol = "smtp"\nphase = "helo"\n'
        'context = { smtp = { helo = "mail.example.org" } }\n'
        'expect_rules = []\nexpect_verdict = "pass"\n'
    )
    assert main(["rules", "test", str(rules), str(cases)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "Passed: 2\nFailed: 0" in out, out
    cases.write_text(cases.read_text().replace('"pass"', '"deny"'))
    assert main(["rules", "test", str(rules), str(cases)]) == 1
    assert "good helo" in capsys.readouterr().out


def test_check_command(
    tmp_path: Path, mailmoat_tls: MailmoatTLS, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, GOOD, mailmoat_tls)
    assert main(["check", "-c", str(good)]) == 0
    assert "OK: 1 listener(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(
        GOOD.replace("[node]", '[node]\nmode = "panic"')
        .replace("{cert}", "x")
        .replace("{key}", "y")
    )
    assert main(["check", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"mailmoat: {bad}:2: mode = 'panic' is not one of: 'enforce', 'detect'" in err
    assert "Traceback" not in err


def test_check_rejects_mismatched_key(
    tmp_path: Path, mailmoat_tls: MailmoatTLS, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailmoat.demo.certs import ensure_self_signed

    _, other_key = ensure_self_signed(tmp_path / "other")
    p = write(tmp_path, GOOD.replace('key = "{key}"', f'key = "{other_key}"'), mailmoat_tls)
    assert main(["check", "-c", str(p)]) == 1
    err = capsys.readouterr().err
    assert str(other_key) in err or str(mailmoat_tls.cert) in err


def test_console_script_exit_status(tmp_path: Path) -> None:
    """The installed entry point: a missing file is one clear line and status 1."""
    r = subprocess.run(
        [sys.executable, "-m", "mailmoat.cli", "check", "-c", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        == f"mailmoat: {tmp_path / 'nope.toml'}: config file does not exist (pass -c FILE)"
    )


def test_shipped_deploy_config_is_valid() -> None:
    """deploy/mailmoat.toml parses and validates (its certificate paths are the admin's)."""
    cfg = load_config(Path(__file__).parent.parent / "deploy" / "mailmoat.toml", check_files=False)
    assert [lc.name for lc in cfg.listeners] == [
        "mx",
        "submission",
        "submissions",
        "imap",
        "imaps",
        "webmail",
        "webmail-http",
    ]
    assert cfg.backends["dovecot"].client_identity == "imap-id"
    webmail = cfg.listeners[5].http
    assert webmail is not None
    assert webmail.login is not None
    assert webmail.login.form.user_field == "_user"
    assert cfg.listeners[0].greet_delay == 2
    assert cfg.backends["postfix-mx"].client_identity == "xclient"


def test_imap_listener_and_identity_fit(tmp_path: Path, mailmoat_tls: MailmoatTLS) -> None:
    text = GOOD + (
        '\n[[listener]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:143"\n'
        'tls = "starttls"\nbackend = "postfix"\n'
    )
    p = write(
        tmp_path,
        text.replace(
            'address = "127.0.0.1:10587"',
            'address = "127.0.0.1:10587"\nclient_identity = "xclient"',
        ),
        mailmoat_tls,
    )
    errs = errors_of(p)
    assert any(
        "client_identity = 'xclient', which an imap listener cannot speak" in e for e in errs
    ), errs
    ok = write(tmp_path, text, mailmoat_tls)
    cfg = load_config(ok)
    assert [lc.protocol for lc in cfg.listeners] == ["smtp", "imap"]


HTTP = """\
[node]
name = "web"
data_dir = "data"

[tls]
cert = "{cert}"
key = "{key}"

[[backend]]
name = "webmail"
address = "127.0.0.1:8080"
client_identity = "forwarded"

[[listener]]
name = "webmail"
protocol = "http"
listen = "0.0.0.0:443"
tls = "implicit"
backend = "webmail"
max_body_size = 1048576
header_timeout = 5
trusted_proxies = ["10.0.0.0/8", "2001:db8::1"]
deny_page = "deny.html"

[listener.login]
path = "/"
user_field = "_user"
password_field = "_pass"
success_status = [302]
success_cookie = "roundcube_sessauth"

[[listener]]
name = "plain"
protocol = "http"
listen = "0.0.0.0:80"
redirect_https = "host"
"""


def test_http_listener_loads(tmp_path: Path, mailmoat_tls: MailmoatTLS) -> None:
    path = write(tmp_path, HTTP, mailmoat_tls)
    (err,) = errors_of(path)
    assert "deny_page" in err
    assert "does not exist" in err
    (tmp_path / "deny.html").write_text("<p>no</p>")
    cfg = load_config(write(tmp_path, HTTP, mailmoat_tls))
    web, plain = cfg.listeners
    assert web.http is not None
    assert web.idle_timeout == 60.0  # the keep-alive default, not SMTP's 300
    assert web.http.max_body_size == 1048576
    assert web.http.header_timeout == 5.0
    assert web.http.trusted_proxies == ("10.0.0.0/8", "2001:db8::1/128")
    assert web.http.deny_page == tmp_path / "deny.html"
    login = web.http.login
    assert login is not None
    form, outcome = login.form, login.outcome
    assert (form.path, form.user_field, form.password_field) == ("/", "_user", "_pass")
    assert outcome.success_status == (302,)
    assert outcome.success_cookie == "roundcube_sessauth"
    assert plain.http is not None
    assert plain.http.redirect_https == "host"
    assert plain.backend == ""  # a redirect-only listener needs none


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ('tls = "implicit"', 'tls = "starttls"', "an http listener has no STARTTLS"),
        ('redirect_https = "host"', 'redirect_https = "http://x"', "use 'host'"),
        ('"10.0.0.0/8"', '"10.0.0.0/33"', "trusted_proxies: '10.0.0.0/33' is not an IP"),
        ('user_field = "_user"\n', "", "[listener.login] needs user_field"),
        ("success_status = [302]", 'success_status = ["302"]', "list of HTTP status codes"),
        ('path = "/"', 'path = "login"', "must start with '/'"),
        ("success_cookie", "sucess_cookie", "unknown key 'sucess_cookie' in [listener.login]"),
        ("max_body_size = 1048576", "max_body_size = -1", "max_body_size must be at least 0"),
        ('client_identity = "forwarded"', 'client_identity = "xclient"', "an http listener"),
    ],
)
def test_http_listener_errors_name_line_and_fix(
    tmp_path: Path, mailmoat_tls: MailmoatTLS, old: str, new: str, fragment: str
) -> None:
    assert old in HTTP
    p = write(tmp_path, HTTP.replace(old, new, 1), mailmoat_tls)
    errs = errors_of(p)
    assert any(fragment in e for e in errs), errs
    assert all(e.startswith(f"{p}:") for e in errs)


@pytest.mark.parametrize(
    ("old", "new", "at"),
    [
        ('path = "/"', 'path = "login"', 'path = "login"'),
        ("success_cookie", "sucess_cookie", "sucess_cookie"),
        ("success_status = [302]", "success_status = []", "success_status = []"),
        ('user_field = "_user"\n', "", "[listener.login]"),  # missing: the table's header
    ],
)
def test_http_login_errors_point_at_the_login_line(
    tmp_path: Path, mailmoat_tls: MailmoatTLS, old: str, new: str, at: str
) -> None:
    # the second [[listener]] also has a [listener.login]: the error names the right one
    text = HTTP + '\n[listener.login]\npath = "/x"\nuser_field = "u"\npassword_field = "p"\n'
    text = text.replace(old, new, 1)
    (tmp_path / "deny.html").write_text("<p>no</p>")
    p = write(tmp_path, text, mailmoat_tls)
    lines = p.read_text().splitlines()
    want = next(n for n, line in enumerate(lines, start=1) if line.startswith(at))
    errs = errors_of(p)
    assert errs, text
    assert all(e.startswith(f"{p}:{want}: ") for e in errs), (want, errs)


def test_an_inline_login_table_error_points_at_its_line(
    tmp_path: Path, mailmoat_tls: MailmoatTLS
) -> None:
    (tmp_path / "deny.html").write_text("<p>no</p>")
    text = HTTP.replace(
        '[listener.login]\npath = "/"\n',
        'login = { path = "nope", user_field = "u", password_field = "p" }\n',
    ).replace(
        'user_field = "_user"\npassword_field = "_pass"\n'
        'success_status = [302]\nsuccess_cookie = "roundcube_sessauth"\n',
        "",
    )
    p = write(tmp_path, text, mailmoat_tls)
    want = next(
        n for n, line in enumerate(p.read_text().splitlines(), 1) if line.startswith("login =")
    )
    (err,) = errors_of(p)
    assert err.startswith(f"{p}:{want}: "), err
    assert "must start with '/'" in err


def test_http_keys_on_a_mail_listener_are_unknown(
    tmp_path: Path, mailmoat_tls: MailmoatTLS
) -> None:
    text = GOOD.replace("require_tls = true", "require_tls = true\nheader_timeout = 5")
    p = write(tmp_path, text, mailmoat_tls)
    (err,) = errors_of(p)
    assert "unknown key 'header_timeout' in [listener]" in err
