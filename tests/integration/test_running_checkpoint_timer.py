"""The Running checkpoint's own timer (decision 0042) against what can happen to
the store and the attempt while it is pending, on a real SQLite file with real
processes: nothing the loop would report as an unhandled error, no crash, and
the outcome's write (not the timer) says what went wrong."""

from __future__ import annotations

import asyncio
import gc
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
    store = await Store.open(db, synchronous="NORMAL", max_bytes=112 * 1024)
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
