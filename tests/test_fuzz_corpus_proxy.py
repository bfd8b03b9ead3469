"""Replay the PROXY protocol fuzz seed corpus through the harness's entry point.

The harness (fuzz/fuzz_proxy_protocol.py) carries the oracle; running its
seeds here keeps the oracle and the corpus working without atheris.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_corpus import load_harness

check_input, SEEDS = load_harness("proxy_protocol")


def test_corpus_is_curated() -> None:
    assert 5 <= len(SEEDS) <= 20
    assert all(seed.stat().st_size <= 4096 for seed in SEEDS)


@pytest.mark.parametrize("seed", SEEDS, ids=[seed.name for seed in SEEDS])
def test_seed(seed: Path) -> None:
    check_input(seed.read_bytes())


@pytest.mark.parametrize(
    "data",
    [b"", b"P", b"PROXY", b"\r\n\r\n", b"\r\n\r\n\x00\r\nQUIT\n", b"\r\n\r\n\x00\r\nQUIT\n\x21"],
)
def test_small_inputs(data: bytes) -> None:
    check_input(data)
