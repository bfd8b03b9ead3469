"""The live rule set of a node, and how it is replaced.

Contract: :class:`RuleHolder` always holds a complete, compiled
:class:`RuleSet` in :attr:`RuleHolder.current`.  :meth:`RuleHolder.reload`
compiles the files aside; only when every file compiled does it swap the new
set in (one attribute assignment, so a session reading ``current`` sees
either the old or the new set, never a mix).  On any error the old set stays
in force and the errors are returned.  Hit counters carry over, so a reload
never resets what an analyst sees.  Sessions fetch ``current`` at every phase
and so see the new rules from their next phase on.

:func:`snapshot` fingerprints the files under the rule paths (name, size,
mtime) so a watcher can tell that something changed without compiling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

from mailmoat.errors import RuleError

from ._engine import RuleSet
from ._loader import load_rules
from ._model import Mode, RuleErrors

#: a watcher never walks more files than this (a rules directory is small)
MAX_WATCHED_FILES: Final = 10_000


@final
@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: ``ok`` and the diff, or the errors that kept the old set."""

    ok: bool
    errors: tuple[RuleError, ...]
    rules: int
    files: int
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for people: what changed, or how many errors kept the old rules."""
        if not self.ok:
            n = len(self.errors)
            return f"{n} error{'s' if n != 1 else ''}; the previous rules stay in force"
        parts = [f"{self.rules} rules from {self.files} files"]
        for label, ids in (("added", self.added), ("removed", self.removed)):
            if ids:
                parts.append(f"{label} {', '.join(ids)}")
        if self.changed:
            parts.append(f"changed {', '.join(self.changed)}")
        if len(parts) == 1:
            parts.append("no rule changed")
        return "; ".join(parts)


def _signature(rs: RuleSet) -> dict[str, tuple[object, ...]]:
    return {
        r.id: (
            r.when,
            r.phase,
            tuple(sorted(r.protocols)),
            r.action,
            tuple(sorted(r.reply.items())),
            r.severity,
            r.score,
            r.tarpit,
            r.ban,
            r.mode,
            r.enabled,
            r.tags,
        )
        for r in rs.rules
    }


@final
class RuleHolder:
    """The node's rule set; see the module docstring."""

    def __init__(self, paths: Sequence[Path], *, mode: Mode = "enforce") -> None:
        self.paths = tuple(paths)
        self.mode: Mode = mode
        self.current: RuleSet = RuleSet((), mode=mode)
        self.generation = 0
        self.last_result: ReloadResult | None = None

    @classmethod
    def empty(cls, mode: Mode = "enforce") -> RuleHolder:
        """A holder with no rule paths: every phase passes."""
        return cls((), mode=mode)

    def reload(self) -> ReloadResult:
        """Compile the rule paths aside and swap them in if they all compiled."""
        if not self.paths:
            result = ReloadResult(True, (), 0, 0)
            self.last_result = result
            return result
        try:
            new = load_rules(self.paths, base_mode=self.mode)
        except RuleErrors as exc:
            result = ReloadResult(False, exc.errors, len(self.current.rules), 0)
            self.last_result = result
            return result
        old_sig = _signature(self.current)
        new_sig = _signature(new)
        new.carry_counters_from(self.current)
        self.current = new
        self.generation += 1
        result = ReloadResult(
            True,
            (),
            len(new.rules),
            len(new.files),
            added=tuple(i for i in new_sig if i not in old_sig),
            removed=tuple(i for i in old_sig if i not in new_sig),
            changed=tuple(i for i in new_sig if i in old_sig and old_sig[i] != new_sig[i]),
        )
        self.last_result = result
        return result


def snapshot(paths: Sequence[Path]) -> frozenset[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of every file under ``paths`` (directories walked)."""
    seen: set[tuple[str, int, int]] = set()

    def add(p: str) -> None:
        try:
            st = os.stat(p)
        except OSError:
            return
        seen.add((p, st.st_size, st.st_mtime_ns))

    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    if len(seen) >= MAX_WATCHED_FILES:
                        return frozenset(seen)
                    add(os.path.join(root, name))
        else:
            add(str(path))
    return frozenset(seen)
