"""``MqttLink.connected`` means subscribed: it is set on the SUBACK, not on the CONNACK.

The messages published on every connect (the agent's state, which makes the
cloud re-send what the site has not confirmed) go out then too: an answer to
them must find the site's subscriptions in place.

Why: a broker that makes a session's queue on SUBSCRIBE (RabbitMQ: a quorum
queue replicated over the cluster, which takes a while on a busy machine)
drops what is published to the link's topics between the CONNACK and the
SUBACK.  A caller that acts on ``connected`` (the operator re-sends, a test
publishes) must find the subscriptions in place.  A paho client stand-in
records the calls; nothing touches a network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from tideflow.mqtt import BrokerConnection, LinkConfig, MqttLink


class FakeClient:
    def __init__(self) -> None:
        self.subscribed: list[Any] = []
        self.published: list[str] = []

    def subscribe(self, topics: Any, qos: int = 0) -> tuple[int, int]:
        self.subscribed.append(topics)
        return 0, 7  # (rc, mid)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append(topic)

    def disconnect(self) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make(loop: asyncio.AbstractEventLoop, subscriptions: list[str]) -> tuple[MqttLink, FakeClient]:
    config = LinkConfig(
        BrokerConnection("mqtt://127.0.0.1:1"), client_id="t", subscriptions=subscriptions
    )
    link = MqttLink(
        config, loop, lambda _t, _d: None, lambda _s: None,
        on_connected_publish=lambda: [("a/state", b"{}", True)],
    )  # fmt: skip
    fake = FakeClient()
    link.client = fake  # type: ignore[assignment]
    return link, fake


def granted() -> list[ReasonCode]:
    return [ReasonCode(9, identifier=1), ReasonCode(9, identifier=1)]  # 9: SUBACK


def test_connected_waits_for_the_suback_of_every_subscription(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link, fake = make(loop, ["a/assign", "a/acks"])
    success = ReasonCode(2, identifier=0)  # 2: CONNACK
    link._handle_connect(fake, None, None, success, None)  # type: ignore[arg-type]
    assert fake.subscribed == [[("a/assign", 1), ("a/acks", 1)]], "one SUBSCRIBE for all"
    assert not link.connected, "connected before the broker confirmed the subscriptions"
    assert fake.published == [], "announced before the answers to it could be received"
    link._handle_subscribe(fake, None, 6, granted(), None)  # type: ignore[arg-type]
    assert not link.connected, "another SUBSCRIBE's answer"
    link._handle_subscribe(fake, None, 7, granted(), None)  # type: ignore[arg-type]
    assert link.connected
    assert fake.published == ["a/state"]


def test_a_link_without_subscriptions_is_connected_on_the_connack(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link, fake = make(loop, [])
    link._handle_connect(fake, None, None, ReasonCode(2, identifier=0), None)  # type: ignore[arg-type]
    assert fake.subscribed == [] and link.connected
    assert fake.published == ["a/state"]


def test_a_refused_subscription_is_logged_and_the_link_still_comes_up(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    link, fake = make(loop, ["a/assign", "b/assign"])
    link._handle_connect(fake, None, None, ReasonCode(2, identifier=0), None)  # type: ignore[arg-type]
    codes = [ReasonCode(9, identifier=1), ReasonCode(9, identifier=0x80)]
    link._handle_subscribe(fake, None, 7, codes, None)  # type: ignore[arg-type]
    assert link.connected
    assert "refused the subscription to b/assign" in caplog.text


def test_subscriptions_added_while_running_are_made_whenever_they_come(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """``subscribe()`` (an operator shard following a site it now knows): before the
    connect, between the CONNACK and the SUBACK, and once subscribed, each topic is
    subscribed exactly once on this connection, and all of them on the next."""
    link, fake = make(loop, ["a/state"])
    link.subscribe(["b/events"])  # before connecting: the connect's SUBSCRIBE takes it
    link._handle_connect(fake, None, None, ReasonCode(2, identifier=0), None)  # type: ignore[arg-type]
    assert fake.subscribed == [[("a/state", 1), ("b/events", 1)]]
    link.subscribe(["c/events"])  # on its way: sent once the SUBACK came
    assert fake.subscribed == [[("a/state", 1), ("b/events", 1)]]
    link._handle_subscribe(fake, None, 7, granted(), None)  # type: ignore[arg-type]
    assert fake.subscribed[1:] == [[("c/events", 1)]]
    link.subscribe(["d/events", "b/events"])  # subscribed: at once, only what is new
    assert fake.subscribed[2:] == [[("d/events", 1)]]
    # A reconnect subscribes to all of them in its one SUBSCRIBE.
    fake.subscribed.clear()
    link._handle_connect(fake, None, None, ReasonCode(2, identifier=0), None)  # type: ignore[arg-type]
    assert fake.subscribed == [[("a/state", 1), ("b/events", 1), ("c/events", 1), ("d/events", 1)]]
