"""Prometheus metrics of the operator (``--metrics-port``).

Counters are incremented where things happen; gauges that describe current
state (workflows by phase, sites connected) are computed at scrape time from
the running operator, so they can never drift from it.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .applier import Discard
from .http_servers import BoundedWSGIServer, QuietWSGIHandler

REGISTRY = CollectorRegistry()
STATUS_PATCHES = PromCounter(
    "tideflow_operator_status_patches", "Workflow status patches written", registry=REGISTRY
)
STATUS_PATCH_SECONDS = Histogram(
    "tideflow_operator_status_patch_seconds",
    "Latency of Workflow status patches",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
ADMISSION_SECONDS = Histogram(
    "tideflow_operator_admission_seconds",
    "From a new Workflow's watch event to its assignment ready to send to the site"
    " (Assigned status and ledger entry stored)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
SPANS_EXPORTED = PromCounter(
    "tideflow_operator_spans_exported", "Spans re-exported through OTLP", registry=REGISTRY
)


class _StateCollector(Collector):
    """Gauges of the running operator, read at scrape time through ``runtime_of``."""

    def __init__(self) -> None:
        self.runtime_of: Callable[[], Any] = lambda: None

    def collect(self) -> Iterator[Any]:
        runtime = self.runtime_of()
        phases = GaugeMetricFamily(
            "tideflow_operator_workflows",
            "Workflows known to the operator, by phase",
            labels=["phase"],
        )
        applied = GaugeMetricFamily(
            "tideflow_operator_records_applied_total", "Site records applied exactly once"
        )
        duplicates = GaugeMetricFamily(
            "tideflow_operator_duplicates_ignored_total", "Duplicate site records ignored"
        )
        gaps = GaugeMetricFamily("tideflow_operator_gaps_total", "Batches that arrived after a gap")
        connected = GaugeMetricFamily("tideflow_operator_sites_connected", "Sites online now")
        discarded = GaugeMetricFamily(
            "tideflow_operator_records_discarded_total",
            "Site records not applied, by reason (forged: another site's run; unknown:"
            " no such Workflow; final: a finished run's phase; beyond_window, overflow,"
            " retired_epoch: not consumed, the site resends)",
            labels=["reason"],
        )
        dropped = GaugeMetricFamily(
            "tideflow_operator_dropped_messages_total",
            "Malformed messages dropped",
            labels=["reason"],
        )
        if runtime is not None:
            counts = Counter(runtime.public_phase(key) for key in runtime.records)
            for phase, n in sorted(counts.items()):
                phases.add_metric([phase], n)
            bridge = runtime.bridge
            applied.add_metric([], bridge.records_applied)
            duplicates.add_metric([], bridge.duplicates_ignored)
            gaps.add_metric([], bridge.gaps)
            connected.add_metric([], len(bridge.presence.online_sites()))
            for reason, n in sorted(bridge.dropped.items()):
                dropped.add_metric([reason], n)
            for why in Discard:  # every label, zeros too: a fixed set
                discarded.add_metric([why.value], runtime.applier.discarded[why])
        yield from (phases, applied, duplicates, gaps, connected, discarded, dropped)


STATE = _StateCollector()
REGISTRY.register(STATE)


def serve_metrics(
    port: int, runtime_of: Callable[[], Any], addr: str = "0.0.0.0"
) -> BoundedWSGIServer:
    """Serve the registry from a thread (a thread per request, at most
    ``tideflow.http_bounds.MAX_CONNECTIONS`` open); the state gauges come from
    ``runtime_of()`` (None: not started).  Returns the server."""
    STATE.runtime_of = runtime_of
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    server_class = type("_Server", (BoundedWSGIServer,), {"address_family": family[0][0]})
    server: BoundedWSGIServer = make_server(
        addr, port, _plain_if_unsure(make_wsgi_app(REGISTRY)), server_class,
        handler_class=QuietWSGIHandler,
    )  # fmt: skip
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _plain_if_unsure(app: Any) -> Any:
    """The metrics app, answering the plain text format to an ``Accept`` header
    that ``prometheus_client`` cannot read (``version=abc`` raised in it: a 500
    and a traceback on stderr per request)."""

    def plain_if_unsure(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            choose_encoder(environ.get("HTTP_ACCEPT", ""))
        except (TypeError, ValueError):
            environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    return plain_if_unsure
