"""Configuration: the TOML file of DESIGN.md §4, validated into frozen objects.

Contract: :func:`load_config` either returns a complete, consistent
:class:`Config` or raises :class:`ConfigErrors` listing *every* problem it
found, each as ``file:line: message`` with the fix in the message.  Nothing
downstream re-validates; a running node never sees a half-valid config.

``tomllib`` does not report where a key was written, so :class:`_Locator`
scans the source once and remembers the line of every table header and
``key =`` assignment; a message about ``[[listener]]`` number 2, key
``listen`` then points at that line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, final

from .errors import ConfigError, MailmoatError
from .protocols.http import HttpLimits, LoginForm, LoginOutcome

TlsMode = Literal["none", "starttls", "implicit"]
Protocol = Literal["smtp", "imap", "http"]
Identity = Literal["none", "xclient", "proxy-v2", "imap-id", "forwarded"]

TLS_MODES: tuple[TlsMode, ...] = ("none", "starttls", "implicit")
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
#: protocols this version can proxy; the others are reserved by DESIGN.md §4
SUPPORTED_PROTOCOLS: tuple[Protocol, ...] = ("smtp", "imap", "http")
SUPPORTED_IDENTITIES: tuple[Identity, ...] = ("none", "xclient", "proxy-v2", "imap-id", "forwarded")


@final
class ConfigErrors(MailmoatError):
    """Every problem found in one config file."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = tuple(errors)


@final
@dataclass(frozen=True, slots=True)
class Address:
    """A host and port; ``host`` is an IP literal (or a name, for backends)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@final
@dataclass(frozen=True, slots=True)
class CertConfig:
    cert: Path
    key: Path
    line: int | None = None


@final
@dataclass(frozen=True, slots=True)
class TlsConfig:
    certs: tuple[CertConfig, ...] = ()
    min_version: str = "1.2"


@final
@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = "mailmoat"
    data_dir: Path = Path("/var/lib/mailmoat")
    mode: Literal["enforce", "detect"] = "enforce"
    drain_timeout: float = 30.0


@final
@dataclass(frozen=True, slots=True)
class LogConfig:
    #: ``"stdout"``, ``"stderr"``, ``"none"`` or a file path for the JSON-lines event stream
    events: str = "stdout"


@final
@dataclass(frozen=True, slots=True)
class SmtpLimitsConfig:
    max_command_line: int = 512
    max_text_line: int | None = 1000
    max_message_size: int = 50 * 1024 * 1024


@final
@dataclass(frozen=True, slots=True)
class HttpLoginConfig:
    """``[listener.login]``: the webmail's login endpoint (``form``: method,
    path, the user and password fields) and how its answer reads
    (``outcome``: success and failure statuses, redirect, cookie)."""

    form: LoginForm
    outcome: LoginOutcome = field(default_factory=LoginOutcome)


_HTTP_LIMITS = HttpLimits()


@final
@dataclass(frozen=True, slots=True)
class HttpListenerConfig:
    """The keys only an ``http`` listener has (docs/http.md)."""

    # the request screen's own defaults (protocols/http, HttpLimits)
    max_head_size: int = _HTTP_LIMITS.max_head_size
    max_header_count: int = _HTTP_LIMITS.max_header_count
    max_target_length: int = _HTTP_LIMITS.max_target_length
    max_body_size: int = _HTTP_LIMITS.max_body_size
    #: seconds from the first byte of a request head to its blank line (slowloris)
    header_timeout: float = 10.0
    #: ``""``: proxy; ``"host"``: redirect to https://<Host>; else an https origin to redirect to
    redirect_https: str = ""
    #: peers whose forwarding fields (X-Forwarded-For, Forwarded) are believed
    trusted_proxies: tuple[str, ...] = ()
    websocket: bool = True
    #: an HTML file answered (with 403) instead of the built-in page
    deny_page: Path | None = None
    login: HttpLoginConfig | None = None


@final
@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    protocol: Protocol
    listen: tuple[Address, ...]
    backend: str
    tls: TlsMode = "none"
    require_tls: bool = False
    hostname: str = ""
    idle_timeout: float = 300.0
    tls_handshake_timeout: float = 30.0
    max_sessions: int = 1000
    greet_delay: float = 0.0
    bare_newline: Literal["reject", "normalize"] = "reject"
    max_errors: int = 20
    limits: SmtpLimitsConfig = field(default_factory=SmtpLimitsConfig)
    #: ``protocol = "http"`` only
    http: HttpListenerConfig | None = None
    line: int | None = None


@final
@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    address: tuple[Address, ...]
    tls: TlsMode = "none"
    verify: bool = True
    ca: Path | None = None
    pin_sha256: bytes | None = None
    server_name: str | None = None
    client_identity: Identity = "none"
    connect_timeout: float = 10.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    line: int | None = None


@final
@dataclass(frozen=True, slots=True)
class RulesConfig:
    """``[rules]``: where the rule files are and whether to watch them."""

    paths: tuple[Path, ...] = ()
    watch: bool = False
    #: seconds between two looks at the files when ``watch`` is on
    watch_interval: float = 1.0
    line: int | None = None


@final
@dataclass(frozen=True, slots=True)
class AdminSectionConfig:
    """``[admin]``: the admin API's address and the file holding its bearer token."""

    listen: Address
    token_file: Path
    line: int | None = None


@final
@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where bans and counters live (``memory``: this process; ``redis``: shared)."""

    backend: Literal["memory", "redis"] = "memory"
    url: str = ""
    on_failure: Literal["open", "closed"] = "open"
    timeout: float = 0.5
    max_bans: int = 100_000
    max_keys: int = 200_000
    login_window: float = 600.0
    v6_prefix: int = 64
    snapshot: bool = True
    #: false: no login/reputation/outbound detectors (bans still apply)
    detection: bool = True
    #: distinct users failing with one non-browser JA4 in login_window: ``tls.shared_ja4``
    shared_ja4_users: int = 10
    #: how long port-25 senders' STARTTLS use is remembered (``tls.stripped_inbound``)
    inbound_tls_window: float = 30 * 86400.0
    #: encrypted logins of a user on a protocol before ``tls.downgrade`` can fire
    downgrade_min_logins: int = 3


@final
@dataclass(frozen=True, slots=True)
class GeoipConfig:
    """``[geoip]``: MaxMind databases (City or Country, and ASN); none: geo fields stay empty."""

    city: Path | None = None
    asn: Path | None = None


@final
@dataclass(frozen=True, slots=True)
class JournalConfig:
    """``[journal]``: the msgpack event journal in ``data_dir`` (docs/journal.md)."""

    enabled: bool = True
    #: default: ``data_dir/journal``
    dir: Path | None = None
    segment_size: int = 64 * 1024 * 1024
    segment_age: float = 3600.0
    retain_age: float = 14 * 86400.0
    retain_size: int = 2 * 1024**3
    queue: int = 10_000
    #: seconds between fsyncs; 0: after every batch; ``None`` (``false``): never
    fsync_interval: float | None = 1.0


@final
@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None
    node: NodeConfig
    tls: TlsConfig
    log: LogConfig
    listeners: tuple[ListenerConfig, ...]
    backends: Mapping[str, BackendConfig]
    rules: RulesConfig = field(default_factory=RulesConfig)
    admin: AdminSectionConfig | None = None
    state: StateConfig = field(default_factory=StateConfig)
    geoip: GeoipConfig = field(default_factory=GeoipConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)

    @property
    def journal_dir(self) -> Path:
        """Where the journal lives: ``[journal] dir``, else ``data_dir/journal``."""
        return self.journal.dir or self.node.data_dir / "journal"


# --------------------------------------------------------------------------- locating


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


@final
class _Locator:
    """Maps (table, index, key) to the line where it was written."""

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, int], int] = {}
        self.keys: dict[tuple[str, int, str], int] = {}
        counts: dict[str, int] = {}
        current = ("", 0)
        for lineno, line in enumerate(text.splitlines(), start=1):
            if m := _HEADER.match(line):
                name = m.group(2).replace('"', "")
                if m.group(1) == "[[":
                    idx = counts.get(name, -1) + 1
                    counts[name] = idx
                else:
                    # [listener.login] belongs to the [[listener]] above it
                    idx = counts.get(name.rpartition(".")[0], 0)
                current = (name, idx)
                self.tables.setdefault(current, lineno)
            elif m := _KEY.match(line):
                self.keys.setdefault((current[0], current[1], m.group(1)), lineno)

    def line(self, table: str, index: int = 0, key: str | None = None) -> int | None:
        if key is not None and (found := self.keys.get((table, index, key))) is not None:
            return found
        return self.tables.get((table, index))


# --------------------------------------------------------------------------- parsing helpers


@final
class _Ctx:
    """Error collector for one file."""

    def __init__(self, path: Path | None, locator: _Locator) -> None:
        self.path = str(path) if path is not None else "<config>"
        self.base = path.parent if path is not None else Path.cwd()
        self.loc = locator
        self.errors: list[ConfigError] = []

    def error(self, message: str, table: str, index: int = 0, key: str | None = None) -> None:
        self.errors.append(ConfigError(message, self.path, self.loc.line(table, index, key)))

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p


def parse_address(value: str, *, allow_names: bool, allow_zero: bool = False) -> Address:
    """Parse ``host:port`` / ``[v6]:port``; raises ValueError with the fix."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {value!r}: write IPv6 as '[::1]:587'")
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {value!r}: expected 'host:port', e.g. '127.0.0.1:587'")
        if ":" in host:
            raise ValueError(f"bad address {value!r}: write IPv6 in brackets, e.g. '[::]:587'")
    if not port_s.isdigit() or not (0 if allow_zero else 1) <= int(port_s) < 65536:
        raise ValueError(f"bad port in {value!r}: expected a number from 1 to 65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost" or (
            allow_names and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?", host)
        ):
            pass
        else:
            raise ValueError(
                f"bad address {value!r}: {host!r} is not an IP address"
                + ("" if allow_names else " (listeners bind IP literals such as 0.0.0.0 or [::])")
            ) from None
    return Address(host, int(port_s))


def _check_keys(
    ctx: _Ctx, table: Mapping[str, Any], allowed: Sequence[str], name: str, index: int = 0
) -> None:
    for key in table:
        if key not in allowed:
            ctx.error(
                f"unknown key {key!r} in [{name}]; allowed keys: {', '.join(allowed)}",
                name,
                index,
                key,
            )


def _get(
    ctx: _Ctx,
    table: Mapping[str, Any],
    key: str,
    typ: type | tuple[type, ...],
    default: Any,
    name: str,
    index: int = 0,
) -> Any:
    if key not in table:
        return default
    value = table[key]
    # bool is an int subclass: never accept true for a number
    if isinstance(value, bool) and typ is not bool and not (isinstance(typ, tuple) and bool in typ):
        ctx.error(f"{key} must be a number, not a boolean", name, index, key)
        return default
    if not isinstance(value, typ):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        ctx.error(f"{key} must be a {want}, got {type(value).__name__}", name, index, key)
        return default
    return value


def _choice(
    ctx: _Ctx,
    table: Mapping[str, Any],
    key: str,
    choices: Sequence[str],
    default: str,
    name: str,
    index: int = 0,
) -> str:
    value = _get(ctx, table, key, str, default, name, index)
    if value not in choices:
        ctx.error(
            f"{key} = {value!r} is not one of: {', '.join(repr(c) for c in choices)}",
            name,
            index,
            key,
        )
        return default
    return cast(str, value)


def _positive(
    ctx: _Ctx, table: Mapping[str, Any], key: str, default: float, name: str, index: int = 0
) -> float:
    value = _get(ctx, table, key, (int, float), default, name, index)
    if value <= 0:
        ctx.error(f"{key} must be greater than 0", name, index, key)
        return default
    return float(value)


def _addresses(
    ctx: _Ctx, table: Mapping[str, Any], key: str, name: str, index: int, *, allow_names: bool
) -> tuple[Address, ...]:
    raw = table.get(key)
    if raw is None:
        ctx.error(f"{key} is required, e.g. {key} = '127.0.0.1:587'", name, index)
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        ctx.error(f"{key} must be an address string or a non-empty list of them", name, index, key)
        return ()
    out: list[Address] = []
    for item in items:
        try:
            # port 0 on a listener: the kernel picks a free port (tests, demos)
            out.append(parse_address(item, allow_names=allow_names, allow_zero=not allow_names))
        except ValueError as exc:
            ctx.error(str(exc), name, index, key)
    return tuple(out)


# --------------------------------------------------------------------------- sections


def _node(ctx: _Ctx, raw: Mapping[str, Any]) -> NodeConfig:
    _check_keys(ctx, raw, ("name", "data_dir", "mode", "drain_timeout"), "node")
    d = NodeConfig()
    name = _get(ctx, raw, "name", str, d.name, "node")
    data_dir = _get(ctx, raw, "data_dir", str, None, "node")
    mode = _choice(ctx, raw, "mode", ("enforce", "detect"), d.mode, "node")
    drain = _positive(ctx, raw, "drain_timeout", d.drain_timeout, "node")
    return NodeConfig(
        name=name,
        data_dir=ctx.resolve(data_dir) if data_dir else d.data_dir,
        mode=cast(Literal["enforce", "detect"], mode),
        drain_timeout=drain,
    )


def _tls(ctx: _Ctx, raw: Mapping[str, Any]) -> TlsConfig:
    _check_keys(ctx, raw, ("cert", "key", "min_version"), "tls")
    certs: list[CertConfig] = []
    if "cert" in raw or "key" in raw:
        cert = _get(ctx, raw, "cert", str, None, "tls")
        key = _get(ctx, raw, "key", str, None, "tls")
        if not cert or not key:
            ctx.error("[tls] needs both cert and key (PEM files)", "tls")
        else:
            certs.append(
                CertConfig(ctx.resolve(cert), ctx.resolve(key), ctx.loc.line("tls", 0, "cert"))
            )
    min_version = _choice(ctx, raw, "min_version", TLS_VERSIONS, "1.2", "tls")
    return TlsConfig(tuple(certs), min_version)


def _tls_certs(ctx: _Ctx, raw: Any) -> list[CertConfig]:
    """``[[tls.cert]]`` tables: extra certificates picked by SNI."""
    out: list[CertConfig] = []
    if raw is None:
        return out
    if not isinstance(raw, list):
        ctx.error("tls.cert must be written as [[tls.cert]] tables", "tls")
        return out
    for i, item in enumerate(raw):
        _check_keys(ctx, item, ("cert", "key"), "tls.cert", i)
        cert = _get(ctx, item, "cert", str, None, "tls.cert", i)
        key = _get(ctx, item, "key", str, None, "tls.cert", i)
        if not cert or not key:
            ctx.error("[[tls.cert]] needs both cert and key", "tls.cert", i)
            continue
        out.append(CertConfig(ctx.resolve(cert), ctx.resolve(key), ctx.loc.line("tls.cert", i)))
    return out


def _log(ctx: _Ctx, raw: Mapping[str, Any]) -> LogConfig:
    _check_keys(ctx, raw, ("events",), "log")
    events = _get(ctx, raw, "events", str, "stdout", "log")
    if events not in ("stdout", "stderr", "none"):
        events = str(ctx.resolve(events))
    return LogConfig(events=events)


_LISTENER_KEYS = (
    "name",
    "protocol",
    "listen",
    "tls",
    "require_tls",
    "backend",
    "hostname",
    "idle_timeout",
    "tls_handshake_timeout",
    "max_sessions",
    "greet_delay",
    "bare_newline",
    "max_errors",
    "max_command_line",
    "max_text_line",
    "max_message_size",
)
_HTTP_LISTENER_KEYS = (
    "max_head_size",
    "max_header_count",
    "max_target_length",
    "max_body_size",
    "header_timeout",
    "redirect_https",
    "trusted_proxies",
    "websocket",
    "deny_page",
    "login",
)
_LOGIN_KEYS = (
    "path",
    "method",
    "user_field",
    "password_field",
    "success_status",
    "success_location",
    "success_cookie",
    "failure_status",
    "failure_location",
)


def _statuses(
    ctx: _Ctx, raw: Mapping[str, Any], key: str, default: tuple[int, ...], i: int
) -> tuple[int, ...]:
    value = raw.get(key, list(default))
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value
    ):
        _login_error(
            ctx, f"login {key} must be a list of HTTP status codes, e.g. [302, 303]", i, key
        )
        return default
    return tuple(value)


def _login_error(ctx: _Ctx, message: str, i: int, key: str | None = None) -> None:
    """An error of ``[listener.login]``: at its key, or its header, or (an
    inline table) the listener's ``login =`` line."""
    line = ctx.loc.line("listener.login", i, key) or ctx.loc.line("listener", i, "login")
    ctx.errors.append(ConfigError(message, ctx.path, line))


def _http_login(ctx: _Ctx, raw: Any, i: int) -> HttpLoginConfig | None:
    if not isinstance(raw, dict):
        _login_error(
            ctx, "login must be a table: [listener.login] with path, user_field, password_field", i
        )
        return None
    for key in raw:
        if key not in _LOGIN_KEYS:
            _login_error(
                ctx,
                f"unknown key {key!r} in [listener.login]; allowed keys: {', '.join(_LOGIN_KEYS)}",
                i,
                key,
            )
    values: dict[str, str | None] = {}
    for key in ("path", "user_field", "password_field"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            _login_error(
                ctx,
                f"[listener.login] needs {key} (e.g. path = '/login', user_field = 'user', "
                "password_field = 'password')",
                i,
                key,
            )
            return None
        values[key] = value
    for key in ("method", "success_location", "success_cookie", "failure_location"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            _login_error(ctx, f"login {key} must be a non-empty string", i, key)
            value = None
        values[key] = value
    path = str(values["path"])
    if not path.startswith("/"):
        _login_error(ctx, f"login path {path!r} must start with '/'", i, "path")
    success = _statuses(ctx, raw, "success_status", (302, 303), i)
    if not success:
        _login_error(ctx, "login success_status must not be empty", i, "success_status")
        success = (302, 303)
    if not path.startswith("/"):
        return None  # the error is recorded above; LoginForm would refuse it
    return HttpLoginConfig(
        form=LoginForm(
            path=path,
            user_field=str(values["user_field"]),
            password_field=str(values["password_field"]),
            method=(values["method"] or "POST").upper(),
        ),
        outcome=LoginOutcome(
            success_status=success,
            success_location=values["success_location"],
            success_cookie=values["success_cookie"],
            failure_status=_statuses(ctx, raw, "failure_status", (), i),
            failure_location=values["failure_location"],
        ),
    )


def _http_listener(ctx: _Ctx, raw: Mapping[str, Any], i: int) -> HttpListenerConfig:
    t = "listener"
    d = HttpListenerConfig()
    minimums = {
        "max_head_size": 1024,
        "max_header_count": 8,
        "max_target_length": 256,
        "max_body_size": 0,
    }
    sizes: dict[str, int] = {}
    for key, minimum in minimums.items():
        value = _get(ctx, raw, key, int, getattr(d, key), t, i)
        if value < minimum:
            ctx.error(f"{key} must be at least {minimum}", t, i, key)
            value = getattr(d, key)
        sizes[key] = value
    redirect = _get(ctx, raw, "redirect_https", str, "", t, i)
    if redirect and redirect != "host" and not re.fullmatch(r"https://[^/?#\s]+", redirect):
        ctx.error(
            f"redirect_https = {redirect!r}: use 'host' (redirect to https:// plus the request's "
            "Host) or an origin such as 'https://mail.example.org' (no path)",
            t,
            i,
            "redirect_https",
        )
        redirect = ""
    trusted_raw = _get(ctx, raw, "trusted_proxies", list, [], t, i)
    trusted: list[str] = []
    for item in trusted_raw:
        try:
            trusted.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            ctx.error(
                f"trusted_proxies: {item!r} is not an IP address or network (e.g. '10.0.0.0/8')",
                t,
                i,
                "trusted_proxies",
            )
    deny_page = _get(ctx, raw, "deny_page", str, None, t, i)
    login = _http_login(ctx, raw["login"], i) if "login" in raw else None
    return HttpListenerConfig(
        max_head_size=sizes["max_head_size"],
        max_header_count=sizes["max_header_count"],
        max_target_length=sizes["max_target_length"],
        max_body_size=sizes["max_body_size"],
        header_timeout=_positive(ctx, raw, "header_timeout", d.header_timeout, t, i),
        redirect_https=redirect,
        trusted_proxies=tuple(trusted),
        websocket=_get(ctx, raw, "websocket", bool, True, t, i),
        deny_page=ctx.resolve(deny_page) if deny_page else None,
        login=login,
    )


def _listener(ctx: _Ctx, raw: Mapping[str, Any], i: int) -> ListenerConfig | None:
    t = "listener"
    protocol = _choice(ctx, raw, "protocol", ("smtp", "imap", "http"), "smtp", t, i)
    _check_keys(
        ctx, raw, _LISTENER_KEYS + (_HTTP_LISTENER_KEYS if protocol == "http" else ()), t, i
    )
    name = _get(ctx, raw, "name", str, f"listener-{i + 1}", t, i)
    if "protocol" not in raw:
        ctx.error("protocol is required: 'smtp', 'imap' or 'http'", t, i)
    elif protocol not in SUPPORTED_PROTOCOLS:
        ctx.error(
            f"protocol {protocol!r} is not available in this version of mailmoat "
            f"(supported: {', '.join(SUPPORTED_PROTOCOLS)})",
            t,
            i,
            "protocol",
        )
    listen = _addresses(ctx, raw, "listen", t, i, allow_names=False)
    tls = _choice(ctx, raw, "tls", TLS_MODES, "none", t, i)
    require_tls = _get(ctx, raw, "require_tls", bool, False, t, i)
    if require_tls and tls == "none":
        ctx.error(
            "require_tls = true needs tls = 'starttls' or 'implicit' on this listener",
            t,
            i,
            "require_tls",
        )
    http = _http_listener(ctx, raw, i) if protocol == "http" else None
    if http is not None and tls == "starttls":
        ctx.error(
            "an http listener has no STARTTLS: use tls = 'implicit' (HTTPS) or 'none'", t, i, "tls"
        )
    backend = _get(ctx, raw, "backend", str, "", t, i)
    if not backend and not (http is not None and http.redirect_https):
        ctx.error("backend is required: the name of a [[backend]]", t, i)
    max_line = int(_positive(ctx, raw, "max_command_line", 512, t, i))
    if max_line < 512:
        ctx.error(
            "max_command_line must be at least 512 (RFC 5321 4.5.3.1.4)", t, i, "max_command_line"
        )
    text_line_raw = _get(ctx, raw, "max_text_line", int, 1000, t, i)
    if text_line_raw != 0 and text_line_raw < 1000:
        ctx.error(
            "max_text_line must be at least 1000 (RFC 5321 4.5.3.1.6), or 0 to disable the check",
            t,
            i,
            "max_text_line",
        )
    greet_delay = _get(ctx, raw, "greet_delay", (int, float), 0.0, t, i)
    if not 0 <= greet_delay <= 30:
        ctx.error("greet_delay must be between 0 and 30 seconds", t, i, "greet_delay")
        greet_delay = 0.0
    bare_newline = _choice(ctx, raw, "bare_newline", ("reject", "normalize"), "reject", t, i)
    limits = SmtpLimitsConfig(
        max_command_line=max_line,
        max_text_line=text_line_raw or None,
        max_message_size=int(_positive(ctx, raw, "max_message_size", 50 * 1024 * 1024, t, i)),
    )
    return ListenerConfig(
        name=name,
        protocol=cast(Protocol, protocol),
        listen=listen,
        backend=backend,
        tls=cast(TlsMode, tls),
        require_tls=require_tls,
        hostname=_get(ctx, raw, "hostname", str, "", t, i),
        idle_timeout=_positive(
            ctx, raw, "idle_timeout", 60.0 if protocol == "http" else 300.0, t, i
        ),
        tls_handshake_timeout=_positive(ctx, raw, "tls_handshake_timeout", 30.0, t, i),
        max_sessions=int(_positive(ctx, raw, "max_sessions", 1000, t, i)),
        greet_delay=float(greet_delay),
        bare_newline=cast(Literal["reject", "normalize"], bare_newline),
        max_errors=int(_positive(ctx, raw, "max_errors", 20, t, i)),
        limits=limits,
        http=http,
        line=ctx.loc.line(t, i),
    )


_BACKEND_KEYS = (
    "name",
    "address",
    "tls",
    "verify",
    "ca",
    "pin_sha256",
    "server_name",
    "client_identity",
    "connect_timeout",
    "command_timeout",
    "data_timeout",
)


def _backend(ctx: _Ctx, raw: Mapping[str, Any], i: int) -> BackendConfig | None:
    t = "backend"
    _check_keys(ctx, raw, _BACKEND_KEYS, t, i)
    name = _get(ctx, raw, "name", str, "", t, i)
    if not name:
        ctx.error("name is required, e.g. name = 'postfix'", t, i)
    address = _addresses(ctx, raw, "address", t, i, allow_names=True)
    tls = _choice(ctx, raw, "tls", TLS_MODES, "none", t, i)
    verify = _get(ctx, raw, "verify", bool, True, t, i)
    ca_raw = _get(ctx, raw, "ca", str, None, t, i)
    ca = ctx.resolve(ca_raw) if ca_raw else None
    if ca is not None and not ca.is_file():
        ctx.error(f"ca file {str(ca)!r} does not exist", t, i, "ca")
    pin_raw = _get(ctx, raw, "pin_sha256", str, None, t, i)
    pin: bytes | None = None
    if pin_raw is not None:
        try:
            pin = bytes.fromhex(pin_raw.replace(":", ""))
        except ValueError:
            pin = None
        if pin is None or len(pin) != 32:
            ctx.error(
                "pin_sha256 must be the hex SHA-256 of the backend's public key (64 hex digits); "
                "get it with: openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin "
                "-outform der | sha256sum",
                t,
                i,
                "pin_sha256",
            )
            pin = None
    if tls == "none" and (ca is not None or pin is not None):
        ctx.error(
            "ca / pin_sha256 only make sense with tls = 'starttls' or 'implicit'", t, i, "tls"
        )
    identity = _choice(
        ctx,
        raw,
        "client_identity",
        ("none", "xclient", "proxy-v2", "imap-id", "forwarded"),
        "none",
        t,
        i,
    )
    if identity not in SUPPORTED_IDENTITIES:
        ctx.error(
            f"client_identity = {identity!r} is not available in this version of mailmoat "
            f"(supported: {', '.join(SUPPORTED_IDENTITIES)})",
            t,
            i,
            "client_identity",
        )
    return BackendConfig(
        name=name,
        address=address,
        tls=cast(TlsMode, tls),
        verify=verify,
        ca=ca,
        pin_sha256=pin,
        server_name=_get(ctx, raw, "server_name", str, None, t, i),
        client_identity=cast(Identity, identity),
        connect_timeout=_positive(ctx, raw, "connect_timeout", 10.0, t, i),
        command_timeout=_positive(ctx, raw, "command_timeout", 300.0, t, i),
        data_timeout=_positive(ctx, raw, "data_timeout", 600.0, t, i),
        line=ctx.loc.line(t, i),
    )


_TOP_KEYS = (
    "node",
    "tls",
    "log",
    "rules",
    "state",
    "geoip",
    "journal",
    "admin",
    "listener",
    "backend",
)
_RESERVED: tuple[str, ...] = ()


def parse_config(text: str, path: Path | None = None, *, check_files: bool = True) -> Config:
    """Parse and validate config text; raises :class:`ConfigErrors`."""
    where = str(path) if path is not None else "<config>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        raise ConfigErrors([ConfigError(f"TOML syntax error: {msg}", where, line)]) from None
    ctx = _Ctx(path, _Locator(text))
    for key in raw:
        if key == "scoring":
            ctx.error(
                "[scoring] belongs in a rule file (it is reloaded with the rules); "
                "move it to a *.toml under [rules] paths",
                key,
            )
        elif key in _RESERVED:
            ctx.error(
                f"[{key}] is not available in this version of mailmoat; remove the section", key
            )
        elif key not in _TOP_KEYS:
            ctx.error(
                f"unknown section [{key}]; allowed: {', '.join('[' + k + ']' for k in _TOP_KEYS)}",
                key,
            )
    node = _node(ctx, _table(ctx, raw, "node"))
    tls_raw = _table(ctx, raw, "tls")
    extra_certs = _tls_certs(
        ctx, tls_raw.get("cert") if isinstance(tls_raw.get("cert"), list) else None
    )
    if isinstance(tls_raw.get("cert"), list):
        tls_raw = {k: v for k, v in tls_raw.items() if k != "cert"}
    tls = _tls(ctx, tls_raw)
    tls = TlsConfig(tls.certs + tuple(extra_certs), tls.min_version)
    log = _log(ctx, _table(ctx, raw, "log"))
    rules = _rules(ctx, _table(ctx, raw, "rules"), check_files=check_files)
    state = _state(ctx, _table(ctx, raw, "state"))
    geoip = _geoip(ctx, _table(ctx, raw, "geoip"), check_files=check_files)
    journal = _journal(ctx, _table(ctx, raw, "journal"))
    admin = _admin(ctx, _table(ctx, raw, "admin"), present="admin" in raw, check_files=check_files)

    backends: dict[str, BackendConfig] = {}
    for i, b in enumerate(_array(ctx, raw, "backend")):
        cfg = _backend(ctx, b, i)
        if cfg is None or not cfg.name:
            continue
        if cfg.name in backends:
            ctx.error(f"backend name {cfg.name!r} is used twice", "backend", i, "name")
        backends[cfg.name] = cfg

    listeners: list[ListenerConfig] = []
    names: set[str] = set()
    for i, item in enumerate(_array(ctx, raw, "listener")):
        lc = _listener(ctx, item, i)
        if lc is None:
            continue
        if lc.name in names:
            ctx.error(f"listener name {lc.name!r} is used twice", "listener", i, "name")
        names.add(lc.name)
        if lc.backend and lc.backend not in backends:
            known = ", ".join(repr(n) for n in backends) or "none defined"
            ctx.error(
                f"backend {lc.backend!r} is not defined by any [[backend]] (known: {known})",
                "listener",
                i,
                "backend",
            )
        bk = backends.get(lc.backend)
        fits = {
            "smtp": ("none", "xclient", "proxy-v2"),
            "imap": ("none", "imap-id", "proxy-v2"),
            "http": ("none", "forwarded"),
        }
        if bk is not None and lc.protocol in fits and bk.client_identity not in fits[lc.protocol]:
            ctx.error(
                f"backend {bk.name!r} has client_identity = {bk.client_identity!r}, which an "
                f"{lc.protocol} listener cannot speak (use one of "
                f"{', '.join(repr(x) for x in fits[lc.protocol])})",
                "listener",
                i,
                "backend",
            )
        if lc.tls != "none" and not tls.certs:
            ctx.error(
                f"tls = {lc.tls!r} needs a certificate: set cert and key in [tls]",
                "listener",
                i,
                "tls",
            )
        listeners.append(lc)
    if not listeners and "listener" not in raw:
        ctx.errors.append(ConfigError("no [[listener]] defined: nothing to do", where, None))

    if check_files:
        for lc in listeners:
            page = lc.http.deny_page if lc.http is not None else None
            if page is not None and not (page.is_file() and os.access(page, os.R_OK)):
                ctx.errors.append(
                    ConfigError(
                        f"listener {lc.name!r}: deny_page {str(page)!r} does not exist or is not "
                        "readable (an HTML file; leave deny_page out for the built-in page)",
                        where,
                        lc.line,
                    )
                )
        for c in tls.certs:
            for p, what in ((c.cert, "certificate"), (c.key, "key")):
                if not p.is_file():
                    ctx.errors.append(
                        ConfigError(
                            f"{what} file {str(p)!r} does not exist or is not a file", where, c.line
                        )
                    )
                elif not os.access(p, os.R_OK):
                    ctx.errors.append(
                        ConfigError(
                            f"{what} file {str(p)!r} is not readable by this user", where, c.line
                        )
                    )
    if ctx.errors:
        raise ConfigErrors(ctx.errors)
    return Config(
        path, node, tls, log, tuple(listeners), backends, rules, admin, state, geoip, journal
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _rules(ctx: _Ctx, raw: Mapping[str, Any], *, check_files: bool) -> RulesConfig:
    _check_keys(ctx, raw, ("paths", "watch", "watch_interval"), "rules")
    d = RulesConfig()
    value = raw.get("paths", [])
    items = [value] if isinstance(value, str) else value
    paths: list[Path] = []
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        ctx.error(
            'paths must be a list of files or folders, e.g. paths = ["rules/"]',
            "rules",
            key="paths",
        )
    else:
        for item in items:
            path = ctx.resolve(item)
            if check_files and not path.exists():
                ctx.error(
                    f"rule path {str(path)!r} does not exist (a file or a folder of *.toml)",
                    "rules",
                    key="paths",
                )
            paths.append(path)
    watch = _get(ctx, raw, "watch", bool, d.watch, "rules")
    interval = _positive(ctx, raw, "watch_interval", d.watch_interval, "rules")
    return RulesConfig(tuple(paths), bool(watch), interval, ctx.loc.line("rules"))


def _state(ctx: _Ctx, raw: Mapping[str, Any]) -> StateConfig:
    t = "state"
    _check_keys(
        ctx,
        raw,
        (
            "backend",
            "url",
            "on_failure",
            "timeout",
            "max_bans",
            "max_keys",
            "login_window",
            "v6_prefix",
            "snapshot",
            "detection",
            "shared_ja4_users",
            "inbound_tls_window",
            "downgrade_min_logins",
        ),
        t,
    )
    d = StateConfig()
    backend = _choice(ctx, raw, "backend", ("memory", "redis"), d.backend, t)
    url = _get(ctx, raw, "url", str, "", t)
    if backend == "redis":
        if not url:
            ctx.error('backend = "redis" needs url = "redis://127.0.0.1:6379/0"', t, key="backend")
        elif not re.match(r"^(redis|rediss|redis\+sentinel|redis\+cluster)://", url):
            ctx.error(
                f"url {url!r} is not a Redis URL: use redis://, rediss://, redis+sentinel:// "
                "or redis+cluster://",
                t,
                key="url",
            )
    elif url:
        ctx.error('url is only used with backend = "redis"', t, key="url")
    on_failure = _choice(ctx, raw, "on_failure", ("open", "closed"), d.on_failure, t)
    ints = {}
    for key, low in (
        ("max_bans", 1),
        ("max_keys", 1000),
        ("v6_prefix", 32),
        ("shared_ja4_users", 2),
        ("downgrade_min_logins", 1),
    ):
        value = _get(ctx, raw, key, int, getattr(d, key), t)
        if value < low or (key == "v6_prefix" and value > 128):
            limit = "between 32 and 128" if key == "v6_prefix" else f"at least {low}"
            ctx.error(f"{key} must be {limit}", t, key=key)
            value = getattr(d, key)
        ints[key] = int(value)
    return StateConfig(
        backend=cast(Literal["memory", "redis"], backend),
        url=url,
        on_failure=cast(Literal["open", "closed"], on_failure),
        timeout=_positive(ctx, raw, "timeout", d.timeout, t),
        max_bans=ints["max_bans"],
        max_keys=ints["max_keys"],
        login_window=_positive(ctx, raw, "login_window", d.login_window, t),
        v6_prefix=ints["v6_prefix"],
        snapshot=bool(_get(ctx, raw, "snapshot", bool, d.snapshot, t)),
        detection=bool(_get(ctx, raw, "detection", bool, d.detection, t)),
        shared_ja4_users=ints["shared_ja4_users"],
        inbound_tls_window=_positive(ctx, raw, "inbound_tls_window", d.inbound_tls_window, t),
        downgrade_min_logins=ints["downgrade_min_logins"],
    )


def _journal(ctx: _Ctx, raw: Mapping[str, Any]) -> JournalConfig:
    t = "journal"
    keys = (
        "enabled",
        "dir",
        "segment_size",
        "segment_age",
        "retain_age",
        "retain_size",
        "queue",
        "fsync_interval",
    )
    _check_keys(ctx, raw, keys, t)
    d = JournalConfig()
    directory = _get(ctx, raw, "dir", str, None, t)
    ints: dict[str, int] = {}
    for key, low in (("segment_size", 4096), ("retain_size", 4096), ("queue", 16)):
        value = _get(ctx, raw, key, int, getattr(d, key), t)
        if value < low:
            ctx.error(f"{key} must be at least {low}", t, key=key)
            value = getattr(d, key)
        ints[key] = int(value)
    fsync_raw = raw.get("fsync_interval", d.fsync_interval)
    fsync: float | None
    if fsync_raw is False:
        fsync = None
    elif isinstance(fsync_raw, int | float) and not isinstance(fsync_raw, bool) and fsync_raw >= 0:
        fsync = float(fsync_raw)
    else:
        ctx.error(
            "fsync_interval must be seconds (0: every batch) or false (never)",
            t,
            key="fsync_interval",
        )
        fsync = d.fsync_interval
    return JournalConfig(
        enabled=bool(_get(ctx, raw, "enabled", bool, d.enabled, t)),
        dir=ctx.resolve(directory) if directory else None,
        segment_size=ints["segment_size"],
        segment_age=_positive(ctx, raw, "segment_age", d.segment_age, t),
        retain_age=_positive(ctx, raw, "retain_age", d.retain_age, t),
        retain_size=ints["retain_size"],
        queue=ints["queue"],
        fsync_interval=fsync,
    )


def _geoip(ctx: _Ctx, raw: Mapping[str, Any], *, check_files: bool) -> GeoipConfig:
    _check_keys(ctx, raw, ("city", "asn"), "geoip")
    paths: dict[str, Path | None] = {}
    for key in ("city", "asn"):
        value = _get(ctx, raw, key, str, None, "geoip")
        path = ctx.resolve(value) if value else None
        if path is not None and check_files and not path.is_file():
            ctx.error(
                f"{key} database {str(path)!r} does not exist (a MaxMind .mmdb file, e.g. "
                f"GeoLite2-{'City' if key == 'city' else 'ASN'}.mmdb)",
                "geoip",
                key=key,
            )
        paths[key] = path
    return GeoipConfig(paths["city"], paths["asn"])


def _admin(
    ctx: _Ctx, raw: Mapping[str, Any], *, present: bool, check_files: bool
) -> AdminSectionConfig | None:
    if not present:
        return None
    _check_keys(ctx, raw, ("listen", "token_file"), "admin")
    listen_raw = _get(ctx, raw, "listen", str, None, "admin")
    token_raw = _get(ctx, raw, "token_file", str, None, "admin")
    if listen_raw is None:
        ctx.error("listen is required, e.g. listen = '127.0.0.1:9099'", "admin")
    if token_raw is None:
        ctx.error("token_file is required, e.g. token_file = 'admin.token'", "admin")
    if listen_raw is None or token_raw is None:
        return None
    try:
        listen = parse_address(listen_raw, allow_names=False, allow_zero=True)
    except ValueError as exc:
        ctx.error(str(exc), "admin", key="listen")
        return None
    if not _loopback(listen.host):
        ctx.error(
            f"listen = {listen_raw!r}: the admin API has no TLS and listens on loopback only "
            "(127.0.0.1 or [::1]); put a TLS proxy in front to reach it remotely",
            "admin",
            key="listen",
        )
    token_file = ctx.resolve(token_raw)
    if check_files:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            ctx.error(
                f"token_file {str(token_file)!r} cannot be read ({exc.__class__.__name__}); "
                "create it with e.g. 'openssl rand -hex 32 > admin.token'",
                "admin",
                key="token_file",
            )
        else:
            if len(token) < 16:
                ctx.error(
                    f"token_file {str(token_file)!r} holds a token shorter than 16 characters; "
                    "use e.g. 'openssl rand -hex 32'",
                    "admin",
                    key="token_file",
                )
    return AdminSectionConfig(listen, token_file, ctx.loc.line("admin"))


def _table(ctx: _Ctx, raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        ctx.error(f"{key} must be a table: write [{key}]", key)
        return {}
    return value


def _array(ctx: _Ctx, raw: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        ctx.error(f"{key} must be written as [[{key}]] tables", key)
        return []
    return value


def load_config(path: Path | str, *, check_files: bool = True) -> Config:
    """Read and validate a config file; raises :class:`ConfigErrors`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigErrors(
            [ConfigError("config file does not exist (pass -c FILE)", str(p))]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigErrors([ConfigError(f"cannot read config file: {exc}", str(p))]) from None
    return parse_config(text, p, check_files=check_files)
