"""An attempt's span is derived from its outcome's task record (decision 0036).

The agent used to build each attempt's span record whole
(``AttemptSpan`` + ``finish_attempt_span``, attributes repeating the record's
fields) and send it inside the outcome record.  Now the record carries only
``attemptSpan`` (the ids, the site, and for an outcome without ``finishedAt``
its end and retry delay) and :func:`tideflow.tracing.attempt_span_of` makes the
span.  Proved here, for every kind of outcome: the derived span is the one the
old path made (same name, ids, attributes, events, status; times as the
record has them), whichever way it is reached — from the record as stored,
through the wire's two decoders into the operator's applier, or filed into
the site's ``spans`` table and read back by ``trace`` — and an older agent's
whole ``span`` is still taken as sent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from services import old_spans
from services.old_spans import AttemptSpan, finish_attempt_span

from edge_agent import tracing as agent_tracing
from edge_agent.state import RunState, TaskState, record_json
from edge_agent.store import Store
from edge_agent.tracing import AgentTracer, AttemptIds
from tideflow import wire, wire_events
from tideflow.phases import RunPhase, TaskPhase
from tideflow.tracing import attempt_span_of, record_to_span, stored_span, unix_ns
from tideflow_operator.applier import Applier, carried_span

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
RUN_SPAN = "a3ce929d0e0e4736"
SITE = "plant-7"
STARTED, FINISHED, ENDED = 1764499991.25, 1764499995.75, 1764499996.5

# (phase, exit code, message, finished, retry delay): one of each kind of outcome.
OUTCOMES: dict[str, tuple[str, int | None, str | None, float | None, float | None]] = {
    "succeeded": (TaskPhase.SUCCEEDED, 0, None, FINISHED, None),
    "failed": (TaskPhase.FAILED, 3, "exit code 3", FINISHED, None),
    "timed-out": (TaskPhase.FAILED, -9, "timed out after 5s; process group killed", FINISHED,
                  None),
    "retrying": (TaskPhase.RETRYING, 1, "exit code 1; retry 1/3 in 2.5s", None, 2.4567),
    "retry-after-timeout": (TaskPhase.RETRYING, -9, "timed out after 1s; retry 2/3 in 4.0s",
                            None, 4.0),
    "cancelled": (TaskPhase.CANCELLED, -15, None, FINISHED, None),
    "interrupted": (TaskPhase.INTERRUPTED, None, "attempt 1 interrupted: the agent stopped",
                    None, None),
    "template-failure": (TaskPhase.FAILED, None, "template {{x}} has no value" + "!" * 300,
                         FINISHED, None),
}  # fmt: skip


def make_run() -> RunState:
    run = RunState("uid-1.3", "uid-1", 3, "etl", "nightly", "{}", trace_id=TRACE, span_id=RUN_SPAN)
    run.phase = RunPhase.RUNNING
    return run


def outcome(kind: str, *, compensation: bool = False, attempt: int = 2) -> TaskState:
    phase, exit_code, message, finished, _ = OUTCOMES[kind]
    return TaskState(
        "uid-1.3", "extract", compensation=compensation, phase=phase, attempt=attempt,
        started_at=STARTED, finished_at=finished, exit_code=exit_code, message=message,
    )  # fmt: skip


def old_path(
    run: RunState, task: TaskState, site: str | None, delay: float | None, span_id: int
) -> dict[str, Any]:
    """The span as the agent made it before decision 0036, with the record's times.

    The attributes are what ``AgentTracer.attempt_span`` gave an ``AttemptSpan``
    then; the clock is the record's (start at ``startedAt``, the end and every
    event at the attempt's end), so the two paths can be compared exactly.
    """
    attributes: dict[str, Any] = {
        "tideflow.workflow": run.name,
        "tideflow.namespace": run.namespace,
        "tideflow.run_id": run.run_id,
        "tideflow.task": task.name,
        "tideflow.attempt": task.attempt,
        "tideflow.compensation": task.compensation,
    }
    if site:
        attributes["tideflow.site"] = site
    span = AttemptSpan(int(TRACE, 16), int(RUN_SPAN, 16), f"task {task.name}", attributes)
    span.span_id = span_id
    assert task.started_at is not None
    span.start_ns = unix_ns(task.started_at)
    end = unix_ns(task.finished_at or ENDED)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(old_spans.time, "time_ns", lambda: end)
        return finish_attempt_span(span, task, delay)


def new_path(
    run: RunState, task: TaskState, site: str | None, delay: float | None
) -> tuple[dict[str, Any], int]:
    """The outcome record as the agent now writes it, and its span id."""
    tracer = AgentTracer.__new__(AgentTracer)  # (no provider: only the attempt's part)
    tracer.site = site
    ids = AttemptIds(TRACE, RUN_SPAN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agent_tracing.time, "time", lambda: ENDED)
        ref = tracer.attempt_span_ref(ids, task, delay)
    return {**task.to_record(run), "attemptSpan": ref}, int(ids.span_id_hex, 16)


@pytest.mark.parametrize("kind", sorted(OUTCOMES))
@pytest.mark.parametrize("site", [SITE, None])
def test_the_derived_span_is_the_span_the_old_path_made(kind: str, site: str | None) -> None:
    run, task = make_run(), outcome(kind)
    delay = OUTCOMES[kind][4]
    record, span_id = new_path(run, task, site, delay)
    derived = attempt_span_of(record)
    assert derived == old_path(run, task, site, delay, span_id)
    # What the record carries beyond its own fields: ids, site, an end it lacks.
    assert set(record["attemptSpan"]) == (
        {"traceId", "spanId", "parentSpanId"}
        | ({"site"} if site else set())
        | ({"endedAt"} if task.finished_at is None else set())
        | ({"retryDelaySeconds"} if delay is not None else set())
    )
    # The operator re-exports it: an SDK span with the same ids, times and status.
    rebuilt = record_to_span(derived)
    assert (rebuilt.start_time, rebuilt.end_time) == (
        derived["startTimeUnixNano"],
        derived["endTimeUnixNano"],
    )


def test_a_compensation_attempt_and_a_later_attempt_are_derived_as_before() -> None:
    run = make_run()
    for task in (outcome("failed", compensation=True), outcome("succeeded", attempt=7)):
        record, span_id = new_path(run, task, SITE, None)
        assert attempt_span_of(record) == old_path(run, task, SITE, None, span_id)


def test_a_record_with_a_whole_span_gives_that_span_and_one_without_gives_none() -> None:
    """An agent between decisions 0022 and 0036 sends the span whole: taken as sent."""
    run = make_run()
    task = outcome("failed")
    whole = old_path(run, task, SITE, None, 0x00F067AA0BA902B7)
    whole["attributes"]["tideflow.note"] = "only an old agent knows this"
    assert attempt_span_of({**task.to_record(run), "span": whole}) == whole
    assert attempt_span_of(task.to_record(run)) is None
    assert stored_span(whole) == whole  # a span record's body, as stored
    assert stored_span({**task.to_record(run), "span": whole}) == whole


def test_a_traced_outcome_record_is_a_third_of_what_it_was() -> None:
    run, task = make_run(), outcome("succeeded")
    record, span_id = new_path(run, task, SITE, None)
    before = record_json({**task.to_record(run), "span": old_path(run, task, SITE, None, span_id)})
    after = record_json(record)
    assert len(after) < len(before) / 2, (len(after), len(before))


def events_message(records: list[tuple[str, dict[str, Any]]]) -> bytes:
    body = {
        "v": 1, "kind": "events", "site": SITE, "seq": 1, "sentAt": 1764500100.5,
        "payload": {"records": [
            {"seq": n, "kind": kind, "body": rec} for n, (kind, rec) in enumerate(records, 1)
        ]},
    }  # fmt: skip
    return json.dumps(body).encode()


@pytest.mark.parametrize("kind", sorted(OUTCOMES))
def test_the_cloud_derives_the_same_span_through_either_decoder(kind: str) -> None:
    run, task = make_run(), outcome(kind)
    delay = OUTCOMES[kind][4]
    record, span_id = new_path(run, task, SITE, delay)
    expected = old_path(run, task, SITE, delay, span_id)
    data = events_message([("task", record)])
    topic = wire.topic(SITE, wire.EVENTS)
    fast = wire_events.decode_batch(topic, data)
    assert fast is not None
    _envelope, payload = wire.decode(topic, data)
    slow = wire_events.checked_batch(SITE, payload)  # type: ignore[arg-type]
    for checked in (fast, slow):
        body = checked.records[0]["body"]
        assert body is not None
        assert carried_span(body) == expected
    applier = Applier()
    applier.apply_batch(SITE, fast)
    assert [(s.site, s.body) for s in applier.drain_spans()] == [(SITE, expected)]


def test_the_cloud_still_exports_an_older_agents_whole_span_beside_a_derived_one() -> None:
    run = make_run()
    old_task, new_task = outcome("failed"), outcome("succeeded", attempt=3)
    whole = old_path(run, old_task, SITE, None, 0x00F067AA0BA902B7)
    whole["attributes"]["tideflow.note"] = "only an old agent knows this"
    new_record, span_id = new_path(run, new_task, SITE, None)
    data = events_message([("task", {**old_task.to_record(run), "span": whole}),
                           ("task", new_record)])  # fmt: skip
    fast = wire_events.decode_batch(wire.topic(SITE, wire.EVENTS), data)
    assert fast is not None
    applier = Applier()
    applier.apply_batch(SITE, fast)
    collected = applier.drain_spans()
    assert [s.body for s in collected] == [whole, old_path(run, new_task, SITE, None, span_id)]
    exported = [record_to_span(s.body) for s in collected]  # what goes out through OTLP
    assert [format(s.context.span_id, "016x") for s in exported] == [
        "00f067aa0ba902b7",
        f"{span_id:016x}",
    ]
    assert exported[0].attributes["tideflow.note"] == "only an old agent knows this"


def test_a_malformed_attempt_span_fails_its_record_as_malformed() -> None:
    run = make_run()
    record, _ = new_path(run, outcome("succeeded"), SITE, None)
    record["attemptSpan"]["spanId"] = "not hex"
    with pytest.raises(wire.WireError) as raised:
        wire.decode_record(wire.EventRecord(seq=1, kind="task", body=record))
    assert raised.value.reason == wire.DropReason.BAD_RECORD


async def test_the_store_files_the_record_and_trace_reads_the_derived_span(
    tmp_path: Path,
) -> None:
    run = make_run()
    run.phase = RunPhase.PENDING
    tasks = [TaskState(run.run_id, name) for name in ("a", "b")]
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        assert await store.create_run(run, tasks)
        expected = []
        for kind, task in zip(("retrying", "succeeded"), tasks, strict=True):
            template = outcome(kind)
            template.name = task.name
            task.__dict__.update({k: v for k, v in template.__dict__.items() if k != "name"})
            record, span_id = new_path(run, task, SITE, OUTCOMES[kind][4])
            task.span_ref = record["attemptSpan"]
            write = store.save_task(run, task)
            task.span_ref = None
            await write
            expected.append(old_path(run, task, SITE, OUTCOMES[kind][4], span_id))
        by_start = sorted(expected, key=lambda s: (s["startTimeUnixNano"], s["spanId"]))
        assert sorted(await store.spans_for_trace(TRACE), key=lambda s: s["spanId"]) == sorted(
            by_start, key=lambda s: s["spanId"]
        )  # unfiled: derived from the outbox
        run.phase, run.finished_at = RunPhase.SUCCEEDED, time.time()
        await store.save_run(run)  # the run's end files the retried attempt ...
        filed = await store._rows("SELECT span_id, name, start_ns, end_ns, body FROM spans")
        retried, last = expected
        assert [(r["span_id"], r["name"]) for r in filed] == [(retried["spanId"], retried["name"])]
        assert [(r["start_ns"], r["end_ns"]) for r in filed] == [
            (retried["startTimeUnixNano"], retried["endTimeUnixNano"])
        ]
        assert [stored_span(json.loads(r["body"])) for r in filed] == [retried]
        # ... and b's last attempt is kept in b's row (decision 0038), derived the same.
        assert await store.kept_spans(run_id=run.run_id) == [last]
        assert sorted(await store.spans_for_trace(TRACE), key=lambda s: s["spanId"]) == sorted(
            expected, key=lambda s: s["spanId"]
        )
    finally:
        await store.close()


def test_the_golden_outcome_with_attempt_span_derives_the_golden_whole_span() -> None:
    """The two golden forms of one outcome (0022's ``span``, 0036's ``attemptSpan``)."""
    golden = Path(__file__).resolve().parents[1] / "golden" / "wire" / "v1"

    def task_body(name: str) -> dict[str, Any]:
        message = json.loads((golden / name).read_text())["message"]
        body: dict[str, Any] = message["payload"]["records"][0]["body"]
        return body

    whole = task_body("events-span-in-task.json")
    derived = task_body("events-attempt-span-in-task.json")
    assert {k: v for k, v in whole.items() if k != "span"} == {
        k: v for k, v in derived.items() if k != "attemptSpan"
    }
    assert attempt_span_of(derived) == whole["span"]


async def test_an_agent_from_before_the_derivation_refuses_a_database_that_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 8: its outbox and spans hold outcome records in place of spans, which an
    agent of schema 7 would file by ``$.span`` (no span id: its commit fails)."""
    from edge_agent import store as store_module

    path = tmp_path / "site.db"
    store = await Store.open(path, synchronous="NORMAL")
    await store.close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 7)
    with pytest.raises(store_module.StoreError, match="newer"):
        await Store.open(path, synchronous="NORMAL")


async def test_an_outcome_whose_span_was_cut_away_is_not_filed_and_its_run_still_ends(
    tmp_path: Path,
) -> None:
    """A record over the size limit may have its nested objects emptied
    (``fit_record``'s last resort): an ``attemptSpan`` or ``span`` with no ids
    then stands for no span.  Filing must skip it, not fail the run's last commit."""
    run = make_run()
    run.phase = RunPhase.PENDING
    tasks = [TaskState(run.run_id, name) for name in ("a", "b", "c")]
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        assert await store.create_run(run, tasks)
        # (c's outcome is a retry: filed, beside the cut records; decision 0038 keeps a
        # finished task's last attempt in its row instead.)
        record, span_id = new_path(run, outcome("retrying"), SITE, OUTCOMES["retrying"][4])
        own = {k: v for k, v in record.items() if k != "attemptSpan"}
        cut = [{**own, "task": "a", "attemptSpan": {}}, {**own, "task": "b", "span": {}}]
        for body in cut:
            await store._submit(
                lambda db, body=body: db.execute(
                    "INSERT INTO outbox (kind, run_id, body, created_at, span_trace)"
                    " VALUES ('task', ?, ?, 1.0, ?)",
                    (run.run_id, record_json(body), TRACE),
                )
            )
        assert attempt_span_of(cut[0]) is None and attempt_span_of(cut[1]) is None
        whole = outcome("retrying")
        whole.name = "c"
        tasks[2].__dict__.update({k: v for k, v in whole.__dict__.items() if k != "name"})
        tasks[2].span_ref = record["attemptSpan"]
        await store.save_task(run, tasks[2])
        tasks[2].span_ref = None
        assert [s["spanId"] for s in await store.spans_for_trace(TRACE)] == [f"{span_id:016x}"]
        run.phase, run.finished_at = RunPhase.SUCCEEDED, time.time()
        await store.save_run(run)  # files: the two cut records are skipped
        assert await store._scalar("SELECT count(*) FROM spans") == 1
        assert (await store.load_run(run.run_id))[0].phase == RunPhase.SUCCEEDED
    finally:
        await store.close()
