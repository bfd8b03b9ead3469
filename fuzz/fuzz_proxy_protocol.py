"""Atheris harness for the PROXY protocol codec.

    PYTHONPATH=src python fuzz/fuzz_proxy_protocol.py -max_total_time=60 \
        /tmp/corpus-copy fuzz/corpus/proxy_protocol

(libFuzzer writes new inputs into the *first* directory: give it a scratch
copy so that only the curated seeds live in the repository.)

An input is the first bytes a listener reads from a connection.
:func:`check_input` is the single entry point; pytest replays the seed
corpus through it (tests/test_fuzz_corpus_proxy.py).  It asserts:

* ``parse`` returns ``None``, a result, or raises ``RemoteProtocolError``,
  nothing else, whatever the bytes and whatever ``max_v2_length``;
* the verdict is consistent across lengths: a prefix of a ``None`` input is
  ``None``; an input that fails still fails with bytes appended; a header is
  found again in exactly the bytes it used, every shorter prefix of those
  needs more data, and bytes after it change nothing;
* v1 needs at most 107 bytes and v2 at most 16 + ``max_v2_length``;
* every parsed header survives ``encode_v2`` (and ``encode_v1`` when it has
  no TLVs) and ``parse`` again, up to IPv4-mapped addresses travelling as
  IPv4 and LOCAL travelling as v1 ``UNKNOWN``.
"""

from __future__ import annotations

import ipaddress
import sys

from mailmoat.errors import RemoteProtocolError
from mailmoat.protocols.proxy_protocol import (
    MAX_V1_LINE,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    encode_v1,
    encode_v2,
    parse,
)

Result = tuple[ProxyHeader, int] | None | RemoteProtocolError


def run(data: bytes, max_v2_length: int = MAX_V2_LENGTH) -> Result:
    try:
        return parse(data, max_v2_length=max_v2_length)
    except RemoteProtocolError as exc:
        return exc


def _unmapped(endpoint: tuple[str, int] | None) -> tuple[str, int] | None:
    if endpoint is None:
        return None
    address = ipaddress.ip_address(endpoint[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped), endpoint[1]
    return str(address), endpoint[1]


def normalized(header: ProxyHeader) -> tuple[object, ...]:
    return (_unmapped(header.source), _unmapped(header.destination), header.tlvs)


def check_reencoding(header: ProxyHeader) -> None:
    wire = encode_v2(header)
    again = parse(wire)
    assert again is not None
    assert again[1] == len(wire)
    assert again[0].command == header.command
    assert normalized(again[0]) == normalized(header), (header, again)
    if not header.tlvs:
        line = encode_v1(header)
        assert len(line) <= MAX_V1_LINE
        text = parse(line)
        assert text is not None
        assert text[1] == len(line)
        assert text[0].command == "PROXY"
        assert normalized(text[0]) == normalized(header)


def check_one(data: bytes, max_v2_length: int) -> None:
    result = run(data, max_v2_length)
    if isinstance(result, RemoteProtocolError):
        for tail in (b"\r\n", b"\x00" * 17):
            assert isinstance(run(data + tail, max_v2_length), RemoteProtocolError)
        return
    if result is None:
        if data.startswith(V2_SIGNATURE):
            assert len(data) < 16 + max_v2_length
        else:
            assert len(data) < MAX_V1_LINE
        for end in (0, len(data) // 2, len(data) - 1):
            if 0 <= end < len(data):
                assert run(data[:end], max_v2_length) is None
        return
    header, used = result
    assert 0 < used <= len(data)
    if data.startswith(V2_SIGNATURE):
        assert used <= 16 + max_v2_length
    else:
        assert data.startswith(b"PROXY ")
        assert used <= MAX_V1_LINE
    assert run(data[:used], max_v2_length) == result
    assert run(data[:used] + b"EHLO x\r\n", max_v2_length) == result
    for end in {0, 1, 12, 15, 16, used // 2, used - 1}:
        if end < used:
            assert run(data[:end], max_v2_length) is None, end
    check_reencoding(header)


def check_input(data: bytes) -> None:
    """The fuzz target: see the module docstring for what it asserts."""
    for max_v2_length in (MAX_V2_LENGTH, 40, 0):
        check_one(data, max_v2_length)
    # Most random inputs die at the signature; also try them as the body of
    # a v2 header and as the rest of a v1 line.
    if len(data) >= 2:
        body = data[2:]
        framed = V2_SIGNATURE + data[:2] + len(body).to_bytes(2, "big") + body
        check_one(framed, MAX_V2_LENGTH)
    check_one(b"PROXY " + data[:MAX_V1_LINE], MAX_V2_LENGTH)


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
