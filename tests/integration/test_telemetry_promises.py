"""What the README's Observability section and "no shell unless asked" promise, checked at a site.

With a real agent daemon, a real Mosquitto and the operator's bridge:

* the run continues the trace the cloud sent (its span's parent is the
  assignment's traceparent) and each task process gets ``TRACEPARENT`` naming
  its own attempt span;
* attempt spans carry workflow, namespace, site, task, attempt, exit code,
  outcome and, for a retry, its delay; events mark the retry, the timeout and
  the cancellation;
* the agent's Prometheus series move when their event happens: seconds
  offline grows while the link is down (and is 0 once it is back), link
  connected follows the link, dropped messages are counted by reason, outbox
  and sync lag rise while unacknowledged and fall after, the last acked seq
  reaches the last seq;
* tasks do not inherit the agent's ``TIDEFLOW_*`` settings, for ``run`` (its
  settings given only through the environment) and ``run-local`` alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import (
    AgentProcess,
    agent_truth,
    has_schema,
    read_only,
    stored_span_bodies,
    wait_for,
)
from services.broker import LinkProxy, Mosquitto
from services.cloud import SITE, converged, running_cloud, until
from services.metrics import metered_agent, scrape

from tideflow import tracing, wire


def stored_spans(db: Path) -> list[dict[str, Any]]:
    with read_only(db) as conn:
        assert has_schema(conn)
        return stored_span_bodies(conn)


def attempts_of(spans: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    found = [s for s in spans if s["attributes"].get("tideflow.task") == task]
    return sorted(found, key=lambda s: s["attributes"]["tideflow.attempt"])


def event_names(span: dict[str, Any]) -> list[str]:
    return [e["name"] for e in span.get("events", [])]


async def test_trace_context_span_attributes_and_events_at_a_site(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    seen_traceparent, flag = tmp_path / "traceparent", tmp_path / "flaky-once"
    trace_id, root_span = tracing.new_trace_id(), tracing.new_span_id()
    spec = {
        "tasks": [
            {"name": "ok", "script": f'echo "$TRACEPARENT" > "{seen_traceparent}"'},
            {
                "name": "flaky",
                "script": f'if [ -e "{flag}" ]; then exit 0; fi; touch "{flag}"; exit 3',
                "retry": {"limit": 2, "backoff": {"seconds": 0.3}, "jitter": 0},
            },
            {"name": "slow", "command": ["sleep", "30"], "timeoutSeconds": 1},
        ]
    }
    async with running_cloud(mosquitto.url) as cloud:
        with AgentProcess(SITE, mosquitto.url, tmp_path / "a.db") as agent:
            cloud.assign(
                spec, name="traced",
                traceparent=tracing.format_traceparent(trace_id, root_span),
            )  # fmt: skip
            doomed = cloud.assign({"tasks": [{"name": "long", "command": ["sleep", "300"]}]},
                                  name="doomed")  # fmt: skip
            await until(lambda: _task_phase(agent, doomed, "long") == "Running", 30, "long runs")
            cloud.cancel(doomed)
            await until(lambda: cloud.view_phase("traced") == "Failed", 60, "traced to end")
            await until(lambda: cloud.view_phase("doomed") == "Cancelled", 30, "doomed Cancelled")
            await converged(cloud, agent)
            spans = stored_spans(agent.db)

    # The run continues the cloud's trace; each task process gets its own attempt's context.
    (run_span,) = [s for s in spans if s["name"] == "workflow default/traced"]
    assert (run_span["traceId"], run_span["parentSpanId"]) == (trace_id, root_span)
    (ok,) = attempts_of(spans, "ok")
    assert seen_traceparent.read_text().strip() == f"00-{trace_id}-{ok['spanId']}-01"
    assert ok["parentSpanId"] == run_span["spanId"]

    for span in spans:
        assert span["attributes"]["tideflow.site"] == SITE, span["name"]
        assert span["attributes"]["tideflow.namespace"] == "default", span["name"]
    assert ok["attributes"]["tideflow.exit_code"] == 0
    assert ok["attributes"]["tideflow.outcome"] == "Succeeded"

    first, second = attempts_of(spans, "flaky")
    assert first["attributes"]["tideflow.exit_code"] == 3
    assert first["attributes"]["tideflow.outcome"] == "Retrying"
    assert first["attributes"]["tideflow.retry_delay_seconds"] == 0.3
    (retry,) = [e for e in first["events"] if e["name"] == "retry"]
    assert retry["attributes"]["delay_seconds"] == 0.3
    assert second["attributes"]["tideflow.attempt"] == 2
    assert second["attributes"]["tideflow.outcome"] == "Succeeded"
    assert second["startTimeUnixNano"] - first["endTimeUnixNano"] >= 0.3e9 * 0.9

    (slow,) = attempts_of(spans, "slow")
    assert "timeout" in event_names(slow)
    assert slow["attributes"]["tideflow.outcome"] == "Failed"

    (long,) = attempts_of(spans, "long")
    assert "cancelled" in event_names(long)
    assert long["attributes"]["tideflow.outcome"] == "Cancelled"


def _task_phase(agent: AgentProcess, uid: str, task: str) -> str | None:
    run = agent_truth(agent.db)["runs"].get(f"{uid}.1")
    return run["tasks"].get(task, {}).get("phase") if run else None


async def test_every_agent_metric_moves_when_its_event_happens(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    spec = {"tasks": [{"name": "gated", "script": f'while [ ! -e "{gate}" ]; do sleep 0.05; done'}]}
    with LinkProxy(mosquitto.host, mosquitto.port) as link:
        agent, port = metered_agent(SITE, link.url, tmp_path / "a.db")
        m = lambda: scrape(port)  # noqa: E731
        try:
            async with running_cloud(mosquitto.url) as cloud:
                await until(lambda: m().get("tideflow_agent_link_connected") == 1, 30, "link up")
                await until(lambda: m()["tideflow_agent_offline_seconds"] == 0, 10, "online: 0")
                uid = cloud.assign(spec, name="gated")
                await until(lambda: _task_phase(agent, uid, "gated") == "Running", 30, "running")
                await until(lambda: m()["tideflow_agent_running_tasks"] == 1, 10, "running 1")
                link.cut()
                await until(lambda: m()["tideflow_agent_link_connected"] == 0, 30, "link down")
                # Offline: the gauge is above 0 and grows while the link stays down.
                await until(lambda: m()["tideflow_agent_offline_seconds"] > 0, 10, "offline > 0")
                low = m()["tideflow_agent_offline_seconds"]
                await until(lambda: m()["tideflow_agent_offline_seconds"] > low + 1, 10, "grows")
                gate.touch()  # the task finishes offline: its records wait in the outbox
                await until(lambda: _task_phase(agent, uid, "gated") == "Succeeded", 20, "done")
                await until(
                    lambda: (
                        m()["tideflow_agent_sync_lag_records"] > 0
                        and m()["tideflow_agent_running_tasks"] == 0
                    ),
                    10,
                    "the lag to show",
                )
                offline = m()
                assert offline["tideflow_agent_outbox_records"] > 0
                assert offline["tideflow_agent_outbox_bytes"] > 0
                assert offline["tideflow_agent_task_attempts_total{outcome=Succeeded}"] == 1
                assert offline["tideflow_agent_task_duration_seconds_count"] == 1
                link.restore()
                await until(lambda: m()["tideflow_agent_link_connected"] == 1, 30, "link back")
                await converged(cloud, agent)
                last = agent_truth(agent.db)["last_seq"]
                await until(
                    lambda: (
                        m()["tideflow_agent_last_acked_seq"] == last
                        and m()["tideflow_agent_sync_lag_records"] == 0
                        and m()["tideflow_agent_outbox_records"] == 0
                        and m()["tideflow_agent_outbox_bytes"] == 0
                    ),
                    20,
                    "acked through the last seq, lag and outbox back to 0",
                )
                await until(lambda: m()["tideflow_agent_offline_seconds"] == 0, 10, "back to 0")
                _publish(mosquitto, wire.topic(SITE, wire.CONTROL), b"{not json")
                await until(
                    lambda: m().get("tideflow_agent_dropped_messages_total{reason=not-json}") == 1,
                    20,
                    "the dropped message counted",
                )
        finally:
            agent.kill()


def _publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, 1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


# -- tasks do not inherit the agent's settings ----------------------------------------

AGENT_OWN = {"TIDEFLOW_SITE", "TIDEFLOW_BROKER", "TIDEFLOW_DB", "TIDEFLOW_PASSWORD_FILE",
             "TIDEFLOW_HEARTBEAT_SECONDS", "TIDEFLOW_ACK_TIMEOUT", "TIDEFLOW_LOG_LEVEL",
             "TIDEFLOW_FUTURE_SECRET"}  # fmt: skip


def _settings_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    env.update({f"TIDEFLOW_{k}": v for k, v in settings.items()})
    env["TIDEFLOW_FUTURE_SECRET"] = "must-not-leak"
    return env


def _dump_env_task(target: Path) -> dict[str, Any]:
    return {
        "name": "dump",
        "command": [
            sys.executable,
            "-c",
            f"import json, os; open({str(target)!r}, 'w').write(json.dumps(dict(os.environ)))",
        ],
    }


def _leaked(target: Path) -> dict[str, str]:
    seen = json.loads(target.read_text())
    assert seen.get("TIDEFLOW_TASK") == "dump", "the dump is not the task's own environment"
    return {k: v for k, v in seen.items() if k in AGENT_OWN or v == "must-not-leak"}


def test_run_local_tasks_do_not_inherit_the_agent_settings(tmp_path: Path) -> None:
    target, manifest = tmp_path / "env.json", tmp_path / "wf.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
                                        "metadata": {"name": "env"},
                                        "spec": {"tasks": [_dump_env_task(target)]}}))  # fmt: skip
    env = _settings_env(tmp_path, DB=str(tmp_path / "site.db"), LOG_LEVEL="INFO")
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site.db").exists(), "TIDEFLOW_DB was not used: the test proves nothing"
    assert _leaked(target) == {}


async def test_daemon_tasks_do_not_inherit_the_agent_settings(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    password = tmp_path / "pw"
    password.write_text("site-pw\n")
    broker = mosquitto_factory(users={"op": "op-pw", SITE: "site-pw"},
                               acl_sites={SITE: SITE}, admin_users=["op"])  # fmt: skip
    target, db = tmp_path / "env.json", tmp_path / "a.db"
    env = _settings_env(tmp_path, SITE=SITE, BROKER=broker.url, DB=str(db), USERNAME=SITE,
                        PASSWORD_FILE=str(password), HEARTBEAT_SECONDS="1", ACK_TIMEOUT="2",
                        LOG_LEVEL="INFO")  # fmt: skip
    op_password = tmp_path / "op-pw"
    op_password.write_text("op-pw\n")
    log = (tmp_path / "agent.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run"], env=env,
                            stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    log.close()
    try:
        async with running_cloud(broker.url, username="op", password_file=op_password) as cloud:
            cloud.assign({"tasks": [_dump_env_task(target)]}, name="env")
            await until(lambda: cloud.view_phase("env") == "Succeeded", 30, "the task to run")
        assert _leaked(target) == {}
    finally:
        proc.kill()
        proc.wait(10)
    wait_for(lambda: proc.poll() is not None, 10, "the agent to exit")
