"""Prometheus metrics of the operator (``--metrics-port``).

Counters are incremented where things happen; gauges that describe current
state (workflows by phase, sites connected) are computed at scrape time from
the running operator, so they can never drift from it.  They are read on the
operator's event loop, the only thread its registries are used from (the
applier is not thread-safe): read from the metrics server's thread, a scrape
during a burst of admissions or of new sites failed ("dictionary changed size
during iteration", a 500).  A loop that does not answer within
:data:`STATE_SECONDS` leaves those gauges out of that scrape.
"""

from __future__ import annotations

import asyncio
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


# How long a scrape waits for the event loop to read the operator's state.
STATE_SECONDS = 2.0


def _state(runtime: Any) -> dict[str, Any]:
    """The numbers the state gauges show, read on the runtime's event loop."""
    bridge = runtime.bridge
    return {
        "phases": Counter(runtime.public_phase(key) for key in runtime.records),
        "applied": bridge.records_applied,
        "duplicates": bridge.duplicates_ignored,
        "gaps": bridge.gaps,
        "connected": len(bridge.presence.online_sites()),
        "dropped": dict(bridge.dropped),
        "discarded": {why: runtime.applier.discarded[why] for why in Discard},
    }


def _read_state(runtime: Any) -> dict[str, Any] | None:
    """:func:`_state` from the runtime's loop (None: not started, stopped, or not answering)."""
    loop = getattr(runtime, "loop", None)
    if loop is None or loop.is_closed():
        return None

    async def read() -> dict[str, Any]:
        return _state(runtime)

    try:
        return asyncio.run_coroutine_threadsafe(read(), loop).result(STATE_SECONDS)
    except Exception:  # a stuck or stopping loop: this scrape goes without them
        return None


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
        state = _read_state(runtime) if runtime is not None else None
        if state is not None:
            for phase, n in sorted(state["phases"].items()):
                phases.add_metric([phase], n)
            applied.add_metric([], state["applied"])
            duplicates.add_metric([], state["duplicates"])
            gaps.add_metric([], state["gaps"])
            connected.add_metric([], state["connected"])
            for reason, n in sorted(state["dropped"].items()):
                dropped.add_metric([reason], n)
            for why, n in state["discarded"].items():  # every label, zeros too: a fixed set
                discarded.add_metric([why.value], n)
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
