"""Golden wire messages: what this version puts on the wire, checked in, decoded and re-encoded.

A fleet is never upgraded at once, so a change of the wire format must be
seen in review, not discovered in the field.  ``tests/golden/wire/v1/`` holds
one message of every kind on every channel (assign, schedule put and
withdraw, control, events with one record of each kind, receipt, ack, state
and the last will; later forms in files of their own, such as a task record
carrying its attempt's span), pretty-printed with its topic.  For each:

* the current code decodes it (``wire.decode``), and what it decoded, dumped
  again, is the golden payload field for field — a renamed, removed or
  newly required field fails;
* the current encoder writes it byte for byte (``wire.encode``, or for
  events the agent's own path: ``record_json`` bodies through
  ``wire.encode_events``) — a field added with a default, a new alias or a
  changed order fails too;
* every record body decodes (``wire.decode_record``) with no field ignored,
  and the assign and schedule specs pass the agent's validation.

The compatibility rule (README, "Mixed versions"): golden files are never
edited; a wire change adds fields only as optional ("versioned") ones, gets
a new golden file, and the operator is upgraded before the agents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from pydantic import BaseModel

from edge_agent.state import record_json
from tideflow import wire
from tideflow.spec import parse_cron_spec, parse_spec

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "wire" / "v1"
FILES = sorted(GOLDEN.glob("*.json"))
KINDS_COVERED = {
    wire.KIND_ASSIGN,
    wire.KIND_SCHEDULE,
    wire.KIND_CONTROL,
    wire.KIND_EVENTS,
    wire.KIND_RECEIPT,
    wire.KIND_ACK,
    wire.KIND_STATE,
}


def load(path: Path) -> tuple[str, dict[str, Any], bytes]:
    doc = json.loads(path.read_text())
    message = doc["message"]
    return doc["topic"], message, json.dumps(message, separators=(",", ":")).encode()


def dumped(payload: BaseModel) -> dict[str, Any]:
    """A payload as ``wire.encode`` writes it (versioned fields left out when None)."""
    body = payload.model_dump(by_alias=True, mode="json")
    for name in getattr(payload, "versioned", ()):
        if getattr(payload, name) is None:
            body.pop(name, None)
    return body


def test_every_message_kind_and_record_kind_has_a_golden_message() -> None:
    kinds = {load(path)[1]["kind"] for path in FILES}
    assert kinds == KINDS_COVERED == set(wire.PAYLOADS)
    events = [load(p)[1] for p in FILES if load(p)[1]["kind"] == wire.KIND_EVENTS]
    records = [r for message in events for r in message["payload"]["records"]]
    assert {r["kind"] for r in records} == set(wire.RECORD_KINDS)
    # Versioned record fields too: a task outcome carrying its attempt's span (0022).
    assert any(r["kind"] == wire.TASK_RECORD and "span" in r["body"] for r in records)
    channels = {wire.parse_topic(load(path)[0])[1] for path in FILES}
    assert channels == set(wire.CHANNELS)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_the_current_code_decodes_it_field_for_field(path: Path) -> None:
    topic, message, data = load(path)
    envelope, payload = wire.decode(topic, data)
    assert envelope.kind == message["kind"] and envelope.site == message["site"]
    assert envelope.seq == message["seq"] and envelope.sent_at == message["sentAt"]
    assert envelope.traceparent == message["traceparent"]
    assert dumped(payload) == message["payload"]
    if isinstance(payload, wire.EventsPayload):
        for record in payload.records:
            body = wire.decode_record(record)
            if isinstance(body, BaseModel):  # spans are tracing's, kept as they are
                known = {f.alias or name for name, f in type(body).model_fields.items()}
                ignored = set(record.body) - known
                assert not ignored, f"{record.kind} record fields the code ignores: {ignored}"
    if isinstance(payload, wire.AssignPayload):
        parse_spec(payload.spec)
    if isinstance(payload, wire.SchedulePayload) and payload.spec is not None:
        parse_cron_spec(payload.spec)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_the_current_encoder_writes_it_byte_for_byte(path: Path) -> None:
    topic, message, data = load(path)
    site, _ = wire.parse_topic(topic)
    _, payload = wire.decode(topic, data)
    with mock.patch.object(wire.time, "time", return_value=message["sentAt"]):
        if isinstance(payload, wire.EventsPayload):
            rows = [(r.seq, r.kind, record_json(r.body)) for r in payload.records]
            encoded = wire.encode_events(site, rows, epoch=payload.epoch)
        else:
            encoded = wire.encode(
                message["kind"],
                site,
                payload,
                seq=message["seq"],
                traceparent=message["traceparent"],
            )
    assert encoded == data
