"""An attempt's span travels inside its outcome's outbox record, and is filed for ``trace``.

Decision 0022: a task outcome and its attempt span are one outbox record (the
task record's ``span``), written in the outcome's transaction; the ``spans``
table, which ``tideflow-agent trace`` and retention read, gets the span later,
in bulk ("filing": at the run's end, or by the ack that compacts it; decision
0032: not on the steps' path of a long run, and not at close).  Proved on
real SQLite files:

* one record per outcome, carrying the span exactly as the span record was;
* ``Store.spans_for_trace`` sees a span from its commit on, filed or not;
* a finished run's spans are in the table when its last record commits;
* a long run files nothing while it runs, nor does a close;
* filing happens once per span: across acks, a run's end, and a writer killed
  with spans unfiled (reopened, they are found and filed);
* an ack never compacts a span away unfiled (it files what it compacts).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from edge_agent.state import RunState, TaskState, record_json
from edge_agent.store import Store
from tideflow.phases import RunPhase

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def make_run() -> RunState:
    return RunState("wf-uid.1", "wf-uid", 1, "plant-7", "wf", '{"tasks": []}', created_at=1.0)


def span_record(run: RunState, task: str, n: int) -> dict[str, Any]:
    return {
        "traceId": TRACE,
        "spanId": f"{n + 1:016x}",
        "parentSpanId": "a3ce929d0e0e4736",
        "name": f"task {task}",
        "kind": "INTERNAL",
        "startTimeUnixNano": 1_764_499_991_000_000_000 + n,
        "endTimeUnixNano": 1_764_499_995_750_000_000 + n,
        "attributes": {
            "tideflow.run_id": run.run_id,
            "tideflow.task": task,
            "tideflow.note": 'quote " and é',
        },
        "events": [{"name": "retry", "timeUnixNano": 5, "attributes": {"delay_seconds": 0.3}}],
        "status": {"code": "OK", "message": None},
    }


async def outcome(store: Store, run: RunState, task: TaskState, n: int) -> dict[str, Any]:
    """A traced attempt's outcome, written the way the executor writes it."""
    task.phase, task.attempt, task.exit_code = "Succeeded", 1, 0
    span = span_record(run, task.name, n)
    task.span_record = span
    write = store.save_task(run, task)
    task.span_record = None
    await write
    return span


def table(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        return [row[0] for row in con.execute("SELECT body FROM spans ORDER BY rowid")]


def outbox(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        rows = con.execute(
            "SELECT o.kind, coalesce(s.body, o.body) FROM outbox o"
            " LEFT JOIN spans s ON s.rowid = o.span_rowid ORDER BY o.seq"
        ).fetchall()
    return [(kind, json.loads(body)) for kind, body in rows]


async def opened(path: Path, n: int) -> tuple[Store, RunState, list[TaskState]]:
    store = await Store.open(path, synchronous="NORMAL")
    run = make_run()
    tasks = [TaskState(run.run_id, f"t{i}") for i in range(n)]
    assert await store.create_run(run, tasks)
    return store, run, tasks


async def test_an_outcome_and_its_span_are_one_record_seen_by_trace_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.db"
    store, run, tasks = await opened(path, 2)
    try:
        spans = [await outcome(store, run, task, i) for i, task in enumerate(tasks)]
        records = outbox(path)
        assert [kind for kind, _ in records] == ["run", "task", "task"]  # no "span" records
        assert [body["span"] for _, body in records[1:]] == spans
        assert [body["phase"] for _, body in records[1:]] == ["Succeeded", "Succeeded"]
        assert table(path) == []  # not filed yet...
        assert await store.spans_for_trace(TRACE) == spans  # ...and `trace` sees them

        run.phase, run.finished_at = RunPhase.SUCCEEDED, 9.0
        await store.save_run(run)  # the run's end files its spans with its last record
        assert table(path) == [record_json(span) for span in spans]
        assert await store.spans_for_trace(TRACE) == spans
    finally:
        await store.close()
    assert table(path) == [record_json(span) for span in spans]  # once, not again at close


async def test_a_long_run_files_nothing_while_it_runs_nor_at_close_and_trace_sees_it_all(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.db"
    store, run, tasks = await opened(path, 300)
    try:
        spans = [await outcome(store, run, task, i) for i, task in enumerate(tasks)]
        assert table(path) == []  # nothing on the steps' path
        assert await store.spans_for_trace(TRACE) == spans
    finally:
        await store.close()
    assert table(path) == []  # nor at close: a backlog's copy must not stall a stop
    store = await Store.open(path, synchronous="NORMAL")
    try:
        assert await store.spans_for_trace(TRACE) == spans
        run.phase, run.finished_at = RunPhase.SUCCEEDED, 9.0
        await store.save_run(run)  # the run's end, after a restart, files them once
        assert table(path) == [record_json(span) for span in spans]
        assert await store.spans_for_trace(TRACE) == spans
    finally:
        await store.close()


async def test_an_ack_files_spans_before_it_compacts_them_away(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store, run, tasks = await opened(path, 3)
    try:
        spans = [await outcome(store, run, task, i) for i, task in enumerate(tasks)]
        top = (await store.outbox_stats()).last_seq
        assert top is not None
        # Whatever the store believes is pending (a filing that failed on a full
        # disk, say), an ack files what it compacts.
        store._unfiled = 0
        await store.ack(top - 1)  # the first two outcomes go; the third stays unacked
        assert [body["task"] for kind, body in outbox(path) if kind == "task"] == ["t2"]
        # What it compacts is filed first; the rest waits for the next trigger.
        assert table(path) == [record_json(span) for span in spans[:2]]
        assert await store.spans_for_trace(TRACE) == spans  # seen once each
        await store.ack(top)
        assert table(path) == [record_json(span) for span in spans]
        assert outbox(path) == []
        assert await store.spans_for_trace(TRACE) == spans
    finally:
        await store.close()
    assert table(path) == [record_json(span) for span in spans]


KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, os, sys
    sys.path[:0] = sys.argv[2:]
    from test_store_spans import make_run, opened, outcome
    from pathlib import Path

    async def main():
        store, run, tasks = await opened(Path(sys.argv[1]), 4)
        for i, task in enumerate(tasks):
            await outcome(store, run, task, i)
        os._exit(0)  # killed: no close, nothing filed

    asyncio.run(main())
    """
)


async def test_spans_left_unfiled_by_a_killed_writer_are_found_and_filed_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.db"
    here = str(Path(__file__).resolve().parent)
    subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path), here, *sys.path],
        check=True, timeout=60,
    )  # fmt: skip
    assert table(path) == []
    run = make_run()
    spans = [span_record(run, f"t{i}", i) for i in range(4)]
    store = await Store.open(path, synchronous="NORMAL")
    try:
        assert await store.spans_for_trace(TRACE) == spans
        (loaded, _tasks) = await store.load_run(run.run_id)
        loaded.phase, loaded.finished_at = RunPhase.SUCCEEDED, 9.0
        await store.save_run(loaded)  # the recovered run ends: its spans are filed
        assert table(path) == [record_json(span) for span in spans]
        top = (await store.outbox_stats()).last_seq
        assert top is not None
        await store.ack(top)
    finally:
        await store.close()
    assert table(path) == [record_json(span) for span in spans]


async def test_the_demo_counts_a_succeeded_attempt_once_filed_or_not(tmp_path: Path) -> None:
    """The demo reads site databases itself (decision 0005): its span count sees both."""
    from tideflow.tools.demo.truth import read_site_db

    path = tmp_path / "site.db"
    store, run, tasks = await opened(path, 2)
    try:
        for i, task in enumerate(tasks):
            task.phase, task.attempt = "Succeeded", 1
            task.span_record = span_record(run, task.name, i)
            task.span_record["attributes"]["tideflow.outcome"] = "Succeeded"
            write = store.save_task(run, task)
            task.span_record = None
            await write
        unfiled = read_site_db(path, run.namespace, run.name)
        assert unfiled.succeeded_spans == {"t0": 1, "t1": 1}
        run.phase, run.finished_at = RunPhase.SUCCEEDED, 9.0
        await store.save_run(run)
        assert read_site_db(path, run.namespace, run.name).succeeded_spans == {"t0": 1, "t1": 1}
    finally:
        await store.close()
