"""A wide run keeps few attempts waiting for a slot; the rest wait as names.

Why: every ready task of a run got an asyncio task at once, waiting for one of
the agent's ``concurrency`` slots.  A 10,000-task fan-out held 10,000 of them
(some 27 objects each, walked again by every garbage collection: peak RSS 141
against 95 MB now), and since the slots are handed out first come, first
served, a second run submitted meanwhile waited behind all of them.  Now a run
keeps at most ``concurrency`` attempts waiting; its other ready tasks wait in
order, as names, and are launched as the waiting ones take their slots.

What must hold, shown on a real Store (SQLite file) with an in-process runner
that notes each attempt:

* every task of a wide run runs, once;
* the number of asyncio tasks stays bounded by the concurrency, not the width;
* a run submitted after a wide one gets slots long before the wide one ends;
* a stop, a cancel or a suspend while most of the run waits as names starts
  nothing after it, and the run ends (or goes on) as it always did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from services.in_process import InProcessSite

from edge_agent.runner import AttemptRequest, AttemptResult

CONCURRENCY = 4
WIDTH = 300


class Recorder:
    """A TaskRunner that runs nothing for a few ms, noting each attempt."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []  # (run name, task)
        self.most_tasks = 0  # asyncio tasks alive, the most seen at an attempt's start
        self.on_start: Callable[[int], None] | None = None

    async def run(self, request: AttemptRequest) -> AttemptResult:
        request.on_started(0, None)
        self.started.append((request.run_id, request.task))
        self.most_tasks = max(self.most_tasks, len(asyncio.all_tasks()))
        if self.on_start is not None:
            self.on_start(len(self.started))
        await asyncio.sleep(0.002)
        return AttemptResult(0)


def wide(n: int) -> dict[str, Any]:
    return {"tasks": [{"name": f"t{i}", "command": ["true"]} for i in range(n)]}


class Site(InProcessSite):
    def __init__(self, tmp: Path) -> None:
        self.recorder = Recorder()
        super().__init__(tmp, self.recorder, concurrency=CONCURRENCY)

    def started_in(self, run_id: str) -> list[str]:
        return [task for run, task in self.recorder.started if run == run_id]


async def test_every_task_of_a_wide_run_runs_once_with_few_asyncio_tasks(tmp_path: Path) -> None:
    async with Site(tmp_path) as site:
        run = await site.submit(name="wide", body=wide(WIDTH))
        final = await asyncio.wait_for(site.executor.start(run.run_id), 60)
        assert final.phase == "Succeeded"
        started = site.started_in(run.run_id)
        assert sorted(started) == sorted(f"t{i}" for i in range(WIDTH))  # each once
        # This test's task, the run's driver, the attempts holding or waiting for
        # a slot (at most 2 x concurrency), those whose process has ended and
        # whose outcome is committing (a group commit's worth): not the width.
        assert site.recorder.most_tasks <= 10 * CONCURRENCY, site.recorder.most_tasks


async def test_a_run_submitted_after_a_wide_one_is_not_queued_behind_all_of_it(
    tmp_path: Path,
) -> None:
    async with Site(tmp_path) as site:
        first = await site.submit(name="first", body=wide(WIDTH))
        first_driver = site.executor.start(first.run_id)
        while len(site.recorder.started) < 10:
            await asyncio.sleep(0.001)
        second = await site.submit(name="second", body=wide(3))
        second_driver = site.executor.start(second.run_id)
        assert (await asyncio.wait_for(second_driver, 60)).phase == "Succeeded"
        # The second run ended while most of the first still waited.
        assert len(site.started_in(first.run_id)) < WIDTH // 2, len(site.started_in(first.run_id))
        assert (await asyncio.wait_for(first_driver, 60)).phase == "Succeeded"


def _after(count: int, action: Callable[[], Any]) -> Callable[[int], None]:
    done = [False]

    def on_start(started: int) -> None:
        if started >= count and not done[0]:
            done[0] = True
            action()

    return on_start


async def test_a_stop_in_a_wide_run_starts_nothing_after_it_and_the_next_agent_runs_the_rest(
    tmp_path: Path,
) -> None:
    async with Site(tmp_path) as site:
        run = await site.submit(name="wide", body=wide(WIDTH))
        site.recorder.on_start = _after(20, site.executor.request_stop)
        final = await asyncio.wait_for(site.executor.start(run.run_id), 60)
        assert final.phase == "Running"  # stopped for a restart
        before = len(site.started_in(run.run_id))
        assert before <= 20 + CONCURRENCY, before  # (those already past their slot)
        _, phases = await site.phases(run.run_id)
        assert sum(phase == "Pending" for phase in phases.values()) >= WIDTH - before
        await site.executor.shutdown()
        site.recorder.on_start = None
        site.executor = site.new_executor()
        assert await site.executor.recover() == [run.run_id]
        final = await asyncio.wait_for(site.executor.run_to_end(run.run_id), 60)
        assert final.phase == "Succeeded"
        started = site.started_in(run.run_id)
        assert set(started) == {f"t{i}" for i in range(WIDTH)}
        assert len(started) - WIDTH <= CONCURRENCY  # only those the stop interrupted ran twice


@pytest.mark.parametrize("what", ["cancel", "suspend"])
async def test_a_cancel_or_suspend_in_a_wide_run_starts_nothing_after_it(
    tmp_path: Path, what: str
) -> None:
    async with Site(tmp_path) as site:
        run = await site.submit(name="wide", body=wide(WIDTH))
        asked: list[asyncio.Task[bool]] = []

        def ask() -> None:
            if what == "cancel":
                asked.append(asyncio.ensure_future(site.executor.cancel(run.run_id, "user")))
            else:
                asked.append(asyncio.ensure_future(site.executor.suspend(run.run_id, True)))

        site.recorder.on_start = _after(20, ask)
        driver = site.executor.start(run.run_id)
        while not asked:
            await asyncio.sleep(0.001)
        assert await asked[0]
        settled = len(site.started_in(run.run_id))
        await asyncio.sleep(0.3)  # time enough for anything wrongly started to show
        assert len(site.started_in(run.run_id)) <= settled + CONCURRENCY
        at_pause = len(site.started_in(run.run_id))
        await asyncio.sleep(0.2)
        assert len(site.started_in(run.run_id)) == at_pause  # nothing more, ever
        if what == "cancel":
            final = await asyncio.wait_for(driver, 60)
            assert final.phase == "Cancelled"
            _, phases = await site.phases(run.run_id)
            assert sum(phase == "Cancelled" for phase in phases.values()) >= WIDTH - at_pause
            return
        stored, phases = await site.phases(run.run_id)
        assert stored.suspended and not driver.done()
        assert sum(phase == "Pending" for phase in phases.values()) == WIDTH - at_pause
        assert await site.executor.suspend(run.run_id, False)
        final = await asyncio.wait_for(driver, 60)
        assert final.phase == "Succeeded"
        assert sorted(site.started_in(run.run_id)) == sorted(f"t{i}" for i in range(WIDTH))
