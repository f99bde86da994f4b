"""The operator process and an agent over ``mqtts://``, end to end with the API server.

Mosquitto's only listener speaks TLS with a certificate from a CA made for the
test (:mod:`services.tls`); the operator gets ``--tls-ca``, the agent too.  A
Workflow applied with kubectl runs at the site and its status comes back;
an operator given the wrong CA never connects and the Workflow stays
``Assigned``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from services.agent import wait_for
from services.broker import Mosquitto
from services.tls import make_ca, tls_listener_config
from services.world import World, install_crds, sample_tasks, site_name, spec_for

pytestmark = pytest.mark.envtest


@pytest.fixture
def tls_world(
    envtest: Any, mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> Iterator[tuple[World, str, Path, Path]]:
    right = make_ca(tmp_path / "ca")
    wrong = make_ca(tmp_path / "other-ca", label="impostor")
    broker = mosquitto_factory(extra_config=tls_listener_config(right))
    install_crds(envtest)
    world = World(envtest, broker, tmp_path)
    yield world, f"mqtts://{broker.host}:{broker.port}", right.ca, wrong.ca
    world.close()


def test_operator_and_agent_over_mqtts(tls_world: tuple[World, str, Path, Path]) -> None:
    world, url, ca, _ = tls_world
    site = site_name()
    world.operator("--tls-ca", str(ca), broker_url=url)
    world.agent(site, True, "--tls-ca", str(ca), broker_url=url)
    world.apply("secure", spec_for(site, sample_tasks(0.05, 1)))
    world.wait_phase("secure", "Succeeded")
    # Presence comes from the site's live state (a retained one is not trusted,
    # decision 0012): a run that finished before it is corrected when it comes.
    wait_for(lambda: world.status("secure").get("siteConnected") is True, 20, "siteConnected")


def test_an_operator_with_the_wrong_ca_never_reaches_the_broker(
    tls_world: tuple[World, str, Path, Path],
) -> None:
    world, url, ca, wrong = tls_world
    site = site_name()
    op = world.operator("--tls-ca", str(wrong), broker_url=url)
    world.agent(site, True, "--tls-ca", str(ca), broker_url=url)
    world.apply("refused", spec_for(site, sample_tasks(0.05, 1)))
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in op.log_text(), 30, "the operator's refusal")
    wait_for(lambda: world.status("refused").get("phase") == "Assigned", 30, "Assigned")
    assert op.alive
    assert world.status("refused")["siteConnected"] is False
