"""Replay the HTTP fuzz seed corpus through the harness's entry point.

The harness (fuzz/fuzz_http.py) carries the oracle -- HeadScreen against h11,
whole against split -- and running its seeds here keeps the oracle and the
corpus working without atheris.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_corpus import load_harness

check_input, SEEDS = load_harness("http")


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
        b"G",
        b"\r\n",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81",
    ],
)
def test_small_inputs(data: bytes) -> None:
    check_input(data)
