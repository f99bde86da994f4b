"""The cloud-edge link with real parts: Mosquitto, agent processes, the cloud bridge.

Every scenario ends with the same check: the cloud's applied state equals the
agent's database (each run's phase, each task's phase, attempt, exit code and
outputs), the cloud consumed every outbox seq exactly once, and no process
died.  Faults: the broker down for a whole run, the broker killed and
restarted repeatedly, the agent killed and restarted while offline,
assignments and cancels sent while the site is offline, duplicated and
reordered batches, and garbage of every kind on every topic.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import AgentProcess, agent_truth
from services.broker import Mosquitto
from services.cloud import SITE, Cloud, chain_spec, converged, outbox_depth, until

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge


@pytest.fixture
async def cloud(mosquitto: Mosquitto) -> AsyncIterator[Cloud]:
    bridge = CloudBridge(
        BridgeConfig(BrokerConnection(mosquitto.url), client_id="cloud-under-test")
    )
    await bridge.start()
    await until(bridge.connected.is_set, 10, "the cloud bridge to connect")
    yield Cloud(bridge)
    await bridge.stop()


async def test_assignment_runs_and_syncs(
    cloud: Cloud, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    with AgentProcess(SITE, mosquitto.url, tmp_path / "a.db") as agent:
        cloud.assign(chain_spec(4, 0.05))
        await until(lambda: cloud.view_phase() == "Succeeded", 30, "Succeeded in the cloud")
        await converged(cloud, agent)
        view = cloud.bridge.applier.view("default", "wf")
        assert view is not None and view.tasks["t3"].outputs == {"n": "3"}
        # Everything acknowledged is compacted away at the site.
        await until(lambda: outbox_depth(agent.db) == 0, 10, "the outbox to drain")
        assert agent.alive


async def test_broker_down_for_the_whole_run(
    cloud: Cloud, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    with AgentProcess(SITE, mosquitto.url, tmp_path / "a.db") as agent:
        cloud.assign(chain_spec(6, 0.3))
        await until(lambda: agent_truth(agent.db)["runs"], 15, "the site to take the assignment")
        mosquitto.stop()
        await until(
            lambda: any(r["phase"] == "Succeeded" for r in agent_truth(agent.db)["runs"].values()),
            30,
            "the run to finish offline",
        )
        assert cloud.view_phase() != "Succeeded"
        mosquitto.start()
        await converged(cloud, agent)
        assert agent.alive


def link_downs(agent: AgentProcess) -> int:
    """How many times the agent has logged its link going down."""
    return agent.log_tail(100_000).count("link down")


def link_ups(agent: AgentProcess) -> int:
    return agent.log_tail(100_000).count("link up")


def run_finished(agent: AgentProcess) -> bool:
    return any(r["phase"] == "Succeeded" for r in agent_truth(agent.db)["runs"].values())


async def test_broker_killed_and_restarted_repeatedly(
    cloud: Cloud, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    with AgentProcess(SITE, mosquitto.url, tmp_path / "a.db") as agent:
        cloud.assign(chain_spec(32, 0.3))
        await until(lambda: agent_truth(agent.db)["runs"], 15, "the site to take the assignment")
        for _ in range(4):
            # Each kill lands mid-run, after the run made progress, and the agent notices it.
            seq = agent_truth(agent.db)["last_seq"]
            await until(lambda s=seq: agent_truth(agent.db)["last_seq"] > s, 15, "progress")
            downs = link_downs(agent)
            mosquitto.kill()
            await until(lambda d=downs: link_downs(agent) > d, 15, "the agent to lose the link")
            assert not run_finished(agent), "the fault landed after the run had finished"
            ups = link_ups(agent)
            mosquitto.start()
            await until(lambda u=ups: link_ups(agent) > u, 30, "the agent to reconnect")
        await until(lambda: cloud.view_phase() == "Succeeded", 60, "Succeeded in the cloud")
        await converged(cloud, agent)
        assert agent.alive


async def test_agent_killed_and_restarted_while_offline(
    cloud: Cloud, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    agent = AgentProcess(SITE, mosquitto.url, tmp_path / "a.db").start()
    try:
        cloud.assign(chain_spec(10, 0.3))
        await until(lambda: agent_truth(agent.db)["runs"], 15, "the site to take the assignment")
        downs = link_downs(agent)
        mosquitto.stop()
        await until(lambda: link_downs(agent) > downs, 15, "the agent to lose the link")
        seq = agent_truth(agent.db)["last_seq"]
        await until(lambda: agent_truth(agent.db)["last_seq"] > seq, 15, "progress offline")
        assert not run_finished(agent), "the kill must land mid-run"
        agent.kill()
        agent.start()  # offline restart: it resumes the run with no broker
        await until(
            lambda: any(r["phase"] == "Succeeded" for r in agent_truth(agent.db)["runs"].values()),
            40,
            "the run to finish offline after the kill",
        )
        mosquitto.start()
        await converged(cloud, agent)
        assert agent.alive
    finally:
        agent.kill()


async def test_assignment_and_cancel_sent_while_the_site_is_offline(
    cloud: Cloud, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    agent = AgentProcess(SITE, mosquitto.url, tmp_path / "a.db").start()
    try:
        # Let the agent create its persistent session, then take it offline.
        await until(lambda: cloud.bridge.presence.connected(SITE), 15, "the site to come online")
        agent.terminate()
        await until(lambda: not cloud.bridge.presence.connected(SITE), 15, "the site offline")
        quick = cloud.assign(chain_spec(2, 0.05), name="quick")
        slow = cloud.assign({"tasks": [{"name": "long", "command": ["sleep", "300"]}]}, name="slow")
        cloud.bridge.control(SITE, wire.ControlPayload(action="cancel", uid=slow, reason="stop"))
        agent.start()
        await until(lambda: cloud.view_phase("quick") == "Succeeded", 30, "quick Succeeded")
        await until(lambda: cloud.view_phase("slow") == "Cancelled", 30, "slow Cancelled")
        await converged(cloud, agent)
        assert quick != slow
        assert cloud.bridge.outstanding(SITE) == ([], [])
    finally:
        agent.kill()


async def test_duplicated_and_reordered_batches_apply_once(
    cloud: Cloud, mosquitto: Mosquitto
) -> None:
    site = "injected"
    uid = str(uuid.uuid4())
    cloud.bridge.applier.expect("default", "inj", uid, 1, ["a"], site=site)
    base = {"uid": uid, "generation": 1, "namespace": "default", "name": "inj"}
    records = [
        (1, "run", {**base, "phase": "Pending"}),
        (2, "run", {**base, "phase": "Running"}),
        (3, "task", {**base, "task": "a", "phase": "Running", "attempt": 1}),
        (
            4,
            "task",
            {
                **base,
                "task": "a",
                "phase": "Succeeded",
                "attempt": 1,
                "exitCode": 0,
                "outputs": {"k": "v"},
            },
        ),
        (5, "run", {**base, "phase": "Succeeded"}),
    ]
    batches = [[records[0], records[1]], [records[2]], [records[3], records[4]]]
    acks: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="injector")
    client.on_message = lambda _c, _u, m: acks.append(json.loads(m.payload)["payload"]["through"])
    client.connect(mosquitto.host, mosquitto.port)
    client.subscribe(wire.topic(site, wire.ACKS), 1)
    client.loop_start()
    try:
        # Reordered (last batch first), then duplicated, then the missing middle.
        for batch in (batches[2], batches[0], batches[0], batches[2], batches[1], batches[1]):
            payload = [(seq, kind, json.dumps(body)) for seq, kind, body in batch]
            client.publish(wire.topic(site, wire.EVENTS), wire.encode_events(site, payload), 1)
        await until(lambda: cloud.view_phase("inj") == "Succeeded", 10, "the injected run")
        await until(lambda: acks and acks[-1] == 5, 10, "an ack through 5")
    finally:
        client.loop_stop()
        client.disconnect()
    assert cloud.bridge.applier.applied_through(site) == 5
    assert cloud.bridge.records_applied == 5
    assert cloud.bridge.duplicates_ignored >= 3
    assert acks == sorted(acks), "acks never go backwards"
    view = cloud.bridge.applier.view("default", "inj")
    assert view is not None and view.tasks["a"].outputs == {"k": "v"}


GARBAGE: list[bytes] = [
    b"",
    b"garbage{",
    b'{"v": 1, "kind": "events", "site": "line-2", "payload": {"records": [{"seq": 1',
    b"[1, 2, 3]",
    b'{"v": 99, "kind": "assign", "site": "line-2", "payload": {}}',
    b"\xff\xfe\x00binary",
]


async def test_garbage_on_every_topic_is_dropped_and_nothing_dies(
    cloud: Cloud, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    with AgentProcess(SITE, mosquitto.url, tmp_path / "a.db", "--labels", "zone=a") as agent:
        await until(lambda: cloud.bridge.presence.connected(SITE), 15, "the site to come online")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="vandal")
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        try:
            wrong_site = wire.encode(
                wire.KIND_ASSIGN,
                "elsewhere",
                {
                    "uid": "x",
                    "generation": 1,
                    "namespace": "d",
                    "name": "n",
                    "spec": {
                        "tasks": [{"name": "evil", "command": ["touch", str(tmp_path / "pwned")]}]
                    },
                },
            )
            oversized = (
                b'{"v":1,"kind":"assign","site":"line-2","payload":{"x":"'
                + b"a" * (2 * 1024 * 1024)
                + b'"}}'
            )
            bad_spec = wire.encode(
                wire.KIND_ASSIGN,
                SITE,
                {
                    "uid": "y",
                    "generation": 1,
                    "namespace": "d",
                    "name": "n",
                    "spec": {"tasks": [{"name": "a", "command": ["true"], "dependsOn": ["a"]}]},
                },
            )
            for channel in wire.CHANNELS:
                for junk in [*GARBAGE, wrong_site, oversized]:
                    client.publish(wire.topic(SITE, channel), junk, 1).wait_for_publish(5)
            client.publish(wire.topic(SITE, wire.ASSIGN), bad_spec, 1).wait_for_publish(5)
        finally:
            client.loop_stop()
            client.disconnect()
        # Everything reached both sides: the bad spec was the agent's last message.
        await until(lambda: "invalid spec" in agent.log_tail(400), 20, "the bad spec dropped")
        await until(
            lambda: sum(cloud.bridge.dropped.values()) >= len(GARBAGE) * 2, 20, "cloud drops"
        )
        assert agent.alive
        assert not (tmp_path / "pwned").exists()
        assert agent_truth(agent.db)["runs"] == {}
        assert sum(cloud.bridge.dropped.values()) >= len(GARBAGE) * 2
        # Both sides still work.
        cloud.assign(chain_spec(2, 0.05))
        await until(lambda: cloud.view_phase() == "Succeeded", 30, "Succeeded after the garbage")
        await converged(cloud, agent)
        assert "dropped message" in agent.log_tail(400)


def _journal_spec(journal: Path) -> dict[str, Any]:
    """a -> b (4 s) -> c; each task journals start (attempt, key, pid) and end."""
    script = (
        'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT $TIDEFLOW_IDEMPOTENCY_KEY $$" >> "$J"; '
        'sleep "$NAP"; echo "end $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"'
    )
    naps = {"a": 0.05, "b": 4.0, "c": 0.05}
    deps = {"b": ["a"], "c": ["b"]}
    return {
        "tasks": [
            {
                "name": name,
                "script": script,
                "env": {"J": str(journal), "NAP": str(nap)},
                "dependsOn": deps.get(name, []),
            }
            for name, nap in naps.items()
        ]
    }


def _journal(journal: Path, kind: str, task: str) -> list[list[str]]:
    if not journal.exists():
        return []
    lines = [line.split() for line in journal.read_text().splitlines()]
    return [line for line in lines if line[:2] == [kind, task]]


@pytest.mark.parametrize("fault", ["sigterm", "sigint", "kill-agent", "kill-tree"])
async def test_the_daemon_stopped_mid_task_resumes_and_the_cloud_sees_success(
    cloud: Cloud, mosquitto: Mosquitto, tmp_path: Path, fault: str
) -> None:
    """``tideflow-agent run`` with the default retry policy: a stop is an interruption."""
    import signal

    import psutil

    journal = tmp_path / "journal"
    agent = AgentProcess(SITE, mosquitto.url, tmp_path / "a.db").start()
    try:
        cloud.assign(_journal_spec(journal))
        started = await until(lambda: _journal(journal, "start", "b"), 30, "b to start")
        assert agent.alive and not _journal(journal, "end", "b"), "fault would not be mid-task"
        assert agent.proc is not None
        b_pid = int(started[0][4])
        if fault in ("sigterm", "sigint"):
            agent.proc.send_signal(signal.SIGTERM if fault == "sigterm" else signal.SIGINT)
            await until(lambda: not agent.alive, 20, "the agent to stop")
            assert not psutil.pid_exists(b_pid) or psutil.Process(b_pid).status() == "zombie"
            phases = agent_truth(agent.db)["runs"]
            (run,) = phases.values()
            assert run["tasks"]["b"]["phase"] == "Interrupted"
        elif fault == "kill-agent":
            agent.proc.kill()
            agent.proc.wait(10)
        else:
            tree = [psutil.Process(agent.proc.pid), *psutil.Process(agent.proc.pid).children(True)]
            for proc in tree:
                proc.kill()
            agent.proc.wait(10)
        assert not _journal(journal, "end", "b"), "the fault landed after b finished"
        agent.start()
        await until(lambda: cloud.view_phase() == "Succeeded", 40, "the cloud to see Succeeded")
        await converged(cloud, agent)
        for task in ("a", "b", "c"):
            assert len(_journal(journal, "end", task)) == 1, task
        assert len(_journal(journal, "start", "a")) == 1
        starts = _journal(journal, "start", "b")
        assert [s[2] for s in starts] == ["1", "2"] and starts[0][3] == starts[1][3]
        assert _journal(journal, "end", "b")[0][2] == "2"
    finally:
        agent.kill()
