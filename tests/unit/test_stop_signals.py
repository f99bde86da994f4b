"""No attempt starts once a stop signal has arrived (decision 0044), in process.

The real executor on a real SQLite file, with a runner that only records what
it was asked to start:

* :func:`on_stop_signals` tells the executor in the signal handler itself,
  before the loop has had a turn, and the loop still calls the stop's
  callback, for a second signal too;
* a SIGTERM that lands right after a chain step's outcome committed (the
  listener is told of it in the same call, before the next step would start)
  starts no next step, which stays Pending;
* with the executor told, neither the driver (``_advance``) nor an attempt
  that was waiting for a slot starts anything.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from edge_agent.executor import Executor, local_assignment
from edge_agent.runner import AttemptRequest, AttemptResult
from edge_agent.state import RunState, TaskState
from edge_agent.stops import on_stop_signals
from edge_agent.store import Store
from tideflow.spec import parse_spec


class Recorder:
    """Succeeds every attempt; ``during`` is called inside each, after its start."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.during: Any = None

    async def run(self, request: AttemptRequest) -> AttemptResult:
        self.started.append(request.task)
        request.on_started(0, None)
        if self.during is not None:
            self.during(request.task)
        await asyncio.sleep(0)
        return AttemptResult(0)


def chain(*names: str) -> dict[str, Any]:
    return {
        "tasks": [
            {"name": n, "command": ["x"], **({"dependsOn": [names[i - 1]]} if i else {})}
            for i, n in enumerate(names)
        ]
    }


async def phases(store: Store, run_id: str) -> dict[str, str]:
    _, tasks = await store.load_run(run_id)
    return {t.name: t.phase for t in tasks}


async def test_the_handler_tells_the_executor_at_once_and_the_loop_still_gets_the_signal(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        executor = Executor(store, work_dir=tmp_path / "w", runner=Recorder())
        called: list[int] = []
        loop = asyncio.get_running_loop()
        on_stop_signals(loop, lambda: called.append(1), executor)
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), sig)
            assert executor.stop_signalled  # no loop turn yet
            assert len(called) < 2
            for _ in range(100):
                if len(called) == (1 if sig == signal.SIGTERM else 2):
                    break
                await asyncio.sleep(0.01)
        assert called == [1, 1]  # a second signal reaches the callback as before
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().remove_signal_handler(sig)
        await store.close()


async def test_a_stop_signal_right_after_a_steps_commit_starts_no_next_step(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        runner = Recorder()
        stops: list[asyncio.Task[None]] = []

        def listener(_run: RunState, task: TaskState | None) -> None:
            if task is not None and task.name == "a" and task.phase == "Succeeded" and not stops:
                os.kill(os.getpid(), signal.SIGTERM)  # a's outcome has just committed

        executor = Executor(store, work_dir=tmp_path / "w", runner=runner, listener=listener)
        loop = asyncio.get_running_loop()
        on_stop_signals(loop, lambda: stops.append(loop.create_task(executor.shutdown())), executor)
        assignment = local_assignment("default", "chain", parse_spec(chain("a", "b", "c")))
        await executor.submit(assignment)
        final = await asyncio.wait_for(executor.run_to_end(assignment.run_id), 30)
        assert stops, "the loop never called the stop's callback"
        await stops[0]
        assert not final.done
        assert runner.started == ["a"]
        assert await phases(store, assignment.run_id) == {
            "a": "Succeeded", "b": "Pending", "c": "Pending",
        }  # fmt: skip
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().remove_signal_handler(sig)
        await store.close()


async def test_once_told_neither_the_driver_nor_a_waiting_attempt_starts_anything(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        runner = Recorder()
        executor = Executor(store, work_dir=tmp_path / "w", runner=runner, concurrency=1)
        spec = {"tasks": [{"name": "x", "command": ["x"]}, {"name": "y", "command": ["x"]}]}
        assignment = local_assignment("default", "pair", parse_spec(spec))
        await executor.submit(assignment)
        # One holds the only slot, the other waits for it; the signal lands while one runs.
        runner.during = lambda _task: executor.note_stop_signal()
        driver = executor.start(assignment.run_id)
        for _ in range(200):
            if runner.started and not executor.running_count():
                break
            await asyncio.sleep(0.005)
        # The other took the slot the first gave back, and did not start.
        assert len(runner.started) == 1, runner.started
        (first,) = runner.started
        executor.request_stop()  # (the stop's callback, a turn later)
        final = await asyncio.wait_for(driver, 30)
        assert not final.done
        assert await phases(store, assignment.run_id) == {
            first: "Succeeded", ({"x", "y"} - {first}).pop(): "Pending",
        }  # fmt: skip

        # A run started after the signal (the daemon: an assignment in flight) waits too.
        later = local_assignment("default", "later", parse_spec(chain("p", "q")))
        await executor.submit(later)
        driving = executor.start(later.run_id)
        await asyncio.sleep(0.05)
        assert runner.started == [first]
        executor.request_stop()
        assert not (await asyncio.wait_for(driving, 30)).done
    finally:
        await store.close()
