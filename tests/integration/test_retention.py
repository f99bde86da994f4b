"""Retention at the site: a real SQLite file through the store's own writes.

Proves: a site that fired 10,000 runs (each with a task, a 2 KiB log tail and
a span) keeps its database under 1 MiB once the cloud has acknowledged them
and they are past the retention; nothing the cloud has not acknowledged and
no unfinished run is ever pruned; a schedule's history limits hold at the site
within the retention period; an old database (made before incremental vacuum)
is switched over and shrinks too.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edge_agent.retention import prune_once
from edge_agent.state import RunState, TaskState
from edge_agent.store import ScheduleRow, Store

T0 = 1_767_225_600.0  # 2026-01-01
MIB = 1024 * 1024


async def fire(store: Store, i: int, *, phase: str = "Succeeded", schedule: str = "s-1") -> str:
    """What the agent writes for one fired run: created, one task with a log tail, finished."""
    at = T0 + i
    run = RunState(
        run_id=f"r{i}.1",
        uid=f"r{i}",
        generation=1,
        namespace="plant-7",
        name=f"etl-line-2-{int(at)}",
        spec_json=json.dumps({"tasks": [{"name": "a", "command": ["true"]}]}),
        created_at=at,
        cron={"uid": schedule, "name": "etl", "generation": 1, "scheduledTime": at},
    )
    task = TaskState(run.run_id, "a")
    assert await store.create_run(run, [task])
    run.phase, run.started_at = "Running", at
    task.phase, task.attempt, task.started_at = "Running", 1, at
    await store.save_task(run, task, also_run=True)
    if phase != "Running":
        task.phase, task.finished_at, task.exit_code = phase, at + 0.5, 0
        await store.save_task(run, task, {"stdout": b"x" * 2048})
        run.phase, run.finished_at = phase, at + 0.5
        await store.save_run(run)
    await store.queue_span(
        {
            "traceId": f"{i:032x}",
            "spanId": f"{i:016x}",
            "name": "task a",
            "attributes": {"tideflow.run_id": run.run_id},
            "startTimeUnixNano": int(at * 1e9),
            "endTimeUnixNano": int((at + 0.5) * 1e9),
        }
    )
    return run.run_id


async def ack_all(store: Store) -> None:
    stats = await store.outbox_stats()
    if stats.last_seq:
        await store.ack(stats.last_seq)


def rows(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def test_ten_thousand_acknowledged_runs_leave_a_small_file(tmp_path: Path) -> None:
    db = tmp_path / "site.db"
    store = await Store.open(db, synchronous="OFF")
    try:
        for i in range(10_000):
            await fire(store, i)
        grown = store.size()
        assert grown > 20 * MIB  # what months of runs would cost without retention
        await ack_all(store)
        removed = await prune_once(store, retention_seconds=86400, now=T0 + 10_000 + 2 * 86400)
        assert removed == 10_000
        assert store.size() < 1 * MIB, store.size()
    finally:
        await store.close()
    for table in ("runs", "task_runs", "task_logs", "spans", "outbox"):
        assert rows(db, f"SELECT count(*) FROM {table}") == 0, table


async def test_unacknowledged_and_unfinished_runs_are_never_pruned(tmp_path: Path) -> None:
    db = tmp_path / "site.db"
    store = await Store.open(db, synchronous="OFF")
    try:
        for i in range(10):
            await fire(store, i)
        await ack_all(store)  # the first ten reached the cloud
        unacked = [await fire(store, 100 + i) for i in range(5)]
        running = await fire(store, 200, phase="Running")
        far_future = T0 + 365 * 86400
        assert await prune_once(store, retention_seconds=0, now=far_future) == 10
        left = {r.run_id for r in await store.list_runs()}
        assert left == {*unacked, running}
        # Each still has its records to send; nothing of theirs was touched.
        for run_id in unacked:
            run, tasks = await store.load_run(run_id)
            assert run.phase == "Succeeded" and tasks[0].phase == "Succeeded"
            assert await store.log_tails(run_id, "a")
            assert await store.outbox_records(run_id)
    finally:
        await store.close()


async def test_history_limits_hold_at_the_site_within_the_retention(tmp_path: Path) -> None:
    db = tmp_path / "site.db"
    store = await Store.open(db, synchronous="OFF")
    try:
        spec = {"successfulJobsHistoryLimit": 2, "failedJobsHistoryLimit": 1}
        await store.put_schedule(
            ScheduleRow("s-1", 1, "plant-7", "etl", json.dumps(spec), received_at=T0)
        )
        ok = [await fire(store, i) for i in range(5)]
        bad = [await fire(store, 10 + i, phase="Failed") for i in range(3)]
        await ack_all(store)
        await prune_once(store, retention_seconds=86400, now=T0 + 100)
        left = {r.run_id for r in await store.list_runs()}
        assert left == {*ok[-2:], bad[-1]}
    finally:
        await store.close()


async def test_a_database_made_before_incremental_vacuum_is_switched_and_shrinks(
    tmp_path: Path,
) -> None:
    db = tmp_path / "site.db"
    store = await Store.open(db, synchronous="OFF")
    await store.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")  # as an agent before retention made it
    conn.close()
    assert rows(db, "PRAGMA auto_vacuum") == 0
    store = await Store.open(db, synchronous="OFF")
    try:
        for i in range(2000):
            await fire(store, i)
        grown = store.size()
        await ack_all(store)
        await prune_once(store, retention_seconds=0, now=T0 + 10**6)
        assert store.size() < grown / 5
    finally:
        await store.close()
    assert rows(db, "PRAGMA auto_vacuum") == 2


async def _prune_steps(tmp_path: Path, runs: int) -> int:
    """SQLite VM steps (in hundreds) of one retention pass over ``runs`` finished,
    unacknowledged runs (each with ~5 outbox records); asserts none was pruned."""
    db = tmp_path / f"steps-{runs}.db"
    store = await Store.open(db, synchronous="OFF")
    try:
        for i in range(runs):
            await fire(store, i)
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        conn = store._db._conn
        await store._db._execute(conn.set_progress_handler, count, 100)
        removed = await store.prune(finished_before=T0 + 10 * runs)  # all past retention
        await store._db._execute(conn.set_progress_handler, None, 100)
        assert removed == 0, "runs whose records the cloud has not acknowledged were pruned"
    finally:
        await store.close()
    return steps[0]


async def test_a_pass_over_an_unacknowledged_backlog_reads_the_outbox_once(tmp_path: Path) -> None:
    """A site back from a long offline spell holds every finished run with records in
    its outbox.  The pass that decides what to prune must read the outbox once, not
    once per run: it runs on the database's only thread, and at 15,873 runs with a
    million records the per-run scan held every commit and ack for over ten minutes
    (bench/link_backlog.py -n 1000000).  Twice the runs (and records): about twice
    the work, where one scan per run is four times."""
    small = await _prune_steps(tmp_path, 300)
    large = await _prune_steps(tmp_path, 600)
    assert large < 3 * small, f"work grew {large / small:.1f}x for 2x the backlog"
