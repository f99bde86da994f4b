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
