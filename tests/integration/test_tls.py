"""TLS end to end: the agent and the operator's bridge over ``mqtts://`` to Mosquitto.

The broker's listener speaks only TLS with a certificate from a CA made for
the test.  With ``--tls-ca`` naming that CA, a workflow runs and every record
reaches the cloud; with another CA the agent (and the cloud) refuse the
broker's certificate and never get a session — the broker logs the failed
handshakes and nothing is delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from services.agent import AgentProcess, agent_truth
from services.broker import Mosquitto
from services.cloud import SITE, chain_spec, converged, running_cloud, until
from services.tls import make_ca, tls_listener_config

from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge


@pytest.fixture
def tls_broker(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> tuple[Mosquitto, Path, Path]:
    """(broker, the right CA, a wrong CA); ``broker.tls_url`` is its mqtts:// address."""
    right = make_ca(tmp_path / "ca")
    wrong = make_ca(tmp_path / "other-ca", label="impostor")
    broker = mosquitto_factory(extra_config=tls_listener_config(right))
    return broker, right.ca, wrong.ca


def mqtts(broker: Mosquitto) -> str:
    return f"mqtts://{broker.host}:{broker.port}"


async def test_agent_and_cloud_over_mqtts_with_the_test_ca(
    tls_broker: tuple[Mosquitto, Path, Path], tmp_path: Path
) -> None:
    broker, ca, _ = tls_broker
    async with running_cloud(mqtts(broker), tls_ca=ca) as cloud:
        agent = AgentProcess(SITE, mqtts(broker), tmp_path / "a.db", "--tls-ca", str(ca))
        with agent:
            cloud.assign(chain_spec(3, 0.05))
            await until(lambda: cloud.view_phase() == "Succeeded", 30, "Succeeded over TLS")
            await converged(cloud, agent)


async def test_a_plain_mqtt_client_is_not_served(tls_broker: tuple[Mosquitto, Path, Path],
                                                  tmp_path: Path) -> None:  # fmt: skip
    """The listener really is TLS: the same port without TLS gets nowhere."""
    broker, ca, _ = tls_broker
    async with running_cloud(mqtts(broker), tls_ca=ca) as cloud:
        with AgentProcess(SITE, broker.url, tmp_path / "a.db") as agent:
            cloud.assign(chain_spec(1, 0.05))
            await until(lambda: "unreachable" in agent.log_tail() or "lost" in agent.log_tail(),
                        20, "the plain client to fail")  # fmt: skip
            assert not cloud.bridge.presence.connected(SITE)
            assert agent_truth(agent.db)["runs"] == {}


async def test_a_wrong_ca_is_refused_by_the_agent_and_the_cloud(
    tls_broker: tuple[Mosquitto, Path, Path], tmp_path: Path
) -> None:
    broker, ca, wrong = tls_broker
    async with running_cloud(mqtts(broker), tls_ca=ca) as cloud:
        agent = AgentProcess(SITE, mqtts(broker), tmp_path / "a.db", "--tls-ca", str(wrong))
        with agent:
            cloud.assign(chain_spec(1, 0.05))
            await until(
                lambda: "CERTIFICATE_VERIFY_FAILED" in agent.log_tail(200), 20, "the refusal"
            )
            assert agent.alive, "a refused broker is retried, not fatal"
            assert not cloud.bridge.presence.connected(SITE)
            assert agent_truth(agent.db)["runs"] == {}
    impostor = CloudBridge(
        BridgeConfig(BrokerConnection(mqtts(broker), tls_ca=wrong), client_id="impostor")
    )
    await impostor.start()
    try:
        await until(
            lambda: (
                broker.log_tail(400).count("OpenSSL Error") >= 2
                or "alert" in broker.log_tail(400).lower()
            ),
            20,
            "the broker to log the failed handshakes",
        )
        assert not impostor.connected.is_set()
    finally:
        await impostor.stop()
