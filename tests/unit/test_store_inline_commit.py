"""Group commits that run on the event loop itself (issue 15: a chain step's hand-offs).

Proves, on real SQLite files: a step's checkpoints commit on the event loop
when it has nothing else to run (durably: the job's future resolves with the
transaction committed, as seen by a second connection); heavy work (a new
run's task rows) and any batch on a slow disk (commits averaging above the
bound) go to the database thread; and an inline commit never meets a
statement of the database thread: while the thread holds the connection, a
checkpoint waits for it in order instead of committing beside it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path

import pytest

import edge_agent.store as store_module
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store


def _run() -> RunState:
    return RunState("wf.1", "wf", 1, "plant", "wf", '{"tasks": []}', created_at=1.0)


async def _store(tmp_path: Path, n: int = 2) -> tuple[Store, RunState, list[TaskState]]:
    store = await Store.open(tmp_path / "site.db")  # the default: synchronous=FULL
    run = _run()
    tasks = [TaskState(run.run_id, f"t{i}") for i in range(n)]
    assert await store.create_run(run, tasks)
    return store, run, tasks


def _phase_elsewhere(path: Path, task: str) -> str:
    """The task's committed phase, read through a connection of its own."""
    con = sqlite3.connect(path)
    try:
        return str(con.execute("SELECT phase FROM task_runs WHERE task=?", (task,)).fetchone()[0])
    finally:
        con.close()


async def test_a_step_checkpoint_commits_on_an_idle_loop_and_is_committed_when_awaited(
    tmp_path: Path,
) -> None:
    store, run, tasks = await _store(tmp_path)
    try:
        assert store.inline_commits == 0, "a new run's task rows go to the database thread"
        tasks[0].phase, tasks[0].attempt = "Succeeded", 1
        await store.save_task(run, tasks[0])
        assert store.inline_commits == 1
        assert _phase_elsewhere(tmp_path / "site.db", "t0") == "Succeeded"
        assert int(await store._scalar("PRAGMA synchronous")) == 2  # FULL, on this connection
    finally:
        await store.close()


async def test_a_slow_disk_keeps_commits_on_the_database_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, run, tasks = await _store(tmp_path)
    monkeypatch.setattr(store_module, "INLINE_COMMIT_MAX_SECONDS", 0.0)  # every commit is "slow"
    try:
        tasks[0].phase, tasks[0].attempt = "Succeeded", 1
        await store.save_task(run, tasks[0])
        assert store.inline_commits == 0
        assert _phase_elsewhere(tmp_path / "site.db", "t0") == "Succeeded"
    finally:
        await store.close()


async def test_a_busy_loop_leaves_the_commit_to_the_database_thread(tmp_path: Path) -> None:
    """Other callbacks ready to run: they run during the fsync instead of after it."""
    store, run, tasks = await _store(tmp_path)
    try:
        tasks[0].phase, tasks[0].attempt = "Running", 1
        write = store.save_task(run, tasks[0])
        loop = asyncio.get_running_loop()
        for _ in range(3):  # still ready when the flush runs at the end of this turn
            loop.call_soon(lambda: None)
        await write
        assert store.inline_commits == 0
    finally:
        await store.close()


async def test_an_awaited_step_write_on_an_idle_loop_is_committed_before_it_returns(
    tmp_path: Path,
) -> None:
    """Decision 0027: nothing else ready, so nothing could join the batch: it commits
    at once, and the caller's ``await`` does not even yield."""
    store, run, tasks = await _store(tmp_path)
    try:
        await asyncio.sleep(0)  # let the loop drain what create_run left ready
        tasks[0].phase, tasks[0].attempt = "Succeeded", 1
        outcome = store.save_task(run, tasks[0], awaited=True)
        assert outcome.done(), "committed before save_task returned"
        assert store.inline_commits == 1
        assert _phase_elsewhere(tmp_path / "site.db", "t0") == "Succeeded"
        phases = [json.loads(r.body)["phase"] for r in await store.outbox_records(run.run_id)]
        assert phases[-1] == "Succeeded"
    finally:
        await store.close()


async def test_an_inline_commit_never_meets_a_statement_of_the_database_thread(
    tmp_path: Path,
) -> None:
    store, run, tasks = await _store(tmp_path)
    holding, release = threading.Event(), threading.Event()

    def long_read(conn: sqlite3.Connection) -> int:
        holding.set()
        assert release.wait(10)
        return int(conn.execute("SELECT count(*) FROM task_runs").fetchone()[0])

    try:
        read = asyncio.ensure_future(store._call(long_read))
        assert await asyncio.to_thread(holding.wait, 10)
        tasks[0].phase, tasks[0].attempt = "Succeeded", 1
        write = store.save_task(run, tasks[0])
        await asyncio.sleep(0)  # the flush ran: it must not have committed beside the read
        await asyncio.sleep(0.01)
        assert not write.done()
        assert _phase_elsewhere(tmp_path / "site.db", "t0") == "Pending"
        release.set()
        assert await asyncio.wait_for(read, 10) == 2
        await asyncio.wait_for(write, 10)
        assert store.inline_commits == 0
        assert _phase_elsewhere(tmp_path / "site.db", "t0") == "Succeeded"
        # The thread is free again: the next step's checkpoint commits on the loop.
        tasks[1].phase, tasks[1].attempt = "Succeeded", 1
        await store.save_task(run, tasks[1])
        assert store.inline_commits == 1
    finally:
        release.set()
        await store.close()


async def test_a_task_written_twice_in_one_commit_is_updated_once_and_reported_twice(
    tmp_path: Path,
) -> None:
    """A short task's Running and outcome share a transaction: one UPDATE of its row
    (the outcome's: it writes every column), both records, in order.  If the batch
    fails, each write is tried alone and the Running one updates the row itself."""
    store, run, tasks = await _store(tmp_path)
    statements: list[str] = []
    await store._db.set_trace_callback(statements.append)
    try:
        first = tasks[0]
        first.phase, first.attempt, first.pid, first.pid_start = "Running", 1, 4242, "99"
        running = store.save_task(run, first)
        first.phase, first.pid, first.pid_start = "Succeeded", None, None
        first.exit_code, first.outputs = 0, {"rows": "3"}
        await store.save_task(run, first)
        assert running.done()
        updates = [s for s in statements if s.startswith("UPDATE task_runs")]
        assert len(updates) == 1 and "'Succeeded'" in updates[0], updates
        _, loaded = await store.load_run(run.run_id)
        assert loaded[0] == first
        bodies = [r.body for r in (await store.outbox_records())[1:]]
        assert ['"phase":"Running"' in b for b in bodies] == [True, False]
        assert '"phase":"Succeeded"' in bodies[1]

        statements.clear()
        second = tasks[1]
        second.phase, second.attempt, second.pid = "Running", 1, 4343
        running = store.save_task(run, second)

        def broken(db: sqlite3.Connection) -> None:
            raise RuntimeError("a bug in a later change")

        failed = store._enqueue(broken)
        second.phase, second.pid = "Succeeded", None
        outcome = store.save_task(run, second)
        results = await asyncio.gather(running, failed, outcome, return_exceptions=True)
        assert results[0] is None and isinstance(results[1], RuntimeError) and results[2] is None
        _, loaded = await store.load_run(run.run_id)
        assert loaded[1] == second
        # The batch stopped at the broken change before any UPDATE (the Running one was
        # left to the outcome); then each change alone: the Running one updates its row.
        updates = [s for s in statements if s.startswith("UPDATE task_runs")]
        assert ["'Running'" in u for u in updates] == [True, False], updates
    finally:
        await store._db.set_trace_callback(None)
        await store.close()


async def test_a_backlog_of_checkpoints_commits_on_the_database_thread(tmp_path: Path) -> None:
    """Many step checkpoints queued at once (a burst of independent tasks) are one
    long transaction: it never holds the loop."""
    store, run, tasks = await _store(tmp_path, n=store_module.INLINE_MAX_JOBS + 1)
    try:
        for task in tasks:
            task.phase, task.attempt = "Running", 1
        await asyncio.gather(*(store.save_task(run, task) for task in tasks))
        assert store.inline_commits == 0
        assert await store.task_counts(run.run_id) == {"Running": len(tasks)}
    finally:
        await store.close()


async def test_the_first_write_after_opening_may_meet_a_busy_loop(tmp_path: Path) -> None:
    """Nothing was scheduled before it: the check for the store's own flushes must not
    fail for want of one (it did, and every agent's first write on a busy loop died)."""
    store = await Store.open(tmp_path / "site.db")
    try:
        asyncio.get_running_loop().call_soon(lambda: None)
        assert await store.create_run(_run(), [TaskState("wf.1", "t0")])
    finally:
        await store.close()


async def test_a_progress_checkpoint_superseded_in_its_transaction_writes_nothing(
    tmp_path: Path,
) -> None:
    """Decision 0042: a task's Running checkpoint, committed in one transaction with
    its outcome, leaves no record of its own (the outcome's record supersedes it, and
    nobody could have seen it Running).  Committed on its own, it is written whole."""
    store, run, tasks = await _store(tmp_path)
    statements: list[str] = []
    await store._db.set_trace_callback(statements.append)
    try:
        short, long = tasks
        short.phase, short.attempt, short.started_at, short.pid = "Running", 1, 5.0, 4242
        running = store.save_task(run, short, progress=True)  # queued, not awaited
        short.phase, short.pid, short.finished_at, short.exit_code = "Succeeded", None, 5.01, 0
        await store.save_task(run, short, awaited=True)
        assert running.done() and running.result() is None
        records = [json.loads(r.body) for r in (await store.outbox_records(run.run_id))]
        task_records = [(r["task"], r["phase"]) for r in records if "task" in r]
        assert task_records == [("t0", "Succeeded")]
        assert records[-1]["startedAt"] == 5.0  # what the Running record would have said
        assert sum(s.startswith("INSERT INTO outbox") for s in statements) == 1

        long.phase, long.attempt, long.pid = "Running", 1, 4343
        await asyncio.wait_for(store.save_task(run, long, progress=True), 5)  # alone
        assert _phase_elsewhere(tmp_path / "site.db", "t1") == "Running"
        long.phase, long.pid = "Succeeded", None
        await store.save_task(run, long, awaited=True)
        records = [json.loads(r.body) for r in (await store.outbox_records(run.run_id))]
        task_records = [(r["task"], r["phase"]) for r in records if "task" in r]
        assert task_records == [("t0", "Succeeded"), ("t1", "Running"), ("t1", "Succeeded")]
    finally:
        await store._db.set_trace_callback(None)
        await store.close()


async def test_a_progress_checkpoint_is_written_whole_when_its_batch_fails(
    tmp_path: Path,
) -> None:
    """A batch that fails is tried again job by job: the progress checkpoint is then
    alone in its transaction, nothing supersedes it, and its row and record are kept."""
    store, run, tasks = await _store(tmp_path)
    try:
        first = tasks[0]
        first.phase, first.attempt, first.pid = "Running", 1, 4242
        running = store.save_task(run, first, progress=True)

        def broken(db: sqlite3.Connection) -> None:
            raise RuntimeError("a bug in a later change")

        failed = store._enqueue(broken)
        first.phase, first.pid = "Succeeded", None
        outcome = store.save_task(run, first)
        results = await asyncio.gather(running, failed, outcome, return_exceptions=True)
        assert results[0] is None and isinstance(results[1], RuntimeError) and results[2] is None
        phases = [json.loads(r.body)["phase"] for r in await store.outbox_records(run.run_id)]
        assert phases[-2:] == ["Running", "Succeeded"]
        _, loaded = await store.load_run(run.run_id)
        assert loaded[0] == first
    finally:
        await store.close()
