"""The agent's side of the MQTT link: its topics, last will and state message.

The reconnecting client itself is :class:`tideflow.mqtt.MqttLink`; this module
says what the agent subscribes to and what it announces.  Together they are
the only MQTT on the edge.
"""

from __future__ import annotations

import os

from tideflow import wire
from tideflow.mqtt import BrokerAddress, BrokerConnection, LinkConfig, MqttLink

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


def broker_file_problem(broker: BrokerConnection, exc: OSError | UnicodeDecodeError) -> str:
    """What :class:`MqttLink` (which reads them when it is made) found wrong with the
    broker's password file or CA file, naming the option: ``exc`` says which file
    only when it could not be opened (the password file is the only one decoded)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"--password-file {broker.password_file}: not UTF-8 text"
    strerror = exc.strerror or str(exc)
    if broker.password_file is not None and exc.filename == os.fspath(broker.password_file):
        return f"--password-file {broker.password_file}: {strerror}"
    if broker.tls_ca is not None:
        return f"--tls-ca {broker.tls_ca}: {strerror}"
    return f"the broker's settings: {strerror}"
