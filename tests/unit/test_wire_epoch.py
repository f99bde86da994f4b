"""The ``epoch`` wire field: a versioned field that old and new peers both understand.

Old agents send no epoch and must still be understood; a new operator talking
to an old agent must not send a field that agent's decoder (``extra=forbid``)
would refuse.
"""

from __future__ import annotations

import json

import pytest

from tideflow import wire

SITE = "north"
EVENTS = wire.topic(SITE, wire.EVENTS)
ACKS = wire.topic(SITE, wire.ACKS)
STATE = wire.topic(SITE, wire.STATE)
ROW = (1, "span", '{"traceId":"ab","spanId":"cd","name":"x"}')


def test_events_without_an_epoch_from_an_old_agent_still_decode() -> None:
    old = wire.encode_events(SITE, [ROW])
    assert b"epoch" not in old
    _, payload = wire.decode(EVENTS, old)
    assert isinstance(payload, wire.EventsPayload) and payload.epoch is None


def test_events_carry_the_epoch() -> None:
    _, payload = wire.decode(EVENTS, wire.encode_events(SITE, [ROW], epoch="0f3a-db"))
    assert isinstance(payload, wire.EventsPayload)
    assert payload.epoch == "0f3a-db" and [r.seq for r in payload.records] == [1]


def test_an_ack_without_an_epoch_leaves_the_field_out_for_old_agents() -> None:
    data = wire.encode(wire.KIND_ACK, SITE, wire.AckPayload(through=4))
    assert "epoch" not in json.loads(data)["payload"]
    _, payload = wire.decode(ACKS, data)
    assert isinstance(payload, wire.AckPayload) and payload.epoch is None
    with_epoch = wire.encode(wire.KIND_ACK, SITE, wire.AckPayload(through=4, epoch="e1"))
    _, payload = wire.decode(ACKS, with_epoch)
    assert isinstance(payload, wire.AckPayload) and payload.epoch == "e1"


def test_state_carries_the_epoch_and_leaves_it_out_when_unknown() -> None:
    offline = wire.encode(wire.KIND_STATE, SITE, wire.StatePayload(online=False))
    assert "epoch" not in json.loads(offline)["payload"]
    data = wire.encode(wire.KIND_STATE, SITE, wire.StatePayload(online=True, epoch="e2"))
    _, payload = wire.decode(STATE, data)
    assert isinstance(payload, wire.StatePayload) and payload.epoch == "e2"


@pytest.mark.parametrize("epoch", ["", "x" * 65, "has space", "a/b"])
def test_a_bad_epoch_is_refused_naming_the_field(epoch: str) -> None:
    data = wire.encode_events(SITE, [ROW], epoch=epoch)
    with pytest.raises(wire.WireError, match="epoch"):
        wire.decode(EVENTS, data)
