"""Tests for the webmail proxy's HTTP layer (mailmoat.protocols.http).

The smuggling table follows public research: PortSwigger Web Security
Academy "HTTP request smuggling" (CL.TE, TE.CL, and its TE.TE obfuscation
list), James Kettle's "HTTP Desync Attacks" (2019), and RFC 9112 sections
2.2, 3, 5, 6 and 7.1.  Every row also records what h11 0.16 does with the
same bytes on its own, which is the reason the screen exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailmoat.detect.login import LoginFacts, password_fingerprint
from mailmoat.errors import LocalProtocolError, RemoteProtocolError
from mailmoat.protocols.http import (
    REFUSALS,
    SECRET_FIELD_RE,
    FormExtractor,
    FormResult,
    HeadScreen,
    HttpLimits,
    LoginForm,
    LoginOutcome,
    RequestLine,
    RequestRefused,
    detect_encoding,
    is_websocket_upgrade,
    judge_login,
    normalize_path,
    normalize_request,
    normalize_response,
    request_fields,
)
from mailmoat.secret import Secret
from mailmoat.session.commands import CheckLogin, Emit
from mailmoat.session.http import HttpSession, HttpSessionConfig

ROOT = Path(__file__).resolve().parent.parent
H = b"Host: h\r\n"
TE = b"Transfer-Encoding: chunked\r\n"


def post_chunked(chunks: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\n" + H + TE + b"\r\n" + chunks


def screen_all(data: bytes, step: int = 0, limits: HttpLimits | None = None) -> bytes:
    """Feed ``data`` whole (step 0) or in pieces; return what was passed."""
    screen = HeadScreen(limits)
    if step == 0:
        return screen.feed(data)
    return b"".join(screen.feed(data[i : i + step]) for i in range(0, len(data), step))


def h11_accepts(data: bytes) -> bool:
    """Does h11 alone (server role) take ``data`` without a protocol error?"""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return True
            if isinstance(event, h11.EndOfMessage):
                return True
    except h11.RemoteProtocolError:
        return False


# --------------------------------------------------------------------------
# The smuggling table: raw request -> (status, reason); h11 alone accepts?
# --------------------------------------------------------------------------

REFUSED = [
    # CL.TE / TE.CL (PortSwigger): both framing headers.  h11 lets TE win.
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 13\r\n" + TE + b"\r\n0\r\n\r\nSMUGGLED",
        400,
        "cl-and-te",
        True,
        id="cl-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + TE + b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        400,
        "cl-and-te",
        True,
        id="te-cl",
    ),
    # TE.TE obfuscations (PortSwigger's list and friends).
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        400,
        "bad-transfer-encoding",
        False,
        id="te-xchunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
        "space-before-colon",
        False,
        id="te-space-before-colon",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + TE + b"Transfer-Encoding: x\r\n\r\n0\r\n\r\n",
        400,
        "bad-transfer-encoding",
        False,
        id="te-twice",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + TE + TE + b"\r\n0\r\n\r\n",
        400,
        "bad-transfer-encoding",
        False,
        id="te-twice-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "obs-fold",
        True,
        id="te-leading-space",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"X: X\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bare-lf",
        True,
        id="te-after-bare-lf",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding\n: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bare-lf",
        False,
        id="te-name-bare-lf",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
        "bad-transfer-encoding",
        False,
        id="te-chunked-identity",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad-transfer-encoding",
        False,
        id="te-identity-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked;\r\n\r\n0\r\n\r\n",
        400,
        "bad-transfer-encoding",
        False,
        id="te-chunked-semicolon",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n',
        400,
        "bad-transfer-encoding",
        False,
        id="te-quoted",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: ch\tunked\r\n\r\n0\r\n\r\n",
        400,
        "bad-transfer-encoding",
        False,
        id="te-inner-tab",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        400,
        "bad-header-value",
        False,
        id="te-vertical-tab",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\tidentity\r\n\r\n0\r\n\r\n",
        400,
        "obs-fold",
        False,
        id="te-folded",
    ),
    pytest.param(
        b"POST / HTTP/1.0\r\n" + TE + b"\r\n0\r\n\r\n",
        400,
        "te-in-http10",
        True,
        id="te-in-http10",
    ),
    # Content-Length variants.
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        400,
        "duplicate-content-length",
        True,
        id="cl-twice-equal",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        400,
        "duplicate-content-length",
        False,
        id="cl-twice-different",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\nx",
        400,
        "duplicate-content-length",
        True,
        id="cl-list",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\nx",
        400,
        "bad-content-length",
        False,
        id="cl-plus",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x1\r\n\r\nx",
        400,
        "bad-content-length",
        False,
        id="cl-hex",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
        400,
        "bad-content-length",
        False,
        id="cl-negative",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 1\r\n\r\nx",
        400,
        "bad-content-length",
        False,
        id="cl-inner-space",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n",
        400,
        "bad-content-length",
        False,
        id="cl-empty",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999\r\n\r\n",
        413,
        "body-too-large",
        True,
        id="cl-20-digits",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 67108865\r\n\r\n",
        413,
        "body-too-large",
        True,
        id="cl-over-limit",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Connection: Content-Length\r\nContent-Length: 1\r\n\r\nx",
        400,
        "bad-connection",
        True,
        id="connection-names-content-length",
    ),
    # Chunk-size tricks (h11 takes 1-20 hex digits, any extension, trailing OWS).
    pytest.param(
        post_chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400, "bad-chunk-size", False, id="chunk-0x"
    ),
    pytest.param(
        post_chunked(b"5 \r\nhello\r\n0\r\n\r\n"),
        400,
        "bad-chunk-size",
        True,
        id="chunk-trailing-space",
    ),
    pytest.param(
        post_chunked(b" 5\r\nhello\r\n0\r\n\r\n"),
        400,
        "bad-chunk-size",
        False,
        id="chunk-leading-space",
    ),
    pytest.param(
        post_chunked(b"-1\r\nx\r\n0\r\n\r\n"), 400, "bad-chunk-size", False, id="chunk-negative"
    ),
    pytest.param(
        post_chunked(b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
        400,
        "bad-chunk-size",
        False,
        id="chunk-space-before-ext",
    ),
    pytest.param(
        post_chunked(b"5;\r\nhello\r\n0\r\n\r\n"),
        400,
        "bad-chunk-extension",
        True,
        id="chunk-empty-ext",
    ),
    pytest.param(
        post_chunked(b"5;a b\r\nhello\r\n0\r\n\r\n"),
        400,
        "bad-chunk-extension",
        True,
        id="chunk-ext-space",
    ),
    pytest.param(
        post_chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n"), 400, "bare-cr", True, id="chunk-ext-bare-cr"
    ),
    pytest.param(
        post_chunked(b"5\nhello\r\n0\r\n\r\n"), 400, "bare-lf", False, id="chunk-line-bare-lf"
    ),
    pytest.param(
        post_chunked(b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
        400,
        "chunk-size-too-long",
        True,
        id="chunk-17-digits-padded",
    ),
    pytest.param(
        post_chunked(b"FFFFFFFFFFFFFFFFFFFF\r\nx"),
        400,
        "chunk-size-too-long",
        True,
        id="chunk-20-digits",
    ),
    pytest.param(
        post_chunked(b"FFFFFFFFFFFFFFFF\r\nx"), 413, "body-too-large", True, id="chunk-64-bit"
    ),
    pytest.param(
        post_chunked(b"1;" + b"a" * 1100 + b"\r\nx\r\n0\r\n\r\n"),
        400,
        "chunk-line-too-long",
        True,
        id="chunk-long-extension",
    ),
    pytest.param(
        post_chunked(b"5\r\nhelloX\r\n0\r\n\r\n"), 400, "bad-chunk", False, id="chunk-data-too-long"
    ),
    pytest.param(
        post_chunked(b"5\r\nhello\n0\r\n\r\n"), 400, "bad-chunk", False, id="chunk-data-bare-lf"
    ),
    pytest.param(post_chunked(b"0\r\nX: y\n\n"), 400, "bare-lf", True, id="trailer-bare-lf"),
    pytest.param(
        post_chunked(b"0\r\nContent-Length: 5\r\n\r\n"),
        400,
        "bad-trailer",
        True,
        id="trailer-content-length",
    ),
    pytest.param(
        post_chunked(b"0\r\nX: y\r\n z\r\n\r\n"), 400, "obs-fold", True, id="trailer-folded"
    ),
    # The head: line ends, folding, field syntax.
    pytest.param(b"GET / HTTP/1.1\nHost: h\n\n", 400, "bare-lf", True, id="bare-lf-everywhere"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\n\n", 400, "bare-lf", True, id="bare-lf-blank-line"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400, "bare-cr", False, id="bare-cr-value"
    ),
    pytest.param(
        b"GET /\r HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bare-cr", False, id="bare-cr-request-line"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", 400, "obs-fold", True, id="obs-fold"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", 400, "obs-fold", False, id="space-before-first-field"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        400,
        "space-before-colon",
        False,
        id="host-space-colon",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X\t: y\r\n\r\n",
        400,
        "space-before-colon",
        False,
        id="tab-before-colon",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X(Y): 1\r\n\r\n",
        400,
        "bad-header-name",
        False,
        id="name-bad-char",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X Y: 1\r\n\r\n",
        400,
        "bad-header-name",
        False,
        id="name-inner-space",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b": 1\r\n\r\n", 400, "bad-header-name", False, id="name-empty"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"no colon\r\n\r\n",
        400,
        "bad-header-line",
        False,
        id="no-colon",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n",
        400,
        "bad-header-value",
        False,
        id="nul-in-value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n",
        400,
        "bad-header-value",
        True,
        id="ctl-in-value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n",
        400,
        "bad-header-value",
        True,
        id="del-in-value",
    ),
    # Host.
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400, "duplicate-host", False, id="host-twice"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
        "duplicate-host",
        False,
        id="host-twice-different",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, "missing-host", False, id="host-missing"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad-host", True, id="host-space"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: evil@h\r\n\r\n", 400, "bad-host", True, id="host-userinfo"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: h/x\r\n\r\n", 400, "bad-host", True, id="host-slash"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: h:80:80\r\n\r\n", 400, "bad-host", True, id="host-two-ports"
    ),
    pytest.param(
        b"GET http://evil/ HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "host-mismatch",
        True,
        id="absolute-form-mismatch",
    ),
    pytest.param(
        b"GET https://h:8443/ HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "host-mismatch",
        True,
        id="absolute-form-port-mismatch",
    ),
    pytest.param(
        b"GET http://u@h/ HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "bad-target",
        True,
        id="absolute-form-userinfo",
    ),
    pytest.param(
        b"GET ftp://h/ HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-target", True, id="absolute-form-ftp"
    ),
    # The request line.
    pytest.param(
        b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-request-line", False, id="two-spaces"
    ),
    pytest.param(
        b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400, "bad-request-line", False, id="trailing-space"
    ),
    pytest.param(
        b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-request-line", False, id="tab-separator"
    ),
    pytest.param(
        b"GET /\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "bad-request-line",
        False,
        id="non-ascii-target",
    ),
    pytest.param(
        b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-request-line", False, id="leading-crlf"
    ),
    pytest.param(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        400,
        "bad-request-line",
        False,
        id="tls-client-hello",
    ),
    pytest.param(
        b"GE(T / HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-method", False, id="method-not-token"
    ),
    pytest.param(b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400, "bad-version", True, id="http-1.2"),
    pytest.param(b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400, "bad-version", True, id="http-2.0"),
    pytest.param(
        b"GET / http/1.1\r\n" + H + b"\r\n", 400, "bad-version", False, id="version-lowercase"
    ),
    pytest.param(
        b"GET / HTTP/1.10\r\n" + H + b"\r\n", 400, "bad-version", False, id="version-1.10"
    ),
    pytest.param(b"GET /\r\n\r\n", 400, "bad-request-line", False, id="http-0.9"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad-version", True, id="h2-preface"),
    pytest.param(
        b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 400, "connect-method", True, id="connect"
    ),
    pytest.param(b"GET /#frag HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-target", True, id="fragment"),
    pytest.param(
        b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-target", True, id="asterisk-not-options"
    ),
    pytest.param(
        b"GET index.html HTTP/1.1\r\n" + H + b"\r\n", 400, "bad-target", True, id="relative-target"
    ),
    # Limits: the head in one read, the URL, the field count.
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 20000 + b"\r\n\r\n",
        431,
        "head-too-large",
        True,
        id="oversized-head-one-read",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n",
        431,
        "too-many-headers",
        True,
        id="101-fields",
    ),
    pytest.param(
        b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\n" + H + b"\r\n",
        414,
        "uri-too-long",
        True,
        id="url-8193",
    ),
    pytest.param(
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
        414,
        "request-line-too-long",
        True,
        id="url-9001",
    ),
]


@pytest.mark.parametrize(("raw", "status", "reason", "h11_alone"), REFUSED)
@pytest.mark.parametrize("step", [0, 1, 5], ids=["whole", "bytewise", "5-bytes"])
def test_refused(raw: bytes, status: int, reason: str, h11_alone: bool, step: int) -> None:
    with pytest.raises(RequestRefused) as caught:
        screen_all(raw, step)
    assert (caught.value.status, caught.value.reason) == (status, reason)
    assert REFUSALS[reason] == status


@pytest.mark.parametrize(("raw", "status", "reason", "h11_alone"), REFUSED)
def test_h11_alone(raw: bytes, status: int, reason: str, h11_alone: bool) -> None:
    """What h11 does with the same bytes: the lax rows are why the screen exists."""
    assert h11_accepts(raw) is h11_alone


ACCEPTED = [
    pytest.param(b"GET /?_task=mail HTTP/1.1\r\n" + H + b"\r\n", [("none", 0)], id="get"),
    pytest.param(b"HEAD / HTTP/1.1\r\n" + H + b"\r\n", [("none", 0)], id="head"),
    pytest.param(b"get / HTTP/1.1\r\n" + H + b"\r\n", [("none", 0)], id="method-is-any-token"),
    pytest.param(
        b"POST /login HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        [("content-length", 5)],
        id="post-content-length",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
        [("content-length", 0)],
        id="content-length-0",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 005\r\n\r\nhello",
        [("content-length", 5)],
        id="content-length-leading-zeros",
    ),
    pytest.param(
        post_chunked(b'5;name=value;q="a \\" b"\r\nhello\r\n0;last\r\nX-Sum: 1\r\n\r\n'),
        [("chunked", None)],
        id="chunked-extensions-trailer",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tChunked \r\n\r\n0\r\n\r\n",
        [("chunked", None)],
        id="te-ows-and-case",
    ),
    pytest.param(
        post_chunked(b"000A\r\n0123456789\r\n000\r\n\r\n"),
        [("chunked", None)],
        id="chunk-size-leading-zeros",
    ),
    pytest.param(
        b"GET http://H:80/x HTTP/1.1\r\n" + H + b"\r\n", [("none", 0)], id="absolute-form"
    ),
    pytest.param(
        b"GET https://[2001:db8::1]/ HTTP/1.1\r\nHost: [2001:DB8::1]:443\r\n\r\n",
        [("none", 0)],
        id="absolute-form-ipv6",
    ),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", [("none", 0)], id="http10-without-host"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", [("none", 0)], id="options-asterisk"),
    pytest.param(b"GET / HTTP/1.1\r\nHost:\r\n\r\n", [("none", 0)], id="empty-host"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: 192.0.2.1:8080\r\n\r\n", [("none", 0)], id="host-ip-port"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"X: caf\xc3\xa9 \t au lait\r\n\r\n",
        [("none", 0)],
        id="obs-text-and-inner-whitespace",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\n" + H + b"\r\n"
        b"POST /b HTTP/1.1\r\n"
        + H
        + b"Content-Length: 3\r\n\r\nabc"
        + post_chunked(b"1\r\nx\r\n0\r\n\r\n")
        + b"GET /c HTTP/1.1\r\n"
        + H
        + b"Connection: close\r\n\r\n",
        [("none", 0), ("content-length", 3), ("chunked", None), ("none", 0)],
        id="pipelined",
    ),
    pytest.param(
        b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        [("none", 0)],
        id="websocket-handshake",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(99)) + b"\r\n",
        [("none", 0)],
        id="100-fields",
    ),
    pytest.param(
        b"GET /" + b"a" * 8191 + b" HTTP/1.1\r\n" + H + b"\r\n", [("none", 0)], id="url-8192"
    ),
]


@pytest.mark.parametrize(("raw", "framings"), ACCEPTED)
@pytest.mark.parametrize("step", [0, 1, 5], ids=["whole", "bytewise", "5-bytes"])
def test_accepted_unchanged(raw: bytes, framings: list[tuple[str, int | None]], step: int) -> None:
    screen = HeadScreen()
    if step == 0:
        passed = screen.feed(raw)
    else:
        passed = b"".join(screen.feed(raw[i : i + step]) for i in range(0, len(raw), step))
    assert passed == raw
    assert [(h.framing, h.content_length) for h in screen.take_heads()] == framings
    assert screen.take_heads() == []


@pytest.mark.parametrize(("raw", "framings"), ACCEPTED)
def test_h11_takes_what_the_screen_passes(raw: bytes, framings: list[object]) -> None:
    assert h11_accepts(raw)


def test_head_is_held_until_complete_body_streams() -> None:
    screen = HeadScreen()
    assert screen.feed(b"POST / HTTP/1.1\r\nHost: h\r\n") == b""
    assert screen.feed(b"Content-Length: 10\r\n\r") == b""
    assert screen.feed(b"\nhel") == b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhel"
    assert screen.feed(b"lo") == b"lo"
    # the rest of the body, then the start of the next head, held back
    assert screen.feed(b"world" + b"GET / HT") == b"world"
    assert screen.feed(b"TP/1.1\r\nHost: h\r\n\r\n") == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    heads = screen.take_heads()
    assert [(h.method, h.target, h.content_length) for h in heads] == [
        (b"POST", b"/", 10),
        (b"GET", b"/", 0),
    ]
    assert heads[0].head_size == len(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")


def test_chunks_are_released_as_checked() -> None:
    screen = HeadScreen()
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert screen.feed(head + b"5") == head
    assert screen.feed(b"\r\nhel") == b"5\r\nhel"
    assert screen.feed(b"lo\r") == b"lo"
    assert screen.feed(b"\n0\r\n") == b"\r\n0\r\n"
    assert screen.feed(b"\r\n") == b"\r\n"


def test_smuggled_second_request_is_screened() -> None:
    """A body that ends where the screen says it ends: what follows is a head."""
    screen = HeadScreen()
    first = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    with pytest.raises(RequestRefused) as caught:
        screen.feed(first + b"GET /admin HTTP/1.1\r\nHost: h\r\nHost: x\r\n\r\n")
    assert caught.value.reason == "duplicate-host"
    assert [h.target for h in screen.take_heads()] == [b"/"]


def test_refusal_is_sticky_and_typed() -> None:
    screen = HeadScreen()
    with pytest.raises(RemoteProtocolError):
        screen.feed(b"GET / HTTP/1.1\nHost: h\n\n")
    assert screen.failed
    with pytest.raises(RequestRefused) as caught:
        screen.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert caught.value.reason == "bare-lf"


def test_reply_hint_is_a_complete_response() -> None:
    exc = RequestRefused("head-too-large")
    assert exc.reply_hint is not None
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    client.send(h11.EndOfMessage())
    client.receive_data(exc.reply_hint)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == 431
    assert (b"connection", b"close") in list(response.headers)
    assert isinstance(client.next_event(), h11.EndOfMessage)
    assert "head-too-large" in str(exc)


def test_oversized_head_in_one_read_is_bounded() -> None:
    screen = HeadScreen()
    with pytest.raises(RequestRefused) as caught:
        screen.feed(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 1_000_000)
    assert caught.value.status == 431
    assert "held=0" in repr(screen)


def test_earliest_error_wins() -> None:
    # a bare LF inside the limit beats the size limit, whole or bytewise
    raw = b"GET / HTTP/1.1\r\nA: b\nX: " + b"a" * 20000
    for step in (0, 1):
        with pytest.raises(RequestRefused, match="bare-lf"):
            screen_all(raw, step)


def test_custom_limits() -> None:
    limits = HttpLimits(max_head_size=64, max_header_count=2, max_target_length=10, max_body_size=8)
    with pytest.raises(RequestRefused, match="head-too-large"):
        screen_all(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 60 + b"\r\n\r\n", limits=limits)
    with pytest.raises(RequestRefused, match="too-many-headers"):
        screen_all(b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n", limits=limits)
    with pytest.raises(RequestRefused, match="uri-too-long"):
        screen_all(b"GET /abcdefghijk HTTP/1.1\r\nHost: h\r\n\r\n", limits=limits)
    with pytest.raises(RequestRefused, match="body-too-large"):
        screen_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\n", limits=limits)
    # chunked: the running total, refused at the chunk-size line that crosses it
    body = b"4\r\nabcd\r\n4\r\nefgh\r\n1\r\ni\r\n0\r\n\r\n"
    screen = HeadScreen(limits)
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert screen.feed(head + body[:18]) == head + body[:18]
    with pytest.raises(RequestRefused) as caught:
        screen.feed(body[18:])
    assert caught.value.status == 413
    with pytest.raises(RequestRefused, match="trailers-too-large"):
        screen_all(head + b"0\r\nX: " + b"a" * 70 + b"\r\n\r\n", limits=limits)
    with pytest.raises(RequestRefused, match="too-many-trailers"):
        screen_all(head + b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", limits=limits)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_head_size": 10},
        {"max_header_count": 0},
        {"max_body_size": -1},
        {"max_chunk_line": "9"},
    ],
)
def test_limits_validate(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        HttpLimits(**kwargs)  # type: ignore[arg-type]


def test_switch_protocols_passes_everything_after() -> None:
    screen = HeadScreen()
    handshake = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert screen.feed(handshake) == handshake
    assert screen.take_heads()[0].upgrade
    assert screen.switch_protocols() == b""
    assert screen.feed(b"\x81\x05hello\n\r\x00") == b"\x81\x05hello\n\r\x00"


def test_switch_protocols_returns_what_was_held() -> None:
    screen = HeadScreen()
    handshake = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: x\r\n\r\n"
    assert screen.feed(handshake + b"PING ") == handshake
    assert screen.switch_protocols() == b"PING "


def test_frames_before_the_101_are_refused() -> None:
    # RFC 6455 4.1: "Once the client's opening handshake has been sent, the
    # client MUST wait for a response from the server before sending any
    # further data."  Until switch_protocols(), what follows is HTTP.
    screen = HeadScreen()
    handshake = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"
    with pytest.raises(RequestRefused, match="bad-request-line"):
        screen.feed(handshake + b"\x81\x05hello")


def test_switch_protocols_needs_an_upgrade_request() -> None:
    screen = HeadScreen()
    screen.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    with pytest.raises(LocalProtocolError):
        screen.switch_protocols()
    upgrade = HeadScreen()
    upgrade.feed(b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nContent-Length: 4\r\n\r\nab")
    with pytest.raises(LocalProtocolError):
        upgrade.switch_protocols()  # the body is not over


def test_every_reason_is_documented() -> None:
    doc = (ROOT / "docs" / "http.md").read_text(encoding="utf-8")
    section = doc.split("## Request hardening", 1)[1]
    for reason, status in REFUSALS.items():
        assert re.search(rf"\|\s*{status}\s*\|\s*`{re.escape(reason)}`", section), reason


# --------------------------------------------------------------------------
# Forwarding
# --------------------------------------------------------------------------


def parse_request(raw: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


def headers_of(
    request: h11.Request | h11.Response | h11.InformationalResponse,
) -> list[tuple[bytes, bytes]]:
    return list(request.headers)


def values(request: h11.Request | h11.Response, name: bytes) -> list[bytes]:
    return [v for k, v in request.headers if k == name]


def test_hop_by_hop_removed() -> None:
    request = parse_request(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret-Hop\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Trailer: X-Sum\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Secret-Hop: 1\r\nAccept: */*\r\n\r\n"
    )
    out = normalize_request(request, client_ip="192.0.2.7")
    names = [k for k, _ in headers_of(out)]
    assert names == [
        b"host",
        b"accept",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-real-ip",
    ]
    assert out.http_version == b"1.1"
    h11.Connection(h11.CLIENT).send(out)


def test_connection_cannot_name_framing_away() -> None:
    request = parse_request(
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: content-length, host\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    out = normalize_request(request, client_ip="192.0.2.7")
    assert values(out, b"content-length") == [b"2"]
    assert values(out, b"host") == [b"h"]


def test_exactly_one_framing_field() -> None:
    # h11 itself accepts CL together with TE (TE wins): the forwarded request keeps TE only
    both = parse_request(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    out = normalize_request(both, client_ip="192.0.2.7")
    assert values(out, b"transfer-encoding") == [b"chunked"]
    assert values(out, b"content-length") == []
    twice = parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\n")
    assert values(normalize_request(twice, client_ip="192.0.2.7"), b"content-length") == [b"1"]
    empty_post = parse_request(b"POST / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert values(normalize_request(empty_post, client_ip="192.0.2.7"), b"content-length") == [b"0"]
    get = normalize_request(parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"), client_ip="::1")
    assert values(get, b"content-length") == values(get, b"transfer-encoding") == []


def test_forwarding_fields_untrusted() -> None:
    request = parse_request(
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
        b"Forwarded: for=6.6.6.6\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: evil\r\n"
        b"True-Client-IP: 6.6.6.6\r\n\r\n"
    )
    out = normalize_request(request, client_ip="192.0.2.7", client_port=4711, scheme="https")
    assert headers_of(out)[1:] == [
        (b"forwarded", b'for="192.0.2.7:4711";proto=https'),
        (b"x-forwarded-for", b"192.0.2.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-real-ip", b"192.0.2.7"),
    ]


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ("", ""),
        ("q=inbox", "q=inbox"),
        ("token=abc&x=1", "token=***&x=1"),
        ("_pass=hunter2&_user=alice", "_pass=***&_user=alice"),
        ("api%5Ftoken=z&OTP=1", "api%5Ftoken=***&OTP=***"),
        ("password", "password"),  # no value to hide
    ],
)
def test_redact_query(query: str, shown: str) -> None:
    from mailmoat.protocols.http import RequestLine, redact_query

    assert redact_query(query) == shown
    request = parse_request(b"GET /x?" + query.encode() + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert RequestLine(request).redacted() == b"GET /x?" + shown.encode()


def test_underscore_spellings_of_forwarding_fields_are_dropped() -> None:
    """X-Forwarded_For would become HTTP_X_FORWARDED_FOR in a CGI/WSGI server."""
    request = parse_request(
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n"
        b"Transfer_Encoding: chunked\r\nX_Custom_Field: kept\r\n\r\n"
    )
    for trusted in (False, True):
        out = normalize_request(request, client_ip="192.0.2.7", trusted=trusted)
        assert b"6.6.6.6" not in b"".join(v for _, v in headers_of(out))
        assert values(out, b"transfer_encoding") == []
        assert values(out, b"x_custom_field") == [b"kept"]


def test_forwarding_fields_trusted_append() -> None:
    request = parse_request(
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.1\r\n"
        b"X-Forwarded-For: 10.0.0.2\r\nForwarded: for=203.0.113.9;proto=https\r\n"
        b"X-Forwarded-Proto: https\r\nX-Real-IP: 203.0.113.9\r\n"
        b"X-Forwarded-Host: mail.example.org\r\n\r\n"
    )
    out = normalize_request(request, client_ip="10.0.0.3", scheme="http", trusted=True)
    assert values(out, b"x-forwarded-for") == [b"203.0.113.9, 10.0.0.1, 10.0.0.2, 10.0.0.3"]
    assert values(out, b"forwarded") == [b"for=203.0.113.9;proto=https, for=10.0.0.3;proto=http"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-real-ip") == [b"203.0.113.9"]
    assert values(out, b"x-forwarded-host") == [b"mail.example.org"]
    # trusted, but nothing received: ours only
    plain = normalize_request(
        parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"), client_ip="10.0.0.3", trusted=True
    )
    assert values(plain, b"x-forwarded-for") == [b"10.0.0.3"]
    assert values(plain, b"forwarded") == [b"for=10.0.0.3;proto=https"]


@pytest.mark.parametrize(
    ("ip", "port", "node", "address"),
    [
        ("2001:db8::1", 4711, b'"[2001:db8::1]:4711"', b"2001:db8::1"),
        ("2001:DB8:0::1", None, b'"[2001:db8::1]"', b"2001:db8::1"),
        ("::1", 1, b'"[::1]:1"', b"::1"),
        ("fe80::1%eth0", None, b'"[fe80::1]"', b"fe80::1"),
        ("::ffff:192.0.2.1", 80, b'"192.0.2.1:80"', b"192.0.2.1"),
        ("192.0.2.1", None, b"192.0.2.1", b"192.0.2.1"),
    ],
)
def test_forwarded_node_quoting(ip: str, port: int | None, node: bytes, address: bytes) -> None:
    out = normalize_request(
        parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"), client_ip=ip, client_port=port
    )
    assert values(out, b"forwarded") == [b"for=" + node + b";proto=https"]
    assert values(out, b"x-forwarded-for") == values(out, b"x-real-ip") == [address]


def test_bad_arguments_are_local_errors() -> None:
    request = parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    with pytest.raises(LocalProtocolError):
        normalize_request(request, client_ip="not-an-ip")
    with pytest.raises(LocalProtocolError):
        normalize_request(request, client_ip="::1", client_port=70000)
    with pytest.raises(LocalProtocolError):
        normalize_request(request, client_ip="::1", scheme="ftp")  # type: ignore[arg-type]


def test_absolute_form_becomes_origin_form() -> None:
    request = parse_request(b"GET http://H:80/a/b?c=d HTTP/1.1\r\nHost: h\r\n\r\n")
    out = normalize_request(request, client_ip="192.0.2.7")
    assert out.target == b"/a/b?c=d"
    assert values(out, b"host") == [b"H:80"]


def test_http10_without_host() -> None:
    request = parse_request(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(RequestRefused, match="missing-host"):
        normalize_request(request, client_ip="192.0.2.7")
    out = normalize_request(request, client_ip="192.0.2.7", fallback_host="mail.example.org")
    assert values(out, b"host") == [b"mail.example.org"]
    assert out.http_version == b"1.1"
    with pytest.raises(LocalProtocolError):
        normalize_request(request, client_ip="192.0.2.7", fallback_host="b\u00e4d host")


WEBSOCKET = (
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_websocket_upgrade_passes_only_when_allowed() -> None:
    request = parse_request(WEBSOCKET)
    assert is_websocket_upgrade(request)
    allowed = normalize_request(request, client_ip="192.0.2.7", allow_websocket=True)
    assert values(allowed, b"connection") == [b"upgrade"]
    assert values(allowed, b"upgrade") == [b"websocket"]
    assert values(allowed, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    refused = normalize_request(request, client_ip="192.0.2.7")
    assert values(refused, b"connection") == values(refused, b"upgrade") == []
    h2c = parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert not is_websocket_upgrade(h2c)
    assert values(normalize_request(h2c, client_ip="::1", allow_websocket=True), b"upgrade") == []


def test_normalize_response() -> None:
    response = h11.Response(
        status_code=200,
        headers=[
            (b"Content-Type", b"text/html"),
            (b"Connection", b"keep-alive, X-Backend-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Backend-Hop", b"1"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ],
        http_version=b"1.0",
    )
    out = normalize_response(response)
    assert headers_of(out) == [
        (b"content-type", b"text/html"),
        (b"transfer-encoding", b"chunked"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    assert out.http_version == b"1.1"
    switching = h11.InformationalResponse(
        status_code=101,
        headers=[
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Accept", b"x"),
        ],
    )
    passed = normalize_response(switching, websocket=True)
    assert isinstance(passed, h11.InformationalResponse)
    assert headers_of(passed) == [
        (b"sec-websocket-accept", b"x"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
    ]
    assert headers_of(normalize_response(switching)) == [(b"sec-websocket-accept", b"x")]


# --------------------------------------------------------------------------
# Rule facts
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/", "/"),
        (b"", "/"),
        (b"/a/./b/../c", "/a/c"),
        (b"/a/b/..", "/a/"),
        (b"//admin//x/", "/admin/x/"),
        (b"/%2e%2e/%2E%2e/etc", "/etc"),
        (b"/a%2F..%2Fadmin", "/admin"),
        (b"/caf%C3%A9", "/caf\u00e9"),
        (b"/bad%ff%zz", "/bad\ufffd%zz"),
        (b"*", "*"),
    ],
)
def test_normalize_path(raw: bytes, normal: str) -> None:
    assert normalize_path(raw) == normal


def test_request_fields() -> None:
    request = parse_request(
        b"POST /mail/./../%6Cogin?_task=login&x=%2F HTTP/1.1\r\nHost: Mail.Example.org\r\n"
        b"User-Agent: Mozilla/5.0\r\nCookie: sess=abc\r\nCookie: other=def\r\n"
        b"Authorization: Basic YWxpY2U6aHVudGVyMg==\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 10\r\nAccept: a\r\nAccept: b\r\n\r\n"
    )
    form = FormResult(user="alice", fields={"_user": "alice"}, encoding="urlencoded")
    fields = request_fields(request, form)
    assert fields == {
        "method": "POST",
        "path": "/login",
        "raw_path": "/mail/./../%6Cogin",
        "query": "_task=login&x=%2F",
        "host": "mail.example.org",
        "user_agent": "Mozilla/5.0",
        "headers": {
            "host": "Mail.Example.org",
            "user-agent": "Mozilla/5.0",
            "cookie": "***, ***",
            "authorization": "Basic ***",
            "content-type": "application/x-www-form-urlencoded",
            "content-length": "10",
            "accept": "a, b",
        },
        "content_type": "application/x-www-form-urlencoded",
        "content_length": 10,
        "form": {"_user": "alice"},
    }
    assert "YWxpY2U6aHVudGVyMg" not in repr(fields)


def test_request_fields_zero_values() -> None:
    fields = request_fields(parse_request(b"GET http://h/x HTTP/1.0\r\n\r\n"))
    assert (fields["host"], fields["path"], fields["query"]) == ("h", "/x", "")
    assert (fields["user_agent"], fields["content_type"], fields["content_length"]) == ("", "", 0)
    assert fields["form"] == {}


# --------------------------------------------------------------------------
# Login forms
# --------------------------------------------------------------------------

ROUNDCUBE = LoginForm(path="/", user_field="_user", password_field="_pass")


def extract(
    spec: LoginForm,
    content_type: str | bytes | None,
    body: bytes,
    step: int = 0,
    limit: int = 65536,
) -> FormResult:
    extractor = FormExtractor(spec, content_type, limit=limit)
    pieces = [body] if step == 0 else [body[i : i + step] for i in range(0, len(body), step)]
    for piece in pieces:
        extractor.feed(piece)
    return extractor.finish()


def no_secret(result: FormResult, *secrets: str) -> None:
    text = repr(result)
    for secret in secrets:
        assert secret not in text
    assert all(SECRET_FIELD_RE.search(name) is None for name in result.fields)


@pytest.mark.parametrize("step", [0, 1, 3])
def test_urlencoded(step: int) -> None:
    body = (
        b"_token=t0k3n&_task=login&_action=login&_timezone=Europe%2FParis&_url="
        b"&_user=al%C3%AFce+b&_pass=p%40ss+w0rd&_otp=123456"
    )
    result = extract(ROUNDCUBE, b"application/x-www-form-urlencoded; charset=UTF-8", body, step)
    assert result.user == "al\u00efce b"
    assert result.encoding == "urlencoded"
    assert result.fields == {
        "_task": "login",
        "_action": "login",
        "_timezone": "Europe/Paris",
        "_url": "",
        "_user": "al\u00efce b",
    }
    assert result.size == len(body)
    no_secret(result, "p@ss", "w0rd", "t0k3n", "123456")


def test_login_form_matches() -> None:
    assert ROUNDCUBE.matches(parse_request(b"POST /?_task=login HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert ROUNDCUBE.matches(parse_request(b"POST /./ HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert not ROUNDCUBE.matches(parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
    sogo = LoginForm(path="/SOGo/connect", user_field="userName", password_field="password")
    assert sogo.matches(parse_request(b"POST http://h/SOGo//connect HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert not sogo.matches(parse_request(b"POST /SOGo/connectx HTTP/1.1\r\nHost: h\r\n\r\n"))
    with pytest.raises(LocalProtocolError):
        LoginForm(path="login", user_field="u", password_field="p")
    with pytest.raises(LocalProtocolError):
        LoginForm(path="/", user_field="", password_field="p")


MULTIPART = (
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="_user"\r\n\r\n'
    b"alice@example.org\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="_pass"\r\n\r\n'
    b"hunter2\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="attachment"; filename="a.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
    b"file body\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="lang"\r\n'
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"fr\r\n"
    b"--XyZ--\r\n"
)


@pytest.mark.parametrize("step", [0, 1, 7, 40])
def test_multipart_split_across_feeds(step: int) -> None:
    result = extract(ROUNDCUBE, 'multipart/form-data; boundary="XyZ"', MULTIPART, step)
    assert result.encoding == "multipart"
    assert result.user == "alice@example.org"
    assert result.fields == {"_user": "alice@example.org", "lang": "fr"}
    no_secret(result, "hunter2")


def test_multipart_edge_cases() -> None:
    ctype = "multipart/form-data; boundary=XyZ"
    # preamble, transport padding, a "--XyZ" inside a value that is not a delimiter
    body = (
        b"preamble\r\n--XyZ  \r\nContent-Disposition: form-data; name=_user\r\n\r\n"
        b"a\r\n--XyZz\r\n--XyZ--"
    )
    assert extract(ROUNDCUBE, ctype, body).user == "a\r\n--XyZz"
    # no close delimiter: incomplete, nothing
    assert extract(ROUNDCUBE, ctype, MULTIPART[:-9]).user is None
    # a part too large to be a user name is skipped
    big = (
        b'--XyZ\r\nContent-Disposition: form-data; name="_user"\r\n\r\n'
        + b"a" * 5000
        + b"\r\n--XyZ--"
    )
    assert extract(ROUNDCUBE, ctype, big).user is None
    # no boundary, or an invalid one
    assert extract(ROUNDCUBE, "multipart/form-data", MULTIPART).encoding is None
    assert extract(ROUNDCUBE, "multipart/form-data; boundary=" + "b" * 71, MULTIPART).user is None


@pytest.mark.parametrize("step", [0, 2])
def test_json(step: int) -> None:
    sogo = LoginForm(path="/SOGo/connect", user_field="userName", password_field="password")
    body = json.dumps(
        {
            "userName": "bob",
            "password": "hunter2",
            "rememberLogin": 1,
            "domain": "x",
            "nested": {"a": "b"},
            "totp_code": "999",
        }
    ).encode()
    result = extract(sogo, "application/json;charset=UTF-8", body, step)
    assert result.user == "bob"
    assert result.fields == {"userName": "bob", "domain": "x"}
    no_secret(result, "hunter2", "999")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"[1, 2]"),
        ("application/json", b'{"_user": 1}'),
        ("application/json", b'{"_user": "a"'),
        ("application/json", b"[" * 60000),
        ("application/json", b"\xff\xfe{}"),
        ("application/json", b'{"_user": ' + b"9" * 5000 + b"}"),
        ("multipart/form-data; boundary=b", b"\x00\xff--b\r\n\r\n--b--"),
        ("application/x-www-form-urlencoded", b"%%%&&&===&_user"),
        ("text/plain", b"_user=alice"),
        (None, b"_user=alice"),
        ("application/x-www-form-urlencoded", b"_user=a&_user=b"),
    ],
)
def test_garbage_gives_no_user(content_type: str | None, body: bytes) -> None:
    result = extract(ROUNDCUBE, content_type, body)
    assert result.user is None


def test_conflicting_user_fields_are_ambiguous() -> None:
    result = extract(ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=a&_user=b")
    assert result.ambiguous
    same = extract(ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=a&_user=a")
    assert same.user == "a"
    assert not same.ambiguous


def test_oversize_body_gives_up_but_counts() -> None:
    body = b"_user=alice&_pass=x&pad=" + b"a" * 100
    extractor = FormExtractor(ROUNDCUBE, "application/x-www-form-urlencoded", limit=64)
    for i in range(0, len(body), 10):
        extractor.feed(body[i : i + 10])
    result = extractor.finish()
    assert result == FormResult(None, {}, "urlencoded", truncated=True, size=len(body))
    assert "alice" not in repr(extractor)
    with pytest.raises(LocalProtocolError):
        extractor.feed(b"more")
    with pytest.raises(LocalProtocolError):
        extractor.finish()


def test_detect_encoding() -> None:
    assert detect_encoding(b"Application/X-WWW-Form-Urlencoded") == ("urlencoded", "")
    assert detect_encoding('multipart/form-data; charset=utf-8; boundary="a b:c"') == (
        "multipart",
        "a b:c",
    )
    assert detect_encoding("application/vnd.api+json") == ("json", "")
    assert detect_encoding("text/html") == (None, "")
    assert detect_encoding(None) == (None, "")


# --------------------------------------------------------------------------
# The login form's password: sealed, for the distinct-passwords count only
# --------------------------------------------------------------------------

SOGO = LoginForm(path="/SOGo/connect", user_field="userName", password_field="password")


def sealed(result: FormResult, password: bytes) -> None:
    """``result.password`` is ``password`` as a Secret that nothing prints."""
    assert isinstance(result.password, Secret)
    assert result.password.reveal() == password
    text = password.decode("utf-8", "surrogatepass")
    for shown in (
        repr(result),
        str(result),
        f"{result}",
        repr(result.password),
        str(result.password),
        f"{result.password}",
        repr(result.fields),
    ):
        assert text not in shown
    assert "password=Secret(***)" in repr(result)
    assert "pass" not in "".join(result.fields)


@pytest.mark.parametrize("step", [0, 1, 5])
@pytest.mark.parametrize(
    ("spec", "content_type", "body", "password"),
    [
        (
            ROUNDCUBE,
            "application/x-www-form-urlencoded",
            b"_user=alice&_pass=p%40ss+w0rd%C3%A9&_password=other",
            "p@ss w0rd\u00e9".encode(),
        ),
        (ROUNDCUBE, 'multipart/form-data; boundary="XyZ"', MULTIPART, b"hunter2"),
        (
            SOGO,
            "application/json",
            json.dumps({"userName": "bob", "password": "h\u00fcnter2", "x": "y"}).encode(),
            "h\u00fcnter2".encode(),
        ),
        # a lone surrogate from JSON: kept apart from other passwords, no exception
        (SOGO, "application/json", b'{"userName": "bob", "password": "\\udc80"}', b"\xed\xb2\x80"),
    ],
    ids=["urlencoded", "multipart", "json", "json-surrogate"],
)
def test_password_is_handed_over_sealed(
    spec: LoginForm, content_type: str, body: bytes, password: bytes, step: int
) -> None:
    result = extract(spec, content_type, body, step)
    assert result.user is not None
    sealed(result, password)


@pytest.mark.parametrize(
    ("spec", "content_type", "body"),
    [
        (ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=alice"),
        (ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=alice&_pass="),
        (ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=alice&_pass=a&_pass=b"),
        (ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=alice&_password=not-it"),
        (ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=alice&_PASS=not-it"),
        (ROUNDCUBE, "multipart/form-data; boundary=XyZ", MULTIPART.replace(b"_pass", b"_tok")),
        (SOGO, "application/json", b'{"userName": "bob", "password": 1234}'),
        (SOGO, "application/json", b'{"userName": "bob", "password": "a", "password": "b"}'),
    ],
    ids=[
        "missing",
        "empty",
        "different-values",
        "other-field",
        "other-case",
        "multipart-missing",
        "json-not-a-string",
        "json-repeated",
    ],
)
def test_password_missing_or_ambiguous_is_none(
    spec: LoginForm, content_type: str, body: bytes
) -> None:
    result = extract(spec, content_type, body)
    assert result.user is not None  # the user is still read
    assert not result.ambiguous  # ``ambiguous`` is about the user
    assert result.password is None


def test_password_sent_twice_alike_and_unread_bodies() -> None:
    twice = extract(ROUNDCUBE, "application/x-www-form-urlencoded", b"_pass=s3&_user=a&_pass=s3")
    sealed(twice, b"s3")
    # nothing read, nothing sealed: an unknown type, broken JSON, a truncated body
    body = b"_user=alice&_pass=Hunter-2"
    assert extract(ROUNDCUBE, "text/plain", body).password is None
    assert extract(SOGO, "application/json", b'{"userName": "a", "password": "b"').password is None
    truncated = extract(ROUNDCUBE, "application/x-www-form-urlencoded", body, limit=10)
    assert truncated.truncated
    assert truncated.password is None


def test_a_webmail_login_hands_the_counters_only_a_fingerprint() -> None:
    """mailmoat.session.http: the form's password reaches CheckLogin as a
    fingerprint callable (as IMAP LOGIN's does), and no event or transcript."""
    session = HttpSession(HttpSessionConfig("web"), "192.0.2.7", 40000, session_id="s-1")
    line = RequestLine(parse_request(b"POST /?_task=login HTTP/1.1\r\nHost: h\r\n\r\n"))
    form = extract(ROUNDCUBE, "application/x-www-form-urlencoded", b"_user=alice&_pass=Hunter-2")
    assert form.user is not None
    session.note_request(line)
    session.note_login(line, form.fields, password=form.password)
    out = session.request(request_fields(line.request, form), login_user=form.user)
    out += session.login_result(form.user, False, 200)
    check = next(c for c in out if isinstance(c, CheckLogin))
    assert check.fingerprint is not None
    assert check.fingerprint(b"salt") == password_fingerprint(b"salt", b"Hunter-2")
    assert check.fingerprint(b"pepper") != check.fingerprint(b"salt")
    assert "Hunter-2" not in repr(check)
    out += session.login_checked(LoginFacts(failures_user=1, distinct_passwords_user=1))
    # the password serves its own login only
    session.note_login(line, {"_user": "alice"})
    out += session.login_result("alice", False, 200)
    assert [c.fingerprint is None for c in out if isinstance(c, CheckLogin)] == [False, True]
    out += session.finish()
    emitted = [c for c in out if isinstance(c, Emit)]
    assert "session.transcript" in [e.action for e in emitted]
    shown = repr(out) + json.dumps([e.fields for e in emitted], default=str)
    assert "Hunter-2" not in shown


# --------------------------------------------------------------------------
# Login outcome
# --------------------------------------------------------------------------


def response(status: int, *headers: tuple[bytes, bytes]) -> h11.Response:
    return h11.Response(status_code=status, headers=list(headers))


def test_judge_login_roundcube() -> None:
    spec = LoginOutcome(
        success_status=(302,),
        success_location="./?_task=mail",
        success_cookie="roundcube_sessauth",
        failure_status=(401,),
    )
    good = response(
        302,
        (b"Location", b"./?_task=mail&_mbox=INBOX"),
        (b"Set-Cookie", b"roundcube_sessid=1; path=/"),
        (b"Set-Cookie", b"roundcube_sessauth=S0m3; path=/; HttpOnly"),
    )
    assert judge_login(good, spec) == "success"
    assert judge_login(response(401), spec) == "failure"
    assert judge_login(response(200), spec) == "failure"
    no_cookie = response(302, (b"Location", b"./?_task=mail"))
    assert judge_login(no_cookie, spec) == "failure"
    deleting = response(
        302, (b"Location", b"./?_task=mail"), (b"Set-Cookie", b"roundcube_sessauth=x; Max-Age=0")
    )
    assert judge_login(deleting, spec) == "failure"
    deleted = response(
        302, (b"Location", b"./?_task=mail"), (b"Set-Cookie", b"roundcube_sessauth=deleted")
    )
    assert judge_login(deleted, spec) == "failure"
    elsewhere = response(
        302, (b"Location", b"./?_task=login"), (b"Set-Cookie", b"roundcube_sessauth=S")
    )
    assert judge_login(elsewhere, spec) == "failure"


def test_judge_login_locations() -> None:
    spec = LoginOutcome(
        success_status=(302, 303), success_location="/SOGo/so/", failure_location="/SOGo/?error"
    )
    assert (
        judge_login(
            response(303, (b"Location", b"https://mail.example.org/SOGo/so/bob/Mail")), spec
        )
        == "success"
    )
    assert judge_login(response(302, (b"Location", b"/SOGo/?error=1")), spec) == "failure"
    assert judge_login(response(302), spec) == "failure"
    assert judge_login(response(302), LoginOutcome()) == "success"
    with pytest.raises(LocalProtocolError):
        LoginOutcome(success_status=())
    with pytest.raises(LocalProtocolError):
        LoginOutcome(failure_status=(1000,))


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

TINY = HttpLimits(
    max_head_size=96, max_header_count=3, max_target_length=24, max_chunk_line=12, max_body_size=40
)
HTTPISH = st.lists(
    st.sampled_from(
        [
            b"GET / HTTP/1.1\r\n",
            b"POST /x HTTP/1.0\r\n",
            b"Host: h\r\n",
            TE,
            b"Content-Length: 3\r\n",
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b":",
            b"0\r\n",
            b"5\r\n",
            b"abc",
            b"hello",
            b";x=y",
            b"\x00",
            b"\xff",
            b"Upgrade: websocket\r\n",
        ]
    )
    | st.binary(max_size=8),
    max_size=30,
).map(b"".join)


def outcome(
    data: bytes, step: int, limits: HttpLimits | None
) -> tuple[bytes, str | None, list[object]]:
    screen = HeadScreen(limits)
    passed = b""
    refused: RequestRefused | None = None
    try:
        for i in range(0, len(data), step):
            passed += screen.feed(data[i : i + step])
    except RequestRefused as exc:
        refused = exc
    if refused is None:
        return passed, None, list(screen.take_heads())
    assert refused.status == REFUSALS[refused.reason]
    return passed, refused.reason, list(screen.take_heads())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | HTTPISH, step=st.integers(1, 9), tiny=st.booleans())
def test_screen_any_bytes(data: bytes, step: int, tiny: bool) -> None:
    """Any bytes: only RequestRefused escapes, and splitting changes nothing."""
    limits = TINY if tiny else None
    whole = outcome(data, max(len(data), 1), limits)
    split = outcome(data, step, limits)
    assert data.startswith(split[0])
    assert split[1:] == whole[1:]
    if whole[1] is None:
        assert split[0] == whole[0]


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=400) | HTTPISH,
    content_type=st.sampled_from(
        [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=b",
            "application/json",
            "text/plain",
        ]
    )
    | st.text(max_size=40),
    step=st.integers(1, 50),
)
def test_form_extractor_any_bytes(data: bytes, content_type: str, step: int) -> None:
    result = extract(ROUNDCUBE, content_type, data, step, limit=256)
    assert result == extract(ROUNDCUBE, content_type, data, 0, limit=256)
    assert "_pass" not in result.fields
    assert all(SECRET_FIELD_RE.search(name) is None for name in result.fields)
    assert result.password is None or len(result.password) > 0
