"""Replay the IMAP fuzz seed corpus and attack cases through the harness.

The harness (fuzz/fuzz_imap.py) carries the oracle; running its seeds here
keeps the oracle and the corpus working without atheris.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_corpus import ROOT, load_harness

#: attack and edge cases (tests/attacks/README.md)
ATTACKS = ROOT / "tests" / "attacks" / "imap"


check_input, SEEDS = load_harness("imap")


def test_corpus_is_curated() -> None:
    assert 15 <= len(SEEDS) <= 30
    assert all(seed.stat().st_size <= 8192 for seed in SEEDS)


@pytest.mark.parametrize("seed", SEEDS, ids=[seed.name for seed in SEEDS])
def test_seed(seed: Path) -> None:
    check_input(seed.read_bytes())


ATTACK_FILES = sorted(ATTACKS.iterdir())


@pytest.mark.parametrize("case", ATTACK_FILES, ids=[c.name for c in ATTACK_FILES])
def test_attack_case(case: Path) -> None:
    check_input(case.read_bytes().replace(b"{S}", b"fuzz"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"\r",
        b"{",
        b"}",
        b"{0}\r\n",
        b"a {0}\r\n\r\n",
        b"a X {0+}\r\n\r\n",
        b"+\r\n",
        b"*",
    ],
)
def test_small_inputs(data: bytes) -> None:
    check_input(data)
