"""Round 20, cloud side: a fired run's name taken first, a silent watch, a probe in a flood.

* A fired run's Workflow name is ``<cron>-<site>-<unix seconds>``
  (``tideflow.schedule.run_name``): anyone who may create Workflows in the
  namespace can make one of that name before the site fires.  The operator
  took "already exists" as "made before a crash" and wrote the site's run into
  that object (``status.runUid``, the tasks' phases and outputs under someone
  else's spec); one placed elsewhere silently swallowed the run's records.  Now
  an existing object is the run's only if it is the one the operator makes
  (owner reference, labels, scheduled time, spec); otherwise the run's records
  go nowhere, the site is still acked, and a Warning Event on the CronWorkflow
  names the taken name.  Real API server (envtest), Mosquitto, operator and
  agent processes.
* The console's watches, gone silent.  Each kind's watch asked the API server
  to end it after 240 s and read with a time limit of 255 s: a watch whose
  connection stayed open but delivered nothing (an API server stopped, a proxy
  that black-holes) was noticed after some 250 s, and the page meanwhile showed
  what it last had as current.  Now the server ends each watch after
  ``WATCH_SECONDS`` (30 s; the next resumes where it stopped, without a list)
  and a read waits at most the client's request time (15 s) more: a silent
  watch is said on the page (the kind's ``error``) within
  ``STALE_AFTER_SECONDS`` (45 s) and listed again as soon as the API server
  answers.  Real console command, real API server behind a
  loopback proxy the test turns into a black hole and back.
* A probe in a flood.  The operator's probe and metrics servers keep at most
  ``MAX_CONNECTIONS`` connections, a new one shutting the oldest: a kubelet
  probe that arrived while connections kept coming was shut before its thread
  read it, and failed its 1 s.  Real probe server in a process of its own,
  flooded from two other processes, probed from the test's.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import wait_for
from services.broker import Mosquitto
from services.kube import EnvtestCluster
from services.world import World, install_crds, site_name

from tideflow import wire
from tideflow.schedule import run_name, run_uid
from tideflow.tools.fleet.console.hub import STALE_AFTER_SECONDS
from tideflow_operator.cron import CronPlan, _object_of, not_made_for

EVERY = 4


def _apply(world: World, manifest: dict[str, Any]) -> None:
    world.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))


def _workflow(world: World, name: str, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name, "namespace": world.namespace, **meta},
        "spec": {},
    }


def _cron_events(world: World, cron: str) -> list[dict[str, Any]]:
    out = world.kubectl("get", "events", "-n", world.namespace, "-o", "json").stdout
    return [
        e
        for e in json.loads(out)["items"]
        if e["involvedObject"].get("kind") == "CronWorkflow"
        and e["involvedObject"].get("name") == cron
    ]


def _holds(db: Path, name: str) -> bool:
    """The site holds schedule ``name`` (``tideflow-agent schedules --json``)."""
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "schedules", "--db", str(db), "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return out.returncode == 0 and any(h["name"] == name for h in json.loads(out.stdout))


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _status(world: World, name: str) -> dict[str, Any]:
    done = world.kubectl("get", "twf", name, "-n", world.namespace, "-o", "json", check=False)
    if done.returncode != 0:
        return {}
    return dict(json.loads(done.stdout).get("status") or {})


def test_a_workflow_made_first_under_a_fired_runs_name_gets_none_of_the_runs_records(
    envtest: EnvtestCluster, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    install_crds(envtest)
    world = World(envtest, mosquitto, tmp_path)
    try:
        site, elsewhere = site_name(), site_name()
        for name, labels in ((site, {"line": "sq"}), (elsewhere, {"line": "other"})):
            _apply(world, {"apiVersion": "tideflow.io/v1alpha1", "kind": "EdgeSite",
                           "metadata": {"name": name, "labels": labels}, "spec": {}})  # fmt: skip
        world.agent(site)
        world.operator()
        tasks = [{"name": "a", "command": ["true"]}]
        _apply(world, {
            "apiVersion": "tideflow.io/v1alpha1", "kind": "CronWorkflow",
            "metadata": {"name": "etl", "namespace": world.namespace},
            "spec": {"schedule": f"@every {EVERY}s",
                     "placement": {"siteSelector": {"matchLabels": {"line": "sq"}}},
                     "successfulJobsHistoryLimit": 10, "workflowSpec": {"tasks": tasks}},
        })  # fmt: skip
        cron = json.loads(world.kubectl("get", "tcwf", "etl", "-n", world.namespace,
                                        "-o", "json").stdout)  # fmt: skip
        wait_for(lambda: _holds(world.agents[site].db, "etl"), 60, "the schedule at the site")
        # The times the site fires next, each name made first by someone else.
        first = (int(time.time()) // EVERY + 3) * EVERY
        forged, waiting, assigned = (f"etl-{site}-{first + EVERY * k}" for k in range(3))
        owner = {"apiVersion": "tideflow.io/v1alpha1", "kind": "CronWorkflow", "name": "etl",
                 "uid": cron["metadata"]["uid"], "controller": True,
                 "blockOwnerDeletion": False}  # fmt: skip
        # Labelled and owned as a fired run is, but with a spec of its own.
        squat = _workflow(
            world,
            forged,
            labels={"tideflow.io/cron-workflow": "etl", "tideflow.io/site": site},
            ownerReferences=[owner],
            annotations={"tideflow.io/scheduled-time": _stamp(first)},
        )
        squat["spec"] = {"tasks": [{"name": "a", "command": ["sh", "-c", "echo not-etl"]}],
                         "placement": {"site": site}}  # fmt: skip
        # An ordinary Workflow for a site that is not there: never assigned.
        plain = _workflow(world, waiting)
        nowhere = {"siteSelector": {"matchLabels": {"zone": "none"}}}
        plain["spec"] = {"tasks": tasks, "placement": nowhere}
        # An ordinary Workflow assigned to another site: its run holds the name.
        other = _workflow(world, assigned)
        other["spec"] = {"tasks": tasks, "placement": {"site": elsewhere}}
        for manifest in (squat, plain, other):
            _apply(world, manifest)
        assert time.time() < first, "the names were made too late to come first"
        wait_for(lambda: _status(world, assigned).get("site") == elsewhere, 60, "the other run")
        # A later fire's object is made as usual: the site's acks were not held back.
        later = f"etl-{site}-{first + EVERY * 4}"
        wait_for(lambda: _status(world, later).get("phase") == "Succeeded", 90, later)

        # The object someone else made is theirs still: not written, not deleted.
        theirs = json.loads(world.kubectl("get", "twf", forged, "-n", world.namespace,
                                          "-o", "json").stdout)  # fmt: skip
        assert "runUid" not in (theirs.get("status") or {}), theirs
        assert theirs["spec"]["tasks"][0]["command"][-1] == "echo not-etl"
        assert "runUid" not in _status(world, waiting), _status(world, waiting)
        assert _status(world, assigned).get("site") == elsewhere
        assert _status(world, assigned).get("runUid") is None
        # A Warning Event on the CronWorkflow names each taken name.
        wait_for(
            lambda: all(
                any(name in e["message"] and e["type"] == "Warning" for e in events)
                for events in [_cron_events(world, "etl")]
                for name in (forged, waiting, assigned)
            ),
            30,
            "a Warning Event naming each taken name",
        )
    finally:
        for op in world.operators:
            print(op.log_text()[-4000:])
        world.close()


def test_the_object_made_before_a_kill_is_the_runs_and_one_edited_is_not(
    envtest: EnvtestCluster, tmp_path: Path
) -> None:
    """A kill -9 between making the object and writing its status (or acking the
    site): the site sends the record again, the name exists, and the object, as the
    API server keeps it, must be taken as the run's, not a
    second one made nor the run refused.  The same object with another spec is not."""
    install_crds(envtest)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    plan = CronPlan()
    cron_body = {
        "apiVersion": "tideflow.io/v1alpha1", "kind": "CronWorkflow",
        "metadata": {"name": "etl", "namespace": namespace, "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {"schedule": "@every 4s", "placement": {"site": "s-1"},
                 "workflowSpec": {"tasks": [{"name": "a", "command": ["true"],
                                             "retry": {"limit": 2}}]}},
    }  # fmt: skip
    plan.upsert(cron_body)
    cron = plan.crons[cron_body["metadata"]["uid"]]
    at = datetime.fromtimestamp(1_796_000_000, UTC)
    run = wire.RunRecord(
        uid=run_uid(cron.uid, 1, at), generation=1, namespace=namespace,
        name=run_name("etl", "s-1", at), phase="Running",
        cron={"uid": cron.uid, "name": "etl", "generation": 1, "scheduledTime": at.timestamp()},
    )  # fmt: skip
    body = _object_of(cron, "s-1", run)
    envtest.kubectl("create", "-f", "-", input=json.dumps(body))
    kept = json.loads(envtest.kubectl("get", "twf", run.name, "-n", namespace, "-o", "json").stdout)
    assert not_made_for(kept, body, run.uid) is None
    edited = json.loads(json.dumps(kept))
    edited["spec"]["tasks"][0]["command"] = ["sh", "-c", "echo other"]
    assert not_made_for(edited, body, run.uid) == "its spec is not the CronWorkflow's"
    edited["status"] = {"runUid": run.uid}  # linked by the operator: its spec is anyone's
    assert not_made_for(edited, body, run.uid) is None
    edited["status"] = {"runUid": "another"}
    assert not_made_for(edited, body, run.uid) == "it is linked to another run (another)"


def test_a_console_whose_watches_go_silent_says_so_and_lists_again_within_a_minute(
    envtest: EnvtestCluster, tmp_path: Path
) -> None:
    from urllib.parse import urlparse

    from test_hostile_round19_cloud import CuttableProxy, _through

    install_crds(envtest)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)

    def workflow(name: str) -> None:
        envtest.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"placement": {"site": "s"}, "tasks": [{"name": "a", "script": "true"}]},
        }))  # fmt: skip

    workflow("before")
    config = yaml.safe_load(envtest.kubeconfig.read_text())
    server = urlparse(config["clusters"][0]["cluster"]["server"])
    proxy = CuttableProxy((server.hostname or "127.0.0.1", int(server.port or 443)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tideflow.cli", "console", "--port", "0", "-n", namespace,
         "--kubeconfig", str(_through(proxy, envtest, tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=envtest.env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        found = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline().decode())
        assert found, "the console did not start"
        url = found.group(0)

        def shown() -> dict[str, Any]:
            with urllib.request.urlopen(
                f"{url}api/workflows?namespace={namespace}", timeout=10
            ) as r:
                return dict(json.loads(r.read()))

        wait_for(lambda: [r["name"] for r in shown()["items"]] == ["before"], 30, "the listing")
        time.sleep(2)  # its watches are open
        proxy.blackhole()  # every connection open, or new, delivers nothing from now on
        cut = time.monotonic()
        workflow("after")  # (straight to the API server)
        wait_for(lambda: shown()["status"]["workflows"]["error"], 60, "the page to say it is stale")
        said = time.monotonic() - cut
        assert [r["name"] for r in shown()["items"]] == ["before"]
        proxy.cut.clear()  # the API server answers again
        back = time.monotonic()
        wait_for(lambda: len(shown()["items"]) == 2, 60, "the console to list again")
        relisted = time.monotonic() - back
        assert shown()["status"]["workflows"]["error"] is None
    finally:
        proc.terminate()
        proc.wait(10)
        proxy.close()
    assert said < STALE_AFTER_SECONDS + 5, said  # (and the poll)
    assert relisted < 50, relisted  # a list timed out in the black hole, and a back-off


FLOOD = """
import socket, sys, time
port, until, rate = int(sys.argv[1]), time.monotonic() + float(sys.argv[2]), float(sys.argv[3])
held, made, began = [], 0, time.monotonic()
while time.monotonic() < until:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))  # and never a byte
    made += 1
    held.append(sock)
    if len(held) > 2000:
        held.pop(0).close()
    ahead = made / rate - (time.monotonic() - began)
    if ahead > 0:
        time.sleep(ahead)
"""

SERVE = """
import sys, time
from tideflow_operator.cli import Health, serve_health
from tideflow_operator.metrics import serve_metrics
port = int(sys.argv[2])
if sys.argv[1] == "probes":
    serve_health(f"http://127.0.0.1:{port}/healthz", Health())
else:
    serve_metrics(port, lambda: None, addr="127.0.0.1")
print("serving", flush=True)
time.sleep(600)
"""


def _probe(port: int, path: str) -> str:
    """One kubelet-like probe (1 s in all, its default), from an address of its own:
    the flood's closed connections must not use up the ports it connects from."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        sock.bind(("127.0.0.2", 0))
        began = time.monotonic()
        try:
            sock.connect(("127.0.0.1", port))
        except OSError as exc:
            return f"connect: {exc!r} after {time.monotonic() - began:.2f} s"
        sock.settimeout(max(0.01, 1.0 - (time.monotonic() - began)))
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = sock.recv(12)
        except OSError as exc:
            return f"answer: {exc!r} after {time.monotonic() - began:.2f} s"
        return "" if answer == b"HTTP/1.0 200" else f"answer: {answer!r}"


@pytest.mark.parametrize("which", ["probes", "metrics"])
def test_a_probe_during_a_flood_of_new_idle_connections_is_answered_within_a_second(
    which: str,
) -> None:
    """Two processes open 2,000 connections a second each, never sending a byte;
    30 probes meanwhile, each answered within the kubelet's default second."""
    from services.metrics import free_port

    port = free_port()
    path = "/healthz" if which == "probes" else "/metrics"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, which, str(port)],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    floods: list[subprocess.Popen[bytes]] = []
    try:
        assert server.stdout is not None and server.stdout.readline() == b"serving\n"
        assert _probe(port, path) == ""
        floods = [
            subprocess.Popen([sys.executable, "-c", FLOOD, str(port), "60", "2000"])
            for _ in range(2)
        ]
        time.sleep(2)  # the flood is on
        failed = []
        for _ in range(30):
            if said := _probe(port, path):
                failed.append(said)
            time.sleep(0.2)
        assert all(flood.poll() is None for flood in floods), "the flood ended early"
        assert failed == [], failed
    finally:
        for flood in floods:
            flood.kill()
            flood.wait()
        server.kill()
        server.wait()
