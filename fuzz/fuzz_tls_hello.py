"""Atheris harness for the TLS ClientHello parser and its JA3/JA4 fingerprints.

    PYTHONPATH=src python fuzz/fuzz_tls_hello.py -max_total_time=60 \
        /tmp/corpus-copy fuzz/corpus/tls_hello

(libFuzzer writes new inputs into the *first* directory: give it a scratch
copy so that only the curated seeds live in the repository.)

An input is the first bytes a TLS listener reads from a connection.
:func:`check_input` is the single entry point; pytest replays the seed
corpus through it (tests/test_fuzz_corpus_tls_hello.py).  It asserts:

* ``parse_client_hello`` returns a ``ClientHello`` or raises ``HelloError``,
  nothing else, whatever the bytes and whatever ``max_length``;
* the verdict is consistent across lengths: every prefix of an incomplete
  input is incomplete; an input that fails for another reason fails the
  same way with bytes appended; a parsed input has a shortest prefix that
  parses (its records) to the same hello, with anything after it, and every
  shorter prefix is incomplete;
* a parsed hello is coherent (``fallback_scsv``, SNI and ALPN against the
  extension list) and its fingerprints are deterministic, well formed, agree
  with the counts, the two ALPN conventions, and the hashes of their own raw
  forms (``ja4`` is ``ja4_r`` hashed, ``ja4_o`` is ``ja4_ro`` hashed).
"""

from __future__ import annotations

import hashlib
import re
import sys

from mailmoat.protocols.tls import (
    MAX_HELLO_LENGTH,
    TLS_FALLBACK_SCSV,
    ClientHello,
    HelloError,
    HelloIncomplete,
    fingerprint,
    is_grease,
    parse_client_hello,
)

Result = ClientHello | HelloError

_JA4 = re.compile(r"[tqd](1[0-3]|s[23]|d[123]|00)[di]\d{4}[0-9a-zA-Z]{2}_[0-9a-f]{12}_[0-9a-f]{12}")
_APPENDED_RECORD = b"\x14\x03\x03\x00\x01\x01"  # a ChangeCipherSpec


def run(data: bytes, max_length: int = MAX_HELLO_LENGTH) -> Result:
    try:
        return parse_client_hello(data, max_length=max_length)
    except HelloError as exc:
        return exc


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12] if text else "0" * 12


def _rehash(raw: str) -> str:
    """Hash the b and c parts of a raw JA4 the way the specification says."""
    head, ciphers, rest = raw.split("_", 2)
    extensions = rest.split("_", 1)[0]
    return f"{head}_{_hash12(ciphers)}_{_hash12(rest) if extensions else '0' * 12}"


def check_hello(hello: ClientHello) -> None:
    assert hello.fallback_scsv == (TLS_FALLBACK_SCSV in hello.cipher_suites)
    assert len(hello.random) == 32
    assert len(hello.session_id) <= 32
    assert hello.cipher_suites
    assert hello.compression_methods
    assert len(set(hello.extensions)) == len(hello.extensions)
    if hello.server_name is not None:
        assert 0x0000 in hello.extensions
    assert bool(hello.alpn) == (0x0010 in hello.extensions)
    assert all(hello.alpn)

    fp = fingerprint(hello)
    assert fingerprint(hello) == fp
    assert re.fullmatch(r"[0-9a-f]{32}", fp.ja3)
    assert hashlib.md5(fp.ja3_string.encode(), usedforsecurity=False).hexdigest() == fp.ja3
    for ja4 in (fp.ja4, fp.ja4_o):
        assert _JA4.fullmatch(ja4), ja4
    ciphers = [c for c in hello.cipher_suites if not is_grease(c)]
    extensions = [e for e in hello.extensions if not is_grease(e)]
    assert fp.ja4[4:8] == f"{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}"
    assert fp.ja4[3] == ("d" if 0 in extensions else "i")
    assert fp.ja4[:10] == fp.ja4_r[:10] == fp.ja4_o[:10] == fp.ja4_ro[:10]
    assert _rehash(fp.ja4_r) == fp.ja4
    assert _rehash(fp.ja4_ro) == fp.ja4_o
    assert sorted(fp.ja4_ro.split("_")[1].split(",")) == sorted(fp.ja4_r.split("_")[1].split(","))

    other = fingerprint(hello, "q", alpn_convention="foxio")
    assert other.ja4[0] == "q"
    assert other.ja4[1:8] == fp.ja4[1:8]
    assert other.ja4[10:] == fp.ja4[10:]
    assert other.ja3 == fp.ja3
    if fp.ja4[8:10] != other.ja4[8:10]:
        assert "9" in other.ja4[8:10]


def check_one(data: bytes, max_length: int = MAX_HELLO_LENGTH) -> None:
    result = run(data, max_length)
    if isinstance(result, HelloIncomplete):
        for end in {0, 1, 4, 5, 9, len(data) // 2, len(data) - 1}:
            if 0 <= end < len(data):
                assert isinstance(run(data[:end], max_length), HelloIncomplete), end
        return
    if isinstance(result, HelloError):
        for tail in (b"\x00", _APPENDED_RECORD, b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"):
            again = run(data + tail, max_length)
            assert type(again) is type(result), (again, result)
            assert str(again) == str(result)
        return
    check_hello(result)
    used = _used(data, max_length)
    assert run(data[:used], max_length) == result
    assert run(data[:used] + _APPENDED_RECORD, max_length) == result
    assert run(data[:used] + b"\x00", max_length) == result
    for end in {0, 1, 5, 6, 9, used // 2, used - 1}:
        if end < used:
            assert isinstance(run(data[:end], max_length), HelloIncomplete), end


def _used(data: bytes, max_length: int) -> int:
    """The length of the shortest prefix that parses (the records of the hello)."""
    low, high = 0, len(data)  # run(data[:low]) is incomplete, run(data[:high]) parses
    while high - low > 1:
        middle = (low + high) // 2
        if isinstance(run(data[:middle], max_length), HelloIncomplete):
            low = middle
        else:
            high = middle
    return high


def _record(body: bytes) -> bytes:
    return b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body


def check_input(data: bytes) -> None:
    """The fuzz target: see the module docstring for what it asserts."""
    check_one(data)
    check_one(data, max_length=64)
    # Most random inputs die at the first byte; also try them as the body of
    # a record, and as the body of a ClientHello message inside one.
    check_one(_record(data[:0x4000]))
    body = data[:0x3FFC]
    check_one(_record(b"\x01" + len(body).to_bytes(3, "big") + body))


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
