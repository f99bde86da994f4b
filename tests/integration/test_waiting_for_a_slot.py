"""A run's attempt waiting for a concurrency place gives up when its run is cancelled.

The places are the agent's, shared by its runs: a chain's next attempt (or any
ready task) of run A may wait for the only place while run B's long task holds
it.  A cancel or a deadline of A sets that attempt's abort; the attempt must
stop waiting then, not when B's task ends (A's cancel took as long as B's task
did).  Real processes, a real SQLite file.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.executor import Executor, _Slot, local_assignment
from edge_agent.runner import Abort
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from tideflow.spec import parse_spec

LONG = 30.0  # B's task: far longer than any wait below


def chain_a(**extra: Any) -> dict[str, Any]:
    return {
        "tasks": [
            {"name": "a1", "command": ["sleep", "0.3"]},
            {"name": "a2", "dependsOn": ["a1"], "command": ["true"]},
            {"name": "a3", "dependsOn": ["a2"], "command": ["true"]},
        ],
        **extra,
    }


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_a_cancel_or_deadline_does_not_wait_for_another_runs_task(
    tmp_path: Path, how: str
) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    b_started = asyncio.Event()

    def listener(run: RunState, task: TaskState | None) -> None:
        if task is not None and task.name == "b" and task.phase == "Running":
            b_started.set()

    executor = Executor(
        store, work_dir=tmp_path / "w", concurrency=1, grace_seconds=0.5, listener=listener
    )
    try:
        a_body = chain_a(deadlineSeconds=2) if how == "deadline" else chain_a()
        b_body = {"tasks": [{"name": "b", "command": ["sleep", str(LONG)]}]}
        a, _ = await executor.submit(local_assignment("default", "a", parse_spec(a_body)))
        b, _ = await executor.submit(local_assignment("default", "b", parse_spec(b_body)))
        a_driver = executor.start(a.run_id)
        await asyncio.sleep(0.1)  # a1 holds the place; b waits for it, first in line
        b_driver = executor.start(b.run_id)
        await asyncio.wait_for(b_started.wait(), 10)  # a1 ended; a2 waits behind b
        await asyncio.sleep(0.2)
        _, tasks = await store.load_run(a.run_id)
        assert {t.name: t.phase for t in tasks} == {
            "a1": "Succeeded",
            "a2": "Pending",
            "a3": "Pending",
        }
        began = time.monotonic()
        if how == "cancel":
            assert await executor.cancel(a.run_id, "user asked")
            final = await asyncio.wait_for(asyncio.shield(a_driver), LONG)
            assert final.phase == "Cancelled"
        else:
            final = await asyncio.wait_for(asyncio.shield(a_driver), LONG)
            assert (final.phase, final.reason) == ("Failed", "DeadlineExceeded")
        assert time.monotonic() - began < 5, "waited for another run's task to end"
        _, tasks = await store.load_run(a.run_id)
        assert {t.name: t.phase for t in tasks} == {
            "a1": "Succeeded",
            "a2": "Cancelled",
            "a3": "Cancelled",
        }
        assert not b_driver.done()
        # The place is still counted right: b holds it, and gives it back when cancelled.
        assert executor._slots.locked()
        assert await executor.cancel(b.run_id, "done")
        assert (await asyncio.wait_for(b_driver, 10)).phase == "Cancelled"
        assert not executor._slots.locked()
        c, _ = await executor.submit(
            local_assignment(
                "default", "c", parse_spec({"tasks": [{"name": "c", "command": ["true"]}]})
            )
        )
        assert (await asyncio.wait_for(executor.run_to_end(c.run_id), 10)).phase == "Succeeded"
    finally:
        await executor.shutdown()
        await store.close()


@pytest.mark.parametrize("order", ["release-then-abort", "abort-then-release"])
async def test_an_abort_in_the_turn_the_place_is_handed_over_leaks_nothing(order: str) -> None:
    """The place given to the waiter and its abort in the same turn, either order:
    the place is taken or passed on, never lost, and nothing cancels the attempt's
    task afterwards."""
    limit = asyncio.Semaphore(1)
    await limit.acquire()  # another run's task holds the only place
    abort = Abort()
    slot = _Slot(limit)
    waiter = asyncio.create_task(slot.acquire(abort))
    await asyncio.sleep(0)
    assert not waiter.done()
    if order == "release-then-abort":
        limit.release()
        abort.set()
    else:
        abort.set()
        limit.release()
    took = await waiter
    assert took == slot.held
    slot.release()
    await asyncio.sleep(0.01)  # (any late callback has run)
    assert not limit.locked(), "the place was lost"
    assert not waiter.cancelled()


async def test_a_cancel_of_the_waiting_task_itself_still_cancels_it() -> None:
    limit = asyncio.Semaphore(1)
    await limit.acquire()
    slot = _Slot(limit)
    waiter = asyncio.create_task(slot.acquire(Abort()))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    limit.release()
    assert not limit.locked() and not slot.held
