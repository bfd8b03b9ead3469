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

from . import __version__
from .errors import ConfigError, MailmoatError


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

    check = sub.add_parser("check", help="validate the config (and its certificates)")
    _add_config(check)

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
        help="listeners on BASE+25 (smtp), BASE+587 (submission), BASE+465 (smtps); default 10000",
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

    if isinstance(exc, ConfigErrors):
        for e in exc.errors:
            print(f"mailmoat: {e}", file=sys.stderr)
    else:
        print(f"mailmoat: {exc}", file=sys.stderr)


def cmd_check(config_path: str) -> int:
    from .app import build_certs
    from .config import load_config

    try:
        config = load_config(config_path)
        build_certs(config)  # loads and matches every certificate and key
    except (ConfigError, MailmoatError) as exc:
        _print_config_error(exc)
        return 1
    listeners = ", ".join(
        f"{lc.name} ({lc.protocol}, {' '.join(str(a) for a in lc.listen)}, tls={lc.tls})"
        for lc in config.listeners
    )
    print(f"{config_path}: OK: {len(config.listeners)} listener(s): {listeners}")
    print(f"{config_path}: OK: {len(config.backends)} backend(s): {', '.join(config.backends)}")
    return 0


def cmd_run(config_path: str) -> int:
    import trio

    from .app import ListenError, build_certs, run_node
    from .config import load_config

    try:
        config = load_config(config_path)
        build_certs(config)
    except MailmoatError as exc:
        _print_config_error(exc)
        return 1
    try:
        trio.run(run_node, config)
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
        case "demo":
            from .demo import run_demo

            return run_demo(
                Path(args.data_dir), host=args.host, port_base=args.port_base, backend=args.backend
            )
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
