"""Operator shards, with real parts: shard processes, an API server, Mosquitto, simulated sites.

The README promises (When to shard): with ``--shard-count N`` each site
belongs to one shard, which alone admits its Workflows, writes their status
and registers its EdgeSite; a Workflow that selects sites by label is placed
once, whichever shard owns the chosen site; and a change of count (2 -> 3,
every shard restarted with the new count) while records are in flight loses
and doubles nothing.

Each shard runs as a ServiceAccount of its own, so the API server's audit log
says who wrote what.  The sites are ``bench/fleet_sim.py``'s simulated sites
(the agent's own link and outbox syncer, no processes), in one process; their
log says how often each run started and which records were acknowledged.
This test keeps to a dozen sites; the thousand-site run is
``python -m bench.fleet --shards 2`` (README's fleet table).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from services import kube
from services.agent import wait_for
from services.world import OperatorProcess, World

from tideflow_operator.shards import owner

pytestmark = pytest.mark.envtest
REPO = Path(__file__).resolve().parents[2]


class Sites:
    """``bench.fleet_sim`` in one process: its status lines, and its log once stopped."""

    def __init__(self, names: list[str], broker_url: str, tmp: Path, task_seconds: float) -> None:
        self.log = tmp / "sim.json"
        config = tmp / "sim.config.json"
        config.write_text(json.dumps({
            "broker": broker_url, "sites": names, "log": str(self.log),
            "task_seconds": task_seconds, "heartbeat_seconds": 2.0, "ack_timeout": 3.0,
            "start_spread": 0.5, "status_seconds": 0.2,
        }))  # fmt: skip
        self.stderr = (tmp / "sim.stderr").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet_sim", str(config)], cwd=REPO,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, start_new_session=True,
        )  # fmt: skip
        self.status: dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.status = json.loads(line)

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()
        return list(json.loads(self.log.read_text())["sites"]) if self.log.exists() else []


def sites_for_test(tag: str) -> list[str]:
    """A dozen sites with each shard of 2 and of 3 owning some, and some moving 2 -> 3."""
    names: list[str] = []
    i = 0
    while True:
        names.append(f"sh-{tag}-{i:02d}")
        i += 1
        two = Counter(owner(s, 2) for s in names)
        three = Counter(owner(s, 3) for s in names)
        moved = sum(1 for s in names if owner(s, 2) != owner(s, 3))
        if len(names) >= 12 and len(two) == 2 and len(three) == 3 and moved >= 2:
            return names


def shards(world: World, count: int, tag: str) -> list[tuple[OperatorProcess, str]]:
    """Shards 0..count-1, each as ServiceAccount ``<tag>-<count>-<index>``, started together.

    Each waits for its own Lease (``tideflow-operator-<index>``): a shard started
    again takes it over when the stopped one's expires (15 s).
    """
    started = []
    for index in range(count):
        name = f"{tag}-{count}-{index}"
        config, user = kube.service_account_kubeconfig(
            world.cluster, world.namespace, name, world.tmp / f"{name}.kubeconfig"
        )
        op = world.operator(
            "--shard-index", str(index), "--shard-count", str(count),
            "--client-id", f"tideflow-{name}", env={"KUBECONFIG": str(config)},
        )  # fmt: skip
        started.append((op, user))
    for index, (op, _) in enumerate(started):
        wait_for(
            lambda op=op: not op.alive or "operator shard" in op.log_text(), 60, f"shard {index}"
        )
        assert op.alive, op.log_text()[-3000:]
    return started


def status_writes(world: World, user: str) -> dict[str, Counter[str]]:
    """What ``user`` wrote, from the audit log: Workflow statuses and EdgeSites, by name."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for e in kube.audit_events(world.cluster.audit_log, user):
        ref = e.get("objectRef") or {}
        if (
            e["verb"] not in kube.WRITE_VERBS
            or (e.get("responseStatus") or {}).get("code", 200) >= 300
        ):
            continue  # (a write refused, e.g. on a stale resourceVersion, changed nothing)
        if ref.get("resource") == "workflows" and ref.get("subresource") == "status":
            out["workflows"][ref["name"]] += 1
        elif ref.get("resource") == "edgesites":
            out["edgesites"][ref["name"]] += 1
    return out


def workflow(world: World, name: str, placement: dict[str, Any], tasks: int) -> None:
    steps = [{"name": f"t{i}", "command": ["true"], **({"dependsOn": [f"t{i - 1}"]} if i else {})}
             for i in range(tasks)]  # fmt: skip
    world.apply(name, {"placement": placement, "tasks": steps})


def registered(world: World, site: str) -> bool:
    return bool(world.kubectl("get", "edgesite", site, check=False).returncode == 0)


def phases(world: World) -> dict[str, dict[str, Any]]:
    out = world.kubectl("get", "twf", "-n", world.namespace, "-o", "json").stdout
    return {i["metadata"]["name"]: i.get("status") or {} for i in json.loads(out)["items"]}


def wait_succeeded(world: World, names: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    def done() -> dict[str, dict[str, Any]] | None:
        now = phases(world)
        return now if all(now.get(n, {}).get("phase") == "Succeeded" for n in names) else None

    try:
        return dict(wait_for(done, timeout, f"{len(names)} Workflows Succeeded"))
    except AssertionError:
        now = phases(world)
        print({n: (now.get(n, {}).get("phase"), now.get(n, {}).get("reason")) for n in names})
        for op in world.operators:
            print(op.log_text()[-3000:])
        raise


def test_shards_split_the_sites_and_a_scale_from_2_to_3_loses_and_doubles_nothing(
    world: World,
) -> None:
    # A letter first: a label value like 896e4 is a number to kubectl's YAML.
    tag = "t" + uuid.uuid4().hex[:5]
    names = sites_for_test(tag)
    shards2 = shards(world, 2, tag)
    sites = Sites(names, world.broker.url, world.tmp, task_seconds=1.0)
    try:
        wait_for(lambda: sites.status.get("connected") == len(names), 60, "sites connected")

        # --- two shards: one Workflow per site, and selector Workflows over a label
        # that sites of both shards carry.
        for site in names:
            workflow(world, f"one-{site}", {"site": site}, 2)
        line = [s for s in names if owner(s, 2) == 0][:2]
        line += [s for s in names if owner(s, 2) == 1][:2]
        for site in line:
            wait_for(lambda s=site: registered(world, s), 60, f"EdgeSite {site} registered")
            world.kubectl("label", "edgesite", site, f"line={tag}")
        selected = [f"sel-{i}" for i in range(6)]
        for name in selected:
            workflow(world, name, {"siteSelector": {"matchLabels": {"line": tag}}}, 1)
        first = [f"one-{s}" for s in names] + selected
        # And one deleted while it runs: shards use no kopf finalizer, so the cancel
        # comes from the DELETED event (decision 0016).
        doomed = names[-1]
        workflow(world, "doomed", {"site": doomed}, 30)
        wait_for(lambda: phases(world).get("doomed", {}).get("phase") == "Running", 60, "doomed")
        world.kubectl("delete", "twf", "doomed", "-n", world.namespace)
        done = wait_succeeded(world, first, 120)
        assert all(done[n]["site"] in line for n in selected)

        # Each shard wrote the statuses of its own sites' Workflows and registered its
        # own sites only; the API server's audit log says so, not the shards.
        handed = 0
        for index, (_, user) in enumerate(shards2):
            wrote = status_writes(world, user)
            mine = {s for s in names if owner(s, 2) == index}
            assert {w.removeprefix("one-") for w in wrote["workflows"] if w.startswith("one-")} \
                == mine  # fmt: skip
            # A selector Workflow: its site's owner admitted it and wrote its statuses; the
            # shard that placed it, if another, wrote one status (the placement) and no more.
            for name in selected:
                if owner(done[name]["site"], 2) == index:
                    assert wrote["workflows"][name] >= 2
                else:
                    assert wrote["workflows"][name] <= 1
                    handed += wrote["workflows"][name]
            assert set(wrote["edgesites"]) <= mine and wrote["edgesites"]
        print(f"selector Workflows placed by one shard on another's site: {handed}/6")
        assert handed >= 1

        # --- 2 -> 3 with records in flight: long runs, every shard stopped and
        # started again with count 3 while the sites are writing.
        second = [f"two-{s}" for s in names]
        for site in names:
            workflow(world, f"two-{site}", {"site": site}, 6)
        started = len(first) + 1 + len(names)  # (the doomed run too)
        wait_for(lambda: sites.status.get("runs", 0) >= started, 60, "runs started")
        wait_for(lambda: sites.status.get("unacked_records", 0) > 0, 30, "records in flight")
        for op, _ in shards2:
            assert op.proc is not None
            op.proc.terminate()  # both at once, as a rollout would
        for op, _ in shards2:
            op.stop()
        at_stop = phases(world)
        shards3 = shards(world, 3, tag)
        done = wait_succeeded(world, first + second, 120)
        wait_for(lambda: sites.status.get("unacked_records", 1) == 0, 60, "every record acked")
    finally:
        reports = sites.stop()

    # Nothing lost, nothing doubled: each Workflow ran once at its site, its status
    # holds its run's last record, and every record the sites wrote was acknowledged.
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for report in reports:
        for run in report["runs"]:
            runs[run["name"]].append(run)
    assert {n: len(runs[n]) for n in first + second} == {n: 1 for n in first + second}
    assert {n: done[n]["syncedSeq"] for n in first + second} == {
        n: runs[n][0]["seqs"][-1] for n in first + second
    }
    assert all(r["last_seq"] == r["acked"] for r in reports), reports
    assert [r["phase"] for r in runs["doomed"]] == ["Cancelled"]
    # After the restart each shard of 3 wrote only its own sites' statuses, and the
    # moved sites' runs unfinished at the stop were finished by their new owner, shard 2.
    moved = {
        s for s in names
        if owner(s, 2) != owner(s, 3) and at_stop[f"two-{s}"].get("phase") != "Succeeded"
    }  # fmt: skip
    assert moved, "no moved site had a run in flight at the restart"
    for index, (_, user) in enumerate(shards3):
        wrote = set(status_writes(world, user)["workflows"])
        sites_written = {done[w]["site"] for w in wrote if not w.startswith("sel-")}
        assert sites_written <= {s for s in names if owner(s, 3) == index}
        if index == 2:
            assert {f"two-{s}" for s in moved} <= wrote


async def test_listing_an_empty_namespace_is_empty_not_an_error(world: World) -> None:
    """A watched namespace with no Workflow: the API server answers the metadata-only
    list with ``items: null``.  The reconcile's listing raised on it, every round
    (found by ``bench.fleet``, whose ``storm`` namespace is empty until the storm),
    so missed deletions were never cancelled while any watched namespace was empty;
    a shard's EdgeSite listing takes the same path."""
    from tideflow_operator.kube import Kube

    api = world.cluster.api_client()
    try:
        kube = Kube(api)
        assert await kube.list_workflow_uids([world.namespace]) == {}
        assert isinstance(await kube.list_edgesites(), dict)
    finally:
        api.close()
