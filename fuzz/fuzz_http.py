"""Atheris harness for the HTTP layer: HeadScreen against h11, as a differential oracle.

    PYTHONPATH=src python fuzz/fuzz_http.py -max_total_time=60 \
        /tmp/corpus-copy fuzz/corpus/http

(libFuzzer writes new inputs into the *first* directory: give it a scratch
copy so that only the curated seeds live in the repository.)

An input is what a client sends on one connection.  :func:`check_input` is
the single entry point; pytest replays the seed corpus through it
(tests/test_fuzz_corpus_http.py).  With the default limits and with tiny
ones, it asserts:

* ``HeadScreen.feed`` raises only ``RequestRefused``, whose status is the one
  ``REFUSALS`` gives its reason, and keeps raising it afterwards;
* the outcome does not depend on how the bytes are split (whole, byte by
  byte, in 7-byte pieces): same refusal, same heads, same bytes passed; and
  what is passed is always a prefix of the input;
* differential: h11 (server role), fed only what the screen passed, either
  raises ``h11.RemoteProtocolError`` or parses, for each head the screen
  accepted and in order, a request with the same method, target and version
  and the same framing (chunked, or Content-Length with the same value and a
  body of exactly that length) -- and never a request the screen did not see;
* every request h11 parses from screened bytes survives ``normalize_request``
  (at most one framing field, no hop-by-hop field, h11 can send it) and
  ``request_fields``;
* the login path on screened requests, as the proxy runs it: ``LoginForm.matches``,
  then ``FormExtractor`` with the request's own ``Content-Type`` fed the body
  as h11 delivers it, then ``request_fields(request, form)``: nothing raises,
  every body octet is counted, no secret field comes out, and the facts'
  ``form`` is the extractor's;
* ``FormExtractor`` never raises on the input taken as a body (urlencoded,
  multipart, JSON; whole and split), and no secret field name comes out.
"""

from __future__ import annotations

import sys

import h11

from mailmoat.protocols.http import (
    REFUSALS,
    SECRET_FIELD_RE,
    FormExtractor,
    FormResult,
    HeadScreen,
    HttpLimits,
    LoginForm,
    RequestRefused,
    ScreenedHead,
    normalize_request,
    request_fields,
)

TINY = HttpLimits(
    max_head_size=128,
    max_header_count=4,
    max_target_length=32,
    max_chunk_line=16,
    max_body_size=64,
)
LIMITS = (HttpLimits(), TINY)
STEPS = (0, 1, 7)  # 0: the whole input at once
HOP_BY_HOP = frozenset(
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
SPEC = LoginForm(path="/login", user_field="user", password_field="password")
CONTENT_TYPES = (
    b"application/x-www-form-urlencoded",
    b'multipart/form-data; boundary="b"',
    b"application/json",
    b"text/plain",
)

Outcome = tuple[bytes, str | None, list[ScreenedHead]]


def screen(data: bytes, limits: HttpLimits, step: int) -> Outcome:
    """Feed ``data`` in pieces of ``step`` bytes: (passed, refusal reason, heads)."""
    screener = HeadScreen(limits)
    passed = bytearray()
    reason: str | None = None
    status = 0
    pieces = [data] if step == 0 else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        try:
            passed += screener.feed(piece)
        except RequestRefused as exc:
            reason = exc.reason
            status = exc.status
            break
    if reason is not None:
        assert status == REFUSALS[reason], (status, reason)
        assert refusal_of(screener, b"GET / HTTP/1.1\r\n") == reason
    assert data.startswith(passed)
    return bytes(passed), reason, screener.take_heads()


def refusal_of(screener: HeadScreen, data: bytes) -> str | None:
    try:
        screener.feed(data)
    except RequestRefused as exc:
        return exc.reason
    return None


def h11_framing(request: h11.Request) -> tuple[str, int | None]:
    """How h11 frames ``request``'s body (its rule: Transfer-Encoding beats Content-Length)."""
    codings = [v for k, v in request.headers if k == b"transfer-encoding"]
    lengths = [v for k, v in request.headers if k == b"content-length"]
    if codings:
        return "chunked", None
    if lengths:
        return "content-length", int(lengths[0])
    return "none", 0


def forward(request: h11.Request, trusted: bool) -> h11.Request | str:
    """``normalize_request``'s result, or the reason it refused."""
    try:
        return normalize_request(
            request,
            client_ip="2001:db8::7",
            client_port=4711,
            trusted=trusted,
            allow_websocket=trusted,
        )
    except RequestRefused as exc:
        return exc.reason


def check_forwarding(request: h11.Request) -> None:
    for trusted in (False, True):
        forwarded = forward(request, trusted)
        if isinstance(forwarded, str):
            assert forwarded == "missing-host", forwarded
            assert request.http_version == b"1.0"
            continue
        names = [name for name, _ in forwarded.headers]
        assert names.count(b"content-length") + names.count(b"transfer-encoding") <= 1
        hop = HOP_BY_HOP.intersection(names)
        assert not hop or (trusted and hop == {b"connection", b"upgrade"}), names
        assert names.count(b"host") == 1
        h11.Connection(h11.CLIENT).send(forwarded)
    fields = request_fields(request)
    assert fields["method"] == request.method.decode("utf-8", "replace")
    for secret in ("cookie", "authorization"):
        if secret in fields["headers"]:
            assert fields["headers"][secret].endswith("***")


def check_login_body(request: h11.Request, pieces: list[bytes]) -> None:
    """What the proxy does with a login request's body (net/http.py ``_read_login_body``)."""
    SPEC.matches(request)
    content_type = next((v for k, v in request.headers if k == b"content-type"), None)
    extractor = FormExtractor(SPEC, content_type)
    for piece in pieces:
        extractor.feed(piece)
    form = extractor.finish()
    assert form.size == sum(len(piece) for piece in pieces)
    assert all(SECRET_FIELD_RE.search(name) is None for name in form.fields)
    assert SPEC.password_field not in form.fields
    if form.user is not None:
        assert form.fields[SPEC.user_field] == form.user
        assert not form.ambiguous
    fields = request_fields(request, form)
    assert fields["form"] == form.fields


def differential(passed: bytes, heads: list[ScreenedHead]) -> None:
    """Drive h11 over what the screen passed; compare what both saw."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(passed)
    index = 0
    current: ScreenedHead | None = None
    request: h11.Request | None = None
    pieces: list[bytes] = []
    body = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return  # h11 is allowed to be stricter than the screen
        if isinstance(event, h11.Request):
            assert index < len(heads), "h11 parsed a request the screen did not screen"
            current, request, body, pieces = heads[index], event, 0, []
            index += 1
            assert (event.method, event.target, event.http_version) == (
                current.method,
                current.target,
                current.http_version,
            )
            assert h11_framing(event) == (current.framing, current.content_length), (
                event,
                current,
            )
            check_forwarding(event)
        elif isinstance(event, h11.Data):
            body += len(event.data)
            pieces.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            assert request is not None
            if current.framing != "chunked":
                assert body == current.content_length
            check_login_body(request, pieces)
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
        else:
            return  # NEED_DATA, PAUSED, ConnectionClosed


def check_forms(data: bytes) -> None:
    for content_type in CONTENT_TYPES:
        results: list[FormResult] = []
        for step in (0, 5):
            extractor = FormExtractor(SPEC, content_type, limit=2048)
            pieces = (
                [data] if step == 0 else [data[i : i + step] for i in range(0, len(data), step)]
            )
            for piece in pieces:
                extractor.feed(piece)
            results.append(extractor.finish())
        assert results[0] == results[1]
        result = results[0]
        assert result.size == len(data)
        assert all(SECRET_FIELD_RE.search(name) is None for name in result.fields)
        assert SPEC.password_field not in result.fields
        if result.truncated or result.encoding is None:
            assert result.user is None
            assert result.fields == {}


def check_input(data: bytes) -> None:
    """The fuzz target: see the module docstring for what it asserts."""
    for limits in LIMITS:
        outcomes = [screen(data, limits, step) for step in STEPS]
        whole, bytewise, pieces = outcomes
        for other in (bytewise, pieces):
            assert other[1] == whole[1], (whole[1], other[1])
            assert other[2] == whole[2]
            if whole[1] is None:
                assert other[0] == whole[0]
        differential(bytewise[0], bytewise[2])
    check_forms(data)


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
