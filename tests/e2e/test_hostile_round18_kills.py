"""Round 18: the operator killed (SIGKILL) at random moments while Workflows are
admitted and their sites sync, then started again.

Real API server (envtest), real Mosquitto, a real agent.  Each task appends to
a journal of its own runs; at the end every task ran exactly once, every
Workflow is Succeeded with the status its site's database holds, and the site
holds one run per Workflow (no assignment taken twice).
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from services.agent import agent_truth, wait_for
from services.world import World, site_name, spec_for

pytestmark = pytest.mark.envtest

RUNS = 6


def _tasks(name: str, journal: Any) -> list[dict[str, Any]]:
    return [
        {"name": "a", "script": f'echo {name}.a >> "{journal}"; sleep 0.3'},
        {"name": "b", "script": f'echo {name}.b >> "{journal}"; echo n=1 >> "$TIDEFLOW_OUTPUTS"',
         "dependsOn": ["a"]},
    ]  # fmt: skip


def test_the_operator_killed_at_random_moments_applies_every_run_once(world: World) -> None:
    rng = random.Random(18)
    site = site_name()
    agent = world.agent(site)
    journal = world.tmp / "journal"
    names = [f"k{i}" for i in range(RUNS)]
    op = world.operator("--no-leader-election")
    for i, name in enumerate(names):
        world.apply(name, spec_for(site, _tasks(name, journal)))
        if i % 2:  # killed mid-admission, mid-run, mid-sync; started again at once
            time.sleep(rng.uniform(0.0, 1.5))
            op.kill()
            op = world.operator("--no-leader-election")
    time.sleep(rng.uniform(0.5, 2.0))  # once more while they run and sync
    op.kill()
    op = world.operator("--no-leader-election")
    for name in names:
        status = world.wait_phase(name, "Succeeded", timeout=90)
        assert status["progress"] == "2/2", status
    lines = sorted(journal.read_text().split())
    assert lines == sorted(f"{n}.{t}" for n in names for t in "ab"), "a task ran twice or never"
    truth = agent_truth(agent.db)
    assert len(truth["runs"]) == RUNS, sorted(truth["runs"])

    def statuses_are_the_sites() -> bool:
        by_uid = {}
        for name in names:
            obj = world.get(name)
            by_uid[f"{obj['metadata']['uid']}.1"] = obj["status"]
        for run_id, run in agent_truth(agent.db)["runs"].items():
            status = by_uid.get(run_id)
            if status is None or status["phase"] != run["phase"]:
                return False
            listed = {t["name"]: t for t in status.get("tasks", [])}
            for task, t in run["tasks"].items():
                if (listed[task]["phase"], listed[task]["attempt"]) != (t["phase"], t["attempt"]):
                    return False
                if listed[task].get("outputs", {}) != t["outputs"]:
                    return False
        return True

    wait_for(statuses_are_the_sites, 30, "every status = the site's database")
    assert op.alive, op.log_text()[-3000:]
    for earlier in world.operators:
        assert "Traceback" not in earlier.log_text(), earlier.log_text()[-3000:]
