"""The TLS ClientHello parser, JA3/JA4 fingerprints and ``mailmoat ja4``.

Golden vectors: tests/data/ja4_vectors.json (see tests/data/README.md),
77 real ClientHello records with the fingerprints their sources publish.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailmoat.cli import main
from mailmoat.errors import RemoteProtocolError
from mailmoat.protocols.tls import (
    ALPN_FOXIO,
    ALPN_SPEC,
    DEFAULT_ALPN_CONVENTION,
    MAX_HELLO_LENGTH,
    AlpnConvention,
    ClientHello,
    HelloError,
    HelloIncomplete,
    fingerprint,
    is_grease,
    ja4_alpn,
    parse_client_hello,
)

DATA = Path(__file__).resolve().parent / "data"
VECTORS: list[dict[str, Any]] = json.loads((DATA / "ja4_vectors.json").read_text())
RECORDS = [bytes.fromhex(v["client_hello_record_hex"]) for v in VECTORS]
IDS = [
    f"{i:02d}-{Path(v['file'].split()[-1]).stem}-{v.get('domain') or v['src_port']}"
    for i, v in enumerate(VECTORS)
]
NON_ASCII_ALPN = next(i for i, v in enumerate(VECTORS) if "tls-non-ascii-alpn" in v["file"])
GREASE_VALUES = [0x0A0A + 0x1010 * i for i in range(16)]
KINDS = ("ja3", "ja4", "ja4_r", "ja4_o", "ja4_ro")


# ---------------------------------------------------------------------------
# building ClientHellos by hand


def record(body: bytes, content_type: int = 0x16, version: int = 0x0301) -> bytes:
    return bytes([content_type]) + version.to_bytes(2) + len(body).to_bytes(2) + body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3) + body


def u16s(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(2) for v in values)


def ext_list16(values: list[int]) -> bytes:
    return len(values * 2).to_bytes(2) + u16s(values)


def sni(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + len(n).to_bytes(2) + n for n in names)
    return len(entries).to_bytes(2) + entries


def alpn_ext(*names: bytes) -> bytes:
    entries = b"".join(bytes([len(n)]) + n for n in names)
    return len(entries).to_bytes(2) + entries


def hello_body(
    ciphers: list[int],
    extensions: list[tuple[int, bytes]] | None = None,
    version: int = 0x0303,
    session_id: bytes = b"",
    compression: bytes = b"\x00",
) -> bytes:
    body = version.to_bytes(2) + bytes(range(32)) + bytes([len(session_id)]) + session_id
    body += ext_list16(ciphers) + bytes([len(compression)]) + compression
    if extensions is not None:
        block = b"".join(t.to_bytes(2) + len(d).to_bytes(2) + d for t, d in extensions)
        body += len(block).to_bytes(2) + block
    return body


def client_hello(
    ciphers: list[int],
    extensions: list[tuple[int, bytes]] | None = None,
    version: int = 0x0303,
    session_id: bytes = b"",
) -> bytes:
    return record(handshake(hello_body(ciphers, extensions, version, session_id)))


def fragment(wire: bytes, cuts: list[int]) -> bytes:
    """Re-send the handshake payload of ``wire`` (one record) split at ``cuts``."""
    payload = wire[5 : 5 + int.from_bytes(wire[3:5])]
    version = int.from_bytes(wire[1:3])
    bounds = [0, *cuts, len(payload)]
    return b"".join(record(payload[a:b], version=version) for a, b in itertools.pairwise(bounds))


def modern_hello(grease: bool = False, fallback: bool = False) -> bytes:
    g = GREASE_VALUES
    ciphers = [0x1301, 0x1302, 0xC02B, 0x002F] + ([0x5600] if fallback else [])
    exts: list[tuple[int, bytes]] = [
        (0x0000, sni(b"mx.example.org")),
        (0x0010, alpn_ext(b"smtp", b"h2")),
        (0x000A, ext_list16([0x001D, 0x0017])),
        (0x000B, b"\x01\x00"),
        (0x000D, ext_list16([0x0403, 0x0804, 0x0401])),
        (0x002B, b"\x04" + u16s([0x0304, 0x0303])),
    ]
    if grease:
        ciphers.insert(0, g[2])
        exts.insert(0, (g[10], b""))
        exts.append((g[5], b"\x00"))
        exts[3] = (0x000A, ext_list16([g[7], 0x001D, 0x0017]))
        exts[5] = (0x000D, ext_list16([g[1], 0x0403, 0x0804, 0x0401]))
        exts[6] = (0x002B, b"\x06" + u16s([g[3], 0x0304, 0x0303]))
    return client_hello(ciphers, exts)


def expected(vector: dict[str, Any], kind: str, convention: AlpnConvention) -> str | None:
    """The value a vector's source publishes, else the independent computation.

    The one vector whose published JA4 disagrees with the computed one
    (``ja4_verified`` false) disagrees on the ALPN characters: FoxIO's tools
    print ``99`` (our ``foxio`` convention), JA4.md says ``bd`` (``spec``).
    """
    published = vector.get(f"expected_{kind}")
    computed = vector.get(f"computed_{kind}")
    if kind != "ja3" and vector.get("ja4_verified") is False and convention == ALPN_SPEC:
        return computed
    return published if published is not None else computed


# ---------------------------------------------------------------------------
# golden vectors


@pytest.mark.parametrize("convention", [ALPN_SPEC, ALPN_FOXIO])
@pytest.mark.parametrize("index", range(len(VECTORS)), ids=IDS)
def test_vector(index: int, convention: AlpnConvention) -> None:
    vector = VECTORS[index]
    hello = parse_client_hello(RECORDS[index])
    fp = fingerprint(hello, alpn_convention=convention)
    assert fp.ja3_string == vector["ja3_string"]
    assert fp.ja3 == hashlib.md5(fp.ja3_string.encode(), usedforsecurity=False).hexdigest()
    checked = 0
    for kind in KINDS:
        want = expected(vector, kind, convention)
        if want is not None:
            assert getattr(fp, kind) == want, kind
            checked += 1
    assert checked >= 4
    if "domain" in vector:
        assert hello.server_name == vector["domain"]


def test_vectors_present() -> None:
    assert len(VECTORS) == 77
    assert sum("expected_ja4" in v for v in VECTORS) == 75
    assert sum("expected_ja3" in v for v in VECTORS) == 2


def test_default_convention_is_the_specification() -> None:
    assert DEFAULT_ALPN_CONVENTION == ALPN_SPEC == "spec"
    hello = parse_client_hello(RECORDS[NON_ASCII_ALPN])
    assert fingerprint(hello) == fingerprint(hello, alpn_convention=ALPN_SPEC)


def test_non_ascii_alpn_vector_differs_only_in_alpn_characters() -> None:
    vector = VECTORS[NON_ASCII_ALPN]
    hello = parse_client_hello(RECORDS[NON_ASCII_ALPN])
    assert hello.alpn == ("\xba\xad", "http/1.1")
    assert hello.alpn[0].encode("latin-1") == b"\xba\xad"
    spec = fingerprint(hello)
    foxio = fingerprint(hello, alpn_convention=ALPN_FOXIO)
    assert spec.ja4.startswith("t13d1516bd_")
    assert foxio.ja4.startswith("t13d151699_")
    for kind in KINDS[1:]:
        ours, published = getattr(spec, kind), vector[f"expected_{kind}"]
        assert ours != published
        assert ours[:8] + ours[10:] == published[:8] + published[10:]
        assert getattr(foxio, kind) == published
    assert spec.ja3 == foxio.ja3 == vector["computed_ja3"]


def test_chrome_extension_order_changes_ja3_not_ja4() -> None:
    # tls-sni.pcapng: one Chrome build, connections with shuffled extensions
    chrome = [
        fingerprint(parse_client_hello(RECORDS[i]))
        for i, v in enumerate(VECTORS)
        if v["file"].endswith("tls-sni.pcapng")
        and v["expected_ja4"] == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    ]
    assert len(chrome) > 10
    assert len({fp.ja4 for fp in chrome}) == 1
    assert len({fp.ja3 for fp in chrome}) > 1


def test_tls13_draft_version_is_unknown_to_ja4() -> None:
    # ssl-chrome.pcap offers TLS 1.3 draft 23 (0x7f17): the highest value, so
    # JA4's version is "00"; max_version ignores drafts.
    hello = parse_client_hello(RECORDS[0])
    assert 0x7F17 in hello.supported_versions
    assert fingerprint(hello).ja4.startswith("t00d")
    assert hello.max_version == "TLSv1.2"


@pytest.mark.parametrize("index", range(len(VECTORS)), ids=IDS)
def test_every_truncation_is_incomplete(index: int) -> None:
    wire = RECORDS[index]
    for end in range(len(wire)):
        with pytest.raises(HelloIncomplete):
            parse_client_hello(wire[:end])


@pytest.mark.parametrize(
    "cuts",
    [[1], [2], [3], [4], [5], [40], [100], [-1], [4, 38, 120], list(range(1, 200, 7))],
    ids=str,
)
@pytest.mark.parametrize("index", [1, 3, 6, 73], ids=[IDS[i] for i in (1, 3, 6, 73)])
def test_fragmented_records(index: int, cuts: list[int]) -> None:
    wire = RECORDS[index]
    size = len(wire) - 5
    cuts = sorted({c % size for c in cuts} - {0})
    split = fragment(wire, cuts)
    assert split.count(wire[:3]) >= len(cuts) + 1
    hello = parse_client_hello(split)
    assert hello == parse_client_hello(wire)
    assert fingerprint(hello) == fingerprint(parse_client_hello(wire))
    for end in (0, 5, 6, len(split) // 2, len(split) - 1):
        with pytest.raises(HelloIncomplete):
            parse_client_hello(split[:end])


def test_one_byte_records() -> None:
    wire = RECORDS[73]
    split = fragment(wire, list(range(1, len(wire) - 5)))
    assert len(split) == 6 * (len(wire) - 5)
    assert parse_client_hello(split) == parse_client_hello(wire)


def test_data_after_the_hello_records_is_ignored() -> None:
    wire = RECORDS[6]
    ccs = record(b"\x01", content_type=0x14, version=0x0303)
    early = record(b"\x00" * 40, content_type=0x17, version=0x0303)
    hello = parse_client_hello(wire)
    assert parse_client_hello(wire + ccs + early) == hello
    assert parse_client_hello(wire + b"garbage") == hello


def test_data_after_the_hello_inside_its_record_is_refused() -> None:
    wire = RECORDS[73]
    payload = wire[5:] + handshake(b"", msg_type=20)
    with pytest.raises(HelloError, match="after the ClientHello"):
        parse_client_hello(record(payload))
    with pytest.raises(HelloError, match="after the ClientHello"):
        parse_client_hello(record(wire[5:15]) + record(wire[15:] + b"\x00"))


# ---------------------------------------------------------------------------
# fields, GREASE, versions


def test_parsed_fields() -> None:
    hello = parse_client_hello(modern_hello())
    assert hello == ClientHello(
        record_version=0x0301,
        legacy_version=0x0303,
        random=bytes(range(32)),
        session_id=b"",
        cipher_suites=(0x1301, 0x1302, 0xC02B, 0x002F),
        compression_methods=(0,),
        extensions=(0x0000, 0x0010, 0x000A, 0x000B, 0x000D, 0x002B),
        server_name="mx.example.org",
        alpn=("smtp", "h2"),
        signature_algorithms=(0x0403, 0x0804, 0x0401),
        supported_groups=(0x001D, 0x0017),
        ec_point_formats=(0,),
        supported_versions=(0x0304, 0x0303),
    )
    assert hello.max_version == "TLSv1.3"
    assert not hello.fallback_scsv


def test_is_grease() -> None:
    assert [v for v in range(0x10000) if is_grease(v)] == GREASE_VALUES
    assert GREASE_VALUES[0] == 0x0A0A
    assert GREASE_VALUES[-1] == 0xFAFA
    for value in (0x0000, 0x0A0B, 0x1A2A, 0xAAAB, 0x5600, 0xEEEE, 0xEFEF):
        assert not is_grease(value)


def test_grease_is_kept_in_the_hello_and_ignored_by_fingerprints() -> None:
    plain = parse_client_hello(modern_hello())
    greased = parse_client_hello(modern_hello(grease=True))
    assert greased.cipher_suites[0] == 0x2A2A
    assert greased.extensions[0] == 0xAAAA
    assert greased.extensions[-1] == 0x5A5A
    assert greased.supported_groups[0] == 0x7A7A
    assert greased.signature_algorithms[0] == 0x1A1A
    assert greased.supported_versions[0] == 0x3A3A
    assert greased.max_version == "TLSv1.3"
    assert fingerprint(greased) == fingerprint(plain)
    fp = fingerprint(plain)
    assert fp.ja4.startswith("t13d0406sp_")
    assert fp.ja3_string == "771,4865-4866-49195-47,0-16-10-11-13-43,29-23,0"


def test_ja4_known_values() -> None:
    fp = fingerprint(parse_client_hello(modern_hello()))
    ciphers = "002f,1301,1302,c02b"
    exts = "000a,000b,000d,002b_0403,0804,0401"
    assert fp.ja4_r == f"t13d0406sp_{ciphers}_{exts}"
    assert fp.ja4 == (
        "t13d0406sp_"
        + hashlib.sha256(ciphers.encode()).hexdigest()[:12]
        + "_"
        + hashlib.sha256(exts.encode()).hexdigest()[:12]
    )
    assert fp.ja4_ro == (
        "t13d0406sp_1301,1302,c02b,002f_0000,0010,000a,000b,000d,002b_0403,0804,0401"
    )


def test_transport_prefix() -> None:
    hello = parse_client_hello(modern_hello())
    for transport in ("t", "q", "d"):
        fp = fingerprint(hello, transport)
        assert fp.ja4[0] == fp.ja4_r[0] == fp.ja4_o[0] == fp.ja4_ro[0] == transport
    with pytest.raises(ValueError, match="transport"):
        fingerprint(hello, "x")  # type: ignore[arg-type]


def test_fallback_scsv() -> None:
    assert parse_client_hello(modern_hello(fallback=True)).fallback_scsv
    hello = parse_client_hello(client_hello([0x002F, 0x5600], version=0x0301))
    assert hello.fallback_scsv
    assert hello.max_version == "TLSv1"
    assert not any(parse_client_hello(wire).fallback_scsv for wire in RECORDS)
    # it is a cipher suite value for JA3/JA4: counted and hashed
    assert fingerprint(hello).ja4_r.startswith("t10i0200")


def test_hello_without_extensions() -> None:
    for wire in (client_hello([0x0035], None, 0x0300), client_hello([0x0035], [], 0x0300)):
        hello = parse_client_hello(wire)
        assert hello.extensions == ()
        assert hello.server_name is None
        assert hello.alpn == ()
        assert hello.max_version == "SSLv3"
        fp = fingerprint(hello)
        assert fp.ja3_string == "768,53,,,"
        assert fp.ja4 == "ts3i010000_" + hashlib.sha256(b"0035").hexdigest()[:12] + "_000000000000"
        assert fp.ja4_o.endswith("_000000000000")
        assert fp.ja4_r == "ts3i010000_0035_"


def test_only_grease_ciphers_hash_as_empty() -> None:
    hello = parse_client_hello(client_hello([0x0A0A], [(0x0000, sni(b"a.example"))]))
    fp = fingerprint(hello)
    assert fp.ja4 == "t12d000100_000000000000_000000000000"
    assert fp.ja4_o == "t12d000100_000000000000_" + hashlib.sha256(b"0000").hexdigest()[:12]
    assert fp.ja3_string == "771,,0,,"


@pytest.mark.parametrize(
    ("versions", "legacy", "name", "ja4_version"),
    [
        (None, 0x0303, "TLSv1.2", "12"),
        (None, 0x0302, "TLSv1.1", "11"),
        (None, 0x0301, "TLSv1", "10"),
        (None, 0x0300, "SSLv3", "s3"),
        (None, 0x0200, "", "00"),
        ([0x0304], 0x0303, "TLSv1.3", "13"),
        ([0x0303, 0x0304], 0x0301, "TLSv1.3", "13"),
        ([0x7F1C, 0x0303], 0x0303, "TLSv1.2", "00"),
        ([0x7F1C], 0x0303, "", "00"),
        ([0x0A0A], 0x0302, "TLSv1.1", "11"),
        ([0xFAFA, 0x0302, 0x0301], 0x0303, "TLSv1.1", "11"),
        ([0xFEFD], 0x0303, "", "d2"),
    ],
)
def test_versions(versions: list[int] | None, legacy: int, name: str, ja4_version: str) -> None:
    exts = [] if versions is None else [(0x002B, bytes([2 * len(versions)]) + u16s(versions))]
    hello = parse_client_hello(client_hello([0x002F], exts, legacy))
    assert hello.max_version == name
    assert fingerprint(hello).ja4[1:3] == ja4_version


@pytest.mark.parametrize(
    ("name", "spec", "foxio"),
    [
        # JA4.md's own examples
        (b"h2", "h2", "h2"),
        (b"http/1.1", "h1", "h1"),
        (b"\xab", "ab", "99"),
        (b"\xab\xcd", "ad", "99"),
        (b"\x30\xab", "3b", "09"),
        (b"\x30\x31\xab\xcd", "3d", "09"),
        (b"\x30\xab\xcd\x31", "01", "01"),
        # single character: both first and last
        (b"x", "xx", "xx"),
        (b"-", "2d", "99"),
        (b"smtp", "sp", "sp"),
        (b"h2-", "6d", "h9"),
        (b"_", "5f", "99"),
    ],
)
def test_ja4_alpn(name: bytes, spec: str, foxio: str) -> None:
    names = (name.decode("latin-1"), "http/1.1")
    assert ja4_alpn(names) == spec
    assert ja4_alpn(names, ALPN_SPEC) == spec
    assert ja4_alpn(names, ALPN_FOXIO) == foxio
    hello = parse_client_hello(client_hello([0x1301], [(0x0010, alpn_ext(name, b"h2"))]))
    assert fingerprint(hello).ja4[8:10] == spec
    assert fingerprint(hello, alpn_convention=ALPN_FOXIO).ja4[8:10] == foxio


def test_ja4_alpn_absent_or_empty() -> None:
    assert ja4_alpn(()) == "00"
    assert ja4_alpn(("",)) == "00"
    with pytest.raises(ValueError, match="convention"):
        ja4_alpn(("\xff",), "other")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# refusals


def test_errors_are_remote_protocol_errors() -> None:
    assert issubclass(HelloError, RemoteProtocolError)
    assert issubclass(HelloIncomplete, HelloError)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x17\x03\x03\x00\x10", "not a TLS handshake record"),
        (b"\x15", "not a TLS handshake record"),
        (b"\x14\x03\x01\x00\x01\x01", "not a TLS handshake record"),
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
        (b"EHLO client.example\r\n", "not a TLS handshake record"),
        (b"\x00", "not a TLS handshake record"),
        (b"\x80\x2e\x01\x03\x01\x00\x15", "SSLv2"),
        (b"\x16\x02", "record version"),
        (b"\x16\x00\x00\x00\x01\x01", "record version"),
        (b"\x16\x03\x01\x00\x00", "empty"),
        (b"\x16\x03\x01\x40\x01", "2\\^14"),
        (record(handshake(b"\x03\x03" + bytes(34), msg_type=2)), "not a ClientHello"),
        (record(b"\x0b"), "not a ClientHello"),
        (record(b"\x01\x01\x00\x01"), "longer than"),
        (record(handshake(b"")), "truncated"),
        (record(handshake(bytes(34))), "truncated"),
        (record(handshake(b"\x03\x03" + bytes(32) + b"\x21" + bytes(40))), "session_id"),
        (record(handshake(hello_body([1])[:36])), "truncated"),
        (record(handshake(b"\x03\x03" + bytes(33) + b"\x00\x03\x00\x2f\x00\x01\x00")), "cipher"),
        (record(handshake(b"\x03\x03" + bytes(33) + b"\x00\x00\x01\x00")), "cipher"),
        (record(handshake(b"\x03\x03" + bytes(33) + b"\x00\x04\x00\x2f")), "cipher_suites"),
        (record(handshake(b"\x03\x03" + bytes(33) + b"\x00\x02\x00\x2f")), "truncated"),
        (record(handshake(b"\x03\x03" + bytes(33) + b"\x00\x02\x00\x2f\x00")), "compression"),
        (record(handshake(b"\x03\x03" + bytes(33) + b"\x00\x02\x00\x2f\x02\x00")), "compression"),
        (record(handshake(hello_body([0x2F]) + b"\x00")), "extensions length"),
        (record(handshake(hello_body([0x2F]) + b"\x00\x05\x00\x00\x00\x00")), "extensions"),
        (record(handshake(hello_body([0x2F]) + b"\x00\x02\x00\x00")), "extension header"),
        (record(handshake(hello_body([0x2F]) + b"\x00\x04\x00\x17\x00\x01")), "0x0017"),
    ],
)
def test_refused(wire: bytes, reason: str) -> None:
    with pytest.raises(HelloError, match=reason) as info:
        parse_client_hello(wire)
    assert not isinstance(info.value, HelloIncomplete)


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ([(0x0017, b""), (0x0017, b"")], "duplicate extension 0x0017"),
        ([(0x0A0A, b""), (0x0A0A, b"")], "duplicate extension 0x0a0a"),
        ([(0x0000, b"")], "server_name"),
        ([(0x0000, b"\x00\x00")], "server_name"),
        ([(0x0000, b"\x00\x05\x00\x00\x09ab")], "server_name"),
        ([(0x0000, b"\x00\x04\x00\x00\x09a")], "server_name"),
        ([(0x0000, sni(b""))], "host name"),
        ([(0x0000, sni(b"a b.example"))], "host name"),
        ([(0x0000, sni(b"a\x00.example"))], "host name"),
        ([(0x0000, sni(b"caf\xc3\xa9.example"))], "host name"),
        ([(0x0000, sni(b"a.example", b"b.example"))], "two host names"),
        ([(0x0010, b"")], "ALPN"),
        ([(0x0010, b"\x00\x00")], "ALPN"),
        ([(0x0010, alpn_ext(b"h2", b""))], "ALPN"),
        ([(0x0010, b"\x00\x04\x05h2")], "ALPN"),
        ([(0x0010, b"\x00\x09\x02h2")], "ALPN"),
        ([(0x000D, b"\x00\x00")], "signature_algorithms"),
        ([(0x000D, b"\x00\x03\x04\x03\x08")], "signature_algorithms"),
        ([(0x000D, b"\x00\x04\x04\x03")], "signature_algorithms"),
        ([(0x000A, b"\x00")], "supported_groups"),
        ([(0x002B, b"\x03\x03\x04\x03")], "supported_versions"),
        ([(0x002B, b"\x00")], "supported_versions"),
        ([(0x002B, b"")], "supported_versions"),
        ([(0x000B, b"\x00")], "ec_point_formats"),
        ([(0x000B, b"\x02\x00")], "ec_point_formats"),
    ],
)
def test_malformed_extensions(extensions: list[tuple[int, bytes]], reason: str) -> None:
    with pytest.raises(HelloError, match=reason) as info:
        parse_client_hello(client_hello([0x1301], extensions))
    assert not isinstance(info.value, HelloIncomplete)


def test_server_name_rules() -> None:
    other_type = b"\x00\x08\x01\x00\x05x.y.z"
    hello = parse_client_hello(client_hello([0x1301], [(0x0000, other_type)]))
    assert hello.server_name is None
    assert fingerprint(hello).ja4[3] == "d"  # the extension is there
    both = b"\x00\x13\x01\x00\x05x.y.z\x00\x00\x08a.b.c.de"
    hello = parse_client_hello(client_hello([0x1301], [(0x0000, both)]))
    assert hello.server_name == "a.b.c.de"
    long_name = b"a" * 255
    assert parse_client_hello(client_hello([1], [(0, sni(long_name))])).server_name == "a" * 255
    with pytest.raises(HelloError, match="host name"):
        parse_client_hello(client_hello([1], [(0, sni(long_name + b"a"))]))


def test_max_length() -> None:
    wire = RECORDS[6]
    size = int.from_bytes(wire[6:9])
    assert parse_client_hello(wire, max_length=size) == parse_client_hello(wire)
    with pytest.raises(HelloError, match=f"longer than {size - 1} bytes"):
        parse_client_hello(wire[:9], max_length=size - 1)
    assert MAX_HELLO_LENGTH >= 1 << 14
    # a huge declared length is refused from the handshake header alone
    with pytest.raises(HelloError, match="longer than"):
        parse_client_hello(record(b"\x01\xff\xff\xff"))


def test_record_of_another_type_inside_the_hello() -> None:
    split = fragment(RECORDS[73], [50])
    second = split.index(split[:3], 5)
    bad = split[:second] + b"\x17" + split[second + 1 :]
    with pytest.raises(HelloError, match="record type 23 inside"):
        parse_client_hello(bad)


def test_body_shorter_than_declared_fields_is_not_incomplete() -> None:
    # the message is complete: a field running past it cannot be fixed by more input
    body = hello_body([0x1301], [(0x0017, b"")])
    without_extensions = len(hello_body([0x1301]))
    assert parse_client_hello(record(handshake(body[:without_extensions]))).extensions == ()
    for end in set(range(len(body))) - {without_extensions}:
        with pytest.raises(HelloError) as info:
            parse_client_hello(record(handshake(body[:end])))
        assert not isinstance(info.value, HelloIncomplete), end


# ---------------------------------------------------------------------------
# hypothesis


def _parse_or_error(data: bytes) -> ClientHello | None:
    try:
        return parse_client_hello(data)
    except HelloError:
        return None


def _assert_deterministic(hello: ClientHello, data: bytes) -> None:
    fp = fingerprint(hello)
    assert fingerprint(hello) == fp
    again = parse_client_hello(data)
    assert again == hello
    assert fingerprint(again) == fp
    assert fingerprint(hello, alpn_convention=ALPN_FOXIO).ja3 == fp.ja3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_hello_error(data: bytes) -> None:
    hello = _parse_or_error(data)
    if hello is not None:
        _assert_deterministic(hello, data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([0x0300, 0x0301, 0x0303]))
def test_arbitrary_hello_bodies_raise_only_hello_error(body: bytes, version: int) -> None:
    data = record(handshake(body), version=version)
    hello = _parse_or_error(data)
    if hello is not None:
        _assert_deterministic(hello, data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_vectors_are_incomplete(data: st.DataObject) -> None:
    wire = data.draw(st.sampled_from(RECORDS))
    cuts = data.draw(st.lists(st.integers(1, len(wire) - 6), max_size=4, unique=True))
    split = fragment(wire, sorted(cuts))
    end = data.draw(st.integers(0, len(split) - 1))
    with pytest.raises(HelloIncomplete):
        parse_client_hello(split[:end])


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutated_vectors_raise_only_hello_error(data: st.DataObject) -> None:
    wire = bytearray(data.draw(st.sampled_from(RECORDS)))
    changes = data.draw(
        st.lists(st.tuples(st.integers(0, len(wire) - 1), st.integers(0, 255)), max_size=6)
    )
    for position, value in changes:
        wire[position] = value
    end = data.draw(st.integers(0, len(wire)))
    mutated = bytes(wire[:end])
    hello = _parse_or_error(mutated)
    if hello is not None:
        _assert_deterministic(hello, mutated)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_extension_bodies(data: st.DataObject) -> None:
    """Garbage inside the parsed extensions (SNI, ALPN, lists) is a HelloError."""
    ext_type = data.draw(st.sampled_from([0x0000, 0x0010, 0x000A, 0x000B, 0x000D, 0x002B]))
    body = data.draw(st.binary(max_size=40))
    wire = client_hello([0x1301], [(ext_type, body)])
    hello = _parse_or_error(wire)
    if hello is not None:
        _assert_deterministic(hello, wire)


# ---------------------------------------------------------------------------
# mailmoat ja4


def test_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    vector = VECTORS[3]
    assert main(["ja4", vector["client_hello_record_hex"]]) == 0
    out = capsys.readouterr().out
    assert f"JA3:            {vector['computed_ja3']}\n" in out
    assert f"JA3 string:     {vector['ja3_string']}\n" in out
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["JA4"].strip() == vector["expected_ja4"]
    assert lines["JA4_r"].strip() == vector["expected_ja4_r"]
    assert lines["JA4_o"].strip() == vector["expected_ja4_o"]
    assert lines["JA4_ro"].strip() == vector["expected_ja4_ro"]
    assert lines["max version"].strip() == "TLSv1.2"
    assert lines["SNI"].strip() == "www.cloudflare.com"
    assert lines["ALPN"].strip() == "h2, http/1.1"
    assert lines["fallback SCSV"].strip() == "no"
    assert lines["counts"].strip() == "46 cipher suites, 5 extensions (+0 GREASE)"


def test_cli_tolerates_whitespace_and_colons(capsys: pytest.CaptureFixture[str]) -> None:
    hexa = VECTORS[73]["client_hello_record_hex"]
    pairs = [hexa[i : i + 2] for i in range(0, len(hexa), 2)]
    assert main(["ja4", ":".join(pairs[:50]), " ".join(pairs[50:100]), "\n".join(pairs[100:])]) == 0
    assert VECTORS[73]["expected_ja4"] in capsys.readouterr().out


def test_cli_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hexa = VECTORS[6]["client_hello_record_hex"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(hexa[:100] + "\n" + hexa[100:] + "\n"))
    assert main(["ja4", "-", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ja4"] == VECTORS[6]["expected_ja4"]


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    vector = VECTORS[NON_ASCII_ALPN]
    assert main(["ja4", "--json", vector["client_hello_record_hex"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in KINDS} == {k: vector[f"computed_{k}"] for k in KINDS}
    assert out["ja3_string"] == vector["ja3_string"]
    assert out["max_version"] == "TLSv1.3"
    assert out["server_name"] == "clientservices.googleapis.com"
    assert out["alpn"] == ["\xba\xad", "http/1.1"]
    assert out["fallback_scsv"] is False
    assert out["cipher_count"] == 15
    assert out["extension_count"] == 16
    assert out["grease_count"] == 3


def test_cli_alpn_convention(capsys: pytest.CaptureFixture[str]) -> None:
    vector = VECTORS[NON_ASCII_ALPN]
    hexa = vector["client_hello_record_hex"]
    assert main(["ja4", "--alpn-convention", "foxio", "--json", hexa]) == 0
    assert json.loads(capsys.readouterr().out)["ja4"] == vector["expected_ja4"]
    assert main(["ja4", hexa]) == 0
    out = capsys.readouterr().out
    assert "ALPN:           0xbaad, http/1.1\n" in out
    assert vector["computed_ja4"] in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["zz"], "not hex"),
        (["16030"], "not hex"),
        ([""], "no hex given"),
        (["160301"], "incomplete ClientHello (3 bytes)"),
        (["17030300010a"], "not a TLS ClientHello: not a TLS handshake record"),
        ([" 80 2e 01 03 01"], "SSLv2"),
    ],
)
def test_cli_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ja4", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("mailmoat: ja4: ")
    assert message in captured.err


def test_cli_subprocess_has_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailmoat.cli", "ja4", "16030100050200000100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        result.stderr
        == "mailmoat: ja4: not a TLS ClientHello: not a ClientHello (handshake type 2)\n"
    )
