"""``mailmoat session``, ``unban`` and ``allow``: an analyst's commands (DESIGN.md §3).

Contract: :func:`cmd_session` reads the node's journal directly (no running
node needed) and prints everything one session's events tell -- client, geo,
TLS, identity, each verdict with its rule and evidence, labels, the
transcript, then the events -- as text, or as one JSON object (``--json``:
``session_id``, ``summary``, ``events``, the shape of ``GET
/api/sessions/{id}``); an unknown id exits 1.  :func:`cmd_unban` and
:func:`cmd_allow` ask the running node through its admin API
(``[admin] listen`` and ``token_file``); when the node cannot be asked (no
``[admin]``, an unreadable config or token, nobody listening) they exit 2 with
one line, and when the node refuses (not banned, a list that is not there)
they exit 1 with the node's reason.  Never a traceback.  ``allow --list
[NAME] [--ip ADDR] [--json]`` prints the entries of the list (``GET
/api/allow``) as a table (:func:`render_allow_list`) or as the API's JSON.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import urlencode

#: exit status when the node cannot even be asked
EXIT_UNREACHABLE = 2


class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


def _say(message: str) -> None:
    print(f"mailmoat: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- session


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


def render_session(summary: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """The text ``mailmoat session ID`` prints."""
    from .cli_events import format_line

    lines: list[str] = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:11}{text}".rstrip())

    row(
        "session",
        f"{summary['session_id']}  {summary.get('protocol') or '-'}"
        f"  listener {summary.get('listener') or '-'}  node {summary.get('node') or '-'}",
    )
    row("time", f"{summary.get('start')} .. {summary.get('end')}")
    client = summary["client"]
    where = f"{client.get('ip') or '-'}"
    if client.get("port") is not None:
        where += f" port {client['port']}"
    geo = " ".join(f"{k}={_value(v)}" for k, v in client.items() if k.startswith(("geo.", "asn.")))
    row("client", where + (f"  {geo}" if geo else ""))
    tls = summary["tls"]
    if tls.get("version") or tls.get("ja4") or tls.get("outcome"):
        parts = [str(tls.get("version") or "handshake " + str(tls.get("outcome")))]
        for key in ("cipher", "sni", "ja4", "ja3"):
            if tls.get(key):
                parts.append(f"{key}={tls[key]}")
        if tls.get("fallback_scsv"):
            parts.append("fallback_scsv")
        row("tls", "  ".join(parts))
    else:
        row("tls", "none")
    if summary["auth"]:
        for a in summary["auth"]:
            row("auth", f"{a.get('user')} ({a.get('mechanism') or '-'}): {a.get('outcome')}")
    elif summary.get("user"):
        row("user", str(summary["user"]))
    close = summary.get("close")
    if close:
        extra = []
        if close.get("duration_ms") is not None:
            extra.append(f"after {close['duration_ms']} ms")
        if close.get("client_bytes") is not None:
            extra.append(f"{close['client_bytes']} bytes in, {close.get('server_bytes')} out")
        row("close", f"{close.get('reason')}" + (f" ({', '.join(extra)})" if extra else ""))
    else:
        row("close", "not closed (yet), or its close is not in the journal")
    row("blocked", "YES" if summary["blocked"] else "no")
    if summary["verdicts"]:
        lines.append("verdicts")
        for v in summary["verdicts"]:
            rule = v.get("rule_id") or v.get("action")
            name = f" {v['rule_name']}" if v.get("rule_name") else ""
            severity = f", {v['severity']}" if v.get("severity") else ""
            phase = f" at {v['phase']}" if v.get("phase") else ""
            lines.append(f"  {rule}{name} ({v.get('verdict')}{severity}){phase}")
            evidence = v.get("evidence")
            if isinstance(evidence, dict):
                for k, val in evidence.items():
                    lines.append(f"      {k} = {_value(val)}")
            elif evidence not in (None, ""):
                lines.append(f"      {_value(evidence)}")
    if summary["labels"]:
        lines.append("labels")
        for label in summary["labels"]:
            note = f": {label['note']}" if label.get("note") else ""
            lines.append(
                f"  {label.get('label')} by {label.get('admin_client')}"
                f" at {label.get('@timestamp')}{note}"
            )
    if summary["transcript"]:
        lines.append("transcript")
        for item in summary["transcript"]:
            if isinstance(item, dict):
                who = {"c": "C", "s": "S"}.get(str(item.get("dir")), str(item.get("dir")))
                lines.append(f"  {who}: {item.get('line', '')}")
            else:
                lines.append(f"  {_value(item)}")
    lines.append(f"events ({len(events)})")
    lines.extend(f"  {format_line(e)}" for e in events)
    return "\n".join(lines) + "\n"


def cmd_session(config_path: str, session_id: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    from .admin._routes import session_story
    from .cli_events import journal_dir
    from .errors import MailmoatError
    from .events.journal import Journal

    try:
        directory = journal_dir(config_path)
    except MailmoatError as exc:
        _say(str(exc))
        return 1
    if not directory.is_dir():
        _say(f"no journal at {directory} (is [journal] enabled, has the node run?)")
        return 1
    events = Journal(directory).session(session_id)
    if not events:
        _say(f"no session {session_id!r} in the journal at {directory}")
        return 1
    summary = session_story(events)
    if as_json:
        body = {"session_id": session_id, "summary": summary, "events": events}
        out.write(json.dumps(body, ensure_ascii=False, indent=2, default=str) + "\n")
    else:
        out.write(render_session(summary, events))
    out.flush()
    return 0


# --------------------------------------------------------------------------- admin API calls


def _call(
    config_path: str, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """Call the running node's admin API; :class:`_Fail` (exit 2) when it cannot be asked."""
    from .admin import AdminUnavailable, admin_call
    from .app import read_admin_token
    from .config import ConfigErrors, load_config
    from .errors import MailmoatError

    try:
        config = load_config(config_path, check_files=False)
    except ConfigErrors as exc:
        raise _Fail(EXIT_UNREACHABLE, "\n".join(f"mailmoat: {e}" for e in exc.errors)) from None
    except MailmoatError as exc:
        raise _Fail(EXIT_UNREACHABLE, f"mailmoat: {exc}") from None
    if config.admin is None:
        raise _Fail(
            EXIT_UNREACHABLE,
            f"mailmoat: {config_path}: no [admin] section, so the running node cannot be asked; "
            "add [admin] listen and token_file (docs/admin.md)",
        )
    try:
        token = read_admin_token(config)
        status, answer = admin_call(
            config.admin.listen.host, config.admin.listen.port, token, method, path, body
        )
    except (AdminUnavailable, MailmoatError) as exc:
        raise _Fail(EXIT_UNREACHABLE, f"mailmoat: {exc}") from None
    if status == 401:
        raise _Fail(
            EXIT_UNREACHABLE, "mailmoat: the admin API refused the token in [admin] token_file"
        )
    return status, answer


def _reason(status: int, answer: Any) -> str:
    if isinstance(answer, dict) and answer.get("error"):
        return str(answer["error"])
    return f"unexpected answer from the admin API ({status})"


def cmd_unban(config_path: str, ip: str) -> int:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        _say(f"unban: not an IP address: {ip!r}")
        return 2
    try:
        status, answer = _call(config_path, "POST", "/api/unban", {"ip": str(address)})
    except _Fail as exc:
        print(exc, file=sys.stderr)
        return exc.code
    if status == 200:
        print(f"unbanned {address}")
        return 0
    _say(_reason(status, answer))
    return 1


def cmd_allow(
    config_path: str,
    values: Sequence[str],
    comment: str,
    list_name: str | None,
    *,
    remove: bool = False,
    ip: str | None = None,
    as_json: bool = False,
) -> int:
    """``allow IP|CIDR`` (the kind from the value) or ``allow ip|cidr VALUE``;
    ``--remove`` takes the entry out again; ``--list [NAME]`` alone (``list_name``
    ``""`` when given without a name) prints the entries (:func:`cmd_allow_list`)."""
    if not values and list_name is not None and not remove:
        return cmd_allow_list(config_path, list_name or None, ip, as_json)
    if ip is not None or as_json:
        _say("allow: --ip and --json go with --list alone (allow --list --ip 192.0.2.7)")
        return 2
    if list_name == "" and values:
        _say("allow: --list needs a NAME when adding or removing (alone it lists the entries)")
        return 2
    if len(values) == 2 and values[0] in ("ip", "cidr"):
        kind, value = values
    elif len(values) == 1:
        value = values[0]
        kind = "cidr" if "/" in value else "ip"
    else:
        _say(
            "allow: give an address or a network (allow 192.0.2.7, allow 10.1.0.0/16), "
            "or --list to see the entries"
        )
        return 2
    body: dict[str, Any] = {"kind": kind, "value": value}
    if not remove:
        body["comment"] = comment
    if list_name:
        body["list"] = list_name
    path = "/api/allow/remove" if remove else "/api/allow"
    try:
        status, answer = _call(config_path, "POST", path, body)
    except _Fail as exc:
        print(exc, file=sys.stderr)
        return exc.code
    if status == 200 and isinstance(answer, dict):
        done = "removed" if remove else "added"
        if not answer.get(done):
            print(answer.get("message", "nothing to change"))
            return 1 if remove else 0
        where = "from" if remove else "to"
        print(f"{done} {answer.get('value')} {where} {answer.get('list')} ({answer.get('file')})")
        rules = answer.get("rules") or {}
        print(f"rules reloaded: {rules.get('summary')}")
        return 0
    _say(_reason(status, answer))
    if isinstance(answer, dict):
        for line in (answer.get("rules") or {}).get("errors", []):
            _say(line)
    return 2 if status == 400 else 1


def _cell(value: Any) -> str:
    """A table cell: ``-`` for nothing; a control character (a hand-edited file) as ``?``."""
    if value in (None, ""):
        return "-"
    return "".join(c if c.isprintable() else "?" for c in str(value))


def render_allow_list(answer: dict[str, Any]) -> str:
    """The table ``mailmoat allow --list`` prints for an answer of ``GET /api/allow``.

    Per list a heading (name, file, how many entries), then one row per entry:
    the entry as written, whether it is in force, who added it when, the
    comment.  Lines of the file that are not entries are not here: see
    :func:`cmd_allow_list`.
    """
    ip = answer.get("ip")
    entries = [e for e in answer.get("entries") or [] if isinstance(e, dict)]
    lines: list[str] = []
    for lst in answer.get("lists") or []:
        if not isinstance(lst, dict):
            continue
        mine = [e for e in entries if e.get("list") == lst.get("list")]
        n = len(mine)
        if ip is not None:
            what = (
                f"{n} {'entry covers' if n == 1 else 'entries cover'} {ip}"
                if n
                else f"no entry covers {ip}"
            )
        else:
            what = f"{n} {'entry' if n == 1 else 'entries'}" if n else "no entries"
        lines.append(f"{lst.get('list')} ({lst.get('file')}): {what}")
        if not mine:
            continue
        head = ("ENTRY", "IN FORCE", "ADDED BY", "ADDED AT", "COMMENT")
        rows = [
            (
                _cell(e.get("entry")),
                "yes" if e.get("active") else "no",
                _cell(e.get("added_by")),
                _cell(e.get("added_at")),
                _cell(e.get("comment")),
            )
            for e in mine
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        for r in [head, *rows]:
            cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
            lines.append("  ".join([*cells, r[-1]]).rstrip())
    if any(e.get("active") is False for e in entries):
        lines.append(
            "IN FORCE no: in the file but not in the rules in force (added by hand since the "
            "last reload: mailmoat reload)"
        )
    return "\n".join(lines) + "\n" if lines else ""


def cmd_allow_list(
    config_path: str,
    list_name: str | None,
    ip: str | None,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    """``allow --list [NAME] [--ip ADDR] [--json]``: the entries of the list (default
    ``trusted_networks``); lines of its file that are not entries go to stderr."""
    if list_name is not None:
        try:
            ipaddress.ip_network(list_name, strict=False)
        except ValueError:
            pass
        else:
            _say(
                f"allow: --list takes a list name, not an address: {list_name!r} (the entries "
                "covering an address: allow --list --ip ADDR)"
            )
            return 2
    query: list[tuple[str, str]] = []
    if list_name:
        query.append(("list", list_name))
    if ip is not None:
        query.append(("ip", ip))
    path = "/api/allow" + (f"?{urlencode(query)}" if query else "")
    try:
        status, answer = _call(config_path, "GET", path)
    except _Fail as exc:
        print(exc, file=sys.stderr)
        return exc.code
    if status != 200 or not isinstance(answer, dict):
        _say(_reason(status, answer))
        return 2 if status == 400 else 1
    if as_json:
        out.write(json.dumps(answer, ensure_ascii=False, indent=2) + "\n")
    else:
        out.write(render_allow_list(answer))
    out.flush()
    for bad in answer.get("invalid") or []:
        if isinstance(bad, dict):
            _say(
                f"{bad.get('file')}:{bad.get('line')}: not an entry, {bad.get('error')} "
                "(the rules do not reload until it is fixed or commented out)"
            )
    return 0
