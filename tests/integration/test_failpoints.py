"""The crash matrix driven through named fail points, not random sleeps.

A random kill mostly lands in the idle gaps.  Here the agent kills itself
(SIGKILL) exactly at the moment under test, armed through
``TIDEFLOW_FAILPOINTS``; the next agent on the same database must finish the
run.  The tasks' own journal is the independent witness of what ran:

* ``attempt-started`` — b's process runs, its Running checkpoint is not yet
  committed, the agent dies: the orphan is killed by the next agent (it never
  writes its end line) and b runs again as attempt 2.
* ``process-exited`` — b's process finished its work, its outcome is not
  committed: b runs again (at-least-once, same idempotency key), attempt 2.
* ``outcome-committed`` — b's success is committed, dependants not yet
  released: b never runs again, c runs once.

Over the link, ``records-sent`` / ``ack-received`` / ``ack-applied`` kill the
daemon between publishing a batch and its ack, and between an ack's arrival
and its compaction: the cloud still applies every record exactly once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import (
    AgentProcess,
    task_rows,
    until_the_cloud_holds_the_sites_truth,
    wait_for,
)
from services.broker import Mosquitto

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge

SCRIPT = (
    'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT $TIDEFLOW_IDEMPOTENCY_KEY" >> "$J"; '
    'sleep "$NAP"; echo "end $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"'
)


def spec(journal: Path) -> dict[str, Any]:
    # b outlives an agent restart, so an orphan of it would still be running then.
    naps = {"a": 0.05, "b": 4.0, "c": 0.05}
    deps = {"b": ["a"], "c": ["b"]}
    return {
        "tasks": [
            {
                "name": name,
                "script": SCRIPT,
                "env": {"J": str(journal), "NAP": str(nap)},
                "dependsOn": deps.get(name, []),
            }
            for name, nap in naps.items()
        ]
    }


def journal_lines(journal: Path) -> list[list[str]]:
    return [line.split() for line in journal.read_text().splitlines()] if journal.exists() else []


def run_local(tmp: Path, failpoints: str | None) -> subprocess.CompletedProcess[str]:
    manifest = tmp / "wf.yaml"
    if not manifest.exists():
        body = {
            "apiVersion": "tideflow.io/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "fp", "namespace": "default"},
            "spec": spec(tmp / "journal"),
        }
        manifest.write_text(yaml.safe_dump(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    if failpoints:
        env["TIDEFLOW_FAILPOINTS"] = failpoints
    argv = [sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest),
            "--db", str(tmp / "site.db"), "--quiet"]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


# The second hit of each point is b's (a is the first task through every point).
@pytest.mark.parametrize(
    ("point", "b_ends", "b_attempts"),
    [
        ("attempt-started@2", ["2"], ["1", "2"]),
        ("process-exited@2", ["1", "2"], ["1", "2"]),
        ("outcome-committed@2", ["1"], ["1"]),
    ],
)
def test_a_kill_at_each_point_of_an_attempt(
    tmp_path: Path, point: str, b_ends: list[str], b_attempts: list[str]
) -> None:
    killed = run_local(tmp_path, point)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    # b's first attempt had started when the agent died (its process may write
    # its start line a moment after the agent's kill: it outlives the agent).
    wait_for(
        lambda: ["start", "b", "1"] in [line[:3] for line in journal_lines(tmp_path / "journal")],
        10,
        "b's first attempt to have started",
    )
    done = run_local(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = journal_lines(tmp_path / "journal")
    starts = [line for line in lines if line[:2] == ["start", "b"]]
    ends = [line[2] for line in lines if line[:2] == ["end", "b"]]
    assert [s[2] for s in starts] == b_attempts
    assert len({s[3] for s in starts}) == 1, "the idempotency key changed"
    assert ends == b_ends
    for task in ("a", "c"):
        assert [line[2] for line in lines if line[:2] == ["end", task]] == ["1"], task
    assert task_rows(tmp_path / "site.db") == {
        "a": ("Succeeded", 1),
        "b": ("Succeeded", int(b_attempts[-1])),
        "c": ("Succeeded", 1),
    }


@pytest.mark.parametrize("point", ["records-sent@2", "ack-received@2", "ack-applied@2"])
async def test_a_daemon_killed_around_a_batch_still_applies_every_record_once(
    mosquitto: Mosquitto, tmp_path: Path, point: str
) -> None:
    site = "fp-site"
    bridge = CloudBridge(BridgeConfig(BrokerConnection(mosquitto.url), client_id="cloud-fp"))
    await bridge.start()
    journal = tmp_path / "journal"
    agent = AgentProcess(site, mosquitto.url, tmp_path / "a.db")
    agent.start(failpoints=point)
    try:
        body = spec(journal)
        uid = "6f1d2c1e-0000-4000-8000-00000000f00d"
        names = [t["name"] for t in body["tasks"]]
        bridge.applier.expect("default", "wf", uid, 1, names, site=site)
        bridge.assign(
            site,
            wire.AssignPayload(uid=uid, generation=1, namespace="default", name="wf", spec=body),
        )
        for _ in range(600):
            if not agent.alive:
                break
            await asyncio.sleep(0.05)
        assert agent.proc is not None and agent.proc.returncode == -9, agent.log_tail()
        agent.start()  # no failpoint this time
        truth = await until_the_cloud_holds_the_sites_truth(bridge, agent, site)
        assert bridge.records_applied == truth["last_seq"], "a record applied twice or never"
        ends = {line[1] for line in journal_lines(journal) if line[0] == "end"}
        assert ends == {"a", "b", "c"}  # (a task cut between exit and commit may run twice)
        assert {t["phase"] for t in truth["runs"][f"{uid}.1"]["tasks"].values()} == {"Succeeded"}
    finally:
        agent.kill()
        await bridge.stop()
