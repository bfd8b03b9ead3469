"""What the demo's private daemons (Dovecot, nginx) share: launch, readiness, context manager.

Contract: a subclass sets ``root``, ``stderr_path`` and ``_process`` and
implements ``start`` (preparing its files, then calling :meth:`_launch`),
``stop`` and ``_wait_ready``.  :meth:`_launch` starts the daemon in its own
session with a minimal environment, its output appended to
``stderr_path``, and stops it again if it does not become ready.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


class ManagedProcess:
    root: Path
    stderr_path: Path
    _process: subprocess.Popen[bytes] | None

    def start(self, timeout: float = 10) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 10) -> None:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _launch(self, argv: Sequence[str], deadline: float) -> None:
        with self.stderr_path.open("ab") as err:
            self._process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=dict(_ENV),
                start_new_session=True,
            )
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
