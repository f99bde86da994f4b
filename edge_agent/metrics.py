"""Prometheus metrics of one agent, in a registry of its own.

A registry per agent (not the process-global default) keeps tests that run
several agents in one process honest, and lets ``--metrics-port`` expose
exactly these series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


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

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
