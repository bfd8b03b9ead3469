"""``mailmoat events``: read the node's journal from the command line.

Contract: :func:`cmd_events` finds the journal directory from the config
(``[journal] dir``, default ``data_dir/journal``), turns the options into an
:class:`~mailmoat.events.journal.EventFilter` and prints the matching events
oldest first, as a table (one line per event) or as JSON lines (``--json``,
the events exactly as stored).  ``--follow`` keeps printing new events as
they are written, across segment rotation, until interrupted.  Bad options
(a time that is not ``1h``/``30m``/``2d``/ISO 8601, an IP that is not an
address or CIDR) exit 2 with one line; a missing journal exits 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

#: what a table line shows after time, action and outcome (the first present ones)
_DETAIL_KEYS = (
    "rule.id",
    "verdict.action",
    "auth.user",
    "session.close_reason",
    "tls.version",
    "tls.ja4",
    "error.message",
    "message",
)


def format_line(event: dict[str, Any]) -> str:
    """One table line: time, session, protocol, client, action, outcome, details."""
    ts = str(event.get("@timestamp", ""))[:23].replace("T", " ")
    details = " ".join(
        f"{k.split('.', 1)[-1] if k != 'rule.id' else 'rule'}={event[k]}"
        for k in _DETAIL_KEYS
        if event.get(k) not in (None, "")
    )
    return (
        f"{ts:23} {event.get('session.id', '-')!s:20} {event.get('session.protocol', '-')!s:5} "
        f"{event.get('client.ip', '-')!s:15} {event.get('event.action', ''):24} "
        f"{event.get('event.outcome', ''):7} {details}"
    ).rstrip()


def _print(events: Iterable[dict[str, Any]], as_json: bool, out: TextIO) -> int:
    n = 0
    for event in events:
        out.write((json.dumps(event, default=str) if as_json else format_line(event)) + "\n")
        n += 1
    out.flush()
    return n


def journal_dir(config_path: str) -> Path:
    from .config import load_config

    config = load_config(config_path, check_files=False)
    return config.journal_dir


def cmd_events(config_path: str, opts: Any, out: TextIO = sys.stdout) -> int:
    from .errors import MailmoatError
    from .events import wall_clock
    from .events.journal import EventFilter, Journal, parse_when

    try:
        directory = journal_dir(config_path)
    except MailmoatError as exc:
        print(f"mailmoat: {exc}", file=sys.stderr)
        return 1
    now = wall_clock()
    try:
        where = EventFilter(
            since=parse_when(opts.since, now) if opts.since else None,
            until=parse_when(opts.until, now) if opts.until else None,
            protocol=opts.protocol,
            user=opts.user,
            ip=opts.ip,
            rule=opts.rule,
            country=opts.country,
            blocked=True if opts.blocked else None,
        )
    except ValueError as exc:
        print(f"mailmoat: {exc}", file=sys.stderr)
        return 2
    if not directory.is_dir():
        print(
            f"mailmoat: no journal at {directory} (is [journal] enabled, has the node run?)",
            file=sys.stderr,
        )
        return 1
    journal = Journal(directory)
    if not opts.follow:
        _print(journal.query(where, limit=opts.limit), opts.json, out)
        return 0
    follower = journal.follower(where, from_end=False)
    try:
        while True:
            if not _print(follower.poll(), opts.json, out):
                time.sleep(0.25)
    except KeyboardInterrupt:
        return 0
