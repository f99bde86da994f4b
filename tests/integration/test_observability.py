"""Logs and metrics of a real agent process.

A log line written during a task attempt carries the trace and span ids of
that attempt's span (joined through the agent's own database), and the
agent's Prometheus endpoint, scraped over HTTP, reports what it did.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import agent_truth, read_only, stored_span_bodies, wait_for
from services.broker import Mosquitto
from services.metrics import metered_agent, scrape

from tideflow import wire


def test_task_log_lines_carry_the_attempt_span_ids(tmp_path: Path) -> None:
    manifest = {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "logged"},
        "spec": {"tasks": [{"name": "work", "command": ["true"]}]},
    }
    path, db = tmp_path / "wf.yaml", tmp_path / "site.db"
    path.write_text(yaml.safe_dump(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "--log-level", "INFO", "--log-json",
         "run-local", str(path), "--db", str(db), "--quiet"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    attempt_lines = [
        line for line in lines if line["message"].startswith("task logged/work attempt 1")
    ]
    assert len(attempt_lines) == 2  # starting, and the outcome
    with read_only(db) as conn:
        bodies = stored_span_bodies(conn)
    (span,) = [
        (body["traceId"], body["spanId"]) for body in bodies
        if body["attributes"].get("tideflow.task") == "work"
    ]  # fmt: skip
    for line in attempt_lines:
        assert (line["trace_id"], line["span_id"]) == span


def test_agent_metrics_endpoint_reports_link_tasks_outbox_and_drops(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    site = "metered"
    agent, port = metered_agent(site, mosquitto.url, tmp_path / "a.db")
    try:
        wait_for(lambda: scrape(port).get("tideflow_agent_link_connected") == 1, 20, "link up")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="metrics-test")
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        try:
            spec = {"tasks": [{"name": "ok", "command": ["true"]},
                              {"name": "bad", "command": ["false"]}]}  # fmt: skip
            assign = wire.AssignPayload(
                uid=str(uuid.uuid4()), generation=1, namespace="d", name="m", spec=spec
            )
            topic = wire.topic(site, wire.ASSIGN)
            client.publish(topic, wire.encode(wire.KIND_ASSIGN, site, assign), 1).wait_for_publish()
            client.publish(topic, b"not json", 1).wait_for_publish()
        finally:
            client.loop_stop()
            client.disconnect()
        wait_for(
            lambda: any(r["phase"] == "Failed" for r in agent_truth(agent.db)["runs"].values()),
            30,
            "the run to end",
        )
        wanted = ("tideflow_agent_task_duration_seconds_count", 2)
        values = wait_for(
            lambda: (
                (v := scrape(port)).get(wanted[0]) == wanted[1]
                and v.get("tideflow_agent_dropped_messages_total{reason=not-json}") == 1
                and v.get("tideflow_agent_offline_seconds") == 0
                and v
            ),
            20,
            "both attempts and the dropped message counted",
        )
    finally:
        agent.kill()
    assert values["tideflow_agent_task_attempts_total{outcome=Succeeded}"] == 1
    assert values["tideflow_agent_task_attempts_total{outcome=Failed}"] == 1
    assert values["tideflow_agent_task_duration_seconds_count"] == 2
    assert values["tideflow_agent_dropped_messages_total{reason=not-json}"] == 1
    assert values["tideflow_agent_link_connected"] == 1
    assert values["tideflow_agent_offline_seconds"] == 0
    for name in (
        "tideflow_agent_outbox_records",
        "tideflow_agent_outbox_bytes",
        "tideflow_agent_last_acked_seq",
        "tideflow_agent_sync_lag_records",
        "tideflow_agent_running_tasks",
    ):
        assert name in values
