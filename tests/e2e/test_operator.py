"""The operator end to end: a real API server, real Mosquitto, real agent processes.

Users `kubectl apply` Workflows and read `kubectl get twf`; these tests do
exactly that, and compare what the cloud shows with each agent's database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import AgentProcess, agent_truth, wait_for
from services.broker import Mosquitto

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.envtest


class OperatorProcess:
    def __init__(self, cluster: Any, broker: Mosquitto, log: Path, *extra: str) -> None:
        self.cluster, self.broker, self.log, self.extra = cluster, broker, log, list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
        env.update(self.cluster.env())
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tideflow_operator.cli", "run", "--broker", self.broker.url,
             "--all-namespaces", *self.extra],
            env=env, stdout=handle, stderr=handle, start_new_session=True,
        )  # fmt: skip
        handle.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class World:
    """One test's namespace, broker, operator and agents."""

    def __init__(self, cluster: Any, broker: Mosquitto, tmp: Path) -> None:
        self.cluster, self.broker, self.tmp = cluster, broker, tmp
        self.namespace = f"t-{uuid.uuid4().hex[:8]}"
        cluster.kubectl("create", "namespace", self.namespace)
        self.operators: list[OperatorProcess] = []
        self.agents: dict[str, AgentProcess] = {}

    def operator(self, *extra: str) -> OperatorProcess:
        op = OperatorProcess(
            self.cluster, self.broker, self.tmp / f"operator-{len(self.operators)}.log", *extra
        )
        self.operators.append(op.start())
        return op

    def agent(self, site: str, start: bool = True) -> AgentProcess:
        agent = self.agents.get(site) or AgentProcess(
            site, self.broker.url, self.tmp / f"{site}.db"
        )
        self.agents[site] = agent
        if start:
            agent.start()
        return agent

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.cluster.kubectl(*args, input=input, check=check)

    def apply(self, name: str, spec: dict[str, Any], check: bool = True) -> Any:
        manifest = {
            "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": self.namespace}, "spec": spec,
        }  # fmt: skip
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=check)

    def get(self, name: str) -> dict[str, Any]:
        out = self.kubectl("get", "twf", name, "-n", self.namespace, "-o", "json").stdout
        return dict(json.loads(out))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def wait_phase(
        self, name: str, phases: str | tuple[str, ...], timeout: float = 60
    ) -> dict[str, Any]:
        wanted = (phases,) if isinstance(phases, str) else phases
        try:
            wait_for(lambda: self.status(name).get("phase") in wanted, timeout, f"{name} {wanted}")
        except AssertionError:
            print(json.dumps(self.status(name), indent=1)[:4000])
            for op in self.operators:
                print(op.log_text()[-4000:])
            for agent in self.agents.values():
                print(agent.log_tail(60))
            raise
        return self.status(name)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.kill()
        for op in self.operators:
            op.kill()
        self.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)


@pytest.fixture
def world(envtest: Any, mosquitto: Mosquitto, tmp_path: Path) -> Iterator[World]:
    envtest.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    w = World(envtest, mosquitto, tmp_path)
    yield w
    w.close()


def site_name() -> str:
    return f"s-{uuid.uuid4().hex[:6]}"


def spec_for(site: str, tasks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"placement": {"site": site}, "tasks": tasks,
            "defaults": {"retry": {"limit": 2, "backoff": {"seconds": 0.1}}}, **extra}  # fmt: skip


def sample_tasks(seconds: float = 0.2, n: int = 3) -> list[dict[str, Any]]:
    tasks = [{"name": "extract", "script": f'sleep {seconds}; echo rows=42 >> "$TIDEFLOW_OUTPUTS"'}]
    for i in range(n):
        tasks.append({"name": f"step{i}", "dependsOn": [tasks[-1]["name"]],
                      "command": ["sh", "-c", f"sleep {seconds}; echo $0", "{{tasks.extract.outputs.rows}}"]})  # fmt: skip
    return tasks


def same_as_agent(status: dict[str, Any], agent: AgentProcess) -> Callable[[], bool]:
    def check() -> bool:
        truth = agent_truth(agent.db)
        (run,) = truth["runs"].values()
        listed = {t["name"]: t for t in status.get("tasks", [])}
        return run["phase"] == status["phase"] and all(
            listed[name]["phase"] == t["phase"] and listed[name]["attempt"] == t["attempt"]
            and listed[name].get("outputs", {}) == t["outputs"]
            for name, t in run["tasks"].items()
        )  # fmt: skip

    return check


def test_apply_runs_at_the_site_and_kubectl_shows_progress(world: World) -> None:
    site = site_name()
    world.operator()
    agent = world.agent(site)
    world.apply("etl", spec_for(site, sample_tasks()))
    status = world.wait_phase("etl", "Succeeded")
    assert status["progress"] == "4/4"
    assert status["site"] == site
    assert {t["name"]: t for t in status["tasks"]}["extract"]["outputs"] == {"rows": "42"}
    assert status["traceId"] and len(status["traceId"]) == 32
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Accepted": "True", "Assigned": "True", "SiteConnected": "True",
                          "Completed": "True"}  # fmt: skip
    assert same_as_agent(status, agent)()
    table = world.kubectl("get", "twf", "-n", world.namespace).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "SITE", "PROGRESS", "CONNECTED", "AGE"]
    assert table.splitlines()[1].split()[:5] == ["etl", "Succeeded", site, "4/4", "true"]
    sites = world.kubectl("get", "site", site).stdout
    assert sites.splitlines()[0].split()[:5] == ["NAME", "CONNECTED", "RUNNING", "LAST", "SEEN"]
    events = world.kubectl(
        "get",
        "events",
        "-n",
        world.namespace,
        "--field-selector",
        "involvedObject.name=etl",
        "-o",
        "json",
    ).stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"Assigned", "Running", "Succeeded"} <= reasons


def test_invalid_manifests_are_refused_with_the_field_named(world: World) -> None:
    world.operator()
    site = site_name()
    # The API server's schema: unknown field.
    bad = world.apply("unknown", spec_for(site, [{"name": "a", "command": ["true"], "bogus": 1}]),
                      check=False)  # fmt: skip
    assert bad.returncode != 0 and "bogus" in bad.stderr
    # CEL: both command and script.
    both = world.apply("both", spec_for(site, [{"name": "a", "command": ["true"], "script": "x"}]),
                       check=False)  # fmt: skip
    assert both.returncode != 0 and "exactly one of command or script" in both.stderr
    # Duplicate task names (list-map keys).
    dup = world.apply("dup", spec_for(site, [{"name": "a", "command": ["true"]},
                                             {"name": "a", "command": ["true"]}]), check=False)  # fmt: skip
    assert dup.returncode != 0 and "spec.tasks[1]" in dup.stderr
    # Passes the schema, fails the deeper validation: a cycle.
    world.apply("cycle", spec_for(site, [
        {"name": "a", "command": ["true"], "dependsOn": ["b"]},
        {"name": "b", "command": ["true"], "dependsOn": ["a"]},
    ]))  # fmt: skip
    status = world.wait_phase("cycle", "Failed", timeout=30)
    accepted = {c["type"]: c for c in status["conditions"]}["Accepted"]
    assert accepted["status"] == "False"
    assert "spec.tasks[0].dependsOn" in accepted["message"] and "cycle" in accepted["message"]
    assert status["reason"] == "InvalidSpec"


def test_workflow_applied_while_the_agent_is_down_waits_then_runs(world: World) -> None:
    site = site_name()
    world.operator()
    agent = world.agent(site, start=False)
    world.apply("later", spec_for(site, sample_tasks(0.05, 2)))
    status = world.wait_phase("later", "Assigned", timeout=30)
    assert status["siteConnected"] is False
    assert {c["type"]: c["status"] for c in status["conditions"]}["SiteConnected"] == "False"
    agent.start()
    status = world.wait_phase("later", "Succeeded")
    assert same_as_agent(status, agent)()


def test_site_offline_mid_run_agent_killed_and_restarted_offline_then_converges(
    world: World,
) -> None:
    site = site_name()
    world.operator()
    agent = world.agent(site)
    world.apply("offline", spec_for(site, sample_tasks(0.4, 6)))
    world.wait_phase("offline", "Running")
    world.broker.stop()  # the site (and the cloud) lose the link
    time.sleep(0.8)
    agent.kill()
    agent.start()  # restarted while offline: resumes from its database
    wait_for(lambda: next(iter(agent_truth(agent.db)["runs"].values()))["phase"] == "Succeeded",
             60, "the run to finish offline")  # fmt: skip
    assert world.status("offline")["phase"] == "Running"
    world.broker.start()
    status = world.wait_phase("offline", "Succeeded", timeout=60)
    wait_for(lambda: same_as_agent(world.status("offline"), agent)(), 30, "status = agent db")
    truth = agent_truth(agent.db)
    assert world.status("offline")["syncedSeq"] == truth["last_seq"]
    assert status["taskCounts"]["Succeeded"] == 7


def test_delete_cancels_and_suspend_pauses_at_the_site(world: World) -> None:
    site = site_name()
    world.operator()
    agent = world.agent(site)
    world.apply("paused", spec_for(site, [
        {"name": "first", "command": ["sleep", "1"]},
        {"name": "second", "dependsOn": ["first"], "command": ["true"]},
    ]))  # fmt: skip
    world.wait_phase("paused", "Running")
    world.kubectl("patch", "twf", "paused", "-n", world.namespace, "--type=merge",
                  "-p", '{"spec": {"suspend": true}}')  # fmt: skip
    wait_for(lambda: world.status("paused").get("suspended") is True, 30, "suspended")
    time.sleep(1.5)
    tasks = {t["name"]: t["phase"] for t in world.status("paused")["tasks"]}
    assert tasks == {"first": "Succeeded", "second": "Pending"}
    world.kubectl("patch", "twf", "paused", "-n", world.namespace, "--type=merge",
                  "-p", '{"spec": {"suspend": false}}')  # fmt: skip
    world.wait_phase("paused", "Succeeded")

    world.apply("doomed", spec_for(site, [{"name": "forever", "command": ["sleep", "300"]}]))
    world.wait_phase("doomed", "Running")
    world.kubectl("delete", "twf", "doomed", "-n", world.namespace, "--timeout=30s")
    phases = lambda: {r["phase"] for r in agent_truth(agent.db)["runs"].values()}  # noqa: E731
    wait_for(lambda: phases() == {"Succeeded", "Cancelled"}, 30, "the run cancelled at the site")


def test_spec_edits_after_assignment_are_refused(world: World) -> None:
    site = site_name()
    world.operator()
    world.agent(site)
    world.apply("frozen", spec_for(site, [{"name": "a", "command": ["sleep", "2"]}]))
    world.wait_phase("frozen", ("Assigned", "Running"))
    world.kubectl("patch", "twf", "frozen", "-n", world.namespace, "--type=merge",
                  "-p", '{"spec": {"params": {"x": "y"}}}')  # fmt: skip
    wait_for(lambda: "SpecChangeRefused" in {c["type"] for c in world.status("frozen")["conditions"]},
             30, "the refusal condition")  # fmt: skip
    world.wait_phase("frozen", "Succeeded")


def test_operator_killed_mid_run_resumes_without_duplicate_assignment(world: World) -> None:
    site = site_name()
    op = world.operator()
    agent = world.agent(site)
    world.apply("survivor", spec_for(site, sample_tasks(0.5, 5)))
    world.wait_phase("survivor", "Running")
    op.kill()
    time.sleep(1.5)
    world.operator()
    status = world.wait_phase("survivor", "Succeeded", timeout=60)
    wait_for(lambda: same_as_agent(world.status("survivor"), agent)(), 30, "status = agent db")
    assert len(agent_truth(agent.db)["runs"]) == 1
    assert status["progress"] == "6/6"


def test_two_replicas_only_one_acts(world: World) -> None:
    site = site_name()
    first = world.operator("--leader-election", "--lease-namespace", world.namespace)
    wait_for(lambda: "this replica is active" in first.log_text(), 30, "the first leader")
    second = world.operator("--leader-election", "--lease-namespace", world.namespace)
    agent = world.agent(site)
    world.apply("ha", spec_for(site, sample_tasks(0.05, 1)))
    world.wait_phase("ha", "Succeeded")
    assert "this replica is active" not in second.log_text()
    assert "waiting for the leader lease" in second.log_text()
    first.kill()
    wait_for(lambda: "this replica is active" in second.log_text(), 60, "the standby to take over")
    world.apply("ha2", spec_for(site, sample_tasks(0.05, 1)))
    world.wait_phase("ha2", "Succeeded")
    assert len(agent_truth(agent.db)["runs"]) == 2
