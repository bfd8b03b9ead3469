"""Inspecting what a private Postfix or Dovecot delivered: shared by both instances."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

POLL = 0.02


def maildir_messages(maildir: Path) -> list[Path]:
    """Message files in a Maildir's new/ and cur/, oldest first."""
    found: list[tuple[float, str, Path]] = []
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    found.append((entry.stat().st_mtime, entry.name, Path(entry.path)))
    return [path for _, _, path in sorted(found)]


def log_lines(path: Path) -> list[str]:
    """Lines of a log file so far (none if it does not exist yet)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


def wait_for_messages(
    messages: Callable[[], list[Path]],
    count: int,
    timeout: float,
    failure: Callable[[int], Exception],
) -> list[Path]:
    """Poll ``messages()`` until it holds ``count``; else raise ``failure(found)``."""
    deadline = time.monotonic() + timeout
    while True:
        found = messages()
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise failure(len(found))
        time.sleep(POLL)
