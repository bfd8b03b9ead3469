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
        case "demo":
            from .demo import run_demo

            return run_demo(
                Path(args.data_dir), host=args.host, port_base=args.port_base, backend=args.backend
            )
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
