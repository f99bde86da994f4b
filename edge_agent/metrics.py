"""Prometheus metrics of one agent, in a registry of its own, and its health endpoint.

A registry per agent (not the process-global default) keeps tests that run
several agents in one process honest, and lets ``--metrics-port`` expose
exactly these series.  The same port answers ``/healthz`` for the liveness
probe (:mod:`edge_agent.liveness` says what it checks).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

HEALTH_PATH = "/healthz"


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "tideflow_agent_task_attempts",
            "Finished task attempts by outcome",
            ["outcome"],
            registry=r,
        )
        self.task_seconds = Histogram(
            "tideflow_agent_task_duration_seconds",
            "Duration of task attempts",
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
            registry=r,
        )
        self.running = Gauge("tideflow_agent_running_tasks", "Attempts running now", registry=r)
        self.outbox_depth = Gauge(
            "tideflow_agent_outbox_records", "Records not yet acked", registry=r
        )
        self.outbox_bytes = Gauge("tideflow_agent_outbox_bytes", "Bytes not yet acked", registry=r)
        self.connected = Gauge(
            "tideflow_agent_link_connected", "1 if the MQTT link is up", registry=r
        )
        self.offline_seconds = Gauge(
            "tideflow_agent_offline_seconds",
            "Seconds since the link went down (0 when up)",
            registry=r,
        )
        self.last_acked_seq = Gauge(
            "tideflow_agent_last_acked_seq", "Highest seq the cloud has applied", registry=r
        )
        self.sync_lag = Gauge(
            "tideflow_agent_sync_lag_records",
            "Records written but not yet acked (last seq - acked seq)",
            registry=r,
        )
        self.dropped = Counter(
            "tideflow_agent_dropped_messages",
            "Malformed or misaddressed messages dropped",
            ["reason"],
            registry=r,
        )

    def serve(
        self, port: int, addr: str = "0.0.0.0", *, health: Callable[[], str | None] | None = None
    ) -> ThreadingWSGIServer:
        """Serve the metrics (every path, as ``prometheus_client`` does) and
        ``/healthz`` from a thread of their own; returns the server.

        ``/healthz`` answers 200 ``ok`` while ``health()`` returns None, else 503
        with what it returned.  Without ``health`` it answers 200 while the
        process does.
        """
        app = _with_health(make_wsgi_app(self.registry), health or (lambda: None))
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type("_Server", (ThreadingWSGIServer,), {"address_family": family[0][0]})
        server: ThreadingWSGIServer = make_server(
            addr, port, app, server_class, handler_class=_Quiet
        )
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server


_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _with_health(metrics: _WsgiApp, health: Callable[[], str | None]) -> _WsgiApp:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return metrics(environ, start_response)
        problem = health()
        body = b"ok\n" if problem is None else problem.encode() + b"\n"
        status = "200 OK" if problem is None else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body]

    return app


class _Quiet(WSGIRequestHandler):
    """No line per request on stderr (a probe every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
