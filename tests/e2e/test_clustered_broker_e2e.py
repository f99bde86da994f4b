"""The real operator process on a RabbitMQ cluster: MQTT 3.1.1, a node list, a node killed mid-run.

The link's fault tests (tests/integration/test_clustered_broker.py) drive the
operator's bridge in process; this is the ``tideflow-operator run`` command
itself, as a user starts it for RabbitMQ (README "A clustered broker"):
``--mqtt-version 3.1.1`` and ``--broker`` naming every node.  The agent's
node is killed -9 while the run is under way; the Workflow still ends
Succeeded with every task reported, and the site is connected again.
"""

from __future__ import annotations

import json

from services.agent import agent_truth, wait_for
from services.rabbitmq import RabbitCluster, Vhost
from services.world import World, sample_tasks, site_name, spec_for


def test_the_operator_runs_a_workflow_on_a_rabbitmq_cluster_across_a_node_kill(
    world: World, rabbit: Vhost, rabbitmq_cluster: RabbitCluster
) -> None:
    site = site_name()
    credentials = ["--username", rabbit.username, "--password-file", str(rabbit.password_file)]
    world.operator("--mqtt-version", "3.1.1", *credentials, broker_url=rabbit.url_from(1))
    agent = world.agent(site, True, *rabbit.agent_args(), broker_url=rabbit.url_from(0))
    world.apply("etl", spec_for(site, sample_tasks(seconds=4, n=3)))
    world.wait_phase("etl", "Running", timeout=90)
    rabbitmq_cluster.nodes[0].kill()  # the node the agent is connected to
    wait_for(lambda: "link down" in agent.log_tail(100_000), 15, "the agent to lose its node")
    assert world.status("etl").get("phase") == "Running", "the kill landed after the run"
    status = world.wait_phase("etl", "Succeeded", timeout=120)
    assert status["progress"] == "4/4"
    assert {t["name"]: t for t in status["tasks"]}["extract"]["outputs"] == {"rows": "42"}
    runs = agent_truth(agent.db)["runs"]
    assert [run["phase"] for run in runs.values()] == ["Succeeded"]

    def edgesite_connected() -> bool:
        out = world.kubectl("get", "site", site, "-o", "json").stdout
        return json.loads(out).get("status", {}).get("connected") is True

    wait_for(edgesite_connected, 60, "the EdgeSite connected again")
    (operator,) = world.operators
    assert operator.alive and "Traceback" not in operator.log_text()
