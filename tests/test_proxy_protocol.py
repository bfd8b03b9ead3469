"""Tests for the PROXY protocol codec (mailmoat.protocols.proxy_protocol).

The v2 vectors are written out by hand from the specification (HAProxy
doc/proxy-protocol.txt section 2.2), not produced by the encoder.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailmoat.errors import LocalProtocolError, RemoteProtocolError
from mailmoat.protocols.proxy_protocol import (
    MAX_V1_LINE,
    MAX_V2_LENGTH,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    V2_SIGNATURE,
    ProxyHeader,
    crc32c,
    encode_v1,
    encode_v2,
    parse,
    ssl_tlv,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"

V4 = ProxyHeader(("198.51.100.7", 40000), ("127.0.0.1", 25))
V4_WIRE = (
    SIG
    + b"\x21"  # version 2, command PROXY
    + b"\x11"  # AF_INET, STREAM
    + b"\x00\x0c"  # 12 bytes of addresses
    + bytes([198, 51, 100, 7])
    + bytes([127, 0, 0, 1])
    + b"\x9c\x40"  # 40000
    + b"\x00\x19"  # 25
)
V6 = ProxyHeader(("2001:db8::7", 40000), ("2001:db8::1", 587))
V6_WIRE = (
    SIG
    + b"\x21"
    + b"\x21"  # AF_INET6, STREAM
    + b"\x00\x24"  # 36
    + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x07"
    + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"
    + b"\x9c\x40"
    + b"\x02\x4b"  # 587
)  # fmt: skip
LOCAL_WIRE = SIG + b"\x20\x00\x00\x00"


def test_signature_constant() -> None:
    assert V2_SIGNATURE == SIG
    assert len(SIG) == 12


# ---------------------------------------------------------------------------
# v2 known vectors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "wire"),
    [(V4, V4_WIRE), (V6, V6_WIRE), (ProxyHeader(None, None, "LOCAL"), LOCAL_WIRE)],
    ids=["tcp4", "tcp6", "local"],
)
def test_v2_known_vectors(header: ProxyHeader, wire: bytes) -> None:
    assert encode_v2(header) == wire
    assert parse(wire) == (header, len(wire))


def test_v2_proxy_without_addresses_is_unspec() -> None:
    wire = SIG + b"\x21\x00\x00\x00"
    assert encode_v2(ProxyHeader(None, None)) == wire
    assert parse(wire) == (ProxyHeader(None, None), 16)


def test_v2_tlvs_known_vector() -> None:
    header = ProxyHeader(
        ("192.0.2.1", 1234),
        ("192.0.2.2", 465),
        tlvs=((PP2_TYPE_AUTHORITY, b"mail.example.org"), (PP2_TYPE_ALPN, b"smtp")),
    )
    wire = (
        SIG
        + b"\x21\x11"
        + struct.pack("!H", 12 + 3 + 16 + 3 + 4)
        + bytes([192, 0, 2, 1, 192, 0, 2, 2])
        + b"\x04\xd2\x01\xd1"
        + b"\x02\x00\x10mail.example.org"
        + b"\x01\x00\x04smtp"
    )
    assert encode_v2(header) == wire
    assert parse(wire) == (header, len(wire))


def test_v2_ssl_tlv() -> None:
    kind, value = ssl_tlv(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256")
    assert kind == PP2_TYPE_SSL == 0x20
    # client = PP2_CLIENT_SSL, verify = non-zero (no verified client cert)
    assert value[:5] == b"\x01\x00\x00\x00\x01"
    assert value[5:] == (b"\x21\x00\x07TLSv1.3" + b"\x23\x00\x16TLS_AES_128_GCM_SHA256")
    assert ssl_tlv(client_cert_verified=True) == (0x20, b"\x03\x00\x00\x00\x00")
    header = ProxyHeader(V4.source, V4.destination, tlvs=((kind, value),))
    wire = encode_v2(header)
    assert wire[28:] == b"\x20" + struct.pack("!H", len(value)) + value
    assert parse(wire) == (header, len(wire))


def test_ipv4_mapped_source_is_sent_as_ipv4() -> None:
    header = ProxyHeader(("::ffff:198.51.100.7", 40000), ("127.0.0.1", 25))
    assert encode_v2(header) == V4_WIRE
    assert encode_v1(header) == b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n"
    both = ProxyHeader(("::ffff:198.51.100.7", 40000), ("::ffff:127.0.0.1", 25))
    assert encode_v2(both) == V4_WIRE


def test_mixed_families_are_sent_as_ipv6() -> None:
    header = ProxyHeader(("2001:db8::7", 40000), ("127.0.0.1", 25))
    wire = encode_v2(header)
    assert wire[13] == 0x21
    parsed, _ = parse(wire) or pytest.fail("incomplete")
    assert parsed.source == ("2001:db8::7", 40000)
    assert parsed.destination is not None
    mapped = ipaddress.IPv6Address(parsed.destination[0])
    assert (mapped.ipv4_mapped, parsed.destination[1]) == (ipaddress.IPv4Address("127.0.0.1"), 25)
    line = f"PROXY TCP6 2001:db8::7 {mapped} 40000 25\r\n".encode()
    assert encode_v1(header) == line


def test_crc32c() -> None:
    # RFC 3720 B.4 / the usual check value of CRC-32C.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"\x00" * 32) == 0x8A9136AA


def test_v2_checksum() -> None:
    wire = encode_v2(V4, checksum=True)
    assert wire[16 + 12 : 16 + 12 + 3] == b"\x03\x00\x04"
    zeroed = wire[:-4] + b"\x00" * 4
    assert int.from_bytes(wire[-4:], "big") == crc32c(zeroed)
    header, used = parse(wire) or pytest.fail("incomplete")
    assert used == len(wire)
    assert header.tlvs == ((PP2_TYPE_CRC32C, wire[-4:]),)
    # A parsed checksum TLV is recomputed, so the header re-encodes as is.
    assert encode_v2(header) == wire
    corrupt = wire[:-1] + bytes([wire[-1] ^ 1])
    with pytest.raises(RemoteProtocolError, match="CRC32C"):
        parse(corrupt)


# ---------------------------------------------------------------------------
# Roundtrips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        V4,
        V6,
        ProxyHeader(None, None, "LOCAL"),
        ProxyHeader(None, None, "LOCAL", ((PP2_TYPE_AUTHORITY, b"x"),)),
        ProxyHeader(None, None),
        ProxyHeader(("0.0.0.0", 0), ("255.255.255.255", 65535)),
        ProxyHeader(("::", 1), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 2)),
        ProxyHeader(
            ("203.0.113.9", 5000),
            ("192.0.2.25", 993),
            tlvs=(
                (PP2_TYPE_AUTHORITY, b"imap.example.org"),
                ssl_tlv(version="TLSv1.2"),
                (0xE0, b""),
                (0xFF, b"\x00" * 300),
            ),
        ),
    ],
)
def test_v2_roundtrip(header: ProxyHeader) -> None:
    wire = encode_v2(header)
    assert parse(wire) == (header, len(wire))
    assert parse(wire + b"EHLO x\r\n") == (header, len(wire))


@pytest.mark.parametrize("header", [V4, V6, ProxyHeader(None, None)])
def test_v1_roundtrip(header: ProxyHeader) -> None:
    wire = encode_v1(header)
    assert parse(wire) == (header, len(wire))


def test_v1_local_becomes_unknown() -> None:
    assert encode_v1(ProxyHeader(None, None, "LOCAL")) == b"PROXY UNKNOWN\r\n"


def test_v1_cannot_carry_tlvs() -> None:
    with pytest.raises(LocalProtocolError):
        encode_v1(ProxyHeader(None, None, tlvs=((PP2_TYPE_AUTHORITY, b"x"),)))


# ---------------------------------------------------------------------------
# v1 parsing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "header"),
    [
        (b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n", V4),
        (b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 2001:db8::1 40000 587\r\n", V6),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None)),
        (b"PROXY UNKNOWN ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(None, None)),
    ],
)
def test_v1_parse(line: bytes, header: ProxyHeader) -> None:
    assert parse(line) == (header, len(line))
    assert parse(line + b"EHLO client\r\n") == (header, len(line))


def test_v1_longest_line() -> None:
    addr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {addr} {addr} 65535 65535\r\n".encode()
    assert len(line) == 104 <= MAX_V1_LINE
    header = ProxyHeader((addr, 65535), (addr, 65535))
    assert encode_v1(header) == line
    assert parse(line) == (header, len(line))


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\n",  # bare LF
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000\r\n",
        b"PROXY TCP4 198.51.100.7  127.0.0.1 40000 25\r\n",
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25 \r\n",
        b"PROXY TCP4 2001:db8::1 127.0.0.1 40000 25\r\n",
        b"PROXY TCP6 198.51.100.7 ::1 40000 25\r\n",
        b"PROXY TCP4 198.51.100.07 127.0.0.1 40000 25\r\n",  # leading zero
        b"PROXY TCP4 198.51.100.256 127.0.0.1 40000 25\r\n",
        b"PROXY TCP4 198.51.100.7 127.0.0.1 040000 25\r\n",
        b"PROXY TCP4 198.51.100.7 127.0.0.1 65536 25\r\n",
        b"PROXY TCP4 198.51.100.7 127.0.0.1 -1 25\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY UDP4 198.51.100.7 127.0.0.1 40000 25\r\n",
        b"PROXY tcp4 198.51.100.7 127.0.0.1 40000 25\r\n",
        b"PROXY TCP4 198.51.100.7\r127.0.0.1 40000 25\r\n",
        b"PROXY\r\n",
        b"PROXY \r\n",
        b"proxy UNKNOWN\r\n",
        b"PROXY " + b"x" * 101 + b"\r\n",  # 109 bytes
        b"PROXY " + b"x" * 200,  # no CRLF within 107 bytes
        b"PROXY TCP4 1.2.3.4\rX",
        b"EHLO client\r\n",
        b"\r\n\r\n\x00\r\nQUIX\n",
    ],
)
def test_invalid_raises(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(line)


def test_v1_partial_returns_none() -> None:
    line = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n"
    for end in range(len(line)):
        assert parse(line[:end]) is None, end


# ---------------------------------------------------------------------------
# v2 parsing
# ---------------------------------------------------------------------------


def test_v2_partial_returns_none() -> None:
    wire = encode_v2(
        ProxyHeader(V4.source, V4.destination, tlvs=((PP2_TYPE_AUTHORITY, b"example"),))
    )
    for end in range(len(wire)):
        assert parse(wire[:end]) is None, end


@pytest.mark.parametrize(
    "wire",
    [
        SIG + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in the binary format
        SIG + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        SIG + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        SIG + b"\x21\x12\x00\x0c" + bytes(12),  # UDP over IPv4
        SIG + b"\x21\x22\x00\x24" + bytes(36),  # UDP over IPv6
        SIG + b"\x21\x13\x00\x0c" + bytes(12),  # transport 3
        SIG + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
        SIG + b"\x21\x11\x00\x0b" + bytes(11),  # short address block
        SIG + b"\x21\x21\x00\x0c" + bytes(12),  # IPv6 with an IPv4-sized block
        SIG + b"\x21\x11\x00\x0e" + bytes(14),  # 2 bytes: not a TLV
        SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\x02\x00\x05x",  # TLV overruns
        SIG + b"\x21\x11\x00\x13" + bytes(12) + b"\x03\x00\x04" + bytes(4),  # bad CRC
        SIG + b"\x21\x00\x00\x0b" + b"\x03\x00\x02" + bytes(2) + bytes(6),  # CRC size
        SIG + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH + 1),  # over our bound
    ],
)
def test_v2_invalid(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(wire)


def test_v2_length_bound_is_configurable() -> None:
    wire = encode_v2(ProxyHeader(None, None, tlvs=((0xE0, bytes(100)),)))
    assert parse(wire, max_v2_length=103) is not None
    with pytest.raises(RemoteProtocolError, match="too long"):
        parse(wire[:16], max_v2_length=102)


def test_v2_local_ignores_family_and_block() -> None:
    # 2.2: LOCAL: "discard the protocol block including the family".
    wire = SIG + b"\x20\x11\x00\x0c" + bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2])
    assert parse(wire) == (ProxyHeader(None, None, "LOCAL"), len(wire))
    odd = SIG + b"\x20\x77\x00\x03abc"
    assert parse(odd) == (ProxyHeader(None, None, "LOCAL"), len(odd))


def test_v2_unix_addresses_parse_to_none() -> None:
    wire = SIG + b"\x21\x31" + struct.pack("!H", 216 + 4) + bytes(216) + b"\x04\x00\x01z"
    assert parse(wire) == (ProxyHeader(None, None, tlvs=((0x04, b"z"),)), len(wire))


# ---------------------------------------------------------------------------
# ProxyHeader validation (our own mistakes)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"source": ("1.2.3.4", 1), "destination": None},
        {"source": ("1.2.3.4", 1), "destination": ("1.2.3.5", 2), "command": "LOCAL"},
        {"source": None, "destination": None, "command": "BOGUS"},
        {"source": ("1.2.3.4", 70000), "destination": ("1.2.3.5", 2)},
        {"source": ("1.2.3.4", True), "destination": ("1.2.3.5", 2)},
        {"source": ("mail.example.org", 1), "destination": ("1.2.3.5", 2)},
        {"source": ("fe80::1%eth0", 1), "destination": ("fe80::2", 2)},
        {"source": None, "destination": None, "tlvs": ((256, b""),)},
        {"source": None, "destination": None, "tlvs": ((1, "text"),)},
        {"source": None, "destination": None, "tlvs": ((1, bytes(65536)),)},
        {"source": None, "destination": None, "tlvs": ((PP2_TYPE_CRC32C, b"12"),)},
        {"source": None, "destination": None, "tlvs": [(1, b"")]},
    ],
)
def test_header_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        ProxyHeader(**kwargs)  # type: ignore[arg-type]


def test_encode_refuses_oversize() -> None:
    header = ProxyHeader(None, None, tlvs=((1, bytes(40000)), (2, bytes(40000))))
    with pytest.raises(LocalProtocolError):
        encode_v2(header)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(0, 65535)
TLVS = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != PP2_TYPE_CRC32C), st.binary(max_size=40)),
    max_size=5,
).map(tuple)


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    kind = draw(st.sampled_from(["v4", "v6", "none", "local"]))
    tlvs = draw(TLVS)
    if kind == "local":
        return ProxyHeader(None, None, "LOCAL", tlvs)
    if kind == "none":
        return ProxyHeader(None, None, tlvs=tlvs)
    address = IPV4 if kind == "v4" else IPV6.filter(lambda a: "." not in a)
    return ProxyHeader(
        (draw(address), draw(PORT)), (draw(address), draw(PORT)), tlvs=tlvs
    )  # fmt: skip


def canonical(header: ProxyHeader) -> ProxyHeader:
    """What the wire says about ``header``: IPv4-mapped pairs travel as IPv4."""
    wire = encode_v2(header)
    parsed = parse(wire)
    assert parsed is not None
    return parsed[0]


@given(headers(), st.booleans(), st.binary(max_size=20))
def test_v2_roundtrip_property(header: ProxyHeader, checksum: bool, tail: bytes) -> None:
    wire = encode_v2(header, checksum=checksum)
    parsed = parse(wire + tail)
    assert parsed is not None
    result, used = parsed
    assert used == len(wire)
    if checksum:
        assert result.tlvs[-1][0] == PP2_TYPE_CRC32C
        result = ProxyHeader(result.source, result.destination, result.command, result.tlvs[:-1])
    assert result == canonical(header)
    if header.source is not None and not any(
        host.startswith("::ffff:") for host, _ in (header.source, header.destination or ("", 0))
    ):
        assert result == header
    for end in (0, 1, 11, 12, 15, 16, len(wire) - 1):
        if end < len(wire):
            assert parse(wire[:end]) is None


@given(headers())
def test_v1_roundtrip_property(header: ProxyHeader) -> None:
    bare = ProxyHeader(header.source, header.destination, header.command)
    wire = encode_v1(bare)
    assert len(wire) <= MAX_V1_LINE
    parsed = parse(wire)
    assert parsed is not None
    assert parsed == (ProxyHeader(canonical(bare).source, canonical(bare).destination), len(wire))


def only_remote_errors(data: bytes) -> None:
    try:
        result = parse(data)
    except RemoteProtocolError:
        return
    if result is not None:
        _, used = result
        assert 0 < used <= len(data)
        assert parse(data[:used]) == result


@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    only_remote_errors(data)


@given(st.sampled_from([SIG, b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 "]), st.binary(max_size=300))
def test_parse_arbitrary_after_signature(prefix: bytes, data: bytes) -> None:
    only_remote_errors(prefix + data)


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=300),
)
def test_parse_arbitrary_v2_bodies(version_command: int, family: int, body: bytes) -> None:
    only_remote_errors(SIG + bytes([version_command, family]) + struct.pack("!H", len(body)) + body)
