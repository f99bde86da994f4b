"""The cloud bridge counts dropped messages by :class:`tideflow.wire.DropReason` only.

A label taken from message text gave one metric series per distinct kind a
sender invented; proves 500 invented kinds and 500 oversize lengths make two
labels, and deeply nested JSON is dropped as ``too-deep``.
"""

from __future__ import annotations

import json

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge


async def test_dropped_labels_come_from_the_fixed_set() -> None:
    bridge = CloudBridge(
        BridgeConfig(BrokerConnection("mqtt://127.0.0.1:1"), max_message_bytes=1024 * 1024)
    )
    topic = wire.topic("line-2", wire.EVENTS)
    junk = []
    for i in range(500):
        junk.append(json.dumps({"v": 1, "kind": f"k{i}", "site": "line-2"}).encode())
        junk.append(b"x" * (bridge.config.max_message_bytes + i + 1))  # 500 distinct lengths
    junk.append(b"[" * 400_000 + b"]" * 400_000)
    await bridge.handle_many([(topic, data) for data in junk])
    assert set(bridge.dropped) == {"wrong-kind", "too-large", "too-deep"}
    assert sum(bridge.dropped.values()) == len(junk)
