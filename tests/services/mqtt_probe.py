"""Looking at a broker from the outside, to check that a fault really landed."""

from __future__ import annotations

import re
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from services.broker import Mosquitto


def session_present(broker: Mosquitto, client_id: str) -> bool:
    """Whether the broker still holds a persistent session for ``client_id``."""
    seen: list[bool] = []
    connected = threading.Event()

    def on_connect(_c: Any, _u: Any, flags: Any, _reason: Any, _props: Any) -> None:
        seen.append(bool(flags.session_present))
        connected.set()

    probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    probe.on_connect = on_connect
    probe.connect(broker.host, broker.port)
    probe.loop_start()
    try:
        assert connected.wait(10), "the probe did not connect"
    finally:
        probe.disconnect()
        probe.loop_stop()
    return seen[0]


def connections_logged(broker: Mosquitto, client_id: str) -> int:
    """How many times the broker logged ``client_id`` connecting (its log outlives restarts)."""
    try:
        text = broker.log_path.read_text(errors="replace")
    except OSError:
        return 0
    # The operator's client id is a prefix: it adds its host and pid (unique per process).
    return len(re.findall(rf" as {re.escape(client_id)}(?:-\S+)? ", text))
