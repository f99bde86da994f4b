"""The agent's side of the MQTT link: its topics, last will and state message.

The reconnecting client itself is :class:`tideflow.mqtt.MqttLink`; this module
says what the agent subscribes to and what it announces.  Together they are
the only MQTT on the edge.
"""

from __future__ import annotations

from tideflow import wire
from tideflow.mqtt import (
    BrokerAddress,
    BrokerConnection,
    LinkConfig,
    MqttLink,
    broker_file_problem,
)

__all__ = [
    "BrokerAddress",
    "BrokerConnection",
    "LinkConfig",
    "MqttLink",
    "agent_subscriptions",
    "broker_file_problem",
    "state_message",
]


def agent_subscriptions(site: str) -> list[str]:
    return [wire.topic(site, channel) for channel in (wire.ASSIGN, wire.CONTROL, wire.ACKS)]


def state_message(site: str, *, online: bool, **fields: object) -> bytes:
    payload = wire.StatePayload.model_validate({"online": online, **fields})
    return wire.encode(wire.KIND_STATE, site, payload)
