"""The node's admin API routes: rules, reload, bans, the journal, labels, the allow list, metrics.

Contract (docs/admin.md): :func:`add_node_routes` registers every route on an
:class:`AdminServer` (all need the bearer token):

* ``GET /api/rules``, ``POST /api/reload``, ``GET /api/bans``,
  ``DELETE /api/bans/{ip}`` and ``POST /api/unban`` (``{"ip": ...}``);
* ``GET /api/events``: the journal, newest first, filtered by the query
  parameters of ``mailmoat events`` (:func:`parse_event_query`), a bad one
  answered 400 naming it;
* ``GET /api/sessions/{id}``: every event of one session and
  :func:`session_story`, the summary ``mailmoat session`` prints too;
* ``POST /api/sessions/{id}/label``: an analyst's verdict on a session, kept in
  the journal as a ``session.label`` event of that session;
* ``POST /api/allow``: append an address or network to a file-backed ``cidr``
  list (``trusted_networks`` by default), atomically, then reload the rules;
  ``POST /api/allow/remove`` takes an entry out again the same way;
  ``GET /api/allow`` lists the entries of such a list as its file holds them
  (:func:`read_allow_file`), ``?ip=`` only those covering one address;
* ``GET /metrics``: ``node.metrics.render()`` when the node has metrics.

Theory of operation
-------------------
Journal reads run in a worker thread (a query may read for a second on a
big journal; the node keeps serving mail meanwhile).  The allow list is
changed without an ``await`` between reading the file, replacing it and
reloading the rules, so two admin requests never interleave there: each
sees the other's line.  The file is replaced by writing a temporary file
beside it and renaming it over the list (a crash leaves the old list or the
new one, never half of it); when the reload fails the old content is put
back the same way, so the file never holds an entry that is not in force.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from mailmoat._files import replace_file
from mailmoat.events import wall_clock
from mailmoat.events.journal import EventFilter, Journal, is_blocked, parse_when
from mailmoat.policy import IPNetwork, parse_ip, parse_network
from mailmoat.state import StoreUnavailable

from ._page import add_page_routes
from ._server import AdminServer, Handler, Request, Response

if TYPE_CHECKING:
    from mailmoat.app import Node
    from mailmoat.policy import ReloadResult

#: the query parameters of ``GET /api/events`` (the filters of ``mailmoat events``)
EVENT_PARAMS: Final = (
    "blocked",
    "since",
    "until",
    "protocol",
    "user",
    "ip",
    "rule",
    "country",
    "limit",
)
#: events ``GET /api/events`` returns without ``limit``, and at most
DEFAULT_EVENT_LIMIT: Final = 1000
MAX_EVENT_LIMIT: Final = 10_000
PROTOCOLS: Final = ("smtp", "imap", "http")
LABELS: Final = ("false_positive", "confirmed")
#: the list ``POST /api/allow`` appends to unless told otherwise
DEFAULT_ALLOW_LIST: Final = "trusted_networks"
MAX_NOTE: Final = 2000
#: the query parameters of ``GET /api/allow``
ALLOW_PARAMS: Final = ("ip", "list")
_TRUE: Final = ("", "1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")


class BadParameter(ValueError):
    """A query parameter or body field that cannot be used; the message names it."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


def _json(obj: Any, status: int = 200) -> Response:
    """Like :meth:`Response.json`, for journal events (any stray type becomes its ``str``)."""
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
    return Response(status, body.encode("utf-8"))


def _error(status: int, message: str, **extra: Any) -> Response:
    return Response.json({"error": message, **extra}, status)


def _body(request: Request) -> dict[str, Any]:
    try:
        data = request.json()
    except ValueError:
        raise BadParameter("body", "not JSON") from None
    if not isinstance(data, dict):
        raise BadParameter("body", 'must be a JSON object, like {"ip": "192.0.2.7"}')
    return data


def _text(data: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise BadParameter(name, "is required")
        return None
    if not isinstance(value, str):
        raise BadParameter(name, "must be a string")
    return value


# --------------------------------------------------------------------------- events


def parse_event_query(query: Mapping[str, list[str]], now: float) -> tuple[EventFilter, int]:
    """The filter and limit of ``GET /api/events``; :class:`BadParameter` names a bad one.

    The parameters are the options of ``mailmoat events``: ``blocked`` (no
    value, ``true`` or ``false``), ``since`` and ``until`` (``1h``, ``30m``,
    ``2d`` ago or ISO 8601), ``protocol``, ``user``, ``ip`` (address or
    CIDR), ``rule``, ``country`` and ``limit`` (1 to :data:`MAX_EVENT_LIMIT`,
    default :data:`DEFAULT_EVENT_LIMIT`).
    """
    values: dict[str, str] = {}
    for name, given in query.items():
        if name not in EVENT_PARAMS:
            raise BadParameter(name, f"unknown parameter; known: {', '.join(EVENT_PARAMS)}")
        if len(given) != 1:
            raise BadParameter(name, "given more than once")
        values[name] = given[0]
    blocked: bool | None = None
    if "blocked" in values:
        flag = values["blocked"].strip().lower()
        if flag not in _TRUE + _FALSE:
            raise BadParameter("blocked", f"must be true or false, not {values['blocked']!r}")
        blocked = flag in _TRUE
    bounds: dict[str, float | None] = {"since": None, "until": None}
    for name in bounds:
        if name in values:
            try:
                bounds[name] = parse_when(values[name], now)
            except ValueError as exc:
                raise BadParameter(name, str(exc)) from None
    protocol = values.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise BadParameter("protocol", f"must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    limit = DEFAULT_EVENT_LIMIT
    if "limit" in values:
        try:
            limit = int(values["limit"])
        except ValueError:
            raise BadParameter("limit", f"not a number: {values['limit']!r}") from None
        if not 1 <= limit <= MAX_EVENT_LIMIT:
            raise BadParameter("limit", f"must be from 1 to {MAX_EVENT_LIMIT}, not {limit}")
    for name in ("user", "rule", "country", "ip"):
        if name in values and not values[name].strip():
            raise BadParameter(name, "is empty")
    try:
        where = EventFilter(
            since=bounds["since"],
            until=bounds["until"],
            protocol=protocol,
            user=values.get("user"),
            ip=values.get("ip"),
            rule=values.get("rule"),
            country=values.get("country"),
            blocked=blocked,
        )
    except ValueError as exc:  # only ip is checked when the filter is built
        raise BadParameter("ip", str(exc)) from None
    return where, limit


# --------------------------------------------------------------------------- sessions


def _first(events: Iterable[Mapping[str, Any]], key: str) -> Any:
    for e in events:
        value = e.get(key)
        if value not in (None, ""):
            return value
    return None


def _last(events: list[dict[str, Any]], key: str) -> Any:
    return _first(reversed(events), key)


def session_story(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything one session's events tell, in one map (``GET /api/sessions/{id}``).

    ``client`` (ip, port, geo and AS fields), ``tls`` (the client leg's
    version, cipher, SNI, JA3/JA4), ``auth`` (every attempt: user, mechanism,
    outcome) and ``user`` (the last user named), the listener, protocol and
    times, ``close`` (reason, duration, bytes), ``verdicts`` (every verdict
    event with its rule, the action done and the evidence), ``blocked``,
    ``labels`` (analysts' ``session.label`` events) and ``transcript`` (the
    lines of every ``session.transcript`` event, in order).
    """
    client: dict[str, Any] = {
        "ip": _first(events, "client.ip"),
        "port": _first(events, "client.port"),
    }
    for e in events:
        for key, value in e.items():
            if key.startswith(("client.geo.", "client.asn.")) and value not in (None, ""):
                client.setdefault(key.removeprefix("client."), value)
    handshakes = [
        e
        for e in events
        if e.get("event.action") == "tls.handshake" and e.get("tls.leg", "client") == "client"
    ]
    tls: dict[str, Any] = {
        "active": bool(_last(events, "tls.active")),
        "outcome": handshakes[-1].get("event.outcome") if handshakes else None,
    }
    for key in ("version", "cipher", "sni", "ja3", "ja4", "fallback_scsv", "client_max_version"):
        tls[key] = _last(handshakes, f"tls.{key}")
    auth = [
        {
            "user": e.get("auth.user"),
            "mechanism": e.get("auth.mechanism"),
            "outcome": e.get("event.outcome"),
            "@timestamp": e.get("@timestamp"),
        }
        for e in events
        if e.get("event.action") == "auth.attempt"
    ]
    closes = [e for e in events if e.get("event.action") == "session.close"]
    close: dict[str, Any] | None = None
    if closes:
        c = closes[-1]
        close = {
            "reason": c.get("session.close_reason"),
            "outcome": c.get("event.outcome"),
            "duration_ms": c.get("session.duration_ms"),
            "client_bytes": c.get("client.bytes"),
            "server_bytes": c.get("server.bytes"),
            "backend": c.get("backend.address"),
        }
    verdicts = [
        {
            "action": e.get("event.action"),
            "rule_id": e.get("rule.id"),
            "rule_name": e.get("rule.name"),
            "severity": e.get("rule.severity"),
            "phase": e.get("rule.phase"),
            "verdict": e.get("verdict.action"),
            "evidence": e.get("verdict.evidence"),
            "blocked": is_blocked(e),
            "@timestamp": e.get("@timestamp"),
        }
        for e in events
        if e.get("event.kind") == "verdict"
    ]
    labels = [
        {
            "label": e.get("label.value"),
            "note": e.get("label.note"),
            "admin_client": e.get("admin.client"),
            "@timestamp": e.get("@timestamp"),
        }
        for e in events
        if e.get("event.action") == "session.label"
    ]
    transcript: list[Any] = []
    for e in events:
        if e.get("event.action") == "session.transcript" and isinstance(e.get("transcript"), list):
            transcript.extend(e["transcript"])
    return {
        "session_id": _first(events, "session.id"),
        "node": _first(events, "node.name"),
        "protocol": _first(events, "session.protocol"),
        "listener": _first(events, "session.listener"),
        "start": events[0].get("@timestamp") if events else None,
        "end": events[-1].get("@timestamp") if events else None,
        "client": client,
        "tls": tls,
        "user": _last(events, "auth.user"),
        "auth": auth,
        "close": close,
        "blocked": any(is_blocked(e) for e in events),
        "verdicts": verdicts,
        "labels": labels,
        "transcript": transcript,
        "event_count": len(events),
    }


# --------------------------------------------------------------------------- allow list


def parse_allow_value(kind: str, value: str) -> IPNetwork:
    """The network to allow: ``ip`` takes one address, ``cidr`` a network or an address.

    Parsed as the rule engine parses list entries (:func:`parse_network`):
    IPv4-mapped IPv6 becomes IPv4, a network with host bits set is refused.
    """
    text = value.strip()
    if kind == "ip":
        address = parse_ip(text)
        if address is None:
            raise BadParameter("value", f"not an IP address: {value!r}")
        return ipaddress.ip_network(address)
    if kind == "cidr":
        try:
            return parse_network(text)
        except ValueError as exc:
            raise BadParameter("value", str(exc)) from None
    raise BadParameter("kind", f'must be "ip" or "cidr", not {kind!r}')


def _entry_text(net: IPNetwork) -> str:
    """An address as an address, a network as ``a.b.c.d/n``."""
    full = 32 if net.version == 4 else 128
    return str(net.network_address) if net.prefixlen == full else str(net)


def _clean_comment(text: str) -> str:
    """One line: every character ``str.splitlines`` (the list loader) could split at goes."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _listed(text: str, net: IPNetwork) -> str | None:
    """The entry of the list file ``text`` that already covers ``net``, if any."""
    for raw in text.splitlines():
        have = _entry_of(raw)
        if have is None:
            continue
        item = raw.split("#", 1)[0].strip()
        if isinstance(net, ipaddress.IPv4Network) and isinstance(have, ipaddress.IPv4Network):
            if net.subnet_of(have):
                return item
        elif (
            isinstance(net, ipaddress.IPv6Network)
            and isinstance(have, ipaddress.IPv6Network)
            and net.subnet_of(have)
        ):
            return item
    return None


def _reload_body(result: ReloadResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "summary": result.summary(),
        "count": result.rules,
        "added": list(result.added),
        "removed": list(result.removed),
        "changed": list(result.changed),
        "errors": [str(e) for e in result.errors],
    }


def _list_file(node: Node, list_name: str) -> tuple[str, Path] | Response:
    """The file behind the ``cidr`` list ``list_name``, or a 409 saying why it has none."""
    rules = node.rules.current
    named = rules.lists.get(list_name)
    if named is None or named.kind != "cidr":
        what = "is not loaded" if named is None else f"is of kind {named.kind}, not cidr"
        cidr_lists = sorted(n for n, lst in rules.lists.items() if lst.kind == "cidr")
        return _error(
            409,
            f"the list {list_name!r} {what}: allowing needs a [[list]] of kind cidr read "
            f"from a file (the shipped rules/10-allowlist.toml defines "
            f"{DEFAULT_ALLOW_LIST!r}); cidr lists loaded: {', '.join(cidr_lists) or 'none'}",
        )
    if named.source in {str(f) for f in rules.files}:
        return _error(
            409,
            f"the list {list_name!r} is written inline (items = [...]) in {named.source}; "
            'only a list read from a file (file = "...") can be changed',
        )
    # a symlinked list stays a symlink: replace the file it points to
    return named.source, Path(os.path.realpath(named.source))


def _change_list(
    node: Node,
    list_name: str,
    net: IPNetwork,
    client: str,
    change: Callable[[str, str], tuple[str | None, str]],
    *,
    action: str,
    done: str,
    fields: Mapping[str, Any],
) -> Response:
    """Read the list, ``change(old text, entry)`` it, replace the file, reload the
    rules, audit as ``action``; the file is put back if the reload fails.

    ``change`` returns the new text and the line it wrote or a message, or
    ``None`` and a message for "nothing to do"; the answer says ``done``
    (``added``, ``removed``) true or false.
    Synchronous on purpose (see the module docstring): reading the list,
    replacing it and reloading the rules happen without a checkpoint.
    """
    found = _list_file(node, list_name)
    if isinstance(found, Response):
        return found
    source, path = found
    entry = _entry_text(net)
    result: dict[str, Any] = {"list": list_name, "file": source, "value": entry}
    try:
        old = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _error(500, f"cannot read the list file {source}: {exc}")
    new, message = change(old, entry)
    if new is None:
        return Response.json({"ok": True, done: False, "message": message, **result})
    try:
        replace_file(path, new.encode("utf-8"))
    except OSError as exc:
        return _error(
            500,
            f"cannot write the list file {source}: {exc.strerror or exc} (the node's user "
            f"must be able to create a file in {path.parent}; under systemd's "
            f"ProtectSystem=strict add ReadWritePaths={path.parent})",
        )
    reload = node.reload_rules("admin")
    audit: dict[str, Any] = {
        "list.name": list_name,
        "file.path": source,
        "allowlist.value": entry,
        "admin.client": client,
        "rules.generation": node.rules.generation,
        **fields,
    }
    if not reload.ok:
        # keep the file in step with the rules in force
        try:
            replace_file(path, old.encode("utf-8"))
            restored = True
        except OSError:
            restored = False
        audit["error.message"] = reload.summary()
        node.emitter.emit(action, audit, kind="audit", outcome="failure")
        return Response.json(
            {
                "ok": False,
                done: False,
                "error": "the rules did not reload, so the change was "
                + ("taken out again" if restored else "written but is NOT in force")
                + f": {reload.summary()}",
                "rules": _reload_body(reload),
                **result,
            },
            422,
        )
    node.emitter.emit(action, audit, kind="audit", outcome="success")
    current = node.rules.current.lists.get(list_name)
    return Response.json(
        {
            "ok": True,
            done: True,
            "line" if done == "added" else "message": message,
            "active": current is not None and str(net.network_address) in current,
            "rules": _reload_body(reload),
            **result,
        }
    )


def allow(
    node: Node, list_name: str, kind: str, net: IPNetwork, comment: str, client: str
) -> Response:
    """``POST /api/allow`` once its body is checked: append, reload, audit (or say why not)."""

    def append(old: str, entry: str) -> tuple[str | None, str]:
        covered = _listed(old, net)
        if covered is not None:
            return None, f"{entry} is already in the list {list_name!r} as {covered}"
        when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        line = f"{entry}  # added by {client} at {when}" + (f": {comment}" if comment else "")
        return old + ("" if not old or old.endswith("\n") else "\n") + line + "\n", line

    fields = {"allowlist.kind": kind, "allowlist.comment": comment}
    return _change_list(
        node, list_name, net, client, append, action="allowlist.add", done="added", fields=fields
    )


def disallow(node: Node, list_name: str, net: IPNetwork, client: str) -> Response:
    """``POST /api/allow/remove``: take the entry for exactly ``net`` out, reload, audit."""

    def remove(old: str, entry: str) -> tuple[str | None, str]:
        lines = old.splitlines(keepends=True)
        kept = [line for line in lines if _entry_of(line) != net]
        if len(kept) == len(lines):
            covered = _listed(old, net)
            why = f"; it is covered by {covered}: remove that" if covered else ""
            return None, f"{entry} is not an entry of the list {list_name!r}{why}"
        return "".join(kept), f"removed {len(lines) - len(kept)} line(s) for {entry}"

    return _change_list(
        node, list_name, net, client, remove, action="allowlist.remove", done="removed", fields={}
    )


def _entry_of(line: str) -> IPNetwork | None:
    item = line.split("#", 1)[0].strip()
    try:
        return parse_network(item) if item else None
    except ValueError:
        return None


#: the comment :func:`allow` writes after an entry: ``added by CLIENT at TIME[: COMMENT]``
_ADDED: Final = re.compile(
    r"added by (?P<by>\S+) at (?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)(?:: (?P<comment>.*))?"
)


def read_allow_file(
    text: str,
) -> tuple[list[tuple[IPNetwork, dict[str, Any]]], list[dict[str, Any]]]:
    """The entries of a list file and the lines that are not entries, in file order.

    A line is read as the rule loader reads it: what comes before ``#`` is the
    entry, a line with nothing there (blank, only a comment) is skipped.  Each
    entry is its network and ``{"entry" (as written), "kind" ("ip" for one
    address, else "cidr"), "line", "comment", "added_by", "added_at"}``: for a
    line :func:`allow` wrote, who and when and the comment given (``None`` when
    none); for a hand-written one, the whole comment and no who or when.  A line
    whose entry does not parse is ``{"line", "text", "error"}`` in the second
    list (the rule loader refuses the file while it is there).
    """
    entries: list[tuple[IPNetwork, dict[str, Any]]] = []
    invalid: list[dict[str, Any]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        item, _, note = raw.partition("#")
        item, note = item.strip(), note.strip()
        if not item:
            continue
        try:
            net = parse_network(item)
        except ValueError as exc:
            invalid.append({"line": lineno, "text": raw.strip(), "error": str(exc)})
            continue
        added = _ADDED.fullmatch(note)
        full = 32 if net.version == 4 else 128
        entry: dict[str, Any] = {
            "entry": item,
            "kind": "ip" if net.prefixlen == full else "cidr",
            "line": lineno,
            "comment": (added.group("comment") if added else note) or None,
            "added_by": added.group("by") if added else None,
            "added_at": added.group("at") if added else None,
        }
        entries.append((net, entry))
    return entries, invalid


def list_allow(node: Node, list_names: list[str], ip: str | None) -> Response:
    """``GET /api/allow`` once its query is checked: the entries of each list's file.

    Every entry says its list and file and whether it is ``active`` (in the
    rules in force: a line added by hand since the last reload is not); with
    ``ip``, only the entries covering that address, each with ``exact`` (the
    entry is the address itself, so ``POST /api/allow/remove`` can take it out).
    """
    address: IPNetwork | None = None
    if ip is not None:
        parsed = parse_ip(ip.strip())
        if parsed is None:
            raise BadParameter("ip", f"not an IP address: {ip!r}")
        # a zone (fe80::1%eth0) is not part of any list entry
        address = ipaddress.ip_network(str(parsed).partition("%")[0])
    lists: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    for list_name in list_names:
        found = _list_file(node, list_name)
        if isinstance(found, Response):
            return found
        source, path = found
        try:
            # a stray byte in a hand-written comment must not hide the whole list
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return _error(500, f"cannot read the list file {source}: {exc.strerror or exc}")
        named = node.rules.current.lists.get(list_name)
        items = named.items if named is not None else ()
        in_force = {net for i in items if (net := _entry_of(i)) is not None}
        where = {"list": list_name, "file": source}
        found_entries, found_invalid = read_allow_file(text)
        lists.append({**where, "count": len(found_entries), "invalid": len(found_invalid)})
        for net, fields in found_entries:
            # an address of the other family is in no network of this one
            if address is not None and address.network_address not in net:
                continue
            entry = {**fields, **where, "active": net in in_force}
            if address is not None:
                entry["exact"] = net == address
            entries.append(entry)
        invalid.extend({**bad, **where} for bad in found_invalid)
    body: dict[str, Any] = {"lists": lists, "entries": entries, "count": len(entries)}
    if address is not None:
        body["ip"] = str(address.network_address)
    body["invalid"] = invalid
    return Response.json(body)


# --------------------------------------------------------------------------- routes


def _handles_bad_parameters(handler: Handler) -> Handler:
    """400 naming the parameter for a :class:`BadParameter` the handler raises."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except BadParameter as exc:
            return _error(400, str(exc), parameter=exc.name)

    return wrapped


def add_node_routes(server: AdminServer, node: Node) -> None:
    """Register the node's routes on ``server`` (see the module docstring)."""
    config = node.config
    journal_dir = config.journal_dir

    def journal() -> Journal:
        return Journal(journal_dir)

    async def session_events(session_id: str) -> list[dict[str, Any]]:
        return await trio.to_thread.run_sync(journal().session, session_id)

    # -- rules and bans ---------------------------------------------------------------

    async def get_rules(_request: Request) -> Response:
        rules = node.rules.current
        hits = rules.stats()
        errors = rules.counters.errors
        last = node.rules.last_result
        return Response.json(
            {
                "generation": node.rules.generation,
                "mode": rules.mode,
                "files": [str(f) for f in rules.files],
                "last_reload": None
                if last is None
                else {
                    "ok": last.ok,
                    "summary": last.summary(),
                    "errors": [str(e) for e in last.errors],
                },
                "rules": [
                    {
                        "id": r.id,
                        "name": r.name,
                        "phase": r.phase,
                        "protocols": sorted(r.protocols),
                        "action": r.action,
                        "severity": r.severity,
                        "mode": r.mode,
                        "enabled": r.enabled,
                        "source": f"{r.source}:{r.line}",
                        "hits": hits.get(r.id, 0),
                        "errors": errors.get(r.id, 0),
                    }
                    for r in rules.rules
                ],
            }
        )

    async def post_reload(_request: Request) -> Response:
        result, certs_ok = node.reload("admin")
        body = {
            "ok": result.ok and certs_ok,
            "rules": _reload_body(result),
            "certificates": {"ok": certs_ok},
        }
        return Response.json(body, 200 if result.ok and certs_ok else 422)

    async def get_bans(_request: Request) -> Response:
        store = node.store
        return Response.json(
            {
                "bans": [
                    {
                        "ip": b.ip,
                        "reason": b.reason,
                        "rule_id": b.rule_id,
                        "remaining_seconds": round(store.remaining(b), 1),
                    }
                    for b in await store.bans()
                ]
            }
        )

    async def unban(ip: str, request: Request) -> Response:
        try:
            removed = await node.store.unban(ip)
        except StoreUnavailable as exc:
            return _error(503, f"the state store is unavailable: {exc}")
        node.emitter.emit(
            "client.unban",
            {"client.ip": ip, "admin.client": request.client[0]},
            kind="audit",
            outcome="success" if removed else "failure",
        )
        if not removed:
            return _error(404, f"{ip} is not banned")
        return Response.json({"ok": True, "ip": ip})

    async def delete_ban(request: Request) -> Response:
        return await unban(request.path_params["ip"], request)

    async def post_unban(request: Request) -> Response:
        ip = _text(_body(request), "ip")
        assert ip is not None
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            raise BadParameter("ip", f"not an IP address: {ip!r}") from None
        return await unban(str(address), request)

    # -- the journal --------------------------------------------------------------------

    async def get_events(request: Request) -> Response:
        where, limit = parse_event_query(request.query, wall_clock())

        def read() -> list[dict[str, Any]]:
            return list(journal().query(where, newest_first=True, limit=limit))

        events = await trio.to_thread.run_sync(read)
        return _json({"events": events, "count": len(events), "limit": limit})

    async def get_session(request: Request) -> Response:
        session_id = request.path_params["id"]
        events = await session_events(session_id)
        if not events:
            return _error(404, f"no session {session_id!r} in the journal")
        return _json(
            {
                "session_id": session_id,
                "summary": session_story(events),
                "events": events,
                "count": len(events),
            }
        )

    async def post_label(request: Request) -> Response:
        session_id = request.path_params["id"]
        data = _body(request)
        label = _text(data, "label")
        if label not in LABELS:
            raise BadParameter("label", f"must be one of {', '.join(LABELS)}, not {label!r}")
        note = _text(data, "note", required=False) or ""
        if len(note) > MAX_NOTE:
            raise BadParameter("note", f"longer than {MAX_NOTE} characters")
        events = await session_events(session_id)
        if not events:
            return _error(404, f"no session {session_id!r} in the journal")
        fields: dict[str, Any] = {
            "label.value": label,
            "label.note": note,
            "admin.client": request.client[0],
        }
        # so that `mailmoat events --ip/--protocol` find the label beside the session
        for key in ("client.ip", "session.protocol", "session.listener"):
            if (value := _first(events, key)) is not None:
                fields[key] = value
        event = node.emitter.emit(
            "session.label", fields, kind="audit", outcome="success", session_id=session_id
        )
        return _json({"ok": True, "event": event})

    # -- the allow list -----------------------------------------------------------------

    async def post_allow(request: Request) -> Response:
        data = _body(request)
        kind = _text(data, "kind")
        value = _text(data, "value")
        assert kind is not None
        assert value is not None
        comment = _clean_comment(_text(data, "comment", required=False) or "")
        if len(comment) > MAX_NOTE:
            raise BadParameter("comment", f"longer than {MAX_NOTE} characters")
        list_name = _text(data, "list", required=False) or DEFAULT_ALLOW_LIST
        net = parse_allow_value(kind, value)
        # no await from here on: no other request changes the file meanwhile
        return allow(node, list_name, kind, net, comment, request.client[0])

    async def get_allow(request: Request) -> Response:
        for name, given in request.query.items():
            if name not in ALLOW_PARAMS:
                raise BadParameter(name, f"unknown parameter; known: {', '.join(ALLOW_PARAMS)}")
            if name == "ip" and len(given) != 1:
                raise BadParameter(name, "given more than once")
            if not all(v.strip() for v in given):
                raise BadParameter(name, "is empty")
        ip = request.query["ip"][0] if "ip" in request.query else None
        # a list named twice is listed once
        list_names = list(dict.fromkeys(request.query.get("list") or [DEFAULT_ALLOW_LIST]))
        return list_allow(node, list_names, ip)

    async def post_allow_remove(request: Request) -> Response:
        data = _body(request)
        kind = _text(data, "kind")
        value = _text(data, "value")
        assert kind is not None
        assert value is not None
        list_name = _text(data, "list", required=False) or DEFAULT_ALLOW_LIST
        net = parse_allow_value(kind, value)
        return disallow(node, list_name, net, request.client[0])

    # -- metrics ------------------------------------------------------------------------

    async def get_metrics(_request: Request) -> Response:
        metrics = getattr(node, "metrics", None)
        if metrics is None:
            return _error(404, "this node keeps no metrics")
        body, content_type = metrics.render()
        return Response(200, body, content_type)

    server.route("GET", "/api/rules", get_rules)
    server.route("POST", "/api/reload", post_reload)
    server.route("GET", "/api/bans", get_bans)
    server.route("DELETE", "/api/bans/{ip}", delete_ban)
    server.route("POST", "/api/unban", _handles_bad_parameters(post_unban))
    server.route("GET", "/api/events", _handles_bad_parameters(get_events))
    server.route("GET", "/api/sessions/{id}", get_session)
    server.route("POST", "/api/sessions/{id}/label", _handles_bad_parameters(post_label))
    server.route("GET", "/api/allow", _handles_bad_parameters(get_allow))
    server.route("POST", "/api/allow", _handles_bad_parameters(post_allow))
    server.route("POST", "/api/allow/remove", _handles_bad_parameters(post_allow_remove))
    server.route("GET", "/metrics", get_metrics)
    add_page_routes(server)  # the review page (docs/review.md), no token: it holds no data
