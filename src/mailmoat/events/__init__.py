"""Events (DESIGN.md §6): flat ECS-style maps, emitted to structlog and other sinks."""

from ._emitter import Emitter as Emitter
from ._emitter import EventSink as EventSink
from ._emitter import MemorySink as MemorySink
from ._emitter import json_lines_sink as json_lines_sink
from ._emitter import new_session_id as new_session_id
from ._emitter import wall_clock as wall_clock
from ._metrics import NodeMetrics as NodeMetrics

__all__ = [
    "Emitter",
    "EventSink",
    "MemorySink",
    "NodeMetrics",
    "json_lines_sink",
    "new_session_id",
    "wall_clock",
]
