"""The cloud's one-pass check of ``events`` batches decides exactly as ``wire.decode``.

``tideflow.wire_events.decode_batch`` is the bridge's fast path; whatever it
does not take goes through ``wire.decode`` and ``check_record``, the path it
replaces.  Proved here, on the golden message, on generated valid batches and
on hostile mutations of them: whenever the fast path returns a batch, it is
equal record for record (same bodies, defaults, enums, epoch) to what the
slow path makes of the same bytes; whenever the slow path refuses the message
or skips a record, the fast path returns None and leaves the decision to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tideflow import wire
from tideflow.phases import RunPhase, TaskPhase
from tideflow.wire_events import CheckedBatch, check_record, checked_batch, decode_batch

SITE = "plant-7"
TOPIC = wire.topic(SITE, wire.EVENTS)
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "wire" / "v1" / "events.json"


def slow(topic: str, data: bytes) -> CheckedBatch | None:
    """What the bridge made of an events message before the fast path (None: dropped)."""
    try:
        envelope, payload = wire.decode(topic, data, max_bytes=8 * wire.DEFAULT_MAX_MESSAGE_BYTES)
    except wire.WireError:
        return None
    if not isinstance(payload, wire.EventsPayload):
        return None
    return checked_batch(envelope.site, payload)


def same_decision(topic: str, data: bytes) -> CheckedBatch | None:
    fast = decode_batch(topic, data, max_bytes=8 * wire.DEFAULT_MAX_MESSAGE_BYTES)
    expected = slow(topic, data)
    if fast is not None:
        assert expected == fast
        assert all(r["body"] is not None for r in fast.records)
    return fast


def golden() -> dict[str, Any]:
    message: dict[str, Any] = json.loads(GOLDEN.read_text())["message"]
    return message


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def test_the_golden_batch_takes_the_fast_path_with_the_slow_paths_result() -> None:
    fast = same_decision(TOPIC, encode(golden()))
    assert fast is not None
    assert [r["kind"] for r in fast.records] == ["run", "task", "log", "span", "schedule"]
    run, task = fast.records[0]["body"], fast.records[1]["body"]
    assert run is not None and task is not None
    assert run["phase"] is RunPhase.RUNNING and run["started_at"] == 1764499990.5
    assert task["phase"] is TaskPhase.SUCCEEDED and task["outputs"] == {"rows": "1200"}
    assert fast.epoch == "db-5f2c9e7a1b"


SPAN_IN_TASK = GOLDEN.with_name("events-span-in-task.json")


def test_a_task_record_carrying_its_span_takes_the_fast_path_with_the_slow_paths_result() -> None:
    message = json.loads(SPAN_IN_TASK.read_text())["message"]
    fast = same_decision(TOPIC, encode(message))
    assert fast is not None
    task, span = fast.records[0]["body"], fast.records[1]["body"]
    assert task is not None and span is not None
    assert task["span"] == message["payload"]["records"][0]["body"]["span"]
    assert task["span"]["spanId"] == "00f067aa0ba902b7" and span["spanId"] == "a3ce929d0e0e4736"
    # The older form beside it: a task record without one decodes with span None.
    old = same_decision(TOPIC, encode(golden()))
    assert old is not None and old.records[1]["body"] is not None
    assert old.records[1]["body"]["span"] is None


def test_a_span_nested_too_deep_inside_a_task_record_goes_the_slow_way() -> None:
    message = json.loads(SPAN_IN_TASK.read_text())["message"]
    records = message["payload"]["records"]
    del records[1:]  # the task record alone: no span record beside it
    assert same_decision(TOPIC, encode(message)) is not None
    records[0]["body"]["span"]["attributes"]["deep"] = json.loads("[" * 70 + "]" * 70)
    assert same_decision(TOPIC, encode(message)) is None


def test_the_agents_own_encoding_takes_the_fast_path() -> None:
    records = [
        (r["seq"], r["kind"], json.dumps(r["body"], separators=(",", ":")))
        for r in golden()["payload"]["records"]
    ]
    data = wire.encode_events(SITE, records, epoch="e1")
    fast = same_decision(TOPIC, data)
    assert fast is not None and len(fast.records) == len(records) and fast.epoch == "e1"


def test_defaults_are_filled_as_the_models_fill_them() -> None:
    message = golden()
    task = message["payload"]["records"][1]["body"]
    for optional in ("compensation", "attempt", "outputs", "message", "exitCode"):
        del task[optional]
    fast = same_decision(TOPIC, encode(message))
    assert fast is not None
    body = fast.records[1]["body"]
    assert body is not None
    assert (body["compensation"], body["attempt"], body["outputs"], body["exit_code"]) == (
        False,
        0,
        {},
        None,
    )


def mutated(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    message = golden()
    target: Any = message
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return message


RECORDS = ("payload", "records")
MUTATIONS = {
    # Each is taken by the slow path in its own way; the fast path must step aside.
    "unknown field in a body (ignored)": ((*RECORDS, 1, "body", "newField"), {"a": 1}),
    "malformed body (skipped alone)": ((*RECORDS, 1, "body", "phase"), "Sleeping"),
    "missing required body field": ((*RECORDS, 2, "body", "tail"), KeyError),
    "unknown record kind": ((*RECORDS, 0, "kind"), "metric"),
    "seq zero": ((*RECORDS, 0, "seq"), 0),
    "unknown envelope field": (("extra",), 1),
    "wrong version": (("v",), 2),
    "bad epoch": (("payload", "epoch"), "no spaces allowed"),
    "no records": ((*RECORDS,), []),
    # The envelope's payload defaults to empty: the fast path came out without one
    # and raised KeyError (the bridge counted a bug per message).
    "no payload": (("payload",), KeyError),
    "wrong site": (("site",), "plant-8"),
    "receipt kind": (("kind",), "receipt"),
    "deep span body": ((*RECORDS, 3, "body", "attributes"), json.loads("[" * 70 + "]" * 70)),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_what_the_fast_path_does_not_take_goes_the_slow_way(name: str) -> None:
    path, value = MUTATIONS[name]
    assert same_decision(TOPIC, encode(mutated(path, value))) is None


def test_other_channels_and_oversized_messages_are_not_taken() -> None:
    data = encode(golden())
    assert decode_batch(wire.topic(SITE, wire.STATE), data) is None
    assert decode_batch("not/a/tideflow/topic", data) is None
    assert decode_batch(TOPIC, data, max_bytes=len(data) - 1) is None
    assert decode_batch(TOPIC, b"{not json") is None


def test_a_malformed_record_is_named_by_the_slow_path() -> None:
    bad = wire.EventRecord(seq=7, kind="task", body={"uid": "u"})
    checked = check_record(bad)
    assert checked["body"] is None and "seq 7" in checked.get("error", "")


_text = st.text(max_size=12)
_float = st.none() | st.floats(allow_nan=False, allow_infinity=False, width=64)
_scalar = st.none() | st.booleans() | st.integers(-5, 5) | _text | st.floats(allow_nan=False)


@st.composite
def bodies(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {"uid": draw(_text), "generation": draw(st.integers(1, 9))}
    body |= {"namespace": draw(_text), "name": draw(_text)}
    if kind == "run":
        body["phase"] = draw(st.sampled_from([p.value for p in RunPhase]))
        for key in ("reason", "message"):
            if draw(st.booleans()):
                body[key] = draw(st.none() | _text)
        for key in ("startedAt", "finishedAt"):
            if draw(st.booleans()):
                body[key] = draw(_float)
    elif kind == "task":
        body |= {"task": draw(_text), "phase": draw(st.sampled_from([p.value for p in TaskPhase]))}
        if draw(st.booleans()):
            body["attempt"] = draw(st.integers(0, 99))
        if draw(st.booleans()):
            body["exitCode"] = draw(st.none() | st.integers(-9, 255))
        if draw(st.booleans()):
            body["outputs"] = draw(st.dictionaries(_text, _text, max_size=3))
    else:
        body |= {"task": draw(_text), "attempt": draw(st.integers(0, 9))}
        body |= {"stream": draw(st.sampled_from(["stdout", "stderr"])), "tail": draw(_text)}
    if draw(st.integers(0, 9)) == 0:  # now and then a wrong type or a stray key
        key = draw(st.sampled_from([*body, "stray"]))
        body[key] = draw(_scalar)
    return body


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    kinds = draw(st.lists(st.sampled_from(["run", "task", "log"]), min_size=1, max_size=6))
    records = [
        {"seq": i + 1, "kind": kind, "body": draw(bodies(kind))} for i, kind in enumerate(kinds)
    ]
    message = golden()
    message["payload"] = {"records": records, "epoch": "e-1"}
    return message


@settings(max_examples=300, deadline=None)
@given(batches())
def test_generated_batches_decide_the_same_both_ways(message: dict[str, Any]) -> None:
    same_decision(TOPIC, encode(message))


def test_non_utf8_bytes_are_not_taken_and_the_slow_path_names_them() -> None:
    data = encode(golden())
    broken = data.replace(SITE.encode(), b"plant-\xff", 1)  # the envelope's site
    inside = data.replace(b'"Running"', b'"Runn\xffing"', 1)  # a record's body
    assert broken != data and inside != data
    for bad in (broken, inside, b"\xff\xfe" + data):
        assert decode_batch(TOPIC, bad) is None
        with pytest.raises(wire.WireError):
            wire.decode(TOPIC, bad)
