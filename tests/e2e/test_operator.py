"""The operator end to end: a real API server, real Mosquitto, real agent processes.

Users `kubectl apply` Workflows and read `kubectl get twf`; these tests do
exactly that, and compare what the cloud shows with each agent's database.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from services.agent import AgentProcess, agent_truth, wait_for
from services.world import World, sample_tasks, site_name, spec_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.envtest


def same_as_agent(status: dict[str, Any], agent: AgentProcess) -> Callable[[], bool]:
    def check() -> bool:
        truth = agent_truth(agent.db)
        (run,) = truth["runs"].values()
        listed = {t["name"]: t for t in status.get("tasks", [])}
        return run["phase"] == status["phase"] and all(
            listed[name]["phase"] == t["phase"]
            and listed[name]["attempt"] == t["attempt"]
            and listed[name].get("outputs", {}) == t["outputs"]
            for name, t in run["tasks"].items()
        )

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
    assert conditions == {
        "Accepted": "True",
        "Assigned": "True",
        "SiteConnected": "True",
        "Completed": "True",
    }
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
    # (Was: Assigned, Running and Succeeded Events.  Since decision 0019 Events are
    # only for what a user acts on; a run that went well is told by its status.  The
    # Events that remain: tests/e2e/test_operator_control.py, the Failed one posted
    # once by two operators; test_invalid_manifests_are_refused_with_the_field_named.)
    assert not {"Assigned", "Running", "Succeeded"} & reasons, reasons


def test_invalid_manifests_are_refused_with_the_field_named(world: World) -> None:
    world.operator()
    site = site_name()
    # The API server's schema: unknown field.
    bad = world.apply(
        "unknown", spec_for(site, [{"name": "a", "command": ["true"], "bogus": 1}]), check=False
    )
    assert bad.returncode != 0 and "bogus" in bad.stderr
    # CEL: both command and script.
    both = world.apply(
        "both", spec_for(site, [{"name": "a", "command": ["true"], "script": "x"}]), check=False
    )
    assert both.returncode != 0 and "exactly one of command or script" in both.stderr
    # Duplicate task names (list-map keys).
    dup = world.apply(
        "dup",
        spec_for(site, [{"name": "a", "command": ["true"]}, {"name": "a", "command": ["true"]}]),
        check=False,
    )
    assert dup.returncode != 0 and "spec.tasks[1]" in dup.stderr
    # Passes the schema, fails the deeper validation: a cycle.
    world.apply(
        "cycle",
        spec_for(
            site,
            [
                {"name": "a", "command": ["true"], "dependsOn": ["b"]},
                {"name": "b", "command": ["true"], "dependsOn": ["a"]},
            ],
        ),
    )
    status = world.wait_phase("cycle", "Failed", timeout=30)
    accepted = {c["type"]: c for c in status["conditions"]}["Accepted"]
    assert accepted["status"] == "False"
    assert "spec.tasks[0].dependsOn" in accepted["message"] and "cycle" in accepted["message"]
    assert status["reason"] == "InvalidSpec"

    # What a user acts on gets an Event, once (decision 0019).
    def invalid_events() -> list[dict[str, Any]]:
        out = world.kubectl(
            "get", "events", "-n", world.namespace,
            "--field-selector", "involvedObject.name=cycle", "-o", "json",
        ).stdout  # fmt: skip
        return [e for e in json.loads(out)["items"] if e["reason"] == "InvalidSpec"]

    wait_for(invalid_events, 30, "the InvalidSpec Event")
    assert sum(int(e.get("count") or 1) for e in invalid_events()) == 1


def test_a_spec_too_large_to_send_to_a_site_is_refused_not_left_waiting(world: World) -> None:
    """A 1.2 MB spec passes the API server (etcd takes 1.5 MiB): it was assigned, the
    site dropped the assignment as over its 1 MiB message limit on every re-send, and
    the Workflow waited for ever.  Refused at admission, with its size."""
    import yaml

    world.operator()
    site = site_name()
    spec = spec_for(site, [{"name": "a", "command": ["echo", "{{params.p}}"]}])
    spec["params"] = {"p": "x" * 1_200_000}
    manifest = {
        "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": "huge", "namespace": world.namespace}, "spec": spec,
    }  # fmt: skip
    # (create: apply's last-applied annotation is limited to 256 KiB)
    world.kubectl("create", "-f", "-", input=yaml.safe_dump(manifest))
    status = world.wait_phase("huge", "Failed", timeout=30)
    assert status["reason"] == "InvalidSpec" and "bytes" in status["message"], status


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
    downs = agent.log_tail(100_000).count("link down")
    world.broker.stop()  # the site (and the cloud) lose the link
    wait_for(lambda: agent.log_tail(100_000).count("link down") > downs, 15, "the site offline")
    seq = agent_truth(agent.db)["last_seq"]
    wait_for(lambda: agent_truth(agent.db)["last_seq"] > seq, 15, "progress while offline")
    assert next(iter(agent_truth(agent.db)["runs"].values()))["phase"] == "Running", "mid-run"
    agent.kill()
    agent.start()  # restarted while offline: resumes from its database
    wait_for(
        lambda: next(iter(agent_truth(agent.db)["runs"].values()))["phase"] == "Succeeded",
        60,
        "the run to finish offline",
    )
    assert world.status("offline")["phase"] == "Running"
    world.broker.start()
    status = world.wait_phase("offline", "Succeeded", timeout=60)
    wait_for(lambda: same_as_agent(world.status("offline"), agent)(), 30, "status = agent db")
    truth = agent_truth(agent.db)
    # Every record the site wrote (spans included) was applied and acknowledged.
    site_status = lambda: json.loads(world.kubectl("get", "site", site, "-o", "json").stdout)  # noqa: E731
    wait_for(
        lambda: site_status()["status"].get("lastAckedSeq") == truth["last_seq"],
        30,
        "the site's last acked seq to reach its last record",
    )
    assert world.status("offline")["syncedSeq"] <= truth["last_seq"]
    assert status["taskCounts"]["Succeeded"] == 7


def test_delete_cancels_and_suspend_pauses_at_the_site(world: World) -> None:
    site = site_name()
    world.operator()
    agent = world.agent(site)
    # "first" holds until the suspend has landed: a 1 s sleep could finish before the
    # patch reached a loaded machine's site, and then nothing was left to hold back.
    release = world.tmp / "release-first"
    hold = ["sh", "-c", 'while [ ! -e "$1" ]; do sleep 0.05; done', "hold", str(release)]
    world.apply(
        "paused",
        spec_for(
            site,
            [
                {"name": "first", "command": hold},
                {"name": "second", "dependsOn": ["first"], "command": ["true"]},
            ],
        ),
    )
    world.wait_phase("paused", "Running")
    world.kubectl(
        "patch",
        "twf",
        "paused",
        "-n",
        world.namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": true}}',
    )
    wait_for(lambda: world.status("paused").get("suspended") is True, 30, "suspended")
    release.touch()
    # Suspended while "first" ran; once its success has reached the cloud, "second" is held.
    wait_for(
        lambda: (
            {t["name"]: t["phase"] for t in world.status("paused")["tasks"]}.get("first")
            == "Succeeded"
        ),
        30,
        "first to finish",
    )
    (run,) = agent_truth(agent.db)["runs"].values()
    assert run["tasks"]["second"]["phase"] == "Pending", run
    tasks = {t["name"]: t["phase"] for t in world.status("paused")["tasks"]}
    assert tasks == {"first": "Succeeded", "second": "Pending"}
    world.kubectl(
        "patch",
        "twf",
        "paused",
        "-n",
        world.namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": false}}',
    )
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
    world.kubectl(
        "patch",
        "twf",
        "frozen",
        "-n",
        world.namespace,
        "--type=merge",
        "-p",
        '{"spec": {"params": {"x": "y"}}}',
    )
    wait_for(
        lambda: "SpecChangeRefused" in {c["type"] for c in world.status("frozen")["conditions"]},
        30,
        "the refusal condition",
    )
    world.wait_phase("frozen", "Succeeded")


def test_operator_killed_mid_run_resumes_without_duplicate_assignment(world: World) -> None:
    site = site_name()
    op = world.operator()
    agent = world.agent(site)
    journal = world.tmp / "journal"  # the tasks' own count of their runs
    names = [f"s{i}" for i in range(6)]
    tasks = [
        {"name": n, "script": f'echo {n} >> "{journal}"; sleep 0.5',
         "dependsOn": [names[i - 1]] if i else []}
        for i, n in enumerate(names)
    ]  # fmt: skip
    world.apply("survivor", spec_for(site, tasks))
    world.wait_phase("survivor", "Running")
    op.kill()
    # The site goes on without the cloud: records pile up for the next operator.
    seq = agent_truth(agent.db)["last_seq"]
    wait_for(lambda: agent_truth(agent.db)["last_seq"] > seq + 2, 20, "progress with no operator")
    assert next(iter(agent_truth(agent.db)["runs"].values()))["phase"] == "Running", "mid-run"
    world.operator()
    status = world.wait_phase("survivor", "Succeeded", timeout=60)
    wait_for(lambda: same_as_agent(world.status("survivor"), agent)(), 30, "status = agent db")
    assert len(agent_truth(agent.db)["runs"]) == 1
    assert status["progress"] == "6/6"
    assert sorted(journal.read_text().split()) == names, "a task ran twice (or never)"


def test_records_a_site_wrote_while_no_operator_ran_are_asked_for_by_the_next(
    world: World,
) -> None:
    """The records sent while no operator was subscribed are lost in transit; a
    run that ends meanwhile sends nothing new to reveal the gap.  The next
    operator sees the site's unacknowledged outbox in its heartbeat and asks
    for it, instead of leaving it to the agent's (backed-off) silence timer,
    which this agent has out of reach."""
    site = site_name()
    op = world.operator()
    agent = world.agent(site, True, "--ack-timeout", "600")
    tasks = [
        {"name": "a", "script": "sleep 1"},
        {"name": "b", "script": "sleep 1", "dependsOn": ["a"]},
    ]
    world.apply("orphaned", spec_for(site, tasks))
    world.wait_phase("orphaned", "Running")
    op.kill()
    wait_for(
        lambda: next(iter(agent_truth(agent.db)["runs"].values()))["phase"] == "Succeeded",
        30,
        "the run to end with no operator",
    )
    world.operator()
    status = world.wait_phase("orphaned", "Succeeded", timeout=60)
    assert status["progress"] == "2/2"
    assert "no ack for" not in agent.log_tail(100_000), "the agent's timer, not the operator"


def test_two_replicas_only_one_acts(world: World) -> None:
    site = site_name()
    first = world.operator("--leader-election", "--lease-namespace", world.namespace)
    wait_for(lambda: "this replica is active" in first.log_text(), 30, "the first leader")
    second = world.operator("--leader-election", "--lease-namespace", world.namespace)
    # The standby must be up and standing by before the work arrives; otherwise a
    # loaded machine can finish the run before the second process has started.
    wait_for(lambda: "waiting for the leader lease" in second.log_text(), 30, "the standby")
    agent = world.agent(site)
    world.apply("ha", spec_for(site, sample_tasks(0.05, 1)))
    world.wait_phase("ha", "Succeeded")
    assert "this replica is active" not in second.log_text()
    first.kill()
    wait_for(lambda: "this replica is active" in second.log_text(), 60, "the standby to take over")
    world.apply("ha2", spec_for(site, sample_tasks(0.05, 1)))
    world.wait_phase("ha2", "Succeeded")
    assert len(agent_truth(agent.db)["runs"]) == 2


def test_a_stopped_leader_hands_its_lease_over_at_once(world: World) -> None:
    """SIGTERM (a rolling upgrade, a drained node) releases the Lease: the standby
    takes over on its next retry instead of waiting out the lease duration."""
    first = world.operator("--leader-election", "--lease-namespace", world.namespace)
    wait_for(lambda: "this replica is active" in first.log_text(), 30, "the first leader")
    second = world.operator("--leader-election", "--lease-namespace", world.namespace)
    wait_for(lambda: "waiting for the leader lease" in second.log_text(), 30, "the standby")
    assert first.proc is not None
    # (The holder is <host name>-<pid>-<random>: cli.instance_identity.)
    first_identity = f"{socket.gethostname()}-{first.proc.pid}-"

    def holder() -> str | None:
        lease = world.kubectl(
            "get", "lease", "tideflow-operator", "-n", world.namespace, "-o", "json"
        )
        return json.loads(lease.stdout)["spec"].get("holderIdentity")

    assert (holder() or "").startswith(first_identity)
    first.proc.terminate()  # SIGTERM; a loaded machine may take a while to shut down
    assert first.proc.wait(60) == 0, first.log_text()[-2000:]
    # Without a release the holder stays the stopped process for the whole lease.
    held = holder() or ""
    assert not held.startswith(first_identity), "the stopped leader still holds the lease"
    wait_for(lambda: "this replica is active" in second.log_text(), 30, "the standby to take over")
    site = site_name()
    world.agent(site)
    world.apply("handed", spec_for(site, sample_tasks(0.05, 1)))
    world.wait_phase("handed", "Succeeded")


@pytest.mark.parametrize("point", ["lease-acquired", "operator-starting", "operator-startup"])
def test_a_leader_stopped_during_start_up_hands_its_lease_over_at_once(
    world: World, point: str
) -> None:
    """SIGTERM after the Lease was taken but before kopf's own signal handlers were
    in place (``lease-acquired``, ``operator-starting``), or while kopf runs its
    startup handlers, killed the process by the signal's default action: the Lease
    stayed held for its whole duration and the standby waited it out.  Each fail
    point sends the process SIGTERM at that moment."""
    op = world.operator(
        "--leader-election", "--lease-namespace", world.namespace,
        env={"TIDEFLOW_FAILPOINTS": f"{point}=term"},
    )  # fmt: skip
    assert op.proc is not None
    identity = f"{socket.gethostname()}-{op.proc.pid}-"  # (+ random: cli.instance_identity)
    try:
        code = op.proc.wait(30)
    finally:
        op.kill()
    assert "leader lease acquired" in op.log_text(), op.log_text()[-2000:]
    assert code == 0, (code, op.log_text()[-2000:])
    lease = world.kubectl("get", "lease", "tideflow-operator", "-n", world.namespace, "-o", "json")
    held = json.loads(lease.stdout)["spec"].get("holderIdentity")
    assert not str(held or "").startswith(identity), "the stopped leader still holds the lease"
    nxt = world.operator("--leader-election", "--lease-namespace", world.namespace)
    wait_for(lambda: "this replica is active" in nxt.log_text(), 10, "the next to take over")


def test_an_agent_upgrade_mid_run_ends_succeeded_with_the_default_retry_policy(
    world: World,
) -> None:
    """What ``helm upgrade`` of the agent chart does: SIGTERM, a new agent process
    on the same database.  No retry policy: the stop is an interruption."""
    site = site_name()
    world.operator()
    agent = world.agent(site)
    journal = world.tmp / "journal"
    script = (
        'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"; sleep "$NAP"; '
        'echo "end $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"'
    )
    tasks = [
        {"name": "a", "script": script, "env": {"J": str(journal), "NAP": "0.05"}},
        {"name": "b", "script": script, "env": {"J": str(journal), "NAP": "4"},
         "dependsOn": ["a"]},
        {"name": "c", "script": script, "env": {"J": str(journal), "NAP": "0.05"},
         "dependsOn": ["b"]},
    ]  # fmt: skip
    spec = spec_for(site, tasks)
    assert "retry" not in json.dumps(spec)
    world.apply("upgrade", spec)

    def lines() -> list[str]:
        return journal.read_text().splitlines() if journal.exists() else []

    wait_for(lambda: "start b 1" in lines(), 60, "b to start")
    assert "end b 1" not in lines()
    agent.terminate()  # SIGTERM, as the kubelet sends on a rolling upgrade
    assert agent.proc is not None and agent.proc.returncode == 0
    assert "end b 1" not in lines(), "the stop landed after b finished"
    agent.start()  # the new pod's agent, same volume
    status = world.wait_phase("upgrade", "Succeeded", timeout=90)
    assert status["progress"] == "3/3"
    assert lines().count("end a 1") == 1 and lines().count("start a 1") == 1
    assert [line for line in lines() if line.startswith("end b")] == ["end b 2"]
    assert {t["name"]: t["attempt"] for t in status["tasks"]}["b"] == 2
    assert same_as_agent(status, agent)()
