"""A finished task's last attempt keeps its span in the task's own row (decision 0038).

Since decision 0036 an outcome's record carries only its attempt span's ids
(``attemptSpan``) and the span is derived from the record.  The ``spans``
table then held a copy of every outcome record, made at the run's end: for a
task's last attempt a copy of what its ``task_runs`` row already says.  Now
that row keeps the ids (``span_ref``) and the span is derived from the row;
only attempts the row no longer describes (retried ones; interrupted ones go
as span records of their own) are filed.  Proved with the real executor on
real SQLite files:

* ``trace`` (``Store.spans_for_trace``) sees every attempt's span exactly once,
  the same span the cloud derives from the outcome record on the wire, while
  the run goes, after its end, after the ack that compacts its records, and
  after the agent is reopened;
* the ``spans`` table holds the run span and retried attempts only;
* retention removes a pruned run's kept spans with its rows;
* the demo's own reading of the site database counts each succeeded span once.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from edge_agent.executor import Executor, local_assignment
from edge_agent.runner import AttemptRequest, AttemptResult
from edge_agent.store import OutboxRecord, Store
from edge_agent.tracing import AgentTracer
from tideflow.spec import parse_spec
from tideflow.tracing import attempt_span_of
from tideflow.wire import TASK_RECORD

SITE = "plant-7"


class FirstAttemptFails:
    """Fails each task's first attempt (exit code 1), then succeeds; ``broken`` always fail."""

    def __init__(self, broken: frozenset[str] = frozenset()) -> None:
        self.broken = broken

    async def run(self, request: AttemptRequest) -> AttemptResult:
        request.on_started(0, None)
        if request.task in self.broken or request.attempt == 1:
            return AttemptResult(1, message="exit code 1")
        return AttemptResult(0, outputs={"n": str(request.attempt)})


SPEC = {
    "tasks": [
        {"name": "flaky", "command": ["x"], "retry": {"limit": 2, "backoff": {"seconds": 0.01}}},
        {"name": "after", "command": ["x"], "dependsOn": ["flaky"],
         "retry": {"limit": 1, "backoff": {"seconds": 0.01}}},
        {"name": "broken", "command": ["x"]},
    ]
}  # fmt: skip


def spans_derived_from_the_wire(records: list[OutboxRecord]) -> list[dict[str, Any]]:
    """What the cloud makes of the outcome records the site sent (the operator's derivation)."""
    spans = [attempt_span_of(json.loads(r.body)) for r in records if r.kind == TASK_RECORD]
    return [span for span in spans if span is not None]


def by_id(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {span["spanId"]: span for span in spans}
    assert len(found) == len(spans), "a span seen twice"
    return found


async def ack_everything(store: Store) -> None:
    """The cloud acks every record: the outbox is compacted (and anything unfiled filed)."""
    top = (await store.outbox_stats()).last_seq
    assert top is not None
    await store.ack(top)


async def traced_run(path: Path) -> tuple[Store, str, str]:
    store = await Store.open(path, synchronous="NORMAL")
    try:
        executor = Executor(
            store,
            work_dir=path.parent / "work",
            runner=FirstAttemptFails(frozenset({"broken"})),
            tracer=AgentTracer(store, SITE),
        )
        assignment = local_assignment("plant", "kept", parse_spec(SPEC))
        await executor.submit(assignment)
        final = await asyncio.wait_for(executor.run_to_end(assignment.run_id), 30)
        assert final.phase == "Failed"  # "broken" fails for good
        assert final.trace_id is not None
    except BaseException:
        await store.close()
        raise
    return store, assignment.run_id, final.trace_id


async def test_trace_sees_each_attempt_once_and_only_retried_attempts_are_filed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.db"
    store, run_id, trace_id = await traced_run(path)
    try:
        sent = spans_derived_from_the_wire(await store.outbox_records(run_id))
        # flaky: attempt 1 retried, attempt 2 succeeded; after: 1 retried, 2 succeeded;
        # broken: attempt 1 failed (no retry).
        assert sorted(
            (s["attributes"]["tideflow.task"], s["attributes"]["tideflow.attempt"],
             s["attributes"]["tideflow.outcome"]) for s in sent
        ) == [
            ("after", 1, "Retrying"), ("after", 2, "Succeeded"), ("broken", 1, "Failed"),
            ("flaky", 1, "Retrying"), ("flaky", 2, "Succeeded"),
        ]  # fmt: skip
        attempts = by_id(sent)

        def seen(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
            found = by_id(spans)
            tasks = {k: v for k, v in found.items() if v["name"].startswith("task ")}
            assert tasks == attempts  # every attempt, once, as the cloud derives it
            (run_span,) = [v for v in found.values() if v["name"].startswith("workflow ")]
            assert all(v["parentSpanId"] == run_span["spanId"] for v in tasks.values())
            return found

        at_end = seen(await store.spans_for_trace(trace_id))
        filed = await store._rows("SELECT name, body FROM spans ORDER BY rowid")
        # The run span and the two retried attempts: not the three last attempts.
        assert sorted(row["name"] for row in filed) == [
            "task after", "task flaky", "workflow plant/kept",
        ]  # fmt: skip
        kept = await store.kept_spans(run_id=run_id)
        assert sorted(
            (s["attributes"]["tideflow.task"], s["attributes"]["tideflow.attempt"]) for s in kept
        ) == [("after", 2), ("broken", 1), ("flaky", 2)]

        await ack_everything(store)
        assert await store.outbox_records(run_id) == []
        assert seen(await store.spans_for_trace(trace_id)) == at_end
        assert len(await store._rows("SELECT name FROM spans")) == 3  # the ack filed nothing
    finally:
        await store.close()
    store = await Store.open(path, synchronous="NORMAL")
    try:
        assert seen(await store.spans_for_trace(trace_id)) == at_end
    finally:
        await store.close()


async def test_a_kept_span_is_the_task_rows_own_and_goes_with_the_run(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store, run_id, trace_id = await traced_run(path)
    try:
        rows = await store._rows(
            "SELECT task, phase, attempt, span_ref FROM task_runs WHERE run_id=? ORDER BY task",
            (run_id,),
        )
        assert [(r["task"], r["phase"], r["attempt"]) for r in rows] == [
            ("after", "Succeeded", 2), ("broken", "Failed", 1), ("flaky", "Succeeded", 2),
        ]  # fmt: skip
        for row in rows:
            ref = json.loads(row["span_ref"])
            assert ref["traceId"] == trace_id and ref["site"] == SITE
            assert not {"endedAt", "retryDelaySeconds"} & ref.keys()
        await ack_everything(store)
        # Retention prunes the finished run: its rows, filed spans and kept spans go.
        assert await store.prune(finished_before=4e9) == 1
        assert await store.spans_for_trace(trace_id) == []
        assert await store.kept_spans(run_id=run_id) == []
    finally:
        await store.close()


async def test_the_demo_counts_each_succeeded_last_attempt_once(tmp_path: Path) -> None:
    """The demo reads site databases itself (decision 0005): it sees kept spans too."""
    from tideflow.tools.demo.truth import read_site_db

    path = tmp_path / "site.db"
    store, _run_id, _trace_id = await traced_run(path)
    try:
        truth = read_site_db(path, "plant", "kept")
        assert truth.succeeded_spans == {"flaky": 1, "after": 1}
        await ack_everything(store)
        assert read_site_db(path, "plant", "kept").succeeded_spans == {"flaky": 1, "after": 1}
    finally:
        await store.close()


async def test_a_damaged_kept_span_is_skipped_not_a_crash(tmp_path: Path) -> None:
    """``trace`` reads every kept span of a trace: one row whose ref is not JSON
    (a damaged file, a hand edit) costs that span, not the command."""
    path = tmp_path / "site.db"
    store, run_id, trace_id = await traced_run(path)
    try:
        before = await store.spans_for_trace(trace_id)
        await store._submit(
            lambda db: db.execute(
                "UPDATE task_runs SET span_ref='{not json' WHERE run_id=? AND task='broken'",
                (run_id,),
            )
        )
        after = await store.spans_for_trace(trace_id)
        assert [s for s in before if s["attributes"].get("tideflow.task") != "broken"] == after
    finally:
        await store.close()
