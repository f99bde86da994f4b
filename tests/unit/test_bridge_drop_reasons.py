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


async def test_a_sites_events_waiting_in_the_inbox_are_bounded_and_the_rest_dropped() -> None:
    # Issue 13: while acks lag, sites send their unacknowledged records again and
    # again; queued unbounded, those copies were most of the operator's memory at
    # 1,000 sites.  Past max_inbox_bytes waiting, a site's events are dropped if it has
    # one waiting (it sends them again: they were never acknowledged); state messages
    # are not, and a site with nothing waiting has one taken, however large.
    import asyncio

    config = BridgeConfig(BrokerConnection("mqtt://127.0.0.1:1"), max_inbox_bytes=400)
    bridge = CloudBridge(config)
    events, state = wire.topic("line-2", wire.EVENTS), wire.topic("line-2", wire.STATE)
    batch = b"x" * 100
    for _ in range(10):
        bridge.arrived(events, batch)
    for _ in range(3):
        bridge.arrived(state, batch * 10)
        bridge.arrived(wire.topic("line-3", wire.EVENTS), b"y" * 1000)  # (the first is taken)
    bridge.arrived(wire.topic("line-4", wire.EVENTS), batch)  # (nothing of line-4 waits)
    assert bridge._inbox.qsize() == 4 + 3 + 1 + 1
    assert bridge.dropped["inbox-full"] == 6 + 2
    assert bridge._heard["line-2"] > 0  # (a dropped message still says the site is alive)
    # Once the worker took them, the site's next messages are queued again.
    worker = asyncio.create_task(bridge._consume())
    try:
        for _ in range(100):
            if bridge._inbox.empty() and not bridge._queued:
                break
            await asyncio.sleep(0.01)
        assert bridge._inbox.empty() and not bridge._queued and bridge._queued_bytes == 0
        for _ in range(4):
            bridge.arrived(events, batch)
        assert bridge.dropped["inbox-full"] == 8
    finally:
        worker.cancel()


def test_the_inbox_holds_a_few_sites_windows_by_default_not_a_fifth_of_the_operator() -> None:
    # Issue 13: at 1,000 sites the inbox sat at its 64 MiB bound for minutes while
    # acks lagged (30,000 resent batches waiting, ~73 MB with their overhead, at an
    # RSS of 375 MB).  What is dropped past the bound is sent again by its site;
    # a site's whole window ahead of its ack (~1 MB) must still fit many times over.
    bound = BridgeConfig(BrokerConnection("mqtt://127.0.0.1:1")).max_inbox_bytes
    window = 1024 * 1024
    assert 8 * window <= bound <= 16 * window
