"""JA3 and JA4 fingerprints of a parsed ClientHello.

JA3: salesforce/ja3 (README): ``SSLVersion,Ciphers,Extensions,EllipticCurves,
EllipticCurvePointFormats`` in decimal, list items joined by ``-``, GREASE
removed; the fingerprint is the MD5 of that string.

JA4: FoxIO-LLC/ja4, technical_details/JA4.md (the TLS client part of JA4+,
BSD 3-Clause).  ``a_b_c`` where

* ``a`` = transport (``t`` TCP, ``q`` QUIC, ``d`` DTLS), version (the highest
  non-GREASE ``supported_versions`` value, else ``legacy_version``: ``13``,
  ``12``, ``11``, ``10``, ``s3``, ``s2``, ``d1``..``d3``, else ``00``), ``d``
  with a server_name extension else ``i``, the number of cipher suites and of
  extensions without GREASE (two digits, at most 99), and two characters for
  the first ALPN value (``00`` without one; see :data:`ALPN_SPEC`);
* ``b`` = the first 12 hex digits of the SHA-256 of the cipher suites
  (4-digit lowercase hex, sorted, comma-joined);
* ``c`` = the same of the extensions (sorted, without server_name 0x0000 and
  ALPN 0x0010), then ``_`` and the signature algorithms in the order sent
  (no ``_`` when there are none).

GREASE is dropped from every list.  An empty list hashes to
``000000000000``.  ``ja4_r`` shows the lists instead of their hashes;
``ja4_o``/``ja4_ro`` keep the order sent, server_name and ALPN included.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Literal

from ._hello import EXT_ALPN, EXT_SERVER_NAME, ClientHello, is_grease

__all__ = [
    "ALPN_FOXIO",
    "ALPN_SPEC",
    "DEFAULT_ALPN_CONVENTION",
    "AlpnConvention",
    "Fingerprints",
    "Transport",
    "fingerprint",
    "ja4_alpn",
]

Transport = Literal["t", "q", "d"]
AlpnConvention = Literal["spec", "foxio"]

#: JA4.md, "ALPN Extension Value": when the first or last byte of the first
#: ALPN value is not an ASCII letter or digit, print the first and last
#: characters of the value's hex form (``0xba 0xad`` -> ``"bd"``).
ALPN_SPEC: Final = "spec"
#: What FoxIO's own tools (``ja4.py``, the Rust ``ja4``) print for the same
#: value: ``9`` for such a byte (``"99"``), an artefact of their reading
#: tshark's UTF-8 rendering of the name.
ALPN_FOXIO: Final = "foxio"
#: mailmoat follows the written specification: it is the normative text,
#: keeps information that ``99`` throws away, and does not depend on how a
#: dissector renders invalid UTF-8.  Pass ``alpn_convention=ALPN_FOXIO`` to compare with
#: fingerprints those tools collected.  Both agree on every ALPN value that
#: starts and ends with a letter or digit, which is every registered one.
DEFAULT_ALPN_CONVENTION: Final[AlpnConvention] = ALPN_SPEC

_EMPTY_HASH: Final = "000000000000"
_JA4_VERSIONS: Final[dict[int, str]] = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
_SKIPPED_IN_JA4: Final = frozenset({EXT_SERVER_NAME, EXT_ALPN})


@dataclass(frozen=True, slots=True)
class Fingerprints:
    """JA3 and the four JA4 renderings of one ClientHello."""

    ja3_string: str
    ja3: str
    ja4: str
    ja4_r: str
    ja4_o: str
    ja4_ro: str


def _alnum(char: str) -> bool:
    return char.isascii() and char.isalnum()


def ja4_alpn(alpn: tuple[str, ...], convention: AlpnConvention = DEFAULT_ALPN_CONVENTION) -> str:
    """The two ALPN characters of JA4 for a ClientHello's ALPN list (latin-1 names)."""
    if not alpn or not alpn[0]:
        return "00"
    first, last = alpn[0][0], alpn[0][-1]
    if _alnum(first) and _alnum(last):
        return first + last
    if convention == ALPN_FOXIO:
        return (first if _alnum(first) else "9") + (last if _alnum(last) else "9")
    if convention != ALPN_SPEC:
        raise ValueError(f"unknown ALPN convention {convention!r}")
    return f"{ord(first):02x}"[0] + f"{ord(last):02x}"[1]


def _hash12(text: str) -> str:
    if not text:
        return _EMPTY_HASH
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12]


def _hex_list(values: list[int]) -> str:
    return ",".join(f"{v:04x}" for v in values)


def _ja3_list(values: tuple[int, ...]) -> str:
    return "-".join(str(v) for v in values if not is_grease(v))


def fingerprint(
    hello: ClientHello,
    transport: Transport = "t",
    *,
    alpn_convention: AlpnConvention = DEFAULT_ALPN_CONVENTION,
) -> Fingerprints:
    """Compute JA3 and JA4 (with its raw and original-order forms) for ``hello``."""
    if transport not in ("t", "q", "d"):
        raise ValueError(f"transport must be 't', 'q' or 'd', not {transport!r}")

    ja3_string = ",".join(
        (
            str(hello.legacy_version),
            _ja3_list(hello.cipher_suites),
            _ja3_list(hello.extensions),
            _ja3_list(hello.supported_groups),
            "-".join(str(v) for v in hello.ec_point_formats),
        )
    )
    ja3 = hashlib.md5(ja3_string.encode("ascii"), usedforsecurity=False).hexdigest()

    ciphers = [c for c in hello.cipher_suites if not is_grease(c)]
    extensions = [e for e in hello.extensions if not is_grease(e)]
    versions = [v for v in hello.supported_versions if not is_grease(v)]
    version = max(versions) if versions else hello.legacy_version
    head = (
        f"{transport}{_JA4_VERSIONS.get(version, '00')}"
        f"{'d' if EXT_SERVER_NAME in extensions else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}"
        f"{ja4_alpn(hello.alpn, alpn_convention)}"
    )
    sigalgs = _hex_list([s for s in hello.signature_algorithms if not is_grease(s)])
    tail = "_" + sigalgs if sigalgs else ""

    sorted_ciphers = _hex_list(sorted(ciphers))
    sorted_exts = _hex_list(sorted(e for e in extensions if e not in _SKIPPED_IN_JA4))
    original_ciphers = _hex_list(ciphers)
    original_exts = _hex_list(extensions)
    # JA4.md: "If there are no extensions in the sorted extensions list, then
    # the value of JA4_c is set to 000000000000" (signature algorithms or not).
    c_sorted = _hash12(sorted_exts + tail) if sorted_exts else _EMPTY_HASH
    c_original = _hash12(original_exts + tail) if original_exts else _EMPTY_HASH
    return Fingerprints(
        ja3_string=ja3_string,
        ja3=ja3,
        ja4=f"{head}_{_hash12(sorted_ciphers)}_{c_sorted}",
        ja4_r=f"{head}_{sorted_ciphers}_{sorted_exts}{tail}",
        ja4_o=f"{head}_{_hash12(original_ciphers)}_{c_original}",
        ja4_ro=f"{head}_{original_ciphers}_{original_exts}{tail}",
    )
