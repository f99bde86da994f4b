"""``wire.decode`` against hostile bytes: every refusal is a WireError with a fixed reason.

Proves: deeply nested JSON (deeper than the parser's recursion limit, and
deep but parseable) is refused as ``too-deep`` without a RecursionError;
ordinary nesting still decodes; each kind of garbage maps to one reason of
the fixed :class:`DropReason` set, whatever text the sender put in it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tideflow import wire
from tideflow.wire import MAX_JSON_DEPTH, DropReason, WireError

SITE = "line-2"
CONTROL = wire.topic(SITE, wire.CONTROL)
ASSIGN = wire.topic(SITE, wire.ASSIGN)


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def refusal(topic: str, data: bytes) -> WireError:
    with pytest.raises(WireError) as caught:
        wire.decode(topic, data)
    return caught.value


@pytest.mark.parametrize("depth", [100_000, 400_000])
def test_json_deeper_than_the_parser_can_go_is_too_deep(depth: int) -> None:
    error = refusal(CONTROL, b"[" * depth + b"]" * depth)
    assert error.reason is DropReason.TOO_DEEP
    assert "nested" in str(error)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 900])
def test_deep_but_parseable_json_is_too_deep(depth: int) -> None:
    body = {"uid": "u", "generation": 1, "namespace": "d", "name": "n", "spec": nested(depth)}
    error = refusal(ASSIGN, wire.encode(wire.KIND_ASSIGN, SITE, body))
    assert error.reason is DropReason.TOO_DEEP


def test_ordinary_nesting_decodes() -> None:
    spec = {"tasks": [{"name": "a", "command": ["true"], "retry": {"backoff": {"seconds": 1}}}]}
    body = {"uid": "u", "generation": 1, "namespace": "d", "name": "n", "spec": spec}
    _, payload = wire.decode(ASSIGN, wire.encode(wire.KIND_ASSIGN, SITE, body))
    assert isinstance(payload, wire.AssignPayload) and payload.spec == spec


@pytest.mark.parametrize(
    ("topic", "data", "reason"),
    [
        (CONTROL, b"x" * (wire.DEFAULT_MAX_MESSAGE_BYTES + 1), DropReason.TOO_LARGE),
        ("tideflow/v1/sites/line-2/nope", b"{}", DropReason.BAD_TOPIC),
        ("elsewhere/line-2/control", b"{}", DropReason.BAD_TOPIC),
        (CONTROL, b"garbage{", DropReason.NOT_JSON),
        (CONTROL, b"\xff\xfe\x00", DropReason.NOT_JSON),
        (CONTROL, b"[1, 2]", DropReason.BAD_ENVELOPE),
        (CONTROL, b'{"v": 9, "kind": "control", "site": "line-2"}', DropReason.BAD_ENVELOPE),
        (
            CONTROL,
            wire.encode(wire.KIND_CONTROL, "other", {"action": "cancel", "uid": "u"}),
            DropReason.WRONG_SITE,
        ),
        (CONTROL, wire.encode("kind-" + "z" * 5000, SITE, {}), DropReason.WRONG_KIND),
        (
            CONTROL,
            wire.encode(wire.KIND_CONTROL, SITE, {"action": "explode"}),
            DropReason.BAD_PAYLOAD,
        ),
    ],
)
def test_each_refusal_has_a_reason_from_the_fixed_set(
    topic: str, data: bytes, reason: DropReason
) -> None:
    error = refusal(topic, data)
    assert error.reason is reason
    assert len(str(error)) < 400, "the message is bounded whatever the sender wrote"


def test_distinct_garbage_maps_to_few_reasons() -> None:
    reasons = set()
    for i in range(500):
        data = json.dumps({"v": 1, "kind": f"k{i}", "site": SITE, "payload": {}}).encode()
        reasons.add(refusal(CONTROL, data).reason)
        reasons.add(refusal(CONTROL, b"y" * (wire.DEFAULT_MAX_MESSAGE_BYTES + i + 1)).reason)
    assert reasons == {DropReason.WRONG_KIND, DropReason.TOO_LARGE}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ax', max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@given(value=_json_values, limit=st.integers(1, 8))
def test_the_depth_check_on_the_text_agrees_with_the_parsed_value(value: Any, limit: int) -> None:
    """decode counts nesting on the message's text (brackets outside strings, fast)
    before walking the parsed value; for JSON a sender made (no duplicate keys)
    the two agree, whatever brackets, quotes and backslashes the strings hold."""
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, separators=(",", ":"))):
        assert wire._text_deeper_than(text.encode(), limit) == wire._deeper_than(value, limit)


def test_a_duplicate_keys_dropped_value_does_not_make_a_message_too_deep() -> None:
    deep = json.dumps(nested(MAX_JSON_DEPTH + 5))
    data = (
        '{"v":1,"kind":"control","site":"line-2","seq":1,"sentAt":1.0,'
        f'"payload":{{"action":"cancel","uid":"u","generation":1,"x":{deep}}},'
        '"payload":{"action":"cancel","uid":"u","generation":1}}'
    ).encode()
    _, payload = wire.decode(CONTROL, data)
    assert isinstance(payload, wire.ControlPayload)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32-le"])
def test_json_in_utf16_or_utf32_is_checked_for_depth_too(encoding: str) -> None:
    data = json.dumps({"a": nested(MAX_JSON_DEPTH + 1), "b": "[[[["}).encode(encoding)
    assert refusal(CONTROL, data).reason is DropReason.TOO_DEEP


@pytest.mark.parametrize(
    ("field", "value"),
    [("running", -1), ("outboxDepth", 10**40), ("lastAckedSeq", -3), ("outboxDepth", 2**63)],
)
def test_heartbeat_counters_out_of_range_are_refused_naming_the_field(
    field: str, value: int
) -> None:
    """A negative or past-int64 counter was taken: the EdgeSite status the operator then
    wrote (``minimum: 0``, int64) was refused by the API server whole, so a site whose
    agent kept sending one never had its status (``connected`` included) written."""
    message = wire.encode(wire.KIND_STATE, "site-a", {"online": True, field: value})
    with pytest.raises(WireError) as caught:
        wire.decode(wire.topic("site-a", wire.STATE), message)
    assert caught.value.reason is DropReason.BAD_PAYLOAD and field in str(caught.value)
    ok = wire.encode(wire.KIND_STATE, "site-a", {"online": True, field: 2**63 - 1})
    wire.decode(wire.topic("site-a", wire.STATE), ok)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("agentVersion", "1." + "9" * 300),
        ("labels", {f"k{i}": "v" for i in range(wire.MAX_STATE_LABELS + 1)}),
    ],
)
def test_heartbeat_fields_too_big_for_the_edgesite_are_refused_naming_the_field(
    field: str, value: Any
) -> None:
    """An agent version of megabytes, or labels by the hundred thousand, went into the
    EdgeSite the operator writes (status, labels): past what the API server stores in
    one object, every write for that site was refused."""
    message = wire.encode(wire.KIND_STATE, "site-a", {"online": True, field: value})
    with pytest.raises(WireError) as caught:
        wire.decode(wire.topic("site-a", wire.STATE), message)
    assert caught.value.reason is DropReason.BAD_PAYLOAD and field in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"), [("attempt", -1), ("attempt", 2**63), ("exitCode", 10**30)]
)
def test_task_record_numbers_the_workflow_status_cannot_hold_are_malformed(
    field: str, value: int
) -> None:
    """The Workflow status schema has ``attempt >= 0`` and int64 exit codes: a record
    with other values was applied, and its Workflow's status patch was refused by the
    API server on every try, holding the site's ack below that record for ever."""
    from tideflow.wire_events import check_record, decode_batch

    body = {"uid": "u", "generation": 1, "namespace": "d", "name": "n", "task": "a",
            "phase": "Failed", "attempt": 1, field: value}  # fmt: skip
    record = wire.EventRecord(seq=1, kind="task", body=body)
    checked = check_record(record)
    assert checked["body"] is None and field in str(checked["error"]), checked
    message = wire.encode_events("site-a", [(1, "task", json.dumps(body))])
    fast = decode_batch(wire.topic("site-a", wire.EVENTS), message)
    assert fast is None or fast.records[0]["body"] is None  # (the slow path decides)


def test_status_times_are_rfc3339_for_any_year_and_absent_for_none() -> None:
    """Before year 1000 strftime wrote '68-01-...' (no padding): not a date-time the
    API server takes, so the status patch was refused."""
    from tideflow_operator.applier import rfc3339

    assert rfc3339(-60_000_000_000.0) == "0068-09-03T13:20:00.000Z"
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1e300) is None and rfc3339(float("nan")) is None


def test_a_control_reason_is_bounded_naming_the_field() -> None:
    """A control's reason had no bound: a forged cancel carried a megabyte of text into
    the run's message at the site, its database, its outbox and back into the Workflow
    status.  The cloud writes one short sentence there; past an Event's 1,024 characters
    the control is dropped naming ``reason``."""
    topic = wire.topic(SITE, wire.CONTROL)
    longest = {"action": "cancel", "uid": "u", "reason": "r" * wire.CONTROL_REASON_MAX}
    _, payload = wire.decode(topic, wire.encode(wire.KIND_CONTROL, SITE, longest))
    assert isinstance(payload, wire.ControlPayload)
    for reason in ("r" * (wire.CONTROL_REASON_MAX + 1), "r" * 1_000_000):
        body = {"action": "cancel", "uid": "u", "reason": reason}
        error = refusal(topic, wire.encode(wire.KIND_CONTROL, SITE, body))
        assert error.reason is DropReason.BAD_PAYLOAD and "reason" in str(error), error
        assert len(str(error)) < 500


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("run", {"phase": "Running"}, "uid"),
        ("task", {"task": "a", "phase": "Running"}, "uid"),
        ("log", {"task": "a", "attempt": 1, "stream": "stdout", "tail": "x"}, "uid"),
        ("schedule", {"state": "Held"}, "uid"),
        (
            "run",
            {"phase": "Running", "cron": {"uid": "c" * 200_000, "name": "n", "generation": 1,
                                          "scheduledTime": 0.0}},
            "cron.uid",
        ),
    ],
)  # fmt: skip
def test_a_record_uid_longer_than_any_site_sends_is_malformed(
    kind: str, body: dict[str, Any], field: str
) -> None:
    """A record's uid had no bound (an assignment's has 64 characters, a schedule's 128):
    a forged or broken record carried megabytes there, into the operator's look-ups,
    its log lines and the views it holds.  Now such a record is malformed, naming the
    field, on the fast path and the slow one alike."""
    from tideflow.wire_events import check_record, decode_batch

    base = {"uid": "u" * 200_000, "generation": 1, "namespace": "d", "name": "n"}
    if field != "uid":
        base["uid"] = "u"
    full = base | body
    checked = check_record(wire.EventRecord(seq=1, kind=kind, body=full))
    assert checked["body"] is None and field in str(checked["error"]), checked
    assert len(str(checked["error"])) < 500
    message = wire.encode_events(SITE, [(1, kind, json.dumps(full))])
    fast = decode_batch(wire.topic(SITE, wire.EVENTS), message)
    assert fast is None or fast.records[0]["body"] is None
    if field == "uid":
        longest = wire.SCHEDULE_UID_MAX if kind == "schedule" else wire.UID_MAX
        for uid, taken in (("", False), ("u" * longest, True), ("u" * (longest + 1), False)):
            checked = check_record(wire.EventRecord(seq=1, kind=kind, body=full | {"uid": uid}))
            assert (checked["body"] is not None) is taken, (len(uid), checked)


@pytest.mark.parametrize("action", ["put", "withdraw"])
@pytest.mark.parametrize("generation", [0, 2**63, 10**30])
def test_a_schedule_generation_out_of_range_is_refused_naming_the_field(
    action: str, generation: int
) -> None:
    """A schedule's generation had no upper bound (an assignment's is SQLite's INTEGER):
    one of 2**64 reached the site's store, which raised OverflowError; the daemon
    logged a traceback and counted it as a bug, not as a bad message."""
    spec = {"schedule": "0 0 1 1 *", "placement": {"site": SITE}, "workflowSpec": {}}
    body = {"action": action, "uid": "c", "generation": generation, "namespace": "d",
            "name": "c", "spec": spec if action == "put" else None}  # fmt: skip
    error = refusal(ASSIGN, wire.encode(wire.KIND_SCHEDULE, SITE, body))
    assert error.reason is DropReason.BAD_PAYLOAD and "generation" in str(error), error
    wire.decode(ASSIGN, wire.encode(wire.KIND_SCHEDULE, SITE, body | {"generation": 2**63 - 1}))


@pytest.mark.parametrize("kind", ["run", "task", "log", "schedule", "cron"])
def test_a_record_generation_out_of_range_is_malformed(kind: str) -> None:
    """As an assignment's and a schedule's: the site sends nothing else there."""
    from tideflow.wire_events import check_record

    bodies: dict[str, dict[str, Any]] = {
        "run": {"phase": "Running"},
        "task": {"task": "a", "phase": "Running"},
        "log": {"task": "a", "attempt": 1, "stream": "stdout", "tail": "x"},
        "schedule": {"state": "Held"},
    }
    base = {"uid": "u", "generation": 1, "namespace": "d", "name": "n"}
    for generation, taken in ((1, True), (2**63 - 1, True), (0, False), (2**63, False)):
        if kind == "cron":
            cron = {"uid": "c", "name": "n", "generation": generation, "scheduledTime": 0.0}
            record, field = "run", "cron.generation"
            body = base | bodies["run"] | {"cron": cron}
        else:
            record, field = kind, "generation"
            body = base | bodies[kind] | {"generation": generation}
        checked = check_record(wire.EventRecord(seq=1, kind=record, body=body))
        assert (checked["body"] is not None) is taken, (generation, checked)
        assert taken or field in str(checked["error"]), checked


@pytest.mark.parametrize("uid", ["a/b", "a b", "a\nb", "é", "..", "a:b"])
@pytest.mark.parametrize("kind", [wire.KIND_ASSIGN, wire.KIND_CONTROL, wire.KIND_RECEIPT])
def test_an_assignment_uid_outside_the_file_name_alphabet_is_refused(kind: str, uid: str) -> None:
    """The site names a run's files, workspace and cgroup after its uid, with every
    character outside ``[A-Za-z0-9_.-]`` made ``_``: uids ``a/b`` and ``a_b`` were two
    assignments with one run id, and the second raised AssertionError in the site's
    executor (a traceback, no receipt, and the cloud re-sending it for ever).  A
    Kubernetes uid is a UUID; anything else in that alphabet is refused, naming uid.
    (``..`` is in the alphabet, and is no file name of a run: its id is ``...1``.)"""
    body: dict[str, Any] = {
        wire.KIND_ASSIGN: {"uid": uid, "generation": 1, "namespace": "d", "name": "n", "spec": {}},
        wire.KIND_CONTROL: {"action": "cancel", "uid": uid},
        wire.KIND_RECEIPT: {"uid": uid, "generation": 1, "phase": "Running"},
    }[kind]
    channel = {wire.KIND_ASSIGN: wire.ASSIGN, wire.KIND_CONTROL: wire.CONTROL}.get(
        kind, wire.EVENTS
    )
    data = wire.encode(kind, SITE, body)
    if uid == "..":
        wire.decode(wire.topic(SITE, channel), data)
        return
    error = refusal(wire.topic(SITE, channel), data)
    assert error.reason is DropReason.BAD_PAYLOAD and "uid" in str(error), error
