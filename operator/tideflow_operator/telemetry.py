"""Traces from the sites and the operator's own root spans, re-exported via OTLP.

Sites export their spans into SQLite and sync them as outbox records; the
applier collects them exactly once.  Here they are turned back into SDK
``ReadableSpan`` objects with their original trace ids, span ids and
timestamps and handed to an OTLP/HTTP exporter — only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the ``otlp`` extra).

The workflow's root span is the operator's: its ids were minted at assignment
(``status.traceId``/``rootSpanId``) and sent to the site as the traceparent;
the span itself is emitted once, when the run ends, from the assignment time
to the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tideflow import __version__, wire
from tideflow.tracing import SCOPE, record_to_span

log = logging.getLogger(__name__)

OPERATOR_RESOURCE = Resource.create(
    {"service.name": "tideflow-operator", "service.version": __version__}
)


def agent_resource(site: str) -> dict[str, str]:
    """The resource of a site's agent (its records leave it out to stay small)."""
    return {"service.name": "tideflow-agent", "tideflow.site": site}


def exporter_from_environment() -> SpanExporter | None:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the otlp extra is not installed "
            "(pip install 'tideflow[otlp]'); traces are not exported"
        )
        return None
    return OTLPSpanExporter()


def root_span(
    *,
    trace_id: str,
    span_id: str,
    namespace: str,
    name: str,
    site: str,
    started: float,
    finished: float | None,
    phase: str,
    reason: str | None,
) -> ReadableSpan:
    flags = TraceFlags(TraceFlags.SAMPLED)
    ok = phase == "Succeeded"
    return ReadableSpan(
        name=f"workflow {namespace}/{name}",
        context=SpanContext(int(trace_id, 16), int(span_id, 16), False, trace_flags=flags),
        parent=None,
        resource=OPERATOR_RESOURCE,
        attributes={
            "tideflow.workflow": name,
            "tideflow.namespace": namespace,
            "tideflow.site": site,
            "tideflow.outcome": phase,
            **({"tideflow.reason": reason} if reason else {}),
        },
        kind=SpanKind.SERVER,
        status=Status(StatusCode.OK if ok else StatusCode.ERROR, None if ok else reason),
        start_time=int(started * 1e9),
        end_time=int((finished or time.time()) * 1e9),
        instrumentation_scope=SCOPE,
    )


class SpanForwarder:
    """Exports collected spans; a no-op without an exporter."""

    def __init__(self, exporter: SpanExporter | None) -> None:
        self.exporter = exporter
        self.exported = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.exporter is not None

    async def forward(
        self, records: Iterable[tuple[str, Mapping[str, Any]]], extra: Iterable[ReadableSpan] = ()
    ) -> None:
        """Export ``(site, span record)`` pairs plus ``extra`` spans of the operator's."""
        if self.exporter is None:
            return
        spans: list[ReadableSpan] = list(extra)
        for site, record in records:
            try:
                spans.append(record_to_span(record, agent_resource(site)))
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("dropped a malformed span record: %s", wire.shown(exc, 200))
        if not spans:
            return
        result = await asyncio.to_thread(self.exporter.export, spans)
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
            log.warning("OTLP export of %d spans failed", len(spans))

    def shutdown(self) -> None:
        if self.exporter is not None:
            self.exporter.shutdown()
