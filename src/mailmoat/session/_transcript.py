"""A session's transcript: what client and server said, for the analyst.

Contract: one :class:`Transcript` belongs to one session (SMTP or IMAP).
While :attr:`Transcript.active` (the pre-authentication phase) the session
records every client line it parsed and every line sent to the client; after
a successful login it records only the commands mailmoat itself refused,
each with the reply that refused it.  The session redacts before recording:
a transcript never sees a password or a SASL blob, only ``***``.

It is bounded: at most ``max_lines`` entries and ``max_bytes`` bytes of line
text, each line cut to ``max_line`` characters.  Lines past a bound are
counted, not kept, and :meth:`Transcript.event` ends the list with one marker
entry saying how many were left out.  :meth:`Transcript.event` gives the one
``session.transcript`` event at session end (``None`` when nothing was
recorded, or when it was already given).

The clock is the driver's: a callable returning seconds since the session
started (monotonic).  Sessions stay free of any I/O library; without a clock
every entry is at ``0.0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol, final

from .commands import Emit

#: entries kept per session (the marker entry included)
MAX_LINES: Final = 200
#: bytes of line text kept per session
MAX_BYTES: Final = 16 * 1024
#: characters kept of one line
MAX_LINE: Final = 512


class Redactable(Protocol):
    """A parsed client line that knows its loggable form (codec events)."""

    def redacted(self) -> bytes: ...


def _zero() -> float:
    return 0.0


@final
class Transcript:
    """The lines of one session; see the module docstring."""

    __slots__ = (
        "_dropped_at",
        "_emitted",
        "_pending",
        "active",
        "clock",
        "dropped",
        "entries",
        "max_bytes",
        "max_line",
        "max_lines",
        "size",
    )

    def __init__(
        self,
        clock: Callable[[], float] | None = None,
        *,
        max_lines: int = MAX_LINES,
        max_bytes: int = MAX_BYTES,
        max_line: int = MAX_LINE,
    ) -> None:
        self.clock = clock or _zero
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_line = max_line
        #: True before authentication: record everything
        self.active = True
        self.entries: list[dict[str, Any]] = []
        self.size = 0
        self.dropped = 0
        self._dropped_at = 0.0
        self._pending: Redactable | bytes | None = None
        self._emitted = False

    # ------------------------------------------------------------------ recording

    def command(self, line: Redactable | bytes) -> None:
        """A client line as parsed (``bytes`` must already be redacted).

        Recorded now while active; afterwards only remembered (no work), so
        that :meth:`refused` can name it.
        """
        if self.active:
            self._pending = None
            self._add("c", line if isinstance(line, bytes) else line.redacted())
        else:
            self._pending = line

    def note(self, direction: str, line: bytes) -> None:
        """Record ``line`` (``"c"`` or ``"s"``) in any phase: an event the
        protocol always wants kept (an HTTP login).  A client line replaces
        the remembered command (see :meth:`refused`)."""
        if direction == "c":
            self._pending = None
        self._add(direction, line)

    def reply(self, data: bytes) -> None:
        """Bytes sent to the client: one entry per line, while active."""
        if self.active:
            self._server(data)

    def refused(self, data: bytes) -> None:
        """mailmoat refused the last command with ``data``: recorded in any phase.

        While active the command and the reply are recorded anyway (by
        :meth:`command` and :meth:`reply`); afterwards the command is
        recorded here, once, then the reply.
        """
        if self.active:
            return
        line, self._pending = self._pending, None
        if line is not None:
            self._add("c", line if isinstance(line, bytes) else line.redacted())
        self._server(data)

    def _server(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            if line and line != b"\r":
                self._add("s", line)

    def _add(self, direction: str, line: bytes) -> None:
        line = line.rstrip(b"\r\n")
        cut = line[: self.max_line]
        text = cut.decode("utf-8", "backslashreplace")
        if len(text) > self.max_line or len(cut) < len(line):
            text = text[: self.max_line - 3] + "..."
        size = len(cut)
        if (
            self.dropped
            or len(self.entries) + 1 >= self.max_lines
            or (self.size + size > self.max_bytes)
        ):
            if not self.dropped:
                self._dropped_at = self._now()
            self.dropped += 1
            return
        self.size += size
        self.entries.append({"t": self._now(), "dir": direction, "line": text})

    def _now(self) -> float:
        return round(self.clock() * 1000, 1)

    # ------------------------------------------------------------------ the event

    def event(self) -> Emit | None:
        """The ``session.transcript`` event, once; ``None`` if nothing was recorded."""
        if self._emitted or not (self.entries or self.dropped):
            return None
        self._emitted = True
        entries = list(self.entries)
        if self.dropped:
            entries.append(
                {
                    "t": self._dropped_at,
                    "dir": "s",
                    "line": f"[mailmoat: {self.dropped} more lines left out of this transcript]",
                }
            )
        return Emit(
            "session.transcript",
            {"transcript": entries, "transcript.truncated": self.dropped},
        )
