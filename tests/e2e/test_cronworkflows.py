"""CronWorkflows against a real API server, operator, Mosquitto and agents.

Proves: a CronWorkflow with a label selector reaches the two matching
EdgeSites and not the third; relabelling the third adds it; the sites fire it
from their own clocks; ``kubectl delete tcwf`` withdraws it from a site that
was offline at the time, when that site returns.  What each site holds is
read with ``tideflow-agent schedules --json`` on its own database.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import wait_for
from services.world import World, site_name

pytestmark = [pytest.mark.envtest, pytest.mark.broker]


def held(db: Path) -> list[dict[str, Any]]:
    """What ``tideflow-agent schedules --json`` says the site holds."""
    if not db.exists():
        return []
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "schedules", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        return []
    return list(json.loads(out.stdout))


def fired(db: Path, name: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "runs", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        return 0
    return sum(1 for r in json.loads(out.stdout) if r.get("cron", {}).get("name") == name)


def edgesite(world: World, name: str, labels: dict[str, str]) -> None:
    manifest = {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "EdgeSite",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
    }
    world.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))


def test_selector_fan_out_relabel_and_delete_reaching_an_offline_site(world: World) -> None:
    a, b, c = site_name(), site_name(), site_name()
    edgesite(world, a, {"region": "north"})
    edgesite(world, b, {"region": "north"})
    edgesite(world, c, {"region": "south"})
    for site in (a, b, c):
        world.agent(site)
    world.operator()
    manifest = {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": "etl", "namespace": world.namespace},
        "spec": {
            "schedule": "@every 2s",
            "placement": {"siteSelector": {"matchLabels": {"region": "north"}}},
            "concurrencyPolicy": "Forbid",
            "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
        },
    }
    world.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    db = {site: world.agents[site].db for site in (a, b, c)}

    def holding() -> set[str]:
        return {s for s in (a, b, c) if any(h["name"] == "etl" for h in held(db[s]))}

    wait_for(lambda: holding() == {a, b}, 60, "the schedule on the two north sites")
    # The sites fire it themselves.
    wait_for(lambda: fired(db[a], "etl") >= 1 and fired(db[b], "etl") >= 1, 30, "fires")
    assert fired(db[c], "etl") == 0
    out = world.kubectl("get", "tcwf", "-n", world.namespace).stdout
    assert "@every 2s" in out and "SCHEDULE" in out

    # Relabelling the third site adds it.
    world.kubectl("label", "edgesite", c, "region=north", "--overwrite")
    wait_for(lambda: holding() == {a, b, c}, 60, "the relabelled site to get the schedule")

    # Delete while b is offline: b loses it when it returns, the others at once.
    world.agents[b].kill()
    world.kubectl("delete", "tcwf", "etl", "-n", world.namespace)
    wait_for(lambda: holding() == {b}, 60, "the online sites to drop the schedule")
    world.agent(b)  # back online, same database
    wait_for(lambda: holding() == set(), 60, "the returning site to drop it too")
