"""kill -9 of a real ``tideflow-agent run`` (daemon) during a chain of short tasks,
over the real Mosquitto, with the cloud's bridge applying what it sends.

Since decision 0042 most of these tasks report their outcome alone (no Running
record), and kills land around the 20 ms Running timer.  The cloud must still
apply every record exactly once and end with the database's truth: every task
Succeeded with the attempt the site holds, counts and progress exact.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from services.agent import AgentProcess, agent_truth, until_the_cloud_holds_the_sites_truth
from services.broker import Mosquitto

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge

N = 30


def chain(rng: random.Random) -> dict[str, Any]:
    return {
        "tasks": [
            {
                "name": f"t{i:02d}",
                "command": ["sleep", f"{rng.choice((0, 0.01, 0.02, 0.03, 0.04)):.2f}"],
                **({"dependsOn": [f"t{i - 1:02d}"]} if i else {}),
            }
            for i in range(N)
        ]
    }


@pytest.mark.parametrize("seed", range(2))
async def test_a_daemon_killed_during_a_chain_of_short_tasks_reports_each_record_once(
    mosquitto: Mosquitto, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    site = f"chain-site-{seed}"
    bridge = CloudBridge(BridgeConfig(BrokerConnection(mosquitto.url), client_id=f"cloud-{site}"))
    await bridge.start()
    agent = AgentProcess(site, mosquitto.url, tmp_path / "a.db")
    agent.start()
    uid = f"6f1d2c1e-0000-4000-8000-0000000c{seed:04d}"
    try:
        body = chain(rng)
        names = [t["name"] for t in body["tasks"]]
        bridge.applier.expect("default", "wf", uid, 1, names, site=site)
        bridge.assign(
            site,
            wire.AssignPayload(uid=uid, generation=1, namespace="default", name="wf", spec=body),
        )
        done_before = 0
        for _ in range(2):
            # Wait for the chain to go on (again), then kill at a random moment.
            for _ in range(400):
                tasks = agent_truth(agent.db)["runs"].get(f"{uid}.1", {}).get("tasks", {})
                done = sum(t["phase"] == "Succeeded" for t in tasks.values())
                if done > done_before:
                    done_before = done
                    break
                await asyncio.sleep(0.025)
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            agent.kill()
            agent.start()
        truth = await until_the_cloud_holds_the_sites_truth(bridge, agent, site, tries=1200)
        assert bridge.records_applied == truth["last_seq"], "a record applied twice or never"
        tasks = truth["runs"][f"{uid}.1"]["tasks"]
        assert {t["phase"] for t in tasks.values()} == {"Succeeded"}
        view = bridge.applier.view("default", "wf")
        assert view is not None
        assert view.progress == f"{N}/{N}"
        assert {n: (t.phase, t.attempt) for n, t in view.tasks.items()} == {
            n: (t["phase"], t["attempt"]) for n, t in tasks.items()
        }
    finally:
        agent.kill()
        await bridge.stop()
