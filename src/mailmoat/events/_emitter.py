"""The event emitter.

Contract (DESIGN.md §6): every event is a flat map with ``@timestamp``,
``event.kind`` (``session``, ``verdict``, ``alert``, ``audit``),
``event.action``, ``event.outcome``, ``session.id`` (when it belongs to a
session) and ``node.name``, plus context fields with ECS-style dotted names.
The emitter stamps those and hands the map to every sink.  Sinks must not
block: the JSON-lines sink writes to a local file or pipe through structlog;
the journal (later) takes events through a bounded channel.

Credentials never reach an event: session code only ever puts redacted
values in, and :func:`_scrub` replaces any :class:`~mailmoat.secret.Secret`
that slips through with ``"***"`` as a last line of defence.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any, Protocol, final

import structlog

from mailmoat.secret import Secret


class EventSink(Protocol):
    def __call__(self, event: Mapping[str, Any]) -> None: ...


def wall_clock() -> float:
    """Seconds since the epoch: for facts that outlive the process (login profiles)."""
    return time.time()


def new_session_id() -> str:
    """A time-sortable session id: 12 hex digits of milliseconds + 8 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def _scrub(value: Any) -> Any:
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    return value


@final
class Emitter:
    """Stamps events and fans them out to the sinks."""

    def __init__(self, node_name: str, sinks: list[EventSink] | None = None) -> None:
        self.node_name = node_name
        self.sinks: list[EventSink] = list(sinks or [])

    def emit(
        self,
        action: str,
        fields: Mapping[str, Any] | None = None,
        *,
        kind: str = "session",
        outcome: str = "unknown",
        session_id: str | None = None,
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "@timestamp": datetime.now(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "event.kind": kind,
            "event.action": action,
            "event.outcome": outcome,
            "node.name": self.node_name,
        }
        if session_id is not None:
            event["session.id"] = session_id
        if fields:
            for k, v in fields.items():
                event[k] = _scrub(v)
        for sink in self.sinks:
            sink(event)
        return event


@final
class MemorySink:
    """Keeps events in a list (tests, `mailmoat demo` summaries)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: Mapping[str, Any]) -> None:
        self.events.append(dict(event))

    def actions(self) -> list[str]:
        return [e["event.action"] for e in self.events]

    def find(self, action: str, **match: Any) -> list[dict[str, Any]]:
        out = []
        for e in self.events:
            if e["event.action"] != action:
                continue
            if all(e.get(k.replace("__", ".")) == v for k, v in match.items()):
                out.append(e)
        return out


def _rename_event(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # structlog calls the positional message "event"; our events carry everything as fields
    event_dict.pop("event", None)
    return event_dict


def json_lines_sink(target: str) -> tuple[EventSink, Callable[[], None]]:
    """A structlog JSON-lines sink writing to ``stdout``, ``stderr`` or a file path.

    Returns the sink and a function that closes what it opened.
    """
    stream: IO[str]
    close: Callable[[], None]
    if target == "stdout":
        stream, close = sys.stdout, lambda: None
    elif target == "stderr":
        stream, close = sys.stderr, lambda: None
    else:
        stream = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by `close`
        close = stream.close
    logger = structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=[
            _rename_event,
            structlog.processors.JSONRenderer(
                serializer=json.dumps, ensure_ascii=False, default=str
            ),
        ],
    )

    def sink(event: Mapping[str, Any]) -> None:
        logger.msg(None, **event)

    return sink, close
