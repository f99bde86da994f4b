"""``tideflow.mqtt``: reconnect backoff, driven by a fake clock instead of a broker.

Proves: each failed connect waits longer (``min * 2**n`` with full jitter),
never more than ``backoff_max`` and never less than half of ``backoff_min``,
and the exponent stops growing past 2**30 without overflowing; a link that was
really connected and then lost starts again from the shortest wait, while a
connection the broker refused (no CONNACK success, so never *connected*) keeps
backing off; ``stop()`` during a wait ends the loop at once, with no further
connect.  The link's own reconnect loop (``MqttLink._run``) runs here with its
paho client and its wait replaced: a fake clock records every wait and moves
time forward only by what was asked, so nothing sleeps.

Failover (a clustered broker's nodes, comma-separated): a refused node is
followed at once by the next one, a whole round of refusals by a backoff; a
lost session goes to the next node after the shortest wait.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest

from tideflow.mqtt import BrokerAddress, BrokerConnection, LinkConfig, MqttLink, backoff_delays

MIN, MAX = 0.5, 5.0


class Highest(random.Random):
    """Jitter that always draws the top of its range: the waits are their caps."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def test_the_cap_doubles_per_attempt_up_to_the_maximum() -> None:
    delay = backoff_delays(MIN, MAX, Highest())
    assert [delay(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_full_jitter_never_drops_below_half_the_minimum() -> None:
    delay = backoff_delays(MIN, MAX, Lowest())
    assert {delay(n) for n in range(10)} == {MIN / 2}


def test_jittered_waits_stay_within_their_caps() -> None:
    delay = backoff_delays(MIN, MAX, random.Random(7))
    for attempt in range(200):
        cap = min(MAX, MIN * 2**attempt)
        assert MIN / 2 <= delay(attempt) <= cap
    spread = {round(delay(6), 3) for _ in range(50)}
    assert len(spread) > 10, "jitter spreads sites that lost the same broker"


def test_huge_attempt_numbers_do_not_overflow() -> None:
    delay = backoff_delays(MIN, 3600.0, Highest())
    assert delay(10**6) == 3600.0


class FakeClock:
    """Stands in for the link's stop event: ``wait`` advances time instead of sleeping."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        self.now += timeout
        return self._set


class FakeClient:
    """A paho client whose connects follow a script: 'fail', 'refused' or 'session'.

    'session' connects, gets its CONNACK (the link's on_connect runs) and is lost
    after a few loops; 'refused' connects but the broker refuses (on_connect
    never reports success); 'fail' raises like an unreachable broker.  When the
    script runs out the link is stopped, as ``MqttLink.stop`` would.
    """

    def __init__(self, link: MqttLink, clock: FakeClock, script: list[str]) -> None:
        self.link, self.clock = link, clock
        self.script: Iterator[str] = iter(script)
        self.connects: list[float] = []
        self.ports: list[int] = []
        self.current = ""
        self.loops = 0

    def connect(self, host: str, port: int, keepalive: int = 60) -> None:
        self.connects.append(self.clock.now)
        self.ports.append(port)
        step = next(self.script, None)
        if step is None:
            self.clock.set()  # as stop() would: the loop ends without another wait
            return
        self.current, self.loops = step, 0
        if step == "fail":
            raise ConnectionRefusedError(111, "Connection refused")

    def loop(self, timeout: float = 1.0) -> mqtt.MQTTErrorCode:
        self.loops += 1
        if self.loops == 1 and self.current == "session":
            self.link._set_connected(True)  # what on_connect does after a good CONNACK
        if self.loops < 3:
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST

    def disconnect(self) -> None:
        pass


@pytest.fixture
def make_link() -> Iterator[Callable[..., tuple[MqttLink, FakeClock, FakeClient]]]:
    loop = asyncio.new_event_loop()
    states: list[bool] = []

    def make(
        script: list[str], broker: str = "mqtt://127.0.0.1:1"
    ) -> tuple[MqttLink, FakeClock, FakeClient]:
        config = LinkConfig(
            BrokerConnection(broker), client_id="t", backoff_min=MIN, backoff_max=MAX
        )
        link = MqttLink(config, loop, lambda _t, _d: None, states.append)
        clock = FakeClock()
        client = FakeClient(link, clock, script)
        link._stop = clock  # type: ignore[assignment]
        link.client = client  # type: ignore[assignment]
        link._delay = backoff_delays(MIN, MAX, Highest())
        return link, clock, client

    yield make
    loop.close()


def test_failed_connects_back_off_exponentially_to_the_cap(make_link) -> None:  # type: ignore[no-untyped-def]
    link, clock, client = make_link(["fail"] * 7)
    link._run()
    # Seven failures, then the eighth connect ends the test (its wait is the last one).
    assert clock.waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert client.connects == [0.0, 0.5, 1.5, 3.5, 7.5, 12.5, 17.5, 22.5]


def test_a_lost_session_starts_again_from_the_shortest_wait(make_link) -> None:  # type: ignore[no-untyped-def]
    link, clock, _ = make_link(["fail", "fail", "fail", "session", "fail", "fail"])
    link._run()
    # 3 failures (0.5, 1, 2); the session was up, so its loss waits 0.5 again,
    # then the failures after it grow from there (1, 2).
    assert clock.waits == [0.5, 1.0, 2.0, 0.5, 1.0, 2.0]
    assert not link.connected


def test_a_refused_connection_keeps_backing_off(make_link) -> None:  # type: ignore[no-untyped-def]
    link, clock, _ = make_link(["fail", "fail", "refused", "refused", "fail"])
    link._run()
    # Never connected: the broker's refusals count as failures, no reset.
    assert clock.waits == [0.5, 1.0, 2.0, 4.0, 5.0]


def test_stop_during_a_wait_ends_the_loop_without_another_connect(make_link) -> None:  # type: ignore[no-untyped-def]
    link, clock, client = make_link(["fail"] * 100)
    original = clock.wait

    def stop_on_third(timeout: float | None = None) -> bool:
        if len(clock.waits) == 2:
            clock.set()
        return original(timeout)

    clock.wait = stop_on_third  # type: ignore[method-assign]
    link._run()
    assert len(clock.waits) == 3
    assert len(client.connects) == 3


NODES = "mqtt://127.0.0.1:1,mqtt://127.0.0.1:2, mqtt://127.0.0.1:3"


def test_a_broker_list_parses_in_order_and_rejects_what_cannot_work() -> None:
    assert [a.port for a in BrokerAddress.parse_list(NODES)] == [1, 2, 3]
    assert BrokerAddress.parse_list("mqtt://h") == [BrokerAddress("h", 1883, False)]
    with pytest.raises(ValueError, match="mixes mqtt:// and mqtts://"):
        BrokerAddress.parse_list("mqtt://a:1,mqtts://b:2")
    with pytest.raises(ValueError, match="empty entry"):
        BrokerAddress.parse_list("mqtt://a:1,,mqtt://b:2")
    with pytest.raises(ValueError, match="scheme"):
        BrokerAddress.parse_list("mqtt://a:1,http://b:2")


def test_refused_nodes_are_tried_in_turn_and_a_whole_round_backs_off(make_link) -> None:  # type: ignore[no-untyped-def]
    link, clock, client = make_link(["fail"] * 6, broker=NODES)
    link._run()
    assert client.ports == [1, 2, 3, 1, 2, 3, 1]
    # No wait between the nodes of a round; one backoff per round, growing.
    assert clock.waits == [0.5, 1.0]
    assert client.connects == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.5]


def test_a_lost_session_moves_to_the_next_node_after_the_shortest_wait(make_link) -> None:  # type: ignore[no-untyped-def]
    link, clock, client = make_link(["session", "fail", "fail", "fail"], broker=NODES)
    link._run()
    # Lost on node 1: node 2 after 0.5 s, node 3 at once, node 1 (a round) then a backoff.
    assert client.ports == [1, 2, 3, 1, 2]
    assert clock.waits == [0.5, 1.0]
