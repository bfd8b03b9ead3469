"""Replay the SMTP fuzz seed corpus through the harness's entry point.

The harness (fuzz/fuzz_smtp.py) carries the oracle; running its seeds here
keeps the oracle and the corpus working without atheris.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_corpus import ROOT, load_harness

#: attack cases shared with the e2e tests (tests/attacks/README.md)
ATTACKS = ROOT / "tests" / "attacks" / "smtp"


check_input, SEEDS = load_harness("smtp")


def test_corpus_is_curated() -> None:
    assert 15 <= len(SEEDS) <= 30
    assert all(seed.stat().st_size <= 4096 for seed in SEEDS)


@pytest.mark.parametrize("seed", SEEDS, ids=[seed.name for seed in SEEDS])
def test_seed(seed: Path) -> None:
    check_input(seed.read_bytes())


ATTACK_FILES = sorted(ATTACKS.iterdir())


@pytest.mark.parametrize("case", ATTACK_FILES, ids=[c.name for c in ATTACK_FILES])
def test_attack_case(case: Path) -> None:
    raw = case.read_bytes().replace(b"{S}", b"fuzz")
    if case.suffix == ".body":  # a body: put it in a session so DATA mode sees it
        raw = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + raw + b"\r\n.\r\nQUIT\r\n"
    check_input(raw)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"\r",
        b".\r\n",
        b"DATA\r\n.\r\n",
        b"DATA\r\n\r\n.\r\n",
        b"AUTH\r\n",
        b"\r\n.\r\n",
    ],
)
def test_small_inputs(data: bytes) -> None:
    check_input(data)
