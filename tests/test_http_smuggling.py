"""Request smuggling against the webmail proxy, end to end: mailmoat in front of a real nginx.

Each case is raw bytes on one client connection -- usually a benign request
followed by a smuggled one whose target carries a marker unique to the case
(``/smuggled-<id>-<run>``) -- and the refusal mailmoat must answer with.
For every case: the expected 4xx arrives and the connection closes; the
``http.refused`` event carries the reason code (severity ``high`` for the
smuggling-type reasons); and nothing of the case reaches the backend: no
nginx access-log entry (nor error-log line) holds its marker, checked only
after a canary request sent through the same node afterwards has shown up in
the access log (so the log is being written and read).

Sources of the cases:

* James Kettle, "HTTP Desync Attacks: Request Smuggling Reborn" (PortSwigger,
  2019): CL.TE, TE.CL and the TE.TE obfuscation list;
* James Kettle, "HTTP/1.1 must die: the desync endgame" (PortSwigger, 2025):
  0.CL / CL.0 (a body the front or the back ignores), obfuscated ``Expect``;
* RFC 9112 sections 2.2 (bare CR/LF), 3 (request line), 3.2 (Host), 5.1/5.2
  (space before colon, obs-fold), 6.1/6.3 (message framing), 7.1 (chunked
  coding) and 11.2 (request smuggling);
* "Funky Chunks" (2025): chunk extensions and line terminators read
  differently (``1;\\n``, ``1;a"b``, bare LF after a chunk size, oversized
  sizes truncated to 64 bits);
* the hop-by-hop ``Connection`` abuse and WebSocket / h2c upgrade smuggling.

The controls at the end are well-formed pipelines that must reach nginx with
every marker: they prove the "nothing reached the backend" check can fail.
The screen itself is unit-tested in test_http_codec.py; this file checks the
whole path, HeadScreen -> h11 -> normalize_request -> nginx.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from conftest import RunningNode, StartNode
from mailmoat.demo.nginx import NginxInstance
from mailmoat.events.journal import EventFilter, Journal
from mailmoat.protocols.http import (
    REFUSALS,
    SMUGGLING_REASONS,
    HeadScreen,
    HttpLimits,
    RequestRefused,
)
from test_http_e2e import http_config
from test_metrics import samples, value

pytestmark = pytest.mark.e2e

#: one run's markers never match a log entry of another run
RUN = secrets.token_hex(3)

# Small limits, so that the size cases stay small (the config minimums allow them).
MAX_HEAD = 4096
MAX_HEADERS = 32
MAX_TARGET = 1024
MAX_BODY = 4096
LISTENER = f"""
max_head_size = {MAX_HEAD}
max_header_count = {MAX_HEADERS}
max_target_length = {MAX_TARGET}
max_body_size = {MAX_BODY}
header_timeout = 1
"""
LIMITS = HttpLimits(
    max_head_size=MAX_HEAD,
    max_header_count=MAX_HEADERS,
    max_target_length=MAX_TARGET,
    max_body_size=MAX_BODY,
)

#: refusal reasons that mean "smuggling attempt": severity high
SMUGGLING = SMUGGLING_REASONS

HOST = b"Host: localhost\r\n"
#: the benign request in front of a smuggled one
FIRST = b"GET /static/small.html HTTP/1.1\r\n" + HOST + b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
WS_KEY = b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
WS_HEAD = b"GET /ws HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n" + WS_KEY


def smuggled(marker: bytes, extra: bytes = b"") -> bytes:
    """The request a desync would slip past the front: its target is the marker."""
    return b"GET /" + marker + b" HTTP/1.1\r\n" + HOST + extra + b"\r\n"


def post(fields: bytes, body: bytes, target: bytes = b"/upload") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\n" + HOST + fields + b"\r\n" + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked(body: bytes) -> bytes:
    """A chunked upload whose (possibly broken) coding is ``body``."""
    return post(b"Transfer-Encoding: chunked\r\n", body)


def cl_te(marker: bytes, te: bytes, *, te_first: bool = False) -> bytes:
    """CL.TE: the front reads Content-Length, the back the chunked coding."""
    body = LAST_CHUNK + smuggled(marker)
    cl = b"Content-Length: %d\r\n" % len(body)
    return post(te + cl if te_first else cl + te, body)


def te_cl(marker: bytes, *, te_first: bool = False) -> bytes:
    """TE.CL: the front reads the chunked coding, the back Content-Length."""
    inner = smuggled(marker)
    body = chunk(inner) + LAST_CHUNK
    cl = b"Content-Length: %d\r\n" % len(b"%x\r\n" % len(inner))
    te = b"Transfer-Encoding: chunked\r\n"
    return post(te + cl if te_first else cl + te, body)


def te_only(marker: bytes, te: bytes) -> bytes:
    """An obfuscated Transfer-Encoding and no Content-Length (TE.0 if the back ignores it)."""
    return post(te, LAST_CHUNK + smuggled(marker))


def then(bad: bytes) -> bytes:
    """A benign request, then ``bad`` (pipelined, one write)."""
    return FIRST + bad


def ws_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[bytes], bytes]
    reason: str
    #: which layer refuses: the screen ahead of h11, or normalize_request
    layer: str = "screen"

    @property
    def status(self) -> int:
        return REFUSALS[self.reason]

    def marker(self) -> bytes:
        return f"smuggled-{self.id}-{RUN}".encode()


def _long_target(marker: bytes, length: int) -> bytes:
    target = b"/" + marker + b"?pad="
    return target + b"a" * (length - len(target))


CASES = [
    # ---- CL.TE / TE.CL (Kettle 2019; RFC 9112 6.1, 11.2), both header orders
    Case("cl-te", lambda m: cl_te(m, b"Transfer-Encoding: chunked\r\n"), "cl-and-te"),
    Case(
        "cl-te-te-first",
        lambda m: cl_te(m, b"Transfer-Encoding: chunked\r\n", te_first=True),
        "cl-and-te",
    ),
    Case("te-cl", te_cl, "cl-and-te"),
    Case("te-cl-te-first", lambda m: te_cl(m, te_first=True), "cl-and-te"),
    Case(
        "cl-te-get",
        lambda m: then(
            b"GET /static/small.html HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + LAST_CHUNK + smuggled(m)
        ),
        "cl-and-te",
    ),
    # ---- TE.TE: obfuscations that make one of two parsers ignore Transfer-Encoding
    Case(
        "te-xchunked",
        lambda m: te_only(m, b"Transfer-Encoding: xchunked\r\n"),
        "bad-transfer-encoding",
    ),
    Case(
        "te-xchunked-with-cl",
        lambda m: cl_te(m, b"Transfer-Encoding: xchunked\r\n"),
        "cl-and-te",
    ),
    Case(
        "te-space-before-colon",
        lambda m: te_only(m, b"Transfer-Encoding : chunked\r\n"),
        "space-before-colon",
    ),
    Case(
        "te-tab-before-colon",
        lambda m: te_only(m, b"Transfer-Encoding\t: chunked\r\n"),
        "space-before-colon",
    ),
    Case(
        "te-chunked-identity",
        lambda m: te_only(m, b"Transfer-Encoding: chunked, identity\r\n"),
        "bad-transfer-encoding",
    ),
    Case(
        "te-identity-chunked",
        lambda m: te_only(m, b"Transfer-Encoding: identity, chunked\r\n"),
        "bad-transfer-encoding",
    ),
    # a tab is legal OWS (RFC 9110 5.6.3): alone it is plain chunked (see the
    # controls); beside a Content-Length it is CL.TE
    Case(
        "te-tab-value-with-cl",
        lambda m: cl_te(m, b"Transfer-Encoding:\tchunked\r\n"),
        "cl-and-te",
    ),
    Case(
        "te-two-fields",
        lambda m: te_only(m, b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"),
        "bad-transfer-encoding",
    ),
    Case(
        "te-two-equal-fields",
        lambda m: te_only(m, b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
        "bad-transfer-encoding",
    ),
    Case(
        "te-identity",
        lambda m: te_only(m, b"Transfer-Encoding: identity\r\n"),
        "bad-transfer-encoding",
    ),
    Case("te-cow", lambda m: te_only(m, b"Transfer-encoding: cow\r\n"), "bad-transfer-encoding"),
    Case(
        "te-chunked-semicolon",
        lambda m: te_only(m, b"Transfer-Encoding: chunked;\r\n"),
        "bad-transfer-encoding",
    ),
    Case(
        "te-quoted",
        lambda m: te_only(m, b'Transfer-Encoding: "chunked"\r\n'),
        "bad-transfer-encoding",
    ),
    Case(
        "te-nbsp",
        lambda m: te_only(m, b"Transfer-Encoding: \xa0chunked\r\n"),
        "bad-transfer-encoding",
    ),
    Case(
        "te-leading-space-first-field",
        lambda m: then(
            b"POST /upload HTTP/1.1\r\n Transfer-Encoding: chunked\r\n"
            + HOST
            + b"\r\n"
            + LAST_CHUNK
            + smuggled(m)
        ),
        "obs-fold",
    ),
    Case(
        "te-leading-space-folded",
        lambda m: te_only(m, b"X-Pad: a\r\n Transfer-Encoding: chunked\r\n"),
        "obs-fold",
    ),
    Case(
        "te-vtab", lambda m: te_only(m, b"Transfer-Encoding: chunked\x0b\r\n"), "bad-header-value"
    ),
    Case(
        "te-vtab-leading",
        lambda m: te_only(m, b"Transfer-Encoding:\x0bchunked\r\n"),
        "bad-header-value",
    ),
    Case("te-nul", lambda m: te_only(m, b"Transfer-Encoding: chunked\x00\r\n"), "bad-header-value"),
    Case(
        "te-formfeed",
        lambda m: te_only(m, b"Transfer-Encoding:\x0cchunked\r\n"),
        "bad-header-value",
    ),
    Case(
        "te-name-nul",
        lambda m: te_only(m, b"Transfer-Encoding\x00: chunked\r\n"),
        "bad-header-name",
    ),
    # ---- Content-Length (RFC 9112 6.3)
    Case(
        "cl-duplicate-different",
        lambda m: post(
            b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(smuggled(m)), smuggled(m)
        ),
        "duplicate-content-length",
    ),
    Case(
        "cl-duplicate-equal",
        lambda m: post(
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % ((len(smuggled(m)),) * 2),
            smuggled(m),
        ),
        "duplicate-content-length",
    ),
    Case(
        "cl-list-equal",
        lambda m: post(b"Content-Length: 5, 5\r\n", b"hello" + smuggled(m)),
        "duplicate-content-length",
    ),
    Case(
        "cl-plus",
        lambda m: post(b"Content-Length: +5\r\n", b"hello" + smuggled(m)),
        "bad-content-length",
    ),
    Case(
        "cl-negative", lambda m: post(b"Content-Length: -1\r\n", smuggled(m)), "bad-content-length"
    ),
    Case(
        "cl-hex",
        lambda m: post(b"Content-Length: 0x10\r\n", b"a" * 16 + smuggled(m)),
        "bad-content-length",
    ),
    Case(
        "cl-inner-space",
        lambda m: post(b"Content-Length: 1 0\r\n", b"a" * 10 + smuggled(m)),
        "bad-content-length",
    ),
    Case("cl-empty", lambda m: post(b"Content-Length:\r\n", smuggled(m)), "bad-content-length"),
    Case(
        "cl-huge",
        lambda m: post(b"Content-Length: 18446744073709551621\r\n", b"hello" + smuggled(m)),
        "body-too-large",
    ),
    # ---- line ends and folding (RFC 9112 2.2, 5.2)
    Case("obs-fold-header", lambda m: then(smuggled(m, b"X-Pad: a\r\n\tb\r\n")), "obs-fold"),
    Case(
        "bare-lf-request-line",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\n" + HOST + b"\r\n"),
        "bare-lf",
    ),
    Case("bare-lf-header", lambda m: then(smuggled(m, b"X-Pad: a\n")), "bare-lf"),
    Case(
        "bare-lf-blank-line",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\r\n" + HOST + b"\n"),
        "bare-lf",
    ),
    Case(
        "bare-lf-everywhere",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\nHost: localhost\n\n"),
        "bare-lf",
    ),
    Case("bare-cr-header", lambda m: then(smuggled(m, b"X-Pad: a\rb\r\n")), "bare-cr"),
    Case(
        "bare-cr-request-line",
        lambda m: then(b"GET /" + m + b"\rHTTP/1.1\r\n" + HOST + b"\r\n"),
        "bare-cr",
    ),
    Case(
        "bare-cr-line-end",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\r" + HOST + b"\r\n"),
        "bare-cr",
    ),
    # ---- the chunked coding (RFC 9112 7.1; Funky Chunks)
    Case(
        "chunk-size-overflow",
        lambda m: chunked(b"1" + b"0" * 15 + b"5\r\nhello\r\n" + LAST_CHUNK + smuggled(m)),
        "chunk-size-too-long",
    ),
    Case(
        "chunk-size-zero-padded",
        lambda m: chunked(b"0" * 17 + b"5\r\nhello\r\n" + LAST_CHUNK + smuggled(m)),
        "chunk-size-too-long",
    ),
    Case(
        "chunk-size-0x",
        lambda m: chunked(b"0x5\r\nhello\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk-size",
    ),
    Case(
        "chunk-size-negative",
        lambda m: chunked(b"-1\r\nh\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk-size",
    ),
    Case(
        "chunk-size-trailing-space",
        lambda m: chunked(b"5 \r\nhello\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk-size",
    ),
    Case(
        "chunk-size-leading-space",
        lambda m: chunked(b" 5\r\nhello\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk-size",
    ),
    Case(
        "chunk-ext-bare-lf", lambda m: chunked(b"1;\nx\r\n" + LAST_CHUNK + smuggled(m)), "bare-lf"
    ),
    Case(
        "chunk-ext-quote",
        lambda m: chunked(b'1;a"b\r\nx\r\n' + LAST_CHUNK + smuggled(m)),
        "bad-chunk-extension",
    ),
    Case(
        "chunk-ext-empty",
        lambda m: chunked(b"1;\r\nx\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk-extension",
    ),
    Case(
        "chunk-ext-bare-cr",
        lambda m: chunked(b"1;a\rb\r\nx\r\n" + LAST_CHUNK + smuggled(m)),
        "bare-cr",
    ),
    Case(
        "chunk-ext-space",
        lambda m: chunked(b"1 ;a=b\r\nx\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk-size",
    ),
    Case(
        "chunk-line-bare-lf",
        lambda m: chunked(b"5\nhello\r\n" + LAST_CHUNK + smuggled(m)),
        "bare-lf",
    ),
    Case(
        "chunk-data-longer",
        lambda m: chunked(b"3\r\nhello\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk",
    ),
    Case(
        "chunk-data-shorter",
        lambda m: chunked(b"5\r\nhi\r\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk-size",
    ),
    Case(
        "chunk-data-bare-lf",
        lambda m: chunked(b"5\r\nhello\n" + LAST_CHUNK + smuggled(m)),
        "bad-chunk",
    ),
    Case(
        "chunk-line-too-long",
        lambda m: chunked(b"1;a=" + b"b" * 1100 + b"\r\nx\r\n" + LAST_CHUNK + smuggled(m)),
        "chunk-line-too-long",
    ),
    Case("trailer-bare-lf", lambda m: chunked(b"0\r\n\n" + smuggled(m)), "bare-lf"),
    Case(
        "trailer-content-length",
        lambda m: chunked(b"0\r\nContent-Length: 50\r\n\r\n" + smuggled(m)),
        "bad-trailer",
    ),
    Case(
        "trailer-transfer-encoding",
        lambda m: chunked(b"0\r\nTransfer-Encoding: chunked\r\n\r\n" + smuggled(m)),
        "bad-trailer",
    ),
    Case(
        "trailer-host",
        lambda m: chunked(b"0\r\nHost: evil.example\r\n\r\n" + smuggled(m)),
        "bad-trailer",
    ),
    Case(
        "trailer-obs-fold",
        lambda m: chunked(b"0\r\nX-A: 1\r\n b\r\n\r\n" + smuggled(m)),
        "obs-fold",
    ),
    Case(
        "too-many-trailers",
        lambda m: chunked(
            b"0\r\n"
            + b"".join(b"X-T%d: v\r\n" % i for i in range(MAX_HEADERS + 5))
            + b"\r\n"
            + smuggled(m)
        ),
        "too-many-trailers",
    ),
    Case(
        "trailers-too-large",
        lambda m: chunked(b"0\r\nX-Big: " + b"a" * (MAX_HEAD + 100) + b"\r\n\r\n" + smuggled(m)),
        "trailers-too-large",
    ),
    # ---- Host (RFC 9112 3.2)
    Case(
        "host-duplicate",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\r\n" + HOST + b"Host: evil.example\r\n\r\n"),
        "duplicate-host",
    ),
    Case(
        "host-absolute-mismatch",
        lambda m: then(b"GET http://evil.example/" + m + b" HTTP/1.1\r\n" + HOST + b"\r\n"),
        "host-mismatch",
    ),
    Case(
        "host-missing",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\r\nX-Pad: a\r\n\r\n"),
        "missing-host",
    ),
    Case(
        "host-userinfo",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\r\nHost: a@b\r\n\r\n"),
        "bad-host",
    ),
    Case(
        "host-slash",
        lambda m: then(b"GET /" + m + b" HTTP/1.1\r\nHost: localhost/x\r\n\r\n"),
        "bad-host",
    ),
    Case(
        "target-userinfo",
        lambda m: then(
            b"GET http://localhost@evil.example/" + m + b" HTTP/1.1\r\n" + HOST + b"\r\n"
        ),
        "bad-target",
    ),
    Case(
        "http10-no-host",
        lambda m: then(b"GET /" + m + b" HTTP/1.0\r\n\r\n"),
        "missing-host",
        layer="forward",
    ),
    # ---- the request line and the version (RFC 9112 3, 6.1)
    Case(
        "http10-te",
        lambda m: (
            b"POST /upload HTTP/1.0\r\n"
            + HOST
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + LAST_CHUNK
            + smuggled(m)
        ),
        "te-in-http10",
    ),
    Case(
        "version-1.2",
        lambda m: then(b"GET /" + m + b" HTTP/1.2\r\n" + HOST + b"\r\n"),
        "bad-version",
    ),
    Case(
        "version-2.0",
        lambda m: then(b"GET /" + m + b" HTTP/2.0\r\n" + HOST + b"\r\n"),
        "bad-version",
    ),
    Case(
        "version-lower-case",
        lambda m: then(b"GET /" + m + b" http/1.1\r\n" + HOST + b"\r\n"),
        "bad-version",
    ),
    Case(
        "h2-preface",
        lambda m: then(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + smuggled(m)),
        "bad-version",
    ),
    Case(
        "double-space",
        lambda m: then(b"GET  /" + m + b" HTTP/1.1\r\n" + HOST + b"\r\n"),
        "bad-request-line",
    ),
    Case(
        "tab-in-request-line",
        lambda m: then(b"GET /" + m + b"\tHTTP/1.1\r\n" + HOST + b"\r\n"),
        "bad-request-line",
    ),
    Case(
        "extra-token",
        lambda m: then(b"GET /" + m + b" HTTP/1.1 x\r\n" + HOST + b"\r\n"),
        "bad-request-line",
    ),
    Case(
        "nul-in-target",
        lambda m: then(b"GET /" + m + b"\x00 HTTP/1.1\r\n" + HOST + b"\r\n"),
        "bad-request-line",
    ),
    Case(
        "method-not-token",
        lambda m: then(b"G(T /" + m + b" HTTP/1.1\r\n" + HOST + b"\r\n"),
        "bad-method",
    ),
    Case("header-without-colon", lambda m: then(smuggled(m, b"X-No-Colon\r\n")), "bad-header-line"),
    Case("http09", lambda m: then(b"GET /" + m + b"\r\n"), "bad-request-line"),
    Case("crlf-between-requests", lambda m: then(b"\r\n" + smuggled(m)), "bad-request-line"),
    Case(
        "fragment-in-target",
        lambda m: then(b"GET /" + m + b"#x HTTP/1.1\r\n" + HOST + b"\r\n"),
        "bad-target",
    ),
    Case(
        "connect",
        lambda m: then(b"CONNECT " + m + b":443 HTTP/1.1\r\n" + HOST + b"\r\n"),
        "connect-method",
    ),
    # ---- limits (431 / 414 / 413)
    Case(
        "head-too-large",
        lambda m: then(smuggled(m, b"X-Big: " + b"a" * (MAX_HEAD + 100) + b"\r\n")),
        "head-too-large",
    ),
    Case(
        "too-many-headers",
        lambda m: then(smuggled(m, b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 5)))),
        "too-many-headers",
    ),
    Case(
        "uri-too-long",
        lambda m: then(
            b"GET " + _long_target(m, MAX_TARGET + 20) + b" HTTP/1.1\r\n" + HOST + b"\r\n"
        ),
        "uri-too-long",
    ),
    Case(
        "request-line-too-long",
        lambda m: then(
            b"GET " + _long_target(m, 3 * MAX_TARGET) + b" HTTP/1.1\r\n" + HOST + b"\r\n"
        ),
        "request-line-too-long",
    ),
    Case(
        "body-too-large-content-length",
        lambda m: post(b"Content-Length: %d\r\n" % (MAX_BODY + 1), b"hello" + smuggled(m)),
        "body-too-large",
    ),
    Case(
        "body-too-large-chunked",
        lambda m: chunked(
            chunk(b"a" * (MAX_BODY // 2))
            + b"%x\r\n" % MAX_BODY
            + smuggled(m)
            + b"\r\n"
            + LAST_CHUNK
        ),
        "body-too-large",
    ),
    # ---- hop-by-hop abuse (RFC 9110 7.6.1)
    Case(
        "connection-content-length",
        lambda m: post(
            b"Content-Length: %d\r\nConnection: content-length\r\n" % len(smuggled(m)), smuggled(m)
        ),
        "bad-connection",
    ),
    Case(
        "connection-transfer-encoding",
        lambda m: post(
            b"Transfer-Encoding: chunked\r\nConnection: close, Transfer-Encoding\r\n",
            LAST_CHUNK + smuggled(m),
        ),
        "bad-connection",
    ),
    Case("connection-host", lambda m: then(smuggled(m, b"Connection: host\r\n")), "bad-connection"),
    # ---- the login endpoint: its body is read (FormExtractor) before forwarding
    Case(
        "login-cl-te",
        lambda m: post(
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n",
            chunk(b"user=alice&password=x") + LAST_CHUNK + smuggled(m),
            target=b"/login",
        ),
        "cl-and-te",
    ),
    Case(
        "login-chunk-data-longer",
        lambda m: post(
            b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n",
            b"5\r\nuser=alice&password=x\r\n" + LAST_CHUNK + smuggled(m),
            target=b"/login",
        ),
        "bad-chunk",
    ),
    # ---- upgrades: data before the 101 (RFC 6455 4.1), h2c with the preface in tow
    Case(
        "websocket-frames-before-101",
        lambda m: WS_HEAD + b"\r\n" + ws_frame(b"hello") + smuggled(m),
        "bad-request-line",
    ),
    Case(
        "h2c-preface-before-101",
        lambda m: (
            b"GET /static/small.html HTTP/1.1\r\n" + HOST + b"Upgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\n\r\n"
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + smuggled(m)
        ),
        "bad-version",
    ),
]


# --------------------------------------------------------------------------- helpers


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def parse_responses(data: bytes, heads: frozenset[int] = frozenset()) -> list[Response]:
    """The responses in ``data`` (Content-Length, chunked, or to the end);
    ``heads``: the indexes of the responses to HEAD requests (no body)."""
    out: list[Response] = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"incomplete response head: {data[:200]!r}"
        lines = data[:end].split(b"\r\n")
        data = data[end + 4 :]
        version, status, *_ = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1", lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        code = int(status)
        body = b""
        if 100 <= code < 200 or code in (204, 304) or len(out) in heads:
            pass
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                line_end = data.index(b"\r\n")
                size = int(data[:line_end].split(b";")[0], 16)
                body += data[line_end + 2 : line_end + 2 + size]
                data = data[line_end + 2 + size + 2 :]
                if size == 0:
                    break
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            body, data = data[:length], data[length:]
        else:
            body, data = data, b""
        out.append(Response(code, headers, body))
        if code == 101:
            break  # the rest is the tunnel's
    return out


async def exchange(port: int, data: bytes, timeout: float = 5) -> tuple[bytes, bool]:
    """Send ``data``, read until the server closes: (what came back, closed in time?)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    closed = False
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(timeout):
            try:
                while chunk_ := await stream.receive_some(65536):
                    received += chunk_
            except trio.BrokenResourceError:
                pass  # a reset after the answer: closed all the same
            closed = True
    return bytes(received), closed


def log_hits(nginx: NginxInstance, marker: bytes) -> list[str]:
    """Access-log entries and error-log lines that mention ``marker``."""
    text = marker.decode()
    hits = [json.dumps(e) for e in nginx.access_log() if text in json.dumps(e)]
    hits += [line for line in nginx.error_log_lines() if text in line]
    return hits


async def wait_logged(nginx: NginxInstance, marker: bytes, timeout: float = 5) -> None:
    text = marker.decode()
    with trio.fail_after(timeout):
        while not any(text in json.dumps(e) for e in nginx.access_log()):
            await trio.sleep(0.05)


async def canary(rn: RunningNode, nginx: NginxInstance, name: str) -> None:
    """A well-formed request through the same node: it must be answered and logged."""
    marker = f"canary-{name}-{RUN}".encode()
    request = b"GET /static/small.html?" + marker + b" HTTP/1.1\r\n" + HOST
    data, closed = await exchange(rn.port("web"), request + b"Connection: close\r\n\r\n")
    assert closed
    assert [r.status for r in parse_responses(data)] == [200]
    await wait_logged(nginx, marker)


async def start(start_node: StartNode, nginx: NginxInstance) -> RunningNode:
    return await start_node(http_config(str(nginx.address), extra=LISTENER))


# --------------------------------------------------------------------------- the table


def test_table_is_sound() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert all(case.reason in REFUSALS for case in CASES)
    # every reason code is exercised on the wire
    assert set(REFUSALS) == {case.reason for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_screen_alone(case: Case) -> None:
    """Without the network: the screen refuses the case, with the reason the proxy reports."""
    screen = HeadScreen(LIMITS)
    data = case.build(case.marker())
    assert case.marker() in data
    if case.layer == "forward":
        screen.feed(data)  # the screen passes it; normalize_request refuses it
        return
    with pytest.raises(RequestRefused) as caught:
        screen.feed(data)
    assert caught.value.reason == case.reason


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_smuggling_refused_nothing_reaches_nginx(
    case: Case, nginx: NginxInstance, start_node: StartNode
) -> None:
    rn = await start(start_node, nginx)
    marker = case.marker()
    data, closed = await exchange(rn.port("web"), case.build(marker))
    refused_at = trio.current_time()
    # (1) the expected 4xx, then the connection closes
    assert closed, f"still open after the answer: {data[:300]!r}"
    responses = parse_responses(data)
    assert responses, "no answer at all"
    last = responses[-1]
    assert last.status == case.status, (last.status, last.body)
    assert last.headers.get(b"connection") == b"close"
    assert last.body == case.reason.encode() + b"\n"
    assert all(r.status < 400 for r in responses[:-1]), [r.status for r in responses]
    # (2) the event, with the reason code and the severity
    event = await rn.wait_for("http.refused", http__refusal=case.reason)
    assert event["http.response.status_code"] == case.status
    assert event["event.severity"] == ("high" if case.reason in SMUGGLING else "low")
    assert marker.decode() not in json.dumps(event, default=str)  # no client bytes in it
    close = await rn.wait_for("session.close")
    assert close["session.close_reason"] == "http_refused"
    # (3) nothing of it reached nginx: a canary through the same node shows up
    # in the log, and a while after the refusal the marker still does not
    await canary(rn, nginx, case.id)
    await trio.sleep(max(0.0, refused_at + 0.5 - trio.current_time()))
    assert log_hits(nginx, marker) == []


async def test_a_refused_smuggle_is_a_blocked_session_in_the_journal(
    nginx: NginxInstance, start_node: StartNode, tmp_path: Path
) -> None:
    # what the SOC sees: `mailmoat events --blocked` and the review page list it
    rn = await start(start_node, nginx)
    case = next(c for c in CASES if c.reason == "cl-and-te")
    _, closed = await exchange(rn.port("web"), case.build(case.marker()))
    assert closed
    close = await rn.wait_for("session.close", session__close_reason="http_refused")
    journal = Journal(tmp_path / "data" / "journal")
    blocked = EventFilter(blocked=True, session=str(close["session.id"]))
    with trio.fail_after(10):
        while not (found := list(journal.query(blocked))):
            await trio.sleep(0.05)
    assert [e["event.action"] for e in found] == ["session.close"]
    # and the 400 is in the request metrics like any answer
    assert rn.node.metrics is not None
    got = samples(rn.node.metrics)
    assert value(got, "mailmoat_http_requests_total", listener="web", status="400") == 1


# --------------------------------------------------------------------------- slowloris


async def test_slowloris_head_gets_408_and_nothing_reaches_nginx(
    nginx: NginxInstance, start_node: StartNode
) -> None:
    rn = await start(start_node, nginx)
    marker = f"smuggled-slowloris-{RUN}".encode()
    stream = await trio.open_tcp_stream("127.0.0.1", rn.port("web"))
    received = bytearray()
    began = trio.current_time()
    async with stream, trio.open_nursery() as nursery:

        async def trickle() -> None:
            await stream.send_all(b"GET /" + marker + b" HTTP/1.1\r\n" + HOST)
            for i in range(40):
                await trio.sleep(0.2)
                try:
                    await stream.send_all(b"X-Slow-%d: v\r\n" % i)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        nursery.start_soon(trickle)
        with trio.fail_after(5):
            try:
                while chunk_ := await stream.receive_some(65536):
                    received += chunk_
            except trio.BrokenResourceError:
                pass
        took = trio.current_time() - began
        nursery.cancel_scope.cancel()
    responses = parse_responses(bytes(received))
    assert [r.status for r in responses] == [408]
    assert responses[0].headers.get(b"connection") == b"close"
    assert 0.9 <= took < 4, took  # header_timeout = 1, counted from the first byte
    close = await rn.wait_for("session.close")
    assert close["session.close_reason"] == "client_timeout"
    await canary(rn, nginx, "slowloris")
    await trio.sleep(0.5)
    assert log_hits(nginx, marker) == []


# --------------------------------------------------------------------------- positive controls


@dataclass(frozen=True)
class Control:
    id: str
    #: (markers that must reach nginx, markers that must not) -> bytes
    build: Callable[[list[bytes], bytes], bytes]
    statuses: list[int]
    #: how many requests reach nginx (the markers ``ok``)
    reached: int = 2
    #: indexes of the HEAD requests
    heads: frozenset[int] = frozenset()
    #: the backend may answer the first request before its body is complete
    #: (mailmoat then closes after that answer: "response_before_body")
    early_answer: bool = False


def ok_get(marker: bytes, close: bool = False) -> bytes:
    return (
        b"GET /static/small.html?"
        + marker
        + b" HTTP/1.1\r\n"
        + HOST
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
    )


def upload(marker: bytes, fields: bytes, body: bytes) -> bytes:
    return post(fields, body, target=b"/upload?" + marker)


CONTROLS = [
    Control("pipelined-gets", lambda ok, _: ok_get(ok[0]) + ok_get(ok[1], close=True), [200, 200]),
    Control(
        "chunked-upload-then-get",
        lambda ok, hidden: (
            upload(
                ok[0],
                b"Transfer-Encoding: chunked\r\n",
                chunk(b"hello ") + b'5;name="v a"\r\nworld\r\n0\r\nX-Checksum: 1\r\n\r\n',
            )
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
    ),
    Control(
        "content-length-upload-then-get",
        lambda ok, hidden: (
            upload(ok[0], b"Content-Length: 11\r\n", b"hello world") + ok_get(ok[1], close=True)
        ),
        [200, 200],
    ),
    # a smuggled-looking request inside a chunk is body, never a request
    Control(
        "tab-ows-te-is-chunked",
        lambda ok, hidden: (
            upload(ok[0], b"Transfer-Encoding:\tchunked\r\n", chunk(smuggled(hidden)) + LAST_CHUNK)
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
    ),
    # 0.CL / CL.0 (Kettle 2025): a GET's body is forwarded as a body.  nginx
    # answers a static file without reading the body: if that answer beats the
    # upload, mailmoat closes ("response_before_body") and the second request
    # is dropped -- also safe, so both outcomes are accepted
    Control(
        "get-with-body",
        lambda ok, hidden: (
            b"GET /static/small.html?"
            + ok[0]
            + b" HTTP/1.1\r\n"
            + HOST
            + b"Content-Length: %d\r\n\r\n" % len(smuggled(hidden))
            + smuggled(hidden)
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
        early_answer=True,
    ),
    Control(
        "obfuscated-expect",
        lambda ok, hidden: (
            upload(
                ok[0],
                b"Expect: y 100-continue\r\nContent-Length: %d\r\n" % len(smuggled(hidden)),
                smuggled(hidden),
            )
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
    ),
    # websocket smuggling: the backend does not switch (static file, 200), so
    # what follows is HTTP again -- screened and forwarded as a request of its own
    Control(
        "upgrade-not-accepted",
        lambda ok, hidden: (
            b"GET /static/small.html?"
            + ok[0]
            + b" HTTP/1.1\r\n"
            + HOST
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            + WS_KEY
            + b"\r\n"
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
    ),
    # the login endpoint: mailmoat reads the form first, then forwards it
    Control(
        "login-chunked-then-get",
        lambda ok, hidden: (
            post(
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Transfer-Encoding: chunked\r\n",
                chunk(b"user=alice&") + chunk(b"password=wrong-" + ok[0]) + LAST_CHUNK,
                target=b"/login?" + ok[0],
            )
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
    ),
    # a HEAD response has a Content-Length and no body: the next response
    # must not be read as its body (a response-queue desync)
    Control(
        "head-then-get",
        lambda ok, hidden: (
            b"HEAD /static/small.html?"
            + ok[0]
            + b" HTTP/1.1\r\n"
            + HOST
            + b"\r\n"
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
        heads=frozenset({0}),
    ),
    Control(
        "absolute-form-same-host",
        lambda ok, hidden: (
            b"GET http://LOCALHOST:80/static/small.html?"
            + ok[0]
            + b" HTTP/1.1\r\n"
            + HOST
            + b"\r\n"
            + ok_get(ok[1], close=True)
        ),
        [200, 200],
    ),
    # after "Connection: close" (or an HTTP/1.0 request without keep-alive)
    # nothing more is read: what follows is dropped, never forwarded
    Control(
        "close-then-pipelined",
        lambda ok, hidden: ok_get(ok[0], close=True) + smuggled(hidden),
        [200],
        reached=1,
    ),
    Control(
        "http10-then-pipelined",
        lambda ok, hidden: (
            b"GET /static/small.html?"
            + ok[0]
            + b" HTTP/1.0\r\n"
            + HOST
            + b"\r\n"
            + smuggled(hidden)
        ),
        [200],
        reached=1,
    ),
]


@pytest.mark.parametrize("control", CONTROLS, ids=[c.id for c in CONTROLS])
async def test_control_well_formed_pipelines_reach_nginx(
    control: Control, nginx: NginxInstance, start_node: StartNode
) -> None:
    rn = await start(start_node, nginx)
    ok = [f"ok-{control.id}-{i}-{RUN}".encode() for i in range(control.reached)]
    hidden = f"smuggled-{control.id}-{RUN}".encode()
    data, closed = await exchange(rn.port("web"), control.build(ok, hidden))
    assert closed
    responses = parse_responses(data, control.heads)
    close = await rn.wait_for("session.close")
    statuses = [r.status for r in responses]
    reached = control.reached
    dropped: list[bytes] = []
    if control.early_answer and close["session.close_reason"] == "response_before_body":
        reached = 1
        assert statuses == control.statuses[:1]
        dropped = ok[1:]
    else:
        assert statuses == control.statuses, (close["session.close_reason"], statuses)
    for marker in ok[:reached]:
        await wait_logged(nginx, marker)
    assert close["http.requests"] == reached
    assert rn.events.find("http.refused") == []
    await trio.sleep(0.3)
    for marker in [hidden, *dropped]:
        assert log_hits(nginx, marker) == []
