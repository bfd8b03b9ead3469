"""The context schema: every field a rule condition may read.

Contract: :data:`FIELDS` maps a dotted name (``client.geo.country``) to its
:class:`Field` — CEL type, an example value, a description and the phases in
which a session fills it in.  The loader rejects any dotted path in a
condition that is not in the schema (or below a ``map(string,string)`` field),
so a typo is a load error, never a silently false condition.

:func:`default_context` builds the nested dict with every field at its zero
value (``""``, ``0``, ``0.0``, ``False``, ``[]``, ``{}``); sessions start
from it and fill in what they know, so a condition never fails on a missing
key.  Field names follow ECS where ECS has a name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, final

FieldType = Literal["string", "int", "double", "bool", "list(string)", "map(string,string)"]

#: in the order a session goes through them (``command`` is any other command)
PHASES: Final = (
    "connect",
    "tls",
    "helo",
    "auth",
    "login",
    "mail_from",
    "rcpt",
    "data",
    "command",
    "request",
    "response",
    "close",
)
PROTOCOLS: Final = ("smtp", "imap", "http")

#: top-level names a condition may use (``lists`` holds the named lists)
NAMESPACES: Final = (
    "session",
    "client",
    "tls",
    "smtp",
    "imap",
    "http",
    "auth",
    "login",
    "risk",
    "lists",
)


@final
@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: FieldType
    example: str
    description: str
    phases: tuple[str, ...]


_ALL = PHASES
_SMTP_CMD = ("helo", "auth", "mail_from", "rcpt", "data", "command")
_AFTER_HELO = ("helo", "auth", "login", "mail_from", "rcpt", "data", "command", "close")
_AFTER_AUTH = ("auth", "login", "mail_from", "rcpt", "data", "command", "request", "close")
_AFTER_LOGIN = ("login", "mail_from", "rcpt", "data", "command", "request", "close")
_AFTER_MAIL = ("mail_from", "rcpt", "data", "close")
_AFTER_RCPT = ("rcpt", "data", "close")
_DATA = ("data", "close")
_IMAP = ("auth", "login", "command", "close")
_HTTP = ("login", "request", "response", "close")

_S: FieldType = "string"
_I: FieldType = "int"
_D: FieldType = "double"
_B: FieldType = "bool"
_L: FieldType = "list(string)"
_M: FieldType = "map(string,string)"

_SCHEMA: tuple[tuple[str, FieldType, str, str, tuple[str, ...]], ...] = (
    ("session.id", _S, "01a220630125621b7f99", "time-sortable session id", _ALL),
    ("session.protocol", _S, "smtp", "smtp, imap or http", _ALL),
    ("session.listener", _S, "submission", "the [[listener]] name", _ALL),
    ("session.phase", _S, "auth", "the phase being evaluated", _ALL),
    (
        "session.close_reason",
        _S,
        "pregreet",
        "why the session ended (see docs/events.md), '' before the close phase",
        ("close",),
    ),
    ("client.ip", _S, "198.51.100.7", "peer address (IPv4-mapped IPv6 given as IPv4)", _ALL),
    ("client.port", _I, "36636", "peer port", _ALL),
    ("client.geo.country", _S, "DE", "ISO 3166 country code, '' if unknown", _ALL),
    ("client.geo.city", _S, "Berlin", "city name, '' if unknown", _ALL),
    ("client.geo.lat", _D, "52.52", "latitude", _ALL),
    ("client.geo.lon", _D, "13.40", "longitude", _ALL),
    ("client.asn.number", _I, "64496", "autonomous system number, 0 if unknown", _ALL),
    ("client.asn.org", _S, "Example Hosting", "AS organisation", _ALL),
    ("client.reputation", _I, "-20", "reputation from the state store (negative = bad)", _ALL),
    ("client.banned", _B, "false", "client.ip is currently banned", _ALL),
    ("tls.active", _B, "true", "the client leg is encrypted", _ALL),
    ("tls.version", _S, "TLSv1.3", "negotiated protocol version", _ALL),
    ("tls.cipher", _S, "TLS_AES_256_GCM_SHA384", "negotiated cipher suite", _ALL),
    ("tls.sni", _S, "mx.example.org", "server name the client asked for", _ALL),
    ("tls.ja3", _S, "e7d705a3286e19ea42f587b344ee6865", "JA3 (MD5) of the ClientHello", _ALL),
    ("tls.ja4", _S, "t13d1516h2_8daaf6152771_e5627efa2ab1", "JA4 fingerprint", _ALL),
    ("tls.fallback_scsv", _B, "false", "ClientHello carried TLS_FALLBACK_SCSV", _ALL),
    (
        "tls.client_max_version",
        _S,
        "TLSv1.3",
        "highest TLS version the ClientHello offered",
        _ALL,
    ),
    (
        "tls.downgrade",
        _B,
        "false",
        "this login is plaintext or older TLS than every earlier login of auth.user",
        _AFTER_AUTH,
    ),
    (
        "tls.usual_version",
        _S,
        "TLSv1.3",
        "oldest TLS version auth.user logged in with before, '' if none",
        _AFTER_AUTH,
    ),
    (
        "tls.ja4_users",
        _I,
        "14",
        "distinct users that failed a login with this JA4 within the login window",
        _AFTER_AUTH,
    ),
    (
        "tls.shared_ja4",
        _B,
        "false",
        "a non-browser JA4 failed for [state] shared_ja4_users accounts or more",
        _AFTER_AUTH,
    ),
    (
        "tls.stripped_inbound",
        _B,
        "false",
        "plaintext SMTP from a sender (domain or network) that used STARTTLS before",
        _AFTER_MAIL,
    ),
    (
        "tls.inbound_tls_sessions",
        _I,
        "12",
        "STARTTLS sessions of this sender (domain or network) in the window",
        _AFTER_MAIL,
    ),
    (
        "tls.inbound_plain_sessions",
        _I,
        "1",
        "plaintext sessions of this sender (domain or network) in the window",
        _AFTER_MAIL,
    ),
    (
        "tls.injected_plaintext",
        _B,
        "false",
        "bytes were pipelined after STARTTLS (injection attempt)",
        _ALL,
    ),
    ("smtp.helo", _S, "mail.example.org", "the HELO/EHLO argument", _AFTER_HELO),
    ("smtp.command", _S, "MAIL", "verb of the current command, upper case", _SMTP_CMD),
    ("smtp.args", _S, "FROM:<a@example.org>", "arguments of the current command", _SMTP_CMD),
    ("smtp.mail_from", _S, "a@example.org", "envelope sender ('' for <>)", _AFTER_MAIL),
    ("smtp.rcpt_to", _L, '["b@example.net"]', "envelope recipients so far", _AFTER_RCPT),
    ("smtp.rcpt_count", _I, "3", "number of recipients so far (this one included)", _AFTER_RCPT),
    ("smtp.pregreet", _B, "false", "client spoke before the greeting", _AFTER_HELO),
    ("smtp.errors", _I, "2", "protocol errors so far in the session", _ALL),
    ("smtp.data.size", _I, "48213", "message size in octets", _DATA),
    ("smtp.data.bare_lf", _B, "false", "the message had a bare LF", _DATA),
    ("smtp.data.bare_cr", _B, "false", "the message had a bare CR", _DATA),
    ("smtp.data.smuggling", _B, "false", "a smuggling end-of-data sequence was seen", _DATA),
    (
        "smtp.user_rcpt_rate",
        _I,
        "140",
        "recipients the authenticated user sent to in the last hour (this message included)",
        _DATA,
    ),
    (
        "smtp.user_domains",
        _I,
        "37",
        "distinct recipient domains of the user in the last hour",
        _DATA,
    ),
    (
        "smtp.user_burst",
        _B,
        "false",
        "the user's hourly recipients are far above their own baseline (compromised account?)",
        _DATA,
    ),
    ("imap.tag", _S, "a001", "tag of the current command", _IMAP),
    ("imap.command", _S, "LOGIN", "the current command, upper case", _IMAP),
    ("imap.args", _S, '"user" ***', "arguments (credentials redacted)", _IMAP),
    ("http.method", _S, "POST", "request method", _HTTP),
    (
        "http.path",
        _S,
        "/login",
        "request path without the query, normalised (percent-decoded unreserved "
        "characters, dot-segments resolved, duplicate slashes merged)",
        _HTTP,
    ),
    ("http.raw_path", _S, "/%6Cogin", "request path as sent, without the query", _HTTP),
    ("http.query", _S, "next=%2F", "raw query string", _HTTP),
    ("http.host", _S, "mail.example.org", "Host (lower case, port kept)", _HTTP),
    (
        "http.headers",
        _M,
        '{"host": "mail.example.org"}',
        "request headers, lower-case names, repeats joined with ', '; "
        "Authorization and Cookie values redacted",
        _HTTP,
    ),
    ("http.user_agent", _S, "Mozilla/5.0", "User-Agent header", _HTTP),
    ("http.content_type", _S, "application/x-www-form-urlencoded", "Content-Type", _HTTP),
    (
        "http.content_length",
        _I,
        "512",
        "declared Content-Length; 0 when absent (chunked or no body)",
        _HTTP,
    ),
    (
        "http.form",
        _M,
        '{"user": "alice"}',
        "the login form's fields (urlencoded, multipart or JSON; password and other "
        "secret fields removed); empty for other requests",
        _HTTP,
    ),
    ("http.status", _I, "302", "the backend's response status", ("login", "response", "close")),
    (
        "http.response_headers",
        _M,
        '{"location": "/mail/"}',
        "the backend's response headers, lower-case names",
        ("login", "response", "close"),
    ),
    ("auth.mechanism", _S, "PLAIN", "SASL mechanism or LOGIN/basic", _AFTER_AUTH),
    ("auth.user", _S, "alice@example.org", "the user being authenticated", _AFTER_AUTH),
    (
        "auth.result",
        _S,
        "failure",
        "'' until the backend answers, then success/failure",
        _AFTER_LOGIN,
    ),
    ("login.failures_ip", _I, "7", "recent failed logins from client.ip", _AFTER_AUTH),
    (
        "login.failures_prefix",
        _I,
        "9",
        "recent failed logins from client.ip's network (IPv6 /64; IPv4: the address)",
        _AFTER_AUTH,
    ),
    ("login.failures_user", _I, "3", "recent failed logins for auth.user", _AFTER_AUTH),
    (
        "login.failures_user_ip",
        _I,
        "2",
        "recent failed logins for auth.user from client.ip",
        _AFTER_AUTH,
    ),
    (
        "login.distinct_users_ip",
        _I,
        "12",
        "distinct users with failed logins from client.ip (password spraying)",
        _AFTER_AUTH,
    ),
    (
        "login.distinct_ips_user",
        _I,
        "30",
        "distinct addresses with failed logins for auth.user (credential stuffing)",
        _AFTER_AUTH,
    ),
    (
        "login.distinct_passwords_user",
        _I,
        "4",
        "distinct wrong passwords tried for auth.user (salted fingerprints)",
        _AFTER_AUTH,
    ),
    ("login.travel_kmh", _D, "4200.0", "speed implied by the user's last login place", _AFTER_AUTH),
    ("login.new_country", _B, "true", "first login of auth.user from this country", _AFTER_AUTH),
    ("login.new_asn", _B, "false", "first login of auth.user from this AS", _AFTER_AUTH),
    ("login.new_ja4", _B, "false", "first login of auth.user with this JA4", _AFTER_AUTH),
    ("risk.score", _I, "12", "the session's risk score before this phase", _ALL),
)

#: dotted name -> field, in documentation order
FIELDS: Final[Mapping[str, Field]] = {
    name: Field(name, typ, example, description, phases)
    for name, typ, example, description, phases in _SCHEMA
}

_ZERO: Final[Mapping[FieldType, Any]] = {
    "string": "",
    "int": 0,
    "double": 0.0,
    "bool": False,
    "list(string)": [],
    "map(string,string)": {},
}

#: every object (non-leaf) path, e.g. ``client`` and ``client.geo``
OBJECTS: Final[frozenset[str]] = frozenset(
    ".".join(name.split(".")[:i]) for name in FIELDS for i in range(1, name.count(".") + 1)
)


def zero_value(typ: FieldType) -> Any:
    """A fresh zero value of ``typ`` (lists and maps are new objects)."""
    value = _ZERO[typ]
    return type(value)() if isinstance(value, list | dict) else value


def default_context() -> dict[str, Any]:
    """Every field at its zero value, nested; ``lists`` is filled in by the engine."""
    root: dict[str, Any] = {ns: {} for ns in NAMESPACES if ns != "lists"}
    for field in FIELDS.values():
        *parents, leaf = field.name.split(".")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = zero_value(field.type)
    return root


def known_under(prefix: str) -> list[str]:
    """Names of the fields below ``prefix`` (relative to it), in schema order."""
    start = prefix + "."
    return [name[len(start) :] for name in FIELDS if name.startswith(start)]


def check_path(path: str) -> str | None:
    """``None`` if ``path`` names a field, an object or a key of a map field; else why not."""
    if path in FIELDS or path in OBJECTS:
        return None
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if (field := FIELDS.get(head)) is not None:
            if field.type == "map(string,string)":
                return None
            return (
                f"'{head}' is a {field.type}, it has no field '{'.'.join(parts[i:])}'"
                f" (a method call needs parentheses)"
            )
    # report against the deepest object that exists
    parent = parts[0]
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in OBJECTS:
            parent = head
            break
    known = ", ".join(known_under(parent))
    return f"unknown field '{path}'; known fields under {parent}: {known}"


def read_path(context: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in a nested context, ``None`` if absent."""
    node: Any = context
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node
