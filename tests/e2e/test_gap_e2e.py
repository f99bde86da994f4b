"""A real gap, end to end: the operator process, kubectl, and a broker that drops events.

The operator reaches the broker through a link that can be cut
(:class:`~services.broker.LinkProxy`); the broker keeps one message for an
absent client (``max_queued_messages 1``).  Mid-run the operator's link is
cut while the site keeps reporting: the broker keeps the first events batch
and drops the rest (its log says so).  When the link returns the operator
gets a hole in the site's ``seq``: it must hold back what follows, ask for a
resend, and end with the Workflow's status equal to the site's database and
every record applied once.  The agent's own ack timeout is set out of reach,
so only the operator's request can close the hole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from services.agent import agent_truth, wait_for
from services.broker import LinkProxy, Mosquitto
from services.metrics import scrape
from services.world import World, install_crds, site_name, spec_for

pytestmark = pytest.mark.envtest


@pytest.fixture
def lossy_world(
    envtest: Any, mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> Iterator[tuple[World, LinkProxy]]:
    broker = mosquitto_factory(max_queued_messages=1)
    install_crds(envtest)
    world = World(envtest, broker, tmp_path)
    with LinkProxy(broker.host, broker.port) as link:
        yield world, link
        world.close()


def chain(n: int) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for i in range(n):
        tasks.append({"name": f"t{i}", "command": ["sleep", "0.2"]})
        if i > 1:
            tasks[-1]["dependsOn"] = [f"t{i - 2}"]
    return tasks


def test_the_operator_holds_back_a_gap_asks_for_a_resend_and_applies_once(
    lossy_world: tuple[World, LinkProxy],
) -> None:
    world, link = lossy_world
    site = site_name()
    op, port = world.metered_operator(broker_url=link.url)
    agent = world.agent(site, True, "--ack-timeout", "600")
    world.apply("gappy", spec_for(site, chain(40)))
    world.wait_phase("gappy", "Running")
    m = lambda: scrape(port)  # noqa: E731
    wait_for(lambda: m()["tideflow_operator_records_applied_total"] > 0, 30, "records applied")
    link.cut()
    at_cut = agent_truth(agent.db)["last_seq"]
    wait_for(
        lambda: (
            "Outgoing messages are being dropped for client tideflow-operator"
            in world.broker.log_path.read_text(errors="replace")
        ),
        30,
        "the broker to drop events queued for the operator",
    )
    wait_for(lambda: agent_truth(agent.db)["last_seq"] >= at_cut + 10, 30, "more records")
    (run,) = agent_truth(agent.db)["runs"].values()
    assert run["phase"] == "Running", "the run must still be reporting after the link returns"
    link.restore()
    world.wait_phase("gappy", "Succeeded", timeout=90)
    truth = agent_truth(agent.db)
    site_status = lambda: json.loads(world.kubectl("get", "site", site, "-o", "json").stdout)  # noqa: E731
    wait_for(lambda: site_status()["status"].get("lastAckedSeq") == truth["last_seq"], 30,
             "every record acknowledged")  # fmt: skip
    values = m()
    assert values["tideflow_operator_gaps_total"] >= 1, "the operator never saw the gap"
    assert values["tideflow_operator_records_applied_total"] == truth["last_seq"], values
    assert "no ack for" not in agent.log_tail(100_000), "the ack timeout closed the gap"
    status = world.status("gappy")
    assert status["progress"] == "40/40"
    assert op.alive and agent.alive
