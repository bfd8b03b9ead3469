"""Replay the TLS ClientHello fuzz seed corpus through the harness's entry point.

The harness (fuzz/fuzz_tls_hello.py) carries the oracle; running its seeds
here keeps the oracle and the corpus working without atheris.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_corpus import load_harness

check_input, SEEDS = load_harness("tls_hello")


def test_corpus_is_curated() -> None:
    assert 5 <= len(SEEDS) <= 20
    assert all(seed.stat().st_size <= 4096 for seed in SEEDS)


@pytest.mark.parametrize("seed", SEEDS, ids=[seed.name for seed in SEEDS])
def test_seed(seed: Path) -> None:
    check_input(seed.read_bytes())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x16",
        b"\x16\x03",
        b"\x16\x03\x01\x00\x00",
        b"\x16\x03\x01\x40\x01",
        b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",
        b"\x16\x03\x01\x00\x01\x01",
        b"\x16\x03\x01\x00\x05\x01\xff\xff\xff\x00",
        b"\x80",
        b"\x17\x03\x03\x00\x01\x00",
    ],
)
def test_small_inputs(data: bytes) -> None:
    check_input(data)
