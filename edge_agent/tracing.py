"""The agent's OpenTelemetry spans, exported into its own SQLite database.

Why not an OTLP exporter at the site: the link may be down for hours and the
agent may be killed at any moment.  Finished spans are written into the
database (the ``spans`` table, for ``tideflow-agent trace``, and the outbox,
for the cloud) through the store's group commit, so spans travel with
everything else, exactly once.

Spans that outlive a process keep their identity: the run span and the
current attempt's span have their ids stored with the run and the task, and
after a crash the run span is re-created with the same id and start time
(:class:`~tideflow.tracing.PresetIdGenerator`) and the cut attempt is closed
as a span marked ``tideflow.interrupted``.

A task attempt's span is on the path of every step, so it is not an SDK span,
and since decision 0036 not even a record the agent builds: the attempt keeps
its ids (:class:`AttemptIds`), its outcome's task record carries them as
``attemptSpan`` (:meth:`AgentTracer.attempt_span_ref`), and the span record
is derived from that record wherever it is needed
(:func:`tideflow.tracing.attempt_span_of`: the store filing it into the
``spans`` table at the run's end or in the ack that compacts the record,
decision 0032; ``trace``; the operator's re-export).  One outbox record per
step, as decision 0022 made it, but without the span's ~550 bytes.
(How the agent built the span whole before, the reference the derivation
is tested against, lives with the tests.)  Run spans and the
spans of attempts a restart cut short go through :class:`StoreSpanExporter`
as span records of their own, as before.  While the attempt runs its ids are
its log lines' (``tideflow.logs.log_ids``, not the OpenTelemetry context: no
span object is made unless asked for, :attr:`AttemptIds.current`), and its
process gets them in ``TRACEPARENT``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, Status, StatusCode, TraceFlags

from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from tideflow import __version__
from tideflow.phases import RunPhase, TaskPhase
from tideflow.tracing import (
    PresetIdGenerator,
    attempt_span_ref,
    parse_traceparent,
    remote_parent,
    span_to_record,
)

log = logging.getLogger(__name__)


class StoreSpanExporter(SpanExporter):
    """Queues finished spans for the store's next group commit (never blocks)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self.store.queue_span(span_to_record(span))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1e9)


class AgentTracer:
    def __init__(self, store: Store, site: str | None = None) -> None:
        self.ids = PresetIdGenerator()
        attributes: dict[str, Any] = {
            "service.name": "tideflow-agent",
            "service.version": __version__,
        }
        if site:
            attributes["tideflow.site"] = site
        self.provider = TracerProvider(resource=Resource.create(attributes), id_generator=self.ids)
        self.provider.add_span_processor(SimpleSpanProcessor(StoreSpanExporter(store)))
        self.tracer = self.provider.get_tracer("tideflow.agent", __version__)
        self.site = site

    def run_span(self, run: RunState) -> Span:
        """Start the run's span, or re-create it (same id, same start) after a restart."""
        parent = parse_traceparent(run.traceparent)
        context = remote_parent(*parent) if parent else None
        if run.span_id is not None:
            self.ids.preset(run.span_id, None if parent else run.trace_id)
        span = self.tracer.start_span(
            f"workflow {run.namespace}/{run.name}",
            context=context,
            start_time=_ns(run.started_at),
            attributes={
                "tideflow.workflow": run.name,
                "tideflow.namespace": run.namespace,
                "tideflow.uid": run.uid,
                "tideflow.generation": run.generation,
                "tideflow.run_id": run.run_id,
                **({"tideflow.site": self.site} if self.site else {}),
            },
        )
        ctx = span.get_span_context()
        run.trace_id = format(ctx.trace_id, "032x")
        run.span_id = format(ctx.span_id, "016x")
        return span

    def attempt_ids(self, run_span: Span, run: RunState, task: TaskState) -> AttemptIds:
        """A new attempt's span ids (its span is derived from its outcome record, 0036)."""
        if run.trace_id is None or run.span_id is None:  # (run_span sets them)
            context = run_span.get_span_context()
            run.trace_id = format(context.trace_id, "032x")
            run.span_id = format(context.span_id, "016x")
        ids = AttemptIds(run.trace_id, run.span_id)
        task.span_id = ids.span_id_hex
        return ids

    def attempt_span_ref(
        self, ids: AttemptIds, task: TaskState, retry_delay: float | None
    ) -> dict[str, Any]:
        """The outcome record's ``attemptSpan``: the span's ids and what the record lacks."""
        return attempt_span_ref(
            ids.trace_id_hex,
            ids.span_id_hex,
            ids.parent_span_id_hex,
            self.site,
            ended_at=time.time() if task.finished_at is None else None,
            retry_delay=retry_delay if task.phase == TaskPhase.RETRYING else None,
        )

    def interrupted(self, run_span: Span, run: RunState, task: TaskState) -> None:
        """Close the span of an attempt a crash cut short, with its original id."""
        if task.span_id is None:
            return
        self.ids.preset(task.span_id)
        span = self.tracer.start_span(
            f"task {task.name}",
            context=trace.set_span_in_context(run_span),
            start_time=_ns(task.started_at),
            attributes={
                "tideflow.workflow": run.name,
                "tideflow.namespace": run.namespace,
                "tideflow.run_id": run.run_id,
                "tideflow.task": task.name,
                "tideflow.attempt": task.attempt,
                "tideflow.outcome": "Interrupted",
                "tideflow.interrupted": True,
                **({"tideflow.site": self.site} if self.site else {}),
            },
        )
        span.add_event("interrupted", {"reason": "the agent stopped while the attempt ran"})
        span.set_status(Status(StatusCode.ERROR, "attempt interrupted by an agent restart"))
        span.end(end_time=int(time.time() * 1e9))


class AttemptIds:
    """A task attempt's span while it runs: its ids, for its log lines and its process.

    Nothing else is kept: the span record is derived from the attempt's outcome
    record (decision 0036), which carries these ids as ``attemptSpan``.
    """

    __slots__ = ("parent_span_id_hex", "span_id_hex", "trace_id_hex")

    def __init__(self, trace_id_hex: str, parent_span_id_hex: str) -> None:
        span_id = 0
        while not span_id:
            span_id = random.getrandbits(64)  # as the SDK's RandomIdGenerator
        self.trace_id_hex = trace_id_hex
        self.parent_span_id_hex = parent_span_id_hex
        self.span_id_hex = f"{span_id:016x}"

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` naming this span (sampled), for the attempt's process."""
        return f"00-{self.trace_id_hex}-{self.span_id_hex}-01"

    @property
    def current(self) -> NonRecordingSpan:
        """This span as OpenTelemetry's API sees one (made when asked for)."""
        return NonRecordingSpan(
            SpanContext(
                int(self.trace_id_hex, 16), int(self.span_id_hex, 16),
                is_remote=False, trace_flags=_SAMPLED,
            )
        )  # fmt: skip


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def finish_run_span(span: Span, run: RunState) -> None:
    span.set_attribute("tideflow.outcome", run.phase)
    if run.reason:
        span.set_attribute("tideflow.reason", run.reason)
    if run.phase == RunPhase.SUCCEEDED:
        span.set_status(Status(StatusCode.OK))
    else:
        span.set_status(Status(StatusCode.ERROR, (run.message or run.phase)[:256]))
    span.end(end_time=_ns(run.finished_at))
