"""``tideflow get / watch / submit / list / sites / logs`` against a real fleet.

One world per module (a namespace, a real operator, one live agent and one
dark site on the shared API server) serves every test, so the runs overlap:
a long one stays Running while the others finish.  Commands run through the
CLI's own ``main`` with the cluster's kubeconfig and their output captured
(not a TTY, so the plain output is what is checked; ``-o json`` is parsed);
a few run as a user would, as ``python -m tideflow.cli`` subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import wait_for
from services.broker import Mosquitto
from services.world import World, install_crds, sample_tasks, spec_for

pytestmark = pytest.mark.envtest


class Fleet:
    def __init__(self, world: World, live: str, dark: str) -> None:
        self.world, self.live, self.dark = world, live, dark
        self.ns = world.namespace

    def cli(
        self, *args: str, timeout: float = 90, kubeconfig: str | None = None, process: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``tideflow ARGS`` with the cluster's kubeconfig: in this process (the CLI's own
        ``main``, output captured), or as a subprocess with ``process=True``."""
        config = kubeconfig or str(self.world.cluster.kubeconfig)
        if not process:
            from tideflow import cli

            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main([*args, "--kubeconfig", config])
            return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
        env = {**os.environ, "PYTHONSAFEPATH": "1", "KUBECONFIG": config}
        return subprocess.run(
            [sys.executable, "-m", "tideflow.cli", *args], capture_output=True, text=True,
            env=env, cwd=self.world.tmp, timeout=timeout, check=False,
        )  # fmt: skip

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "-o", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def fleet(envtest: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from services.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    install_crds(envtest)
    suffix = uuid.uuid4().hex[:5]
    live, dark = f"live-{suffix}", f"dark-{suffix}"
    with Mosquitto() as broker:
        world = World(envtest, broker, tmp_path_factory.mktemp("fleet-cli"))
        try:
            world.operator()
            world.agent(live)
            world.agent(dark)
            wait_for(lambda: _connected(world, dark) is True, 60, "the dark site to register")
            world.agents[dark].kill()
            wait_for(lambda: _connected(world, dark) is False, 60, "the dark site to go dark")
            yield Fleet(world, live, dark)
        finally:
            world.close()


def _connected(world: World, site: str) -> bool | None:
    got = world.kubectl("get", "edgesite", site, "-o", "json", check=False)
    if got.returncode != 0:
        return None
    return bool((json.loads(got.stdout).get("status") or {}).get("connected"))


def _failing_spec(site: str) -> dict[str, Any]:
    return spec_for(
        site,
        [
            {"name": "fetch", "script": "echo fetched"},
            {
                "name": "load",
                "dependsOn": ["fetch"],
                "script": "echo nope >&2; exit 3",
                "retry": {"limit": 2, "backoff": {"seconds": 0.1, "maxSeconds": 0.2}, "jitter": 0},
            },
        ],
        onFailure=[{"name": "cleanup", "script": "echo cleaned"}],
    )


def test_get_shows_a_succeeded_run_as_a_tree_in_dag_order(fleet: Fleet) -> None:
    fleet.world.apply("ok", spec_for(fleet.live, sample_tasks(0.05, 2)))
    fleet.world.wait_phase("ok", "Succeeded")
    result = fleet.cli("get", "ok", "-n", fleet.ns, process=True)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"Name:      {fleet.ns}/ok" in text
    assert "Phase:     ✔ Succeeded" in text and "Progress:  3/3" in text
    assert f"{fleet.live}  connected" in text
    lines = [line for line in text.splitlines() if "Succeeded" in line and "✔" in line]
    names = [line.split()[1] if line.startswith("✔") else line.split()[2] for line in lines[1:]]
    assert names == ["extract", "step0", "step1"], text
    assert "    └ ✔ step1" in text  # depth 2
    detail = fleet.json("get", "ok", "-n", fleet.ns)
    status = fleet.world.status("ok")
    assert detail["traceId"] == status["traceId"] and len(detail["traceId"]) == 32
    assert [t["name"] for t in detail["tasks"]] == ["extract", "step0", "step1"]
    assert [t["depth"] for t in detail["tasks"]] == [0, 1, 2]
    assert all(t["exitCode"] == 0 and t["attempt"] == 1 for t in detail["tasks"])
    assert detail["siteConnected"] is True and detail["onFailure"] == []
    as_yaml = fleet.cli("get", "ok", "-n", fleet.ns, "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == {**detail, **_moving(yaml.safe_load(as_yaml.stdout))}


def _moving(detail: dict[str, Any]) -> dict[str, Any]:
    """Fields that move between two calls (the site's last-seen time)."""
    return {k: detail[k] for k in ("siteLastSeen", "siteOfflineForSeconds")}


def test_get_shows_retries_and_the_onfailure_tasks_apart(fleet: Fleet) -> None:
    fleet.world.apply("bad", _failing_spec(fleet.live))
    fleet.world.wait_phase("bad", "Failed")
    wait_for(
        lambda: any(
            t.get("compensation") and t["phase"] == "Succeeded"
            for t in fleet.world.status("bad").get("tasks", [])
        ),
        30,
        "the onFailure task to finish",
    )
    detail = fleet.json("get", "bad", "-n", fleet.ns)
    tasks = {t["name"]: t for t in detail["tasks"]}
    assert detail["phase"] == "Failed"
    assert tasks["load"]["phase"] == "Failed" and tasks["load"]["attempt"] == 3
    assert tasks["load"]["exitCode"] == 3 and tasks["fetch"]["phase"] == "Succeeded"
    assert [t["name"] for t in detail["onFailure"]] == ["cleanup"]
    assert detail["onFailure"][0]["phase"] == "Succeeded"
    text = fleet.cli("get", "bad", "-n", fleet.ns).stdout
    main, _, compensation = text.partition("onFailure:")
    assert "✖ load" in main and "cleanup" not in main
    load_line = next(line for line in main.splitlines() if "✖ load" in line)
    cells = load_line.split()
    assert cells[cells.index("load") + 1 : cells.index("load") + 3] == ["Failed", "3"]
    assert cells[cells.index("load") + 4] == "3"  # the exit code, after the duration
    assert "✔ cleanup" in compensation
    # The failed attempt's stderr reached the cloud: `tideflow logs` shows it.
    wait_for(
        lambda: "nope" in fleet.cli("logs", "bad", "load", "-n", fleet.ns).stdout,
        30,
        "the load task's log tail in the status",
    )
    tail = fleet.json("logs", "bad", "load", "-n", fleet.ns)
    assert tail["synced"] is True and tail["attempt"] == 3
    assert tail["logs"]["stderr"] == "nope\n"


def test_get_of_a_running_run_and_of_one_on_a_dark_site(fleet: Fleet) -> None:
    fleet.world.apply(
        "long",
        spec_for(
            fleet.live,
            [
                {"name": "first", "script": "true"},
                {"name": "slow", "dependsOn": ["first"], "script": "sleep 120"},
            ],
        ),
    )
    # A run's progress is written at most every 2 s: wait for the slow task's Running too.
    wait_for(
        lambda: (
            {t["name"]: t["phase"] for t in fleet.world.status("long").get("tasks", [])}.get("slow")
            == "Running"
        ),
        60,
        "slow to start",
    )
    fleet.world.apply("stranded", spec_for(fleet.dark, sample_tasks(0.05, 1)))
    wait_for(lambda: fleet.world.status("stranded").get("traceId"), 30, "the assignment")
    running = fleet.json("get", "long", "-n", fleet.ns)
    assert running["phase"] == "Running" and running["progress"] == "1/2"
    slow = running["tasks"][1]
    assert slow["name"] == "slow" and slow["phase"] == "Running"
    assert slow["durationSeconds"] is not None and slow["exitCode"] is None
    text = fleet.cli("get", "long", "-n", fleet.ns).stdout
    assert "Phase:     ● Running" in text and "└ ● slow" in text
    stranded = fleet.json("get", "stranded", "-n", fleet.ns)
    assert stranded["site"] == fleet.dark and stranded["siteConnected"] is False
    assert stranded["siteOfflineForSeconds"] > 0
    assert {t["phase"] for t in stranded["tasks"]} == {"Pending"}
    text = fleet.cli("get", "stranded", "-n", fleet.ns).stdout
    assert f"{fleet.dark}  OFFLINE for " in text
    listed = fleet.json("list", "-n", fleet.ns, "--site", fleet.dark)
    assert [r["name"] for r in listed] == ["stranded"]
    logs = fleet.cli("logs", "stranded", "extract", "-n", fleet.ns)
    assert logs.returncode == 0
    assert f"site {fleet.dark} is offline" in logs.stderr


def test_submit_watch_exits_by_the_runs_result(fleet: Fleet, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    for path, name, spec in (
        (good, "sub-ok", spec_for(fleet.live, sample_tasks(0.05, 1))),
        (bad, "sub-bad", _failing_spec(fleet.live)),
    ):
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "tideflow.io/v1alpha1",
                    "kind": "Workflow",
                    "metadata": {"name": name},
                    "spec": spec,
                }
            )
        )
    ok = fleet.cli("submit", str(good), "-n", fleet.ns, "--watch", "--timeout", "60", process=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"workflow {fleet.ns}/sub-ok created" in ok.stdout
    assert "Phase:     ✔ Succeeded" in ok.stdout
    failed = fleet.cli("submit", str(bad), "-n", fleet.ns, "--watch", "--timeout", "60")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Phase:     ✖ Failed" in failed.stdout
    assert fleet.world.status("sub-bad")["phase"] == "Failed"
    again = fleet.cli("submit", str(good), "-n", fleet.ns)
    assert again.returncode == 2 and "Workflow sub-ok already exists" in again.stderr
    watched = fleet.cli("watch", "sub-ok", "-n", fleet.ns)
    assert watched.returncode == 0 and "Phase:     ✔ Succeeded" in watched.stdout


def test_sites_list_the_dark_site_first(fleet: Fleet) -> None:
    rows = fleet.json("sites")
    mine = [r for r in rows if r["name"] in (fleet.live, fleet.dark)]
    assert [r["name"] for r in mine] == [fleet.dark, fleet.live]
    dark, live = mine
    assert dark["connected"] is False and dark["offlineForSeconds"] > 0
    assert live["connected"] is True and live["agentVersion"]
    assert rows.index(dark) < min(i for i, r in enumerate(rows) if r["connected"])
    text = fleet.cli("sites").stdout.splitlines()
    assert text[0].split()[:3] == ["SITE", "CONNECTED", "LAST"]
    dark_line = next(line for line in text if line.startswith(fleet.dark))
    assert dark_line.split()[1] == "NO"


def test_clear_errors_for_missing_objects_crds_and_clusters(fleet: Fleet, tmp_path: Path) -> None:
    missing = fleet.cli("get", "no-such-run", "-n", fleet.ns)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"tideflow get: Workflow no-such-run not found in namespace {fleet.ns}"
    )
    # A Workflow of its own: the test must not lean on another test having run first.
    fleet.world.apply("errs", spec_for(fleet.live, sample_tasks(0.05, 1)))
    fleet.world.wait_phase("errs", "Succeeded")
    unknown_task = fleet.cli("logs", "errs", "nope", "-n", fleet.ns)
    assert unknown_task.returncode == 2 and "has no task nope" in unknown_task.stderr
    # A kubeconfig whose server does not answer.
    config = yaml.safe_load(fleet.world.cluster.kubeconfig.read_text())
    from services.kube import free_port

    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead = tmp_path / "dead.yaml"
    dead.write_text(yaml.safe_dump(config))
    silent = fleet.cli("sites", kubeconfig=str(dead), process=True)
    assert silent.returncode == 2
    assert "does not answer" in silent.stderr and "Traceback" not in silent.stderr
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(
        "apiVersion: tideflow.io/v1alpha1\nkind: Workflow\nmetadata: {name: x}\n"
        "spec: {tasks: [{name: a}]}\n"
    )
    refused = fleet.cli("submit", str(invalid), "-n", fleet.ns)
    assert refused.returncode == 2 and "command" in refused.stderr
    # The CRDs missing: the real API server's answer for a resource it does not serve.
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from tideflow.tools.fleet.api import explain

    with fleet.world.cluster.api_client() as api, pytest.raises(ApiException) as caught:
        client.CustomObjectsApi(api).list_cluster_custom_object(
            "tideflow.io", "v1alpha1", "workflowz"
        )
    assert str(explain(caught.value, "workflowz")).startswith(
        "the cluster has no workflowz.tideflow.io resource: Tideflow's CRDs are not installed"
    )


def test_submit_a_python_flow_and_a_cronworkflow_then_list_them(
    fleet: Fleet, tmp_path: Path
) -> None:
    flow = tmp_path / "flow.py"
    flow.write_text(
        "from tideflow.builder import Workflow\n"
        f"wf = Workflow('from-code', site={fleet.live!r})\n"
        "a = wf.task('a', script='true')\n"
        "wf.task('b', script='true', depends_on=[a])\n"
    )
    made = fleet.cli("submit", str(flow), "-n", fleet.ns, "--watch", "--timeout", "60")
    assert made.returncode == 0, made.stdout + made.stderr
    assert f"workflow {fleet.ns}/from-code created" in made.stdout
    cron = tmp_path / "cron.yaml"
    cron.write_text(yaml.safe_dump({
        "apiVersion": "tideflow.io/v1alpha1", "kind": "CronWorkflow",
        "metadata": {"name": "ticker"},
        "spec": {"schedule": "@every 2s", "placement": {"site": fleet.live},
                 "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]}},
    }))  # fmt: skip
    assert fleet.cli("submit", str(cron), "-n", fleet.ns).returncode == 0

    def listed() -> list[dict[str, Any]]:
        return [r for r in fleet.json("list", "--cron", "-n", fleet.ns) if r["name"] == "ticker"]

    # (The operator writes a CronWorkflow's status once it has fired somewhere.)
    wait_for(lambda: listed() and listed()[0]["sites"] == [fleet.live], 60, "the cron's site")
    (row,) = listed()
    assert row["schedule"] == "@every 2s" and row["siteCount"] == 1
    assert row["lastScheduleTime"]
    fleet.world.kubectl("delete", "cronworkflow", "ticker", "-n", fleet.ns)
    runs = fleet.json("list", "-A", "--phase", "succeeded")
    assert any(r["name"] == "from-code" and r["namespace"] == fleet.ns for r in runs)
    assert all(r["phase"] == "Succeeded" for r in runs)
