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
from datetime import UTC, datetime
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


def cron_workflow(
    world: World, name: str, schedule: str, match_labels: dict[str, str], **spec: object
) -> dict[str, Any]:
    """A CronWorkflow of one `true` task on the sites ``match_labels`` selects."""
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": name, "namespace": world.namespace},
        "spec": {
            "schedule": schedule,
            "placement": {"siteSelector": {"matchLabels": match_labels}},
            **spec,
            "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
        },
    }


def test_selector_fan_out_relabel_and_delete_reaching_an_offline_site(world: World) -> None:
    a, b, c = site_name(), site_name(), site_name()
    edgesite(world, a, {"region": "north"})
    edgesite(world, b, {"region": "north"})
    edgesite(world, c, {"region": "south"})
    for site in (a, b, c):
        world.agent(site)
    world.operator()
    manifest = cron_workflow(
        world, "etl", "@every 2s", {"region": "north"}, concurrencyPolicy="Forbid"
    )
    bad = {**manifest, "spec": {**manifest["spec"], "schedule": "0 2 * *"}}
    refused = world.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert refused.returncode != 0 and "spec.schedule" in refused.stderr
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


def site_runs(db: Path, name: str) -> dict[str, str]:
    """Run name -> uid of the runs the site's schedule ``name`` fired."""
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "runs", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        return {}
    return {
        r["name"]: r["uid"] for r in json.loads(out.stdout) if r.get("cron", {}).get("name") == name
    }


def test_fired_runs_become_workflow_objects_once_and_history_limits_hold(world: World) -> None:
    a, b = site_name(), site_name()
    for site in (a, b):
        edgesite(world, site, {"line": "x"})
        world.agent(site)
    world.operator()
    manifest = cron_workflow(
        world, "tick", "@every 1s", {"line": "x"}, successfulJobsHistoryLimit=2
    )
    world.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    db = {s: world.agents[s].db for s in (a, b)}
    wait_for(lambda: all(len(site_runs(db[s], "tick")) >= 5 for s in (a, b)), 60, "5 fires each")

    def objects() -> list[dict[str, Any]]:
        out = world.kubectl(
            "get", "twf", "-n", world.namespace, "-l", "tideflow.io/cron-workflow=tick",
            "-o", "json",
        ).stdout  # fmt: skip
        return list(json.loads(out)["items"])

    cron = json.loads(
        world.kubectl("get", "tcwf", "tick", "-n", world.namespace, "-o", "json").stdout
    )

    def settled() -> bool:
        items = objects()
        per_site: dict[str, int] = {}
        for item in items:
            if (item.get("status") or {}).get("phase") == "Succeeded":
                site = item["metadata"]["labels"]["tideflow.io/site"]
                per_site[site] = per_site.get(site, 0) + 1
        return bool(items) and all(n == 2 for n in per_site.values()) and len(per_site) == 2

    wait_for(settled, 60, "two Succeeded Workflow objects per site (history limit)")
    world.kubectl("patch", "tcwf", "tick", "-n", world.namespace, "--type=merge",
                  "-p", '{"spec": {"suspend": true}}')  # fmt: skip
    # A run fired just before the suspend may have its object but not yet its status.
    wait_for(
        lambda: all("runUid" in (i.get("status") or {}) for i in objects()),
        60,
        "every Workflow object's status.runUid",
    )
    for item in objects():
        meta = item["metadata"]
        site = meta["labels"]["tideflow.io/site"]
        assert meta["ownerReferences"][0]["uid"] == cron["metadata"]["uid"]
        assert meta["ownerReferences"][0]["kind"] == "CronWorkflow"
        assert meta["annotations"]["tideflow.io/scheduled-time"].endswith("Z")
        # One to one with a run the site fired: same name, the site's run uid.
        assert site_runs(db[site], "tick")[meta["name"]] == item["status"]["runUid"]
    names = [i["metadata"]["name"] for i in objects()]
    assert len(names) == len(set(names))
    status = json.loads(
        world.kubectl("get", "tcwf", "tick", "-n", world.namespace, "-o", "json").stdout
    )["status"]
    assert status["siteCount"] == 2
    assert {s["site"] for s in status["sites"]} == {a, b}
    assert all(s["lastSuccessfulTime"] for s in status["sites"])


def test_a_delete_while_the_operator_is_down_reaches_an_offline_site(world: World) -> None:
    """The restarted operator knows nothing of the deleted CronWorkflow: the site's
    heartbeat lists what it holds, and what no CronWorkflow places there is withdrawn."""
    site = site_name()
    edgesite(world, site, {"line": "l-y"})
    world.agent(site)
    operator = world.operator()
    manifest = cron_workflow(world, "gone", "@every 2s", {"line": "l-y"})
    world.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    db = world.agents[site].db
    wait_for(lambda: [h["name"] for h in held(db)] == ["gone"], 60, "the schedule at the site")
    world.agents[site].kill()  # the site goes offline
    operator.kill()  # and the operator is down when the CronWorkflow is deleted
    world.kubectl("delete", "tcwf", "gone", "-n", world.namespace)
    world.operator()
    world.agent(site)  # the site returns, still holding it
    wait_for(lambda: held(db) == [], 60, "the returning site to drop the deleted schedule")


def test_sharded_operators_each_keep_their_own_sites_in_one_status(world: World) -> None:
    """Two operator shards write one CronWorkflow's status: each its own sites,
    neither reverting the other's (a status write carries the other shard's
    entries as read, and is refused if the object changed since)."""
    from tideflow_operator.shards import owner

    names = (site_name() for _ in range(1000))
    by_shard: dict[int, str] = {}
    while len(by_shard) < 2:
        candidate = next(names)
        by_shard.setdefault(owner(candidate, 2), candidate)
    sites = sorted(by_shard.values())
    for site in sites:
        edgesite(world, site, {"line": "sharded"})
        world.agent(site)
    for index in (0, 1):
        world.operator("--shard-index", str(index), "--shard-count", "2")
    manifest = cron_workflow(world, "both", "@every 1s", {"line": "sharded"})
    world.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    db = {s: world.agents[s].db for s in sites}
    wait_for(lambda: all(fired(db[s], "both") >= 4 for s in sites), 60, "4 fires at each site")
    world.kubectl("patch", "tcwf", "both", "-n", world.namespace, "--type=merge",
                  "-p", '{"spec": {"suspend": true}}')  # fmt: skip

    def latest_fire(site: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "runs", "--db", str(db[site]), "--json"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        times = [
            r["cron"]["scheduledTime"]
            for r in json.loads(out.stdout)
            if r.get("cron", {}).get("name") == "both" and r.get("phase") == "Succeeded"
        ]
        return datetime.fromtimestamp(max(times), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def status_matches_the_sites() -> bool:
        status = (
            json.loads(
                world.kubectl("get", "tcwf", "both", "-n", world.namespace, "-o", "json").stdout
            ).get("status")
            or {}
        )
        written = {s["site"]: s.get("lastSuccessfulTime") for s in status.get("sites") or []}
        seen.update(written=written, truth={s: latest_fire(s) for s in sites})
        return status.get("siteCount") == 2 and written == seen["truth"]

    seen: dict[str, object] = {}

    # Once the schedule is suspended every site's last success is final; a shard
    # that wrote its stale copy of the other shard's site would leave it wrong.
    try:
        wait_for(status_matches_the_sites, 60, "each site's last success")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: status {seen['written']}, sites {seen['truth']}") from None
