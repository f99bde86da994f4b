"""The operator process re-sends what a broker lost, end to end with kubectl.

The broker keeps nothing across a restart (no persistence).  While the site
is offline a Workflow is applied and a running one is deleted; the broker is
restarted, so the assignment and the cancel queued for the site are gone
(checked: the site's session is gone), and the operator's own reconnection
re-sends them into the void.  When the site comes online the operator must
send both again: the new Workflow runs, the deleted one is cancelled at the
site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from services.agent import agent_truth, wait_for
from services.broker import Mosquitto
from services.mqtt_probe import connections_logged, session_present
from services.world import World, install_crds, site_name, spec_for

pytestmark = pytest.mark.envtest


@pytest.fixture
def forgetful_world(
    envtest: Any, mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> Iterator[World]:
    broker = mosquitto_factory(persistence=False)
    install_crds(envtest)
    world = World(envtest, broker, tmp_path)
    yield world
    world.close()


def test_the_operator_re_sends_an_assignment_and_a_cancel_the_broker_lost(
    forgetful_world: World,
) -> None:
    world = forgetful_world
    site = site_name()
    op = world.operator()
    agent = world.agent(site)
    journal = world.tmp / "journal"
    long_task = {"name": "long", "script": f'echo long >> "{journal}"; sleep 300',
                 "retry": {"limit": 3}}  # fmt: skip
    world.apply("doomed", spec_for(site, [long_task]))
    wait_for(lambda: journal.exists(), 60, "doomed to run at the site")
    agent.terminate()
    wait_for(lambda: world.status("doomed").get("siteConnected") is False, 30, "site offline")
    world.apply("late", spec_for(site, [{"name": "t", "script": f'echo t >> "{journal}"'}]))
    world.wait_phase("late", "Assigned")
    world.kubectl("delete", "twf", "doomed", "-n", world.namespace, "--wait=false")
    reconnects = op.log_text().count("came online")
    operator_connections = connections_logged(world.broker, "tideflow-operator")
    world.broker.restart()
    assert not session_present(world.broker, f"tideflow-agent-{site}")
    # The operator reconnects and re-sends at once: into the void, the site is away.
    wait_for(
        lambda: connections_logged(world.broker, "tideflow-operator") > operator_connections,
        30,
        "the operator to reconnect",
    )
    agent.start()
    wait_for(lambda: op.log_text().count("came online") > reconnects, 30, "the site back")
    world.wait_phase("late", "Succeeded", timeout=60)
    phases = lambda: sorted(r["phase"] for r in agent_truth(agent.db)["runs"].values())  # noqa: E731
    wait_for(lambda: phases() == ["Cancelled", "Succeeded"], 30, "doomed cancelled at the site")
    assert journal.read_text().split().count("t") == 1
