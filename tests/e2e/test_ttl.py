"""Finished Workflows are deleted after their TTL (or the operator's default), and only those.

A real API server, Mosquitto, operator and agent; the TTLs are short so the
test stays quick.  The assignment the agent stored carries no
``ttlSecondsAfterFinished`` (a cloud-only field: an older agent would refuse it).
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from services.agent import wait_for
from services.world import World, site_name, spec_for

pytestmark = pytest.mark.envtest

QUICK = [{"name": "a", "command": ["true"]}]


def exists(world: World, name: str) -> bool:
    out = world.kubectl(
        "get", "twf", name, "-n", world.namespace, "--ignore-not-found", "-o", "name", check=True
    ).stdout
    return bool(out.strip())


def test_finished_workflows_are_deleted_after_their_ttl_or_the_default(world: World) -> None:
    site = site_name()
    op = world.operator(env={"TIDEFLOW_TTL_SECONDS_AFTER_FINISHED": "2"})
    agent = world.agent(site)
    world.apply("own-ttl", spec_for(site, QUICK, ttlSecondsAfterFinished=1))
    world.apply("default-ttl", spec_for(site, QUICK))
    world.apply("kept", spec_for(site, QUICK, ttlSecondsAfterFinished=3600))
    world.wait_phase("kept", "Succeeded")

    wait_for(
        lambda: not exists(world, "own-ttl") and not exists(world, "default-ttl"), 60,
        "the Workflows past their TTL deleted",
    )  # fmt: skip
    assert world.status("kept")["phase"] == "Succeeded"
    log = op.log_text()
    for name in ("own-ttl", "default-ttl"):
        assert f"Workflow {world.namespace}/{name} deleted: its ttlSecondsAfterFinished" in log
    assert "kept deleted" not in log

    with sqlite3.connect(agent.db) as db:
        specs = {name: json.loads(spec) for name, spec in db.execute("SELECT name, spec FROM runs")}
    assert set(specs) == {"own-ttl", "default-ttl", "kept"}
    assert all("ttlSecondsAfterFinished" not in spec for spec in specs.values())
