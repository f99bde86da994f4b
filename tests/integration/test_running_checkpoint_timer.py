"""The Running checkpoint's own timer (decision 0042) against what can happen to
the store and the attempt while it is pending, on a real SQLite file with real
processes: nothing the loop would report as an unhandled error, no crash, and
the outcome's write (not the timer) says what went wrong."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from edge_agent.executor import RUNNING_CHECKPOINT_SECONDS, Executor, local_assignment
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store, StoreError
from tideflow.spec import parse_spec


class LoopErrors:
    """What reaches the event loop's exception handler (an error nobody handled)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(lambda _loop, context: self.seen.append(context))

    def close(self) -> list[dict[str, Any]]:
        gc.collect()  # "exception was never retrieved" is said when a future is collected
        self.loop.set_exception_handler(None)
        return self.seen


async def test_the_store_closed_while_the_timer_is_pending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    errors = LoopErrors()
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    started = asyncio.Event()

    def listener(run: RunState, task: TaskState | None) -> None:
        if task is not None and task.phase == "Running":
            started.set()

    executor = Executor(store, work_dir=tmp_path / "w", concurrency=1, listener=listener)
    body = {"tasks": [{"name": "slow", "command": ["sleep", "0.3"]}]}
    run, _ = await executor.submit(local_assignment("default", "wf", parse_spec(body)))
    driver = executor.start(run.run_id)
    await asyncio.wait_for(started.wait(), 10)
    with caplog.at_level(logging.WARNING):
        await store.close()  # the Running checkpoint's timer is still pending
        await asyncio.sleep(RUNNING_CHECKPOINT_SECONDS * 3)
        with pytest.raises(StoreError):
            await asyncio.wait_for(driver, 10)
        await executor.shutdown()
    assert errors.close() == []
    assert any("Running checkpoint" in r.getMessage() for r in caplog.records)


async def test_the_store_full_while_timers_are_pending_then_the_run_resumes(
    tmp_path: Path,
) -> None:
    """A small database fills up while attempts of 10-40 ms (some past their 20 ms
    timer, some not) run side by side: the run stops with StoreFullError, nothing
    reaches the loop's exception handler, and with room again the next executor
    finishes the run, each task Succeeded once."""
    errors = LoopErrors()
    db = tmp_path / "small.db"
    journal = tmp_path / "journal"
    # (the empty schema's 21 pages, since migration 10, and 8 of room)
    store = await Store.open(db, synchronous="NORMAL", max_bytes=116 * 1024)
    executor = Executor(store, work_dir=tmp_path / "w", concurrency=3)
    noisy = (
        'echo "$TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"; sleep "$NAP";'
        " head -c 9000 /dev/urandom | base64"
    )
    tasks = [
        {"name": f"t{i}", "script": noisy, "env": {"J": str(journal), "NAP": f"0.0{i % 5}"}}
        for i in range(40)
    ]
    run, _ = await executor.submit(
        local_assignment("default", "fill", parse_spec({"tasks": tasks}))
    )
    with pytest.raises(StoreError):
        await asyncio.wait_for(executor.run_to_end(run.run_id), 60)
    await executor.shutdown()
    await store.close()
    assert errors.close() == []

    store = await Store.open(db, synchronous="NORMAL")
    try:
        executor = Executor(store, work_dir=tmp_path / "w", concurrency=3)
        final = await asyncio.wait_for(executor.run_to_end(run.run_id), 60)
        assert final.phase == "Succeeded"
        _, states = await store.load_run(run.run_id)
        seen: dict[str, list[int]] = {}
        for line in journal.read_text().splitlines():
            name, attempt = line.split()
            seen.setdefault(name, []).append(int(attempt))
        for state in states:
            attempts = seen[state.name]
            assert attempts == sorted(set(attempts)), (state.name, attempts)
            assert (state.phase, state.attempt) == ("Succeeded", attempts[-1])
        assert await store.integrity_check() == "ok"
    finally:
        await store.close()


async def test_many_attempts_around_the_timer_side_by_side(tmp_path: Path) -> None:
    """48 tasks of 10-30 ms, eight at a time: each reports its outcome alone or
    Running then its outcome, never Running for an attempt that did not last the
    timer's 20 ms, the Running record saying what the outcome says of the start;
    the rows end with no pid."""
    errors = LoopErrors()
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    executor = Executor(store, work_dir=tmp_path / "w", concurrency=8)
    try:
        naps = ("0.01", "0.015", "0.02", "0.025", "0.03")
        body = {
            "tasks": [
                {"name": f"t{i}", "command": ["sleep", naps[i % len(naps)]]} for i in range(48)
            ]
        }
        run, _ = await executor.submit(local_assignment("default", "wf", parse_spec(body)))
        final = await asyncio.wait_for(executor.run_to_end(run.run_id), 60)
        assert final.phase == "Succeeded"
        _, states = await store.load_run(run.run_id)
        by_name = {state.name: state for state in states}
        records: dict[str, list[dict[str, Any]]] = {}
        for record in await store.outbox_records(run.run_id):
            if record.kind == "task":
                body_ = json.loads(record.body)
                records.setdefault(body_["task"], []).append(body_)
        for name, state in by_name.items():
            phases = [r["phase"] for r in records[name]]
            assert phases in (["Succeeded"], ["Running", "Succeeded"]), (name, phases)
            assert all(r["attempt"] == 1 for r in records[name])
            assert {r["startedAt"] for r in records[name]} == {state.started_at}
            assert state.pid is None and state.pid_start is None
            if phases[0] == "Running":
                assert state.finished_at is not None and state.started_at is not None
                lasted = state.finished_at - state.started_at
                assert lasted >= RUNNING_CHECKPOINT_SECONDS, (name, lasted)
    finally:
        await executor.shutdown()
        await store.close()
    assert errors.close() == []
