"""The ``mailmoat`` command line (DESIGN.md §3).

Every command that needs a node's config takes ``-c FILE`` (default
``$MAILMOAT_CONFIG``, else ``./mailmoat.toml``).  Errors are one line per
problem, ``file:line: message``, on stderr, with exit status 1; never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigError, MailmoatError

if TYPE_CHECKING:
    from .config import Config


def _default_config() -> str:
    return os.environ.get("MAILMOAT_CONFIG", "mailmoat.toml")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=_default_config(),
        help="config file (default: $MAILMOAT_CONFIG, else ./mailmoat.toml)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailmoat",
        description="An application firewall in front of mail servers and webmail.",
    )
    parser.add_argument("--version", action="version", version=f"mailmoat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a node in the foreground")
    _add_config(run)

    check = sub.add_parser("check", help="validate the config, its certificates and its rules")
    _add_config(check)

    reload = sub.add_parser(
        "reload", help="ask the running node (admin API) to reload its rules and certificates"
    )
    _add_config(reload)

    rules = sub.add_parser("rules", help="work with rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    rules_test = rules_sub.add_parser(
        "test",
        help="run rules against recorded session cases (exit 1 if any case fails)",
        description="Load every *.toml under RULES (a file or folder) and run the cases in "
        "CASES (a TOML or JSON file, or a folder of them) against them.",
    )
    rules_test.add_argument("rules_path", metavar="RULES", help="rule file or folder")
    rules_test.add_argument("cases", metavar="CASES", help="cases file or folder")
    rules_test.add_argument(
        "--mode",
        choices=("enforce", "detect"),
        default="enforce",
        help="evaluate as a node in this mode (default: enforce)",
    )

    demo = sub.add_parser(
        "demo", help="run mailmoat on embedded defaults in front of backends it starts itself"
    )
    demo.add_argument(
        "--data-dir",
        default=os.environ.get("MAILMOAT_DEMO_DIR", "demo-data"),
        help="where the demo keeps its certificate, config and mail (default: ./demo-data)",
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address the demo listens on (default: 127.0.0.1)"
    )
    demo.add_argument(
        "--port-base",
        type=int,
        default=10000,
        help="listeners on BASE+25 (smtp), BASE+587 (submission), BASE+465 (smtps),"
        " BASE+143 (imap), BASE+993 (imaps),"
        " the admin API on BASE+99; default 10000",
    )
    demo.add_argument(
        "--backend",
        choices=("auto", "postfix", "sink"),
        default="auto",
        help="auto: the machine's Postfix when installed, else the built-in sink",
    )
    events = sub.add_parser(
        "events",
        help="show events from the node's journal",
        description="Events from the journal in [journal] dir (default data_dir/journal), "
        "oldest first: a table, or JSON lines with --json.  Filters combine (all must match).",
    )
    _add_config(events)
    events.add_argument("--blocked", action="store_true", help="only refusals (verdicts, closes)")
    events.add_argument("--since", help="1h, 30m, 2d (ago) or an ISO 8601 time")
    events.add_argument("--until", help="same forms as --since")
    events.add_argument("--protocol", choices=("smtp", "imap", "http"))
    events.add_argument("--user", help="auth.user (case-insensitive)")
    events.add_argument("--ip", help="client address or CIDR")
    events.add_argument("--rule", help="rule id, e.g. MM-MITM-0001")
    events.add_argument("--country", help="ISO country code of the client")
    events.add_argument("--limit", type=int, help="at most this many events")
    events.add_argument("--json", action="store_true", help="JSON lines, as stored")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    session = sub.add_parser(
        "session",
        help="everything the journal knows about one session",
        description="Read the journal (no running node needed) and print one session: client, "
        "geo, TLS, identity, each verdict with its rule and evidence, analysts' labels, the "
        "transcript if recorded, then every event.  Exit 1 when the id is not in the journal.",
    )
    _add_config(session)
    session.add_argument("session_id", metavar="ID", help="the session.id of any of its events")
    session.add_argument("--json", action="store_true", help="one JSON object: summary, events")
    unban = sub.add_parser(
        "unban",
        help="lift a ban on the running node (admin API)",
        description="Ask the running node to lift the ban on IP.  Exit 1 if it is not banned, "
        "2 if the node cannot be asked ([admin] missing, node not running).",
    )
    _add_config(unban)
    unban.add_argument("ip", metavar="IP", help="the banned address")
    allow = sub.add_parser(
        "allow",
        help="add an address or network to the allow list and reload (admin API)",
        description="Ask the running node to append IP or CIDR to a file-backed cidr list "
        "(trusted_networks of rules/10-allowlist.toml unless --list) with a comment saying "
        "who and when, then reload its rules.  The kind can be given first: allow cidr "
        "10.1.0.0/16.  Without IP|CIDR, --list [NAME] prints the entries of the list "
        "instead (--ip ADDR: those covering ADDR).  Exit 2 if the node cannot be asked or "
        "the value is not an address.",
    )
    _add_config(allow)
    allow.add_argument(
        "value", nargs="*", metavar="IP|CIDR", help="an address or a network ([ip|cidr] VALUE)"
    )
    allow.add_argument("--comment", default="", help="why, kept in the list file")
    allow.add_argument(
        "--list",
        dest="list_name",
        nargs="?",
        const="",
        metavar="NAME",
        help="another cidr list; without IP|CIDR: print the list's entries",
    )
    allow.add_argument(
        "--remove", action="store_true", help="take the entry out of the list again (and reload)"
    )
    allow.add_argument("--ip", metavar="ADDR", help="with --list: only the entries covering ADDR")
    allow.add_argument("--json", action="store_true", help="with --list: the API's JSON answer")
    ja4 = sub.add_parser(
        "ja4",
        help="fingerprint a TLS ClientHello (JA3, JA4) given as hex",
        description="Parse a ClientHello from the hex of its TLS record(s), as a server "
        "receives it (e.g. copied from Wireshark or tcpdump -X), and print its JA3 and JA4 "
        "fingerprints and a summary.  Whitespace and colons in the hex are ignored; "
        "'-' reads the hex from stdin.  Exit status 2 when the input is not a ClientHello.",
    )
    ja4.add_argument("hex", nargs="+", metavar="HEX", help="hex of the record(s), or - for stdin")
    ja4.add_argument("--json", action="store_true", help="print one JSON object")
    ja4.add_argument(
        "--alpn-convention",
        choices=("spec", "foxio"),
        default="spec",
        help="JA4 characters for an ALPN value that does not start and end with a letter or "
        "digit: hex as JA4.md says (spec, the default) or 9 as FoxIO's tools print (foxio)",
    )
    return parser


def _print_config_error(exc: MailmoatError) -> None:
    from .config import ConfigErrors
    from .policy import RuleErrors

    if isinstance(exc, ConfigErrors | RuleErrors):
        for e in exc.errors:
            print(f"mailmoat: {e}", file=sys.stderr)
    else:
        print(f"mailmoat: {exc}", file=sys.stderr)


def check_geoip(config: Config) -> None:
    """Open (and close) the [geoip] databases: a wrong file is a config error now."""
    from .detect.geo import GeoIP

    if config.geoip.city is not None or config.geoip.asn is not None:
        GeoIP.from_paths(config.geoip.city, config.geoip.asn).close()


def cmd_check(config_path: str) -> int:
    from .app import build_certs, load_rule_holder
    from .config import load_config

    try:
        config = load_config(config_path)
        build_certs(config)  # loads and matches every certificate and key
        holder = load_rule_holder(config)
        check_geoip(config)
    except (ConfigError, MailmoatError) as exc:
        _print_config_error(exc)
        return 1
    listeners = ", ".join(
        f"{lc.name} ({lc.protocol}, {' '.join(str(a) for a in lc.listen)}, tls={lc.tls})"
        for lc in config.listeners
    )
    print(f"{config_path}: OK: {len(config.listeners)} listener(s): {listeners}")
    print(f"{config_path}: OK: {len(config.backends)} backend(s): {', '.join(config.backends)}")
    rules = holder.current
    where = ", ".join(str(p) for p in config.rules.paths) or "no [rules] paths"
    print(
        f"{config_path}: OK: {len(rules.rules)} rule(s) in {len(rules.files)} file(s) ({where}),"
        f" {len(rules.lists)} list(s), mode={rules.mode}"
    )
    return 0


def cmd_reload(config_path: str) -> int:
    from .admin import AdminUnavailable, admin_call
    from .app import read_admin_token
    from .config import load_config

    try:
        config = load_config(config_path, check_files=False)
        if config.admin is None:
            print(
                f"mailmoat: {config_path}: no [admin] section, so the node cannot be asked to "
                "reload; add [admin] listen and token_file, or send the node SIGHUP",
                file=sys.stderr,
            )
            return 1
        token = read_admin_token(config)
        host, port = config.admin.listen.host, config.admin.listen.port
        status, body = admin_call(host, port, token, "POST", "/api/reload")
    except (AdminUnavailable, MailmoatError) as exc:
        _print_config_error(exc)
        return 1
    if status == 401:
        print("mailmoat: the admin API refused the token in [admin] token_file", file=sys.stderr)
        return 1
    if not isinstance(body, dict) or "rules" not in body:
        print(f"mailmoat: unexpected answer from the admin API ({status})", file=sys.stderr)
        return 1
    rules = body["rules"]
    if rules.get("ok"):
        print(f"rules reloaded: {rules.get('summary')}")
    else:
        for line in rules.get("errors", []):
            print(f"mailmoat: {line}", file=sys.stderr)
        print(f"mailmoat: rules not reloaded: {rules.get('summary')}", file=sys.stderr)
    certs_ok = bool(body.get("certificates", {}).get("ok"))
    print(
        "certificates reloaded"
        if certs_ok
        else "certificates NOT reloaded: the old ones stay (see the tls.reload event)",
        file=sys.stdout if certs_ok else sys.stderr,
    )
    return 0 if body.get("ok") else 1


def cmd_rules_test(rules_path: str, cases: str, mode: str) -> int:
    from .policy import RuleErrors, load_rules, run_cases

    try:
        rules = load_rules([Path(rules_path)], base_mode=mode)
    except RuleErrors as exc:
        _print_config_error(exc)
        return 1
    try:
        report = run_cases(rules, Path(cases))
    except (RuleErrors, ConfigError) as exc:
        _print_config_error(exc)
        return 1
    print(report.render())
    return 0 if report.ok else 1


def cmd_run(config_path: str) -> int:
    from functools import partial

    import trio

    from .app import ListenError, build_certs, load_rule_holder, run_node
    from .config import load_config

    try:
        config = load_config(config_path)
        build_certs(config)
        holder = load_rule_holder(config)
        check_geoip(config)
    except MailmoatError as exc:
        _print_config_error(exc)
        return 1
    try:
        trio.run(partial(run_node, config, rules=holder))
    except ListenError as exc:
        print(f"mailmoat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled as a drain
        return 130
    return 0


def _printable(name: str) -> str:
    """An ALPN name (latin-1) as is when printable ASCII, else as 0x-hex."""
    if name.isascii() and name.isprintable():
        return name
    return "0x" + name.encode("latin-1").hex()


def cmd_ja4(hex_args: Sequence[str], as_json: bool, alpn_convention: str) -> int:
    import json

    from .protocols.tls import (
        HelloError,
        HelloIncomplete,
        fingerprint,
        is_grease,
        parse_client_hello,
    )

    try:  # a UnicodeDecodeError from stdin is a ValueError too
        text = sys.stdin.read() if list(hex_args) == ["-"] else " ".join(hex_args)
        data = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        print("mailmoat: ja4: not hex (whitespace and colons are allowed)", file=sys.stderr)
        return 2
    if not data:
        print("mailmoat: ja4: no hex given", file=sys.stderr)
        return 2
    try:
        hello = parse_client_hello(data)
    except HelloIncomplete as exc:
        print(f"mailmoat: ja4: incomplete ClientHello ({len(data)} bytes): {exc}", file=sys.stderr)
        return 2
    except HelloError as exc:
        print(f"mailmoat: ja4: not a TLS ClientHello: {exc}", file=sys.stderr)
        return 2
    fp = fingerprint(hello, alpn_convention="foxio" if alpn_convention == "foxio" else "spec")
    ciphers = sum(1 for c in hello.cipher_suites if not is_grease(c))
    extensions = sum(1 for e in hello.extensions if not is_grease(e))
    grease = len(hello.cipher_suites) - ciphers + len(hello.extensions) - extensions
    if as_json:
        summary = {
            "ja3": fp.ja3,
            "ja3_string": fp.ja3_string,
            "ja4": fp.ja4,
            "ja4_r": fp.ja4_r,
            "ja4_o": fp.ja4_o,
            "ja4_ro": fp.ja4_ro,
            "max_version": hello.max_version or None,
            "legacy_version": f"0x{hello.legacy_version:04x}",
            "server_name": hello.server_name,
            "alpn": list(hello.alpn),
            "fallback_scsv": hello.fallback_scsv,
            "cipher_count": ciphers,
            "extension_count": extensions,
            "grease_count": grease,
        }
        print(json.dumps(summary, indent=2))
        return 0
    alpn = ", ".join(_printable(name) for name in hello.alpn) or "-"
    print(f"JA3:            {fp.ja3}")
    print(f"JA3 string:     {fp.ja3_string}")
    print(f"JA4:            {fp.ja4}")
    print(f"JA4_r:          {fp.ja4_r}")
    print(f"JA4_o:          {fp.ja4_o}")
    print(f"JA4_ro:         {fp.ja4_ro}")
    print(f"max version:    {hello.max_version or 'unknown'}")
    print(f"SNI:            {hello.server_name or '-'}")
    print(f"ALPN:           {alpn}")
    print(f"fallback SCSV:  {'yes' if hello.fallback_scsv else 'no'}")
    print(f"counts:         {ciphers} cipher suites, {extensions} extensions (+{grease} GREASE)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    match args.command:
        case "check":
            return cmd_check(args.config)
        case "run":
            return cmd_run(args.config)
        case "reload":
            return cmd_reload(args.config)
        case "rules":
            return cmd_rules_test(args.rules_path, args.cases, args.mode)
        case "events":
            from .cli_events import cmd_events

            return cmd_events(args.config, args)
        case "session":
            from .cli_admin import cmd_session

            return cmd_session(args.config, args.session_id, args.json)
        case "unban":
            from .cli_admin import cmd_unban

            return cmd_unban(args.config, args.ip)
        case "allow":
            from .cli_admin import cmd_allow

            return cmd_allow(
                args.config,
                args.value,
                args.comment,
                args.list_name,
                remove=args.remove,
                ip=args.ip,
                as_json=args.json,
            )
        case "ja4":
            return cmd_ja4(args.hex, args.json, args.alpn_convention)
        case "demo":
            from .demo import run_demo

            return run_demo(
                Path(args.data_dir), host=args.host, port_base=args.port_base, backend=args.backend
            )
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
