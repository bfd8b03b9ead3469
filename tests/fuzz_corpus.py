"""What the fuzz-corpus replay tests share: load a harness's oracle without atheris."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent


def load_harness(name: str) -> tuple[Callable[[bytes], None], list[Path]]:
    """``fuzz/fuzz_<name>.py``'s ``check_input`` and the seeds of ``fuzz/corpus/<name>``."""
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", ROOT / "fuzz" / f"fuzz_{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    seeds = sorted((ROOT / "fuzz" / "corpus" / name).iterdir())
    return cast("Callable[[bytes], None]", module.check_input), seeds
