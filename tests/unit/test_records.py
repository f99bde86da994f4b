"""The agent's hand-built records stay equal to what the wire models make.

``TaskState.to_record`` and the attempt span's record are built as plain
dicts (they are on the path of every step); these tests keep them equal to
the pydantic model's dump and to the SDK span's record the cloud decodes.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode
from services.old_spans import AttemptSpan, finish_attempt_span

from edge_agent.state import RunState, TaskState, fit_record, record_json
from tideflow.phases import TaskPhase
from tideflow.tracing import record_to_span, span_to_record
from tideflow.wire import MAX_RECORD_BYTES, TaskRecord


def record_json_unbounded(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


_text = st.text(max_size=20)
_maybe_float = st.none() | st.floats(allow_nan=False, allow_infinity=False)


@given(
    name=_text,
    phase=st.sampled_from(list(TaskPhase)),
    attempt=st.integers(0, 1000),
    started=_maybe_float,
    finished=_maybe_float,
    exit_code=st.none() | st.integers(-64, 255),
    outputs=st.dictionaries(_text, _text, max_size=3),
    message=st.none() | _text,
    compensation=st.booleans(),
)
def test_task_record_is_the_models_dump(
    name: str,
    phase: TaskPhase,
    attempt: int,
    started: float | None,
    finished: float | None,
    exit_code: int | None,
    outputs: dict[str, str],
    message: str | None,
    compensation: bool,
) -> None:
    run = RunState("r.1", "uid-1", 3, "ns", "wf", "{}")
    task = TaskState(
        "r.1", name, compensation=compensation, phase=str(phase), attempt=attempt,
        started_at=started, finished_at=finished, exit_code=exit_code, outputs=outputs,
        message=message,
    )  # fmt: skip
    expected = TaskRecord.model_construct(
        uid=run.uid, generation=run.generation, namespace=run.namespace, name=run.name,
        task=name, compensation=compensation, phase=phase, attempt=attempt,
        started_at=started, finished_at=finished, exit_code=exit_code, outputs=outputs,
        message=message,
    ).model_dump(by_alias=True, mode="json")  # fmt: skip
    record = task.to_record(run)
    assert record == expected
    assert TaskRecord.model_validate(record).model_dump(by_alias=True, mode="json") == expected


def test_attempt_span_record_matches_an_sdk_spans_record() -> None:
    tracer = TracerProvider().get_tracer("t")
    parent = tracer.start_span("workflow ns/wf")
    pctx = parent.get_span_context()
    task = TaskState("r.1", "t1", attempt=2, phase=TaskPhase.RETRYING, exit_code=3,
                     message="exit code 3; retry 1/2 in 1.0s")  # fmt: skip
    span = AttemptSpan(pctx.trace_id, pctx.span_id, "task t1", {"tideflow.task": "t1"})
    record = finish_attempt_span(span, task, 1.0)

    sdk = tracer.start_span("task t1", context=None, attributes={"tideflow.task": "t1"})
    sdk.set_attribute("tideflow.outcome", task.phase)
    sdk.add_event("retry", {"delay_seconds": 1.0, "message": task.message or ""})
    sdk.set_status(Status(StatusCode.ERROR, task.message))
    sdk.end()
    reference = span_to_record(sdk)  # type: ignore[arg-type]

    assert set(record) == set(reference)
    assert record["traceId"] == format(pctx.trace_id, "032x")
    assert record["parentSpanId"] == format(pctx.span_id, "016x")
    assert record["spanId"] == span.span_id_hex and span.span_id != 0
    assert record["status"] == {"code": "ERROR", "message": task.message}
    assert record["attributes"]["tideflow.outcome"] == "Retrying"
    assert record["attributes"]["tideflow.retry_delay_seconds"] == 1.0
    assert [e["name"] for e in record["events"]] == ["retry"]
    assert set(record["events"][0]) == set(reference["events"][0])
    assert record["kind"] == reference["kind"]
    assert record["startTimeUnixNano"] <= record["endTimeUnixNano"]
    # What the operator does with it: an SDK span with the same ids, times and status.
    rebuilt = record_to_span(record)
    assert rebuilt.context is not None
    assert format(rebuilt.context.span_id, "016x") == record["spanId"]
    assert rebuilt.parent is not None and rebuilt.parent.span_id == pctx.span_id
    assert rebuilt.status.status_code == StatusCode.ERROR
    assert rebuilt.end_time == record["endTimeUnixNano"]


_json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=3000)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=5), inner, max_size=8)
    ),
    max_leaves=60,
)


@settings(max_examples=60, deadline=None)
@given(
    body=st.dictionaries(st.text(max_size=8), _json, min_size=1, max_size=6),
    limit=st.integers(2048, 20_000),
)
def test_a_record_over_the_limit_is_cut_to_fit_keeping_its_types(
    body: dict[str, Any], limit: int
) -> None:
    """Whatever a record holds, :func:`fit_record` brings it under the limit, keeps each
    value's type (the cloud still validates it), and names every field it cut."""
    fitted, cut = fit_record(body, limit)
    size = len(record_json_unbounded(fitted))
    if len(record_json_unbounded(body)) <= limit:
        assert fitted is body and cut == []
        return
    assert size <= limit and cut
    assert set(fitted) == set(body) | ({"message"} if "message" in body else set())
    for key, value in body.items():
        if key != "message" or not isinstance(value, str):
            assert type(fitted[key]) is type(value) or key == "message"


def test_a_failure_message_quoting_a_huge_command_is_cut_with_a_marker() -> None:
    run = RunState(run_id="u.1", uid="u", generation=1, namespace="d", name="n", spec_json="{}")
    task = TaskState(run.run_id, "a", phase=TaskPhase.FAILED, attempt=1,
                     message="cannot start /" + "x" * 2_000_000 + ": Argument list too long",
                     outputs={"k": "v"})  # fmt: skip
    text = record_json(task.to_record(run))
    assert len(text) <= MAX_RECORD_BYTES
    record = TaskRecord.model_validate(json.loads(text))
    assert record.message is not None and record.message.startswith("cannot start /xxx")
    assert "cut by the agent" in record.message and record.outputs == {"k": "v"}


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)  # past 64 bits: orjson refuses, the stdlib writes it
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)  # lone surrogates and non-ASCII included
)
_json_body = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


@settings(max_examples=300)
@given(body=st.dictionaries(st.text(max_size=8), _json_body, max_size=6))
def test_a_record_body_is_ascii_json_with_sorted_keys_that_reads_back_as_the_stdlibs(
    body: dict[str, Any],
) -> None:
    """The body as stored and sent (orjson's encoding, the stdlib's as the fallback)
    is ASCII, compact, its keys sorted, and means exactly what the stdlib's text means."""
    text = record_json(body)
    assert text.isascii()
    stdlib = record_json_unbounded(body)
    assert json.loads(text) == json.loads(stdlib)
    assert list(json.loads(text)) == sorted(body)


def test_text_orjson_would_not_escape_is_the_stdlibs_escaped_text() -> None:
    run = RunState("wf.1", "wf", 1, "plant", "wf", "{}", created_at=1.0)
    task = TaskState(run.run_id, "extract", phase="Succeeded", attempt=2, exit_code=0)
    task.started_at, task.finished_at = 1796132295.306305, 1796132296.5
    record = task.to_record(run)
    assert record_json(record) == record_json_unbounded(record)  # a step's record: same text
    for body in ({"m": "café"}, {"m": "\ud800 lone"}, {"n": 2**64}, {"m": "\u2028"}):
        assert record_json(body) == record_json_unbounded(body)
