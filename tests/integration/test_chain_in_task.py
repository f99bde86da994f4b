"""A chain's next attempt runs on in the asyncio task of the attempt before it.

Why: a Task per step (made, scheduled, its coroutine started) cost a chain
~30 us of a ~550 us durable step (issue 15).  What must not change with it,
shown here on a real Store (SQLite file) with an in-process runner that
records the asyncio task of each attempt:

* a chain of any length runs in one task (a loop, not recursion: 1,200 steps
  would overflow the interpreter's stack the other way);
* a fan-out still runs its branches side by side, each in a task of its own;
* a stop, a cancel, a suspend or a deadline that comes while a chain goes on
  in its task starts no attempt after it, whether it comes from the chain's
  own attempt (before its outcome commits) or while the chain's next attempt
  waits for its concurrency slot; the run ends in the phases it always did.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from services.in_process import InProcessSite

from edge_agent.runner import AttemptRequest, AttemptResult
from edge_agent.state import RunState, TaskState

Hook = Callable[[], Awaitable[None]]


class Recorder:
    """A TaskRunner that runs nothing: it notes each attempt and its asyncio task."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.task_of: dict[str, asyncio.Task[Any]] = {}
        self.hooks: dict[str, Hook] = {}
        self.running = 0
        self.peak = 0

    async def run(self, request: AttemptRequest) -> AttemptResult:
        request.on_started(0, None)
        self.started.append(request.task)
        current = asyncio.current_task()
        assert current is not None
        self.task_of[request.task] = current
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            hook = self.hooks.get(request.task)
            if hook is not None:
                await hook()
        finally:
            self.running -= 1
        return AttemptResult(0)


class Site(InProcessSite):
    """The site, with an event per task set right after its success committed."""

    def __init__(self, tmp: Path, concurrency: int) -> None:
        self.recorder = Recorder()
        super().__init__(tmp, self.recorder, concurrency=concurrency, listener=self.on_outcome)
        self.committed: dict[str, asyncio.Event] = {}

    def on_outcome(self, run: RunState, task: TaskState | None) -> None:
        # Called in the attempt's own task, right after its outcome committed.
        if task is not None and task.phase == "Succeeded":
            self.committed.setdefault(task.name, asyncio.Event()).set()

    async def committed_success(self, task: str) -> None:
        await self.committed.setdefault(task, asyncio.Event()).wait()


def chain(n: int) -> dict[str, Any]:
    return {
        "tasks": [
            {"name": f"t{i}", "command": ["true"], **({"dependsOn": [f"t{i - 1}"]} if i else {})}
            for i in range(n)
        ]
    }


async def test_a_chain_runs_all_its_attempts_in_one_asyncio_task(tmp_path: Path) -> None:
    async with Site(tmp_path, concurrency=4) as site:
        run = await site.submit(chain(1200))
        driver = site.executor.start(run.run_id)
        final = await asyncio.wait_for(driver, 120)
        assert final.phase == "Succeeded"
        recorder = site.recorder
        assert recorder.started == [f"t{i}" for i in range(1200)]
        tasks = {id(task) for task in recorder.task_of.values()}
        assert len(tasks) == 1, f"{len(tasks)} asyncio tasks for a chain of 1200"
        assert recorder.task_of["t0"] is not driver
        assert site.executor.running_count() == 0


async def test_a_fan_out_runs_its_branches_side_by_side(tmp_path: Path) -> None:
    """A -> (B, C): B continues in A's task, C gets its own; they overlap."""
    async with Site(tmp_path, concurrency=4) as site:
        arrived = {"b": asyncio.Event(), "c": asyncio.Event()}

        def meet(me: str, other: str) -> Hook:
            async def hook() -> None:
                arrived[me].set()
                await asyncio.wait_for(arrived[other].wait(), 10)  # both running at once

            return hook

        site.recorder.hooks = {"b": meet("b", "c"), "c": meet("c", "b")}
        body = {
            "tasks": [
                {"name": "a", "command": ["true"]},
                {"name": "b", "dependsOn": ["a"], "command": ["true"]},
                {"name": "c", "dependsOn": ["a"], "command": ["true"]},
            ]
        }
        run = await site.submit(body)
        final = await asyncio.wait_for(site.executor.run_to_end(run.run_id), 30)
        assert final.phase == "Succeeded"
        task_of = site.recorder.task_of
        assert site.recorder.peak == 2
        assert task_of["b"] is not task_of["c"]
        assert task_of["b"] is task_of["a"]


# r -> (a, x); a -> b -> c.  With one slot, a goes on in r's task and x waits
# for the slot; then b (in the same task) waits for it while x runs.
FORK = {
    "tasks": [
        {"name": "r", "command": ["true"]},
        {"name": "a", "dependsOn": ["r"], "command": ["true"]},
        {"name": "x", "dependsOn": ["r"], "command": ["true"]},
        {"name": "b", "dependsOn": ["a"], "command": ["true"]},
        {"name": "c", "dependsOn": ["b"], "command": ["true"]},
    ]
}


def hook_for(site: Site, asker: str, what: str, run_id: str) -> Hook:
    """What the asking attempt does before it ends with success."""

    async def hook() -> None:
        if asker == "x":  # b has been launched, in a's task, and waits for x's slot
            await asyncio.wait_for(site.committed_success("a"), 10)
        if what == "stop":
            site.executor.request_stop()  # the first thing Executor.shutdown does
        elif what == "cancel":
            assert await site.executor.cancel(run_id, "user asked")
        elif what == "suspend":
            assert await site.executor.suspend(run_id, True)
        else:  # deadline: the process runs on past the run's deadline, then ends well
            stored, _ = await site.store.load_run(run_id)
            assert stored.deadline_at is not None
            await asyncio.sleep(max(0.0, stored.deadline_at + 0.2 - time.time()))

    return hook


@pytest.mark.parametrize("asker", ["a", "x"], ids=["the-chain's-attempt", "a-parallel-attempt"])
async def test_a_stop_during_a_chain_starts_nothing_after_it(tmp_path: Path, asker: str) -> None:
    async with Site(tmp_path, concurrency=1) as site:
        run = await site.submit(FORK)
        site.recorder.hooks[asker] = hook_for(site, asker, "stop", run.run_id)
        final = await asyncio.wait_for(site.executor.start(run.run_id), 30)
        assert final.phase == "Running"  # stopped for a restart, not finished
        assert "b" not in site.recorder.started and "c" not in site.recorder.started
        assert site.executor.running_count() == 0
        _, phases = await site.phases(run.run_id)
        done = {"r", "a", asker}
        assert phases == {name: "Succeeded" if name in done else "Pending" for name in phases}
        # The next agent runs the rest, each task once.
        await site.executor.shutdown()
        site.recorder.hooks.clear()
        site.executor = site.new_executor()
        assert await site.executor.recover() == [run.run_id]
        final = await asyncio.wait_for(site.executor.run_to_end(run.run_id), 30)
        assert final.phase == "Succeeded"
        assert sorted(site.recorder.started) == ["a", "b", "c", "r", "x"]


@pytest.mark.parametrize("asker", ["a", "x"], ids=["the-chain's-attempt", "a-parallel-attempt"])
async def test_a_cancel_during_a_chain_starts_nothing_after_it(tmp_path: Path, asker: str) -> None:
    async with Site(tmp_path, concurrency=1) as site:
        run = await site.submit(FORK)
        site.recorder.hooks[asker] = hook_for(site, asker, "cancel", run.run_id)
        final = await asyncio.wait_for(site.executor.start(run.run_id), 30)
        assert final.phase == "Cancelled"
        assert "b" not in site.recorder.started and "c" not in site.recorder.started
        assert site.executor.running_count() == 0
        _, phases = await site.phases(run.run_id)
        done = {"r", "a", asker}
        assert phases == {name: "Succeeded" if name in done else "Cancelled" for name in phases}


@pytest.mark.parametrize("asker", ["a", "x"], ids=["the-chain's-attempt", "a-parallel-attempt"])
async def test_a_suspend_during_a_chain_holds_what_comes_after_it(
    tmp_path: Path, asker: str
) -> None:
    async with Site(tmp_path, concurrency=1) as site:
        run = await site.submit(FORK)
        site.recorder.hooks[asker] = hook_for(site, asker, "suspend", run.run_id)
        driver = site.executor.start(run.run_id)
        await site.committed_success(asker)
        await asyncio.sleep(0.3)  # time enough for anything wrongly started to show
        assert "b" not in site.recorder.started and "c" not in site.recorder.started
        assert site.executor.running_count() == 0
        assert not driver.done()
        stored, phases = await site.phases(run.run_id)
        assert stored.suspended and stored.phase == "Running"
        done = {"r", "a", asker}
        assert phases == {name: "Succeeded" if name in done else "Pending" for name in phases}
        assert await site.executor.suspend(run.run_id, False)
        final = await asyncio.wait_for(driver, 30)
        assert final.phase == "Succeeded"
        assert sorted(site.recorder.started) == ["a", "b", "c", "r", "x"]


@pytest.mark.parametrize("asker", ["a", "x"], ids=["the-chain's-attempt", "a-parallel-attempt"])
async def test_a_deadline_during_a_chain_starts_nothing_after_it(
    tmp_path: Path, asker: str
) -> None:
    async with Site(tmp_path, concurrency=1) as site:
        run = await site.submit({**FORK, "deadlineSeconds": 1})
        site.recorder.hooks[asker] = hook_for(site, asker, "deadline", run.run_id)
        final = await asyncio.wait_for(site.executor.start(run.run_id), 30)
        assert final.phase == "Failed" and final.reason == "DeadlineExceeded"
        assert "b" not in site.recorder.started and "c" not in site.recorder.started
        assert site.executor.running_count() == 0
        _, phases = await site.phases(run.run_id)
        # The asking attempt's process ended well, though past the deadline.
        done = {"r", "a", asker}
        assert phases == {name: "Succeeded" if name in done else "Cancelled" for name in phases}
