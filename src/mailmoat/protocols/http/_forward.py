"""What a request and a response look like once mailmoat forwards them.

Contract: :func:`normalize_request` turns a request h11 parsed from the
client into the request mailmoat sends the backend (through an h11 client
connection, which writes HTTP/1.1 and re-frames the body itself), and
:func:`normalize_response` does the same for the backend's response.  Both
are pure: same input, same output; neither keeps state.  docs/http.md
("Request hardening") is the normative list of rules.

1. Hop-by-hop fields go: ``Connection`` and every field it names (but never
   ``Host``, ``Content-Length`` or ``Transfer-Encoding``), ``Keep-Alive``,
   ``Proxy-Connection``, ``TE``, ``Trailer``, ``Upgrade``,
   ``Proxy-Authorization``, ``Proxy-Authenticate``, ``HTTP2-Settings``.  A
   WebSocket handshake, when allowed, leaves with exactly ``Connection:
   upgrade`` and ``Upgrade: websocket``.
2. One framing field: ``Transfer-Encoding: chunked`` if the message had one
   (any ``Content-Length`` beside it is dropped, as RFC 9112 6.3 asks of an
   intermediary and as h11 reads the body), else the first
   ``Content-Length``, else for POST, PUT and PATCH ``Content-Length: 0``
   (RFC 9112 6.3: a request without either has no content).
3. Forwarding fields are mailmoat's: see :func:`normalize_request`.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Final, Literal, TypeVar

import h11

from mailmoat.errors import LocalProtocolError

from ._screen import RequestRefused
from ._syntax import HOST_RE, comma_tokens, split_target

# RFC 9110 7.6.1: "intermediaries SHOULD remove or replace fields that are
# known to require removal before forwarding, whether or not they appear as a
# connection-option [...] This includes but is not limited to:
# Proxy-Connection [...], Keep-Alive [...], TE [...], Transfer-Encoding [...],
# Upgrade".  Trailer, Proxy-Authorization/-Authenticate (RFC 9110 11.7) and
# HTTP2-Settings (RFC 7540 3.2.1) are hop-by-hop as well.  Transfer-Encoding
# is handled with the framing.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"http2-settings",
    }
)
# Connection may not name these away (the screen refuses it; we ignore it).
_PROTECTED: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})
# Fields that claim who the client is or how it connected.  From an
# untrusted peer they are lies; from a trusted one they are history.
_FORWARDING: Final = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
        b"x-originating-ip",
        b"cf-connecting-ip",
    }
)
# Names a client may spell with "_" for "-" to pass for one of these where a
# server maps fields to CGI variables (HTTP_X_FORWARDED_FOR): such fields go.
_UNDERSCORE_SPOOFS: Final = (
    _FORWARDING | _HOP_BY_HOP | {b"host", b"content-length", b"transfer-encoding"}
)
# The ones mailmoat sets itself (after the trusted history, if any).
_OURS: Final = (b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-real-ip")
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})

Header = tuple[bytes, bytes]
_Message = TypeVar("_Message", h11.Response, h11.InformationalResponse)


def is_websocket_upgrade(request: h11.Request) -> bool:
    """True for an RFC 6455 opening handshake: an HTTP/1.1 GET with
    ``Connection: upgrade`` and ``Upgrade: websocket`` (and nothing else)."""
    if request.method != b"GET" or request.http_version != b"1.1":
        return False  # most requests: no need to look at the fields
    headers = list(request.headers)
    connection = comma_tokens([v for k, v in headers if k == b"connection"])
    upgrade = comma_tokens([v for k, v in headers if k == b"upgrade"])
    return b"upgrade" in connection and upgrade == [b"websocket"]


@functools.lru_cache(maxsize=4096)
def _client_address(ip: str) -> str:
    """``ip`` in canonical form; IPv4-mapped IPv6 as IPv4, no zone."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise LocalProtocolError(f"client_ip must be an IP address, not {ip!r}") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address).split("%")[0]
    return str(address)


@functools.lru_cache(maxsize=4096)
def _node(address: str, port: int | None) -> bytes:
    """An RFC 7239 node: ``192.0.2.1``, ``"192.0.2.1:4711"``, ``"[2001:db8::1]:4711"``."""
    if port is not None and (type(port) is not int or not 0 <= port <= 0xFFFF):
        raise LocalProtocolError(f"client_port must be an int in 0..65535, not {port!r}")
    # RFC 7239 6: "It is important to note that an IPv6 address and any
    # nodename with node-port specified MUST be quoted, since ":" is not an
    # allowed character in "token"."
    text = f"[{address}]" if ":" in address else address
    if port is not None:
        text = f"{text}:{port}"
    if ":" in text:
        text = f'"{text}"'
    return text.encode("ascii")


def _fallback(host: str) -> bytes:
    try:
        value = host.encode("ascii")
    except UnicodeEncodeError:
        value = b""
    if HOST_RE.fullmatch(value) is None:
        raise LocalProtocolError(f"fallback_host must be host[:port] in ASCII, not {host!r}")
    return value


def _drop_hop_by_hop(headers: list[Header]) -> list[Header]:
    """``headers`` without hop-by-hop fields and those ``Connection`` names."""
    named = set(comma_tokens([v for k, v in headers if k.lower() == b"connection"]))
    named -= _PROTECTED
    return [
        (raw, value)
        for raw, value in headers
        if raw.lower() not in _HOP_BY_HOP and raw.lower() not in named
    ]


def _one_framing_field(headers: list[Header]) -> tuple[list[Header], bool]:
    """Keep one framing field; also say whether there is one."""
    chunked = any(raw.lower() == b"transfer-encoding" for raw, _ in headers)
    out: list[Header] = []
    framed = False
    for raw, value in headers:
        name = raw.lower()
        if name == b"transfer-encoding":
            if not framed:
                out.append((raw, b"chunked"))
                framed = True
        elif name == b"content-length":
            if not chunked and not framed:
                out.append((raw, value))
                framed = True
        else:
            out.append((raw, value))
    return out, framed


def normalize_request(
    request: h11.Request,
    *,
    client_ip: str,
    client_port: int | None = None,
    scheme: Literal["http", "https"] = "https",
    trusted: bool = False,
    allow_websocket: bool = False,
    fallback_host: str | None = None,
) -> h11.Request:
    """The request to send the backend, as HTTP/1.1.

    ``client_ip``/``client_port`` are the peer of the client connection,
    ``scheme`` how it reached mailmoat.  ``trusted`` says that peer is a
    proxy of ours (a load balancer) whose forwarding fields are to be
    believed.  The forwarding fields sent are:

    ``Forwarded``
        untrusted: ``for=<client>;proto=<scheme>``; trusted: the received
        ``Forwarded`` values, then ``, for=<client>;proto=<scheme>``.
        ``<client>`` is an RFC 7239 node: ``192.0.2.1``,
        ``"192.0.2.1:4711"``, ``"[2001:db8::1]:4711"``.
    ``X-Forwarded-For``
        untrusted: ``<client_ip>``; trusted: the received values joined with
        ``", "``, then ``, <client_ip>`` (so ``original, balancer``).
    ``X-Forwarded-Proto``
        trusted and exactly one received: kept; otherwise ``<scheme>``.
    ``X-Real-IP``
        trusted and exactly one received: kept; otherwise ``<client_ip>``.

    Other client-identity fields (``X-Forwarded-Host``/``-Port``/
    ``-Prefix``/``-Server``, ``X-Client-IP``, ``True-Client-IP``,
    ``X-Cluster-Client-IP``, ``X-Originating-IP``, ``CF-Connecting-IP``) are
    dropped unless trusted, then kept as received.

    An absolute-form target becomes origin-form and its authority the
    ``Host`` (RFC 9112 3.2.2).  A request without ``Host`` (HTTP/1.0) gets
    ``fallback_host``; without one it is refused (``missing-host``), since
    an HTTP/1.1 request must carry a Host.  ``allow_websocket`` passes a
    WebSocket handshake (see :func:`is_websocket_upgrade`); any other
    ``Upgrade`` is dropped.
    """
    peer = _client_address(client_ip)
    for_node = _node(peer, client_port)
    if scheme not in ("http", "https"):
        raise LocalProtocolError(f"scheme must be http or https, not {scheme!r}")
    websocket = allow_websocket and is_websocket_upgrade(request)

    target = request.target
    host: bytes | None = None
    parsed = split_target(target)
    if parsed is not None and parsed.form == "absolute":
        host = parsed.authority
        target = parsed.path + (b"?" + parsed.query if parsed.query else b"")

    received: dict[bytes, list[bytes]] = {name: [] for name in _OURS}
    kept: list[Header] = []
    for raw, value in _drop_hop_by_hop(request.headers.raw_items()):
        name = raw.lower()
        if b"_" in name and name.replace(b"_", b"-") in _UNDERSCORE_SPOOFS:
            # X-Forwarded_For: CGI/WSGI servers read it as HTTP_X_FORWARDED_FOR,
            # the very variable the real X-Forwarded-For becomes
            continue
        if name in _FORWARDING:
            if name in received:
                received[name].append(value)
            elif trusted:
                kept.append((raw, value))
            continue
        if name == b"host":
            if host is None:
                host = value
            continue
        kept.append((raw, value))
    if host is None:
        if fallback_host is None:
            raise RequestRefused("missing-host")
        host = _fallback(fallback_host)
    headers, framed = _one_framing_field(kept)
    if not framed and request.method in _BODY_METHODS:
        headers.append((b"Content-Length", b"0"))

    proto = scheme.encode("ascii")
    ours = b"for=" + for_node + b";proto=" + proto
    forwarded = received[b"forwarded"]
    xff = received[b"x-forwarded-for"]
    xfp = received[b"x-forwarded-proto"]
    real = received[b"x-real-ip"]
    address = peer.encode("ascii")
    headers += [
        (b"Forwarded", b", ".join([*forwarded, ours]) if trusted else ours),
        (b"X-Forwarded-For", b", ".join([*xff, address]) if trusted else address),
        (b"X-Forwarded-Proto", xfp[0] if trusted and len(xfp) == 1 else proto),
        (b"X-Real-IP", real[0] if trusted and len(real) == 1 else address),
    ]
    if websocket:
        headers += [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    # Every name and value here was validated by h11 when it parsed the
    # client's request, or is ours (forwarding values, a checked Host):
    # _parsed=True spares validating them all again on every request.
    return h11.Request(
        method=request.method,
        target=target,
        headers=[(b"Host", host), *headers],
        http_version=b"1.1",
        _parsed=True,
    )


def normalize_response(message: _Message, *, websocket: bool = False) -> _Message:
    """The backend's response without hop-by-hop fields, with one framing field.

    ``websocket`` (the request was a WebSocket handshake mailmoat passed):
    a ``101`` whose ``Upgrade`` is ``websocket`` keeps ``Connection:
    upgrade`` and ``Upgrade: websocket``.  h11, writing the response to the
    client, may still add ``Connection: close`` or re-frame the body for an
    HTTP/1.0 client.
    """
    raw = message.headers.raw_items()
    if not websocket and message.status_code >= 200 and _clean(raw):
        return message  # the common case: nothing to remove, one framing field
    upgrade = comma_tokens([v for k, v in raw if k.lower() == b"upgrade"])
    headers = _drop_hop_by_hop(raw)
    if message.status_code >= 200:
        headers, _ = _one_framing_field(headers)
    else:
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers = [(k, v) for k, v in headers if k.lower() != b"transfer-encoding"]
    if websocket and message.status_code == 101 and upgrade == [b"websocket"]:
        headers += [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    return type(message)(
        status_code=message.status_code,
        headers=headers,
        http_version=b"1.1",  # h11 only writes HTTP/1.1
        reason=message.reason,
        _parsed=True,  # names and values as h11 parsed them from the backend
    )


def _clean(headers: list[Header]) -> bool:
    """No hop-by-hop field and at most one framing field (``chunked`` if TE)?"""
    framing = 0
    for raw, value in headers:
        name = raw.lower()
        if name in _HOP_BY_HOP:
            return False
        if name == b"content-length":
            framing += 1
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                return False
            framing += 1
    return framing <= 1
