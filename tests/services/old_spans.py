"""How the agent built an attempt's span record whole, before decision 0036.

The agent no longer builds it: an outcome record carries only the span's ids
and :func:`tideflow.tracing.attempt_span_of` derives the span from it.  This is
the reference that derivation is tested against (every kind of outcome), and
the way tests write records as an older agent did.
"""

from __future__ import annotations

import random
import time
from typing import Any

from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from edge_agent.state import TaskState
from tideflow.phases import TaskPhase

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class AttemptSpan:
    """One task attempt's span, without the SDK's machinery, whole: how the agent made
    an attempt's span record before decision 0036 (kept as the reference the
    derivation, :func:`tideflow.tracing.attempt_span_of`, is tested against)."""

    __slots__ = ("attributes", "events", "name", "parent_span_id", "span_id", "start_ns",
                 "trace_id")  # fmt: skip

    def __init__(
        self, trace_id: int, parent_span_id: int, name: str, attributes: dict[str, Any]
    ) -> None:
        span_id = 0
        while not span_id:
            span_id = random.getrandbits(64)  # as the SDK's RandomIdGenerator
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.span_id = span_id
        self.name = name
        self.attributes = attributes
        self.events: list[dict[str, Any]] = []
        self.start_ns = time.time_ns()

    @property
    def current(self) -> NonRecordingSpan:
        """This span as OpenTelemetry's API sees one (made when asked for)."""
        return NonRecordingSpan(
            SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=_SAMPLED)
        )

    @property
    def trace_id_hex(self) -> str:
        return format(self.trace_id, "032x")

    @property
    def span_id_hex(self) -> str:
        return format(self.span_id, "016x")

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` naming this span (sampled), for the attempt's process."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-01"

    def get_span_context(self) -> SpanContext:
        return self.current.get_span_context()

    def add_event(self, name: str, attributes: dict[str, Any]) -> None:
        self.events.append({"name": name, "timeUnixNano": time.time_ns(), "attributes": attributes})

    def record(self, status: str, message: str | None) -> dict[str, Any]:
        """The finished span, as :func:`tideflow.tracing.span_to_record` has it."""
        return {
            "traceId": format(self.trace_id, "032x"),
            "spanId": self.span_id_hex,
            "parentSpanId": format(self.parent_span_id, "016x"),
            "name": self.name,
            "kind": "INTERNAL",
            "startTimeUnixNano": self.start_ns,
            "endTimeUnixNano": time.time_ns(),
            "attributes": self.attributes,
            "events": self.events,
            "status": {"code": status, "message": message},
        }


def finish_attempt_span(
    span: AttemptSpan, task: TaskState, retry_delay: float | None
) -> dict[str, Any]:
    """End the attempt's span; returns its record, for the outcome's transaction."""
    span.attributes["tideflow.outcome"] = str(task.phase)
    if task.exit_code is not None:
        span.attributes["tideflow.exit_code"] = task.exit_code
    message = task.message or ""
    if "timed out" in message:
        span.add_event("timeout", {"message": message})
    if task.phase == TaskPhase.CANCELLED:
        span.add_event("cancelled", {"message": message})
    if task.phase == TaskPhase.INTERRUPTED:
        span.attributes["tideflow.interrupted"] = True
        span.add_event("interrupted", {"reason": "the agent stopped while the attempt ran"})
    if task.phase == TaskPhase.RETRYING and retry_delay is not None:
        span.attributes["tideflow.retry_delay_seconds"] = round(retry_delay, 3)
        span.add_event("retry", {"delay_seconds": round(retry_delay, 3), "message": message})
    if task.phase in (
        TaskPhase.FAILED,
        TaskPhase.RETRYING,
        TaskPhase.CANCELLED,
        TaskPhase.INTERRUPTED,
    ):
        return span.record("ERROR", message[:256])
    return span.record("OK", None)
