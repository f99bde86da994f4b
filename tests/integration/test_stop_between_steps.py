"""A stop signal that lands while a step's outcome commits starts nothing new.

A chain's next attempt runs on in the asyncio task of the one before it,
right after that one's outcome commits, and the commit usually happens on the
event loop (decision 0027): the loop is busy for the fsync, so asyncio hands
it a stop signal only at its next ``select``.  The next step's process used to
be started in between, then killed at once and recorded Interrupted: a task
with side effects was started after the stop was asked for.

The fail point ``outcome-committed`` armed with ``=term`` (or ``=int``) makes
the agent signal itself right after task ``a``'s outcome committed, exactly
there.  Real ``tideflow-agent run-local`` and ``run`` processes, real SQLite;
the witnesses are the starts file the runner writes before any process of an
attempt exists, the tasks' own journal, and the stored phase (Pending, not
Interrupted).  A second signal still ends the stop at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
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

from edge_agent.runner import STARTS_FILE
from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge

EXIT_INTERRUPTED = 130
SCRIPT = 'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"; touch "$J.$TIDEFLOW_TASK"'
# Ignores the stop's SIGTERM: only the grace period's end or a second signal ends it.
STUBBORN = (
    'trap "echo term >> $J.slow" TERM; echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"; '
    "while :; do sleep 0.05; done"
)
ACTIONS = {"sigterm": "term", "sigint": "int"}


def spec(journal: Path, *, stubborn: bool = False) -> dict[str, Any]:
    tasks: list[dict[str, Any]] = [
        {"name": "a", "script": SCRIPT, "env": {"J": str(journal)}},
        {"name": "b", "script": SCRIPT, "env": {"J": str(journal)}, "dependsOn": ["a"]},
        {"name": "c", "script": SCRIPT, "env": {"J": str(journal)}, "dependsOn": ["b"]},
    ]
    if stubborn:
        tasks.append({"name": "slow", "script": STUBBORN, "env": {"J": str(journal)}})
    return {"tasks": tasks}


def write_manifest(tmp: Path, body: dict[str, Any]) -> Path:
    path = tmp / "wf.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "tideflow.io/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": "wf", "namespace": "default"},
                "spec": body,
            }
        )
    )
    return path


def env_with(failpoints: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    if failpoints:
        env["TIDEFLOW_FAILPOINTS"] = failpoints
    return env


def run_local_argv(manifest: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest),
            "--db", str(db), "--quiet"]  # fmt: skip


def noted_starts(db: Path) -> list[str]:
    """Every attempt the runner noted as starting (before its process existed)."""
    lines: list[str] = []
    for path in sorted(db.with_name(db.name + ".work").glob(f"*/.tideflow/{STARTS_FILE}")):
        lines += path.read_text().splitlines()
    return lines


def journal_starts(journal: Path) -> list[str]:
    if not journal.exists():
        return []
    return [" ".join(line.split()[1:]) for line in journal.read_text().splitlines()]


def assert_nothing_started_after_a(db: Path, journal: Path) -> None:
    time.sleep(0.1)  # a process started by mistake has written its journal line by now
    assert "b 1" not in noted_starts(db), f"b was started after the stop: {noted_starts(db)}"
    started = journal_starts(journal)
    assert not any(line.startswith("b ") for line in started), started
    assert not Path(f"{journal}.b").exists(), "b's side effect happened after the stop"
    rows = task_rows(db)
    assert rows["a"] == ("Succeeded", 1), rows
    assert rows["b"] == ("Pending", 0), rows
    assert rows["c"] == ("Pending", 0), rows


def assert_resumed_once_each(db: Path, journal: Path, names: tuple[str, ...]) -> None:
    assert sorted(journal_starts(journal)) == sorted(f"{n} 1" for n in names)
    for name in names:
        assert task_rows(db)[name] == ("Succeeded", 1), task_rows(db)


@pytest.mark.parametrize("stop", sorted(ACTIONS))
def test_run_local_starts_no_step_after_a_stop_signal_during_a_commit(
    tmp_path: Path, stop: str
) -> None:
    journal, db = tmp_path / "journal", tmp_path / "site.db"
    manifest = write_manifest(tmp_path, spec(journal))
    stopped = subprocess.run(
        run_local_argv(manifest, db), env=env_with(f"outcome-committed={ACTIONS[stop]}"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr
    assert "interrupted; run again to resume" in stopped.stderr
    assert_nothing_started_after_a(db, journal)
    assert noted_starts(db) == ["a 1"]
    again = subprocess.run(run_local_argv(manifest, db), env=env_with(None),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert_resumed_once_each(db, journal, ("a", "b", "c"))


def test_run_local_a_second_signal_still_stops_at_once(tmp_path: Path) -> None:
    """The stop waits for ``slow`` (it ignores SIGTERM, grace 5 s); a second SIGTERM
    ends it at once, and ``b`` never started."""
    journal, db = tmp_path / "journal", tmp_path / "site.db"
    manifest = write_manifest(tmp_path, spec(journal, stubborn=True))
    agent = subprocess.Popen(
        run_local_argv(manifest, db), env=env_with("outcome-committed=term"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: Path(f"{journal}.slow").exists(), 30, "slow to get the stop's SIGTERM")
        assert agent.poll() is None, "the agent did not wait for its stubborn task"
        agent.send_signal(signal.SIGTERM)
        second = time.monotonic()
        _, stderr = agent.communicate(timeout=30)
        took = time.monotonic() - second
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.communicate(timeout=10)
    assert agent.returncode == EXIT_INTERRUPTED, stderr
    assert took < 2.5, f"the second signal took {took:.1f}s to stop the agent (grace is 5 s)"
    assert_nothing_started_after_a(db, journal)


async def start_daemon_run(
    mosquitto: Mosquitto, tmp: Path, failpoints: str, body: dict[str, Any]
) -> tuple[CloudBridge, AgentProcess]:
    site = "stop-site"
    bridge = CloudBridge(BridgeConfig(BrokerConnection(mosquitto.url), client_id="cloud-stop"))
    await bridge.start()
    agent = AgentProcess(site, mosquitto.url, tmp / "a.db")
    agent.start(failpoints=failpoints)
    uid = "6f1d2c1e-0000-4000-8000-00000000501d"
    bridge.applier.expect("default", "wf", uid, 1, [t["name"] for t in body["tasks"]], site=site)
    bridge.assign(
        site, wire.AssignPayload(uid=uid, generation=1, namespace="default", name="wf", spec=body)
    )
    return bridge, agent


async def until_exited(agent: AgentProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while agent.alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not agent.alive, f"the agent did not stop: {agent.log_tail()}"


@pytest.mark.parametrize("stop", sorted(ACTIONS))
async def test_the_daemon_starts_no_step_after_a_stop_signal_during_a_commit(
    mosquitto: Mosquitto, tmp_path: Path, stop: str
) -> None:
    journal = tmp_path / "journal"
    bridge, agent = await start_daemon_run(
        mosquitto, tmp_path, f"outcome-committed={ACTIONS[stop]}", spec(journal)
    )
    try:
        await until_exited(agent, 30)
        assert agent.proc is not None and agent.proc.returncode == 0, agent.log_tail()
        assert "Traceback" not in agent.log_tail(200), agent.log_tail(200)
        assert_nothing_started_after_a(agent.db, journal)
        assert noted_starts(agent.db) == ["a 1"]
        agent.start()  # no fail point this time
        await until_the_cloud_holds_the_sites_truth(bridge, agent, "stop-site")
        assert_resumed_once_each(agent.db, journal, ("a", "b", "c"))
    finally:
        agent.kill()
        await bridge.stop()


async def test_the_daemon_a_second_signal_still_stops_at_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    bridge, agent = await start_daemon_run(
        mosquitto, tmp_path, "outcome-committed=term", spec(journal, stubborn=True)
    )
    try:
        for _ in range(600):
            if Path(f"{journal}.slow").exists():
                break
            await asyncio.sleep(0.05)
        assert Path(f"{journal}.slow").exists(), agent.log_tail()
        assert agent.alive and agent.proc is not None, "the agent did not wait for slow"
        agent.proc.send_signal(signal.SIGTERM)
        second = time.monotonic()
        await until_exited(agent, 30)
        took = time.monotonic() - second
        assert took < 2.5, f"the second signal took {took:.1f}s to stop the daemon (grace is 5 s)"
        assert_nothing_started_after_a(agent.db, journal)
    finally:
        agent.kill()
        await bridge.stop()
