"""``wire.encode`` / ``wire.decode`` round trips, and the refusals decode tests leave out.

Proves: every message kind comes back from ``decode`` equal to the model that
was encoded, on the channel it belongs to, with its envelope (kind, site, seq,
traceparent, sentAt) intact and its aliases on the wire (``sentAt``,
``agentVersion``, ``outboxDepth``); ``encode_events`` (which splices stored
record bodies without re-parsing them) produces what ``encode`` of the same
batch would; run, task and log record bodies survive ``decode_record`` equal
to their models while span bodies stay plain dicts; and the refusals that
``tests/unit/test_wire_decode.py`` does not reach — a record body that is not
a record (``bad-record``, naming the field and the seq), a topic with a
Tideflow root but too many or too few parts, and a payload that is valid for
another kind of its channel — each carry their reason from the fixed set.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from tideflow import wire
from tideflow.phases import RunPhase, TaskPhase
from tideflow.wire import DropReason, WireError

SITE = "plant-7"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
RUN = {"uid": "u-1", "generation": 2, "namespace": "etl", "name": "nightly"}

MESSAGES: list[tuple[str, str, BaseModel]] = [
    (
        wire.ASSIGN,
        wire.KIND_ASSIGN,
        wire.AssignPayload(**RUN, spec={"tasks": [{"name": "a", "command": ["true"]}]}),
    ),
    (
        wire.CONTROL,
        wire.KIND_CONTROL,
        wire.ControlPayload(action="suspend", uid="u-1", generation=2, reason="maintenance"),
    ),
    (wire.CONTROL, wire.KIND_CONTROL, wire.ControlPayload(action="cancel", uid="u-1")),
    (
        wire.EVENTS,
        wire.KIND_EVENTS,
        wire.EventsPayload(
            records=[
                wire.EventRecord(seq=7, kind="run", body={**RUN, "phase": "Running"}),
                wire.EventRecord(seq=8, kind="span", body={"name": "task a", "é": "ü"}),
            ],
            epoch="db-1",
        ),
    ),
    (
        wire.EVENTS,
        wire.KIND_RECEIPT,
        wire.ReceiptPayload(uid="u-1", generation=2, phase="Succeeded"),
    ),
    (wire.ACKS, wire.KIND_ACK, wire.AckPayload(through=41, resend=True, epoch="db-1")),
    (
        wire.STATE,
        wire.KIND_STATE,
        wire.StatePayload(
            online=True,
            agent_version="0.1.0",
            running=3,
            outbox_depth=12,
            last_acked_seq=40,
            labels={"zone": "north"},
            epoch="db-1",
        ),
    ),
]


@pytest.mark.parametrize(
    ("channel", "kind", "payload"), MESSAGES, ids=[f"{m[1]}-{i}" for i, m in enumerate(MESSAGES)]
)
def test_every_kind_decodes_to_what_was_encoded(channel: str, kind: str, payload: Any) -> None:
    data = wire.encode(kind, SITE, payload, seq=5, traceparent=TRACEPARENT)
    envelope, decoded = wire.decode(wire.topic(SITE, channel), data)
    assert type(decoded) is type(payload)
    assert decoded == payload
    assert (envelope.kind, envelope.site, envelope.seq, envelope.traceparent) == (
        kind,
        SITE,
        5,
        TRACEPARENT,
    )
    raw = json.loads(data)
    assert isinstance(raw["sentAt"], float) and raw["sentAt"] == envelope.sent_at
    # Encoding what was decoded gives the same payload bytes: nothing is lost or added.
    again = wire.encode(kind, SITE, decoded, seq=5, traceparent=TRACEPARENT)
    assert json.loads(again)["payload"] == raw["payload"]


def test_state_uses_the_camel_case_aliases_on_the_wire() -> None:
    payload = wire.StatePayload(online=True, agent_version="1", outbox_depth=2, last_acked_seq=3)
    body = json.loads(wire.encode(wire.KIND_STATE, SITE, payload))["payload"]
    assert {"agentVersion", "outboxDepth", "lastAckedSeq"} <= set(body)
    assert not {"agent_version", "outbox_depth", "last_acked_seq"} & set(body)


def test_a_plain_dict_payload_decodes_like_its_model() -> None:
    body = {"action": "resume", "uid": "u-9"}
    _, decoded = wire.decode(
        wire.topic(SITE, wire.CONTROL), wire.encode(wire.KIND_CONTROL, SITE, body)
    )
    assert decoded == wire.ControlPayload(action="resume", uid="u-9")


@pytest.mark.parametrize("epoch", [None, "db-2"])
def test_encode_events_is_what_encode_of_the_same_batch_gives(epoch: str | None) -> None:
    bodies = [
        (3, "run", {**RUN, "phase": "Running"}),
        (4, "task", {**RUN, "task": "a", "phase": "Succeeded", "outputs": {"q": 'a "b" \\ c'}}),
        (5, "log", {**RUN, "task": "a", "attempt": 1, "stream": "stdout", "tail": "ünï\n"}),
        (6, "span", {"name": "task a", "attributes": {"tideflow.task": "a"}}),
    ]
    rows = [(seq, kind, json.dumps(body)) for seq, kind, body in bodies]
    spliced = wire.encode_events(SITE, rows, epoch=epoch)
    model = wire.EventsPayload(
        records=[wire.EventRecord(seq=s, kind=k, body=b) for s, k, b in bodies],  # type: ignore[arg-type]
        epoch=epoch,
    )
    encoded = wire.encode(wire.KIND_EVENTS, SITE, model, seq=3)
    topic = wire.topic(SITE, wire.EVENTS)
    env_a, from_splice = wire.decode(topic, spliced)
    env_b, from_encode = wire.decode(topic, encoded)
    assert from_splice == from_encode == model
    assert (env_a.kind, env_a.site, env_a.seq) == (env_b.kind, env_b.site, env_b.seq)
    assert json.loads(spliced)["payload"] == json.loads(encoded)["payload"]


RECORDS: list[tuple[str, BaseModel]] = [
    (
        wire.RUN_RECORD,
        wire.RunRecord(
            **RUN, phase=RunPhase.FAILED, reason="TaskFailed", started_at=1.5, finished_at=9.25
        ),
    ),
    (
        wire.TASK_RECORD,
        wire.TaskRecord(
            **RUN,
            task="load",
            phase=TaskPhase.SUCCEEDED,
            attempt=2,
            started_at=2.0,
            finished_at=3.0,
            exit_code=0,
            outputs={"rows": "1200"},
        ),
    ),
    (
        wire.LOG_RECORD,
        wire.LogRecord(**RUN, task="load", attempt=2, stream="stderr", tail="warning\n"),
    ),
]


@pytest.mark.parametrize(("kind", "record"), RECORDS, ids=[r[0] for r in RECORDS])
def test_record_bodies_decode_to_their_models(kind: str, record: BaseModel) -> None:
    body = record.model_dump(by_alias=True, mode="json")
    assert ("startedAt" in body) == hasattr(record, "started_at")
    batch = wire.EventsPayload(records=[wire.EventRecord(seq=1, kind=kind, body=body)])  # type: ignore[arg-type]
    data = wire.encode(wire.KIND_EVENTS, SITE, batch)
    _, payload = wire.decode(wire.topic(SITE, wire.EVENTS), data)
    assert isinstance(payload, wire.EventsPayload)
    assert wire.decode_record(payload.records[0]) == record


def test_a_record_body_may_carry_fields_a_newer_agent_added() -> None:
    body = {**RUN, "phase": "Running", "addedLater": {"x": 1}}
    decoded = wire.decode_record(wire.EventRecord(seq=1, kind="run", body=body))
    assert decoded == wire.RunRecord(**RUN, phase=RunPhase.RUNNING)


def test_span_bodies_stay_plain_dicts() -> None:
    body = {"traceId": "ab", "spanId": "cd", "name": "x", "attributes": {"k": [1, 2]}}
    assert wire.decode_record(wire.EventRecord(seq=3, kind="span", body=body)) == body


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (wire.RUN_RECORD, {**RUN, "phase": "Exploded"}, "phase"),
        (
            wire.RUN_RECORD,
            {"uid": "u", "generation": 1, "namespace": "n", "phase": "Running"},
            "name",
        ),
        (wire.TASK_RECORD, {**RUN, "phase": "Running"}, "task"),
        (
            wire.TASK_RECORD,
            {**RUN, "task": "a", "phase": "Running", "attempt": "two"},
            "attempt",
        ),
        (
            wire.LOG_RECORD,
            {**RUN, "task": "a", "attempt": 1, "stream": "stdin", "tail": ""},
            "stream",
        ),
    ],
)
def test_a_body_that_is_not_its_record_is_bad_record_naming_field_and_seq(
    kind: str, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(WireError) as caught:
        wire.decode_record(wire.EventRecord(seq=17, kind=kind, body=body))  # type: ignore[arg-type]
    assert caught.value.reason is DropReason.BAD_RECORD
    assert field in str(caught.value) and "seq 17" in str(caught.value)


@pytest.mark.parametrize(
    "topic",
    [
        "tideflow/v1/sites/plant-7",
        "tideflow/v1/sites/plant-7/control/extra",
        "tideflow/v2/sites/plant-7/control",
        "",
    ],
)
def test_topics_of_the_wrong_shape_are_bad_topic(topic: str) -> None:
    with pytest.raises(WireError) as caught:
        wire.decode(topic, wire.encode(wire.KIND_CONTROL, SITE, {"action": "cancel", "uid": "u"}))
    assert caught.value.reason is DropReason.BAD_TOPIC


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        (wire.KIND_RECEIPT, {"uid": "u", "phase": "Succeeded"}, "generation"),
        (wire.KIND_EVENTS, {"records": []}, "records"),
        (wire.KIND_EVENTS, {"uid": "u", "generation": 1, "phase": "Succeeded"}, "records"),
    ],
)
def test_a_payload_of_the_wrong_kind_for_its_channel_is_bad_payload(
    kind: str, payload: dict[str, Any], field: str
) -> None:
    """Both kinds belong on ``events``: the envelope's kind, not the payload's shape, decides."""
    with pytest.raises(WireError) as caught:
        wire.decode(wire.topic(SITE, wire.EVENTS), wire.encode(kind, SITE, payload))
    assert caught.value.reason is DropReason.BAD_PAYLOAD
    assert field in str(caught.value)


def test_seq_and_sent_at_must_be_sane_in_the_envelope() -> None:
    topic = wire.topic(SITE, wire.ACKS)
    for bad in ({"seq": -1}, {"sentAt": "yesterday"}, {"site": "Not A Site"}):
        envelope = {"v": 1, "kind": "ack", "site": SITE, "payload": {"through": 1}, **bad}
        with pytest.raises(WireError) as caught:
            wire.decode(topic, json.dumps(envelope).encode())
        assert caught.value.reason is DropReason.BAD_ENVELOPE, bad
