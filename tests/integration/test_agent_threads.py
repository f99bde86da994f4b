"""The agent keeps no idle helper threads while it starts tasks (issue 15).

An agent with attempt cgroups moves itself, every thread of it, into each
attempt's cgroup and back around the task's start (decision 0043), and the
kernel's cost for that grows with its threads (edge_agent/threads.py).  So the
blocking calls the executor and the runner make off the event loop (recovery,
a run's starts file at its start, its workspace removed at its end, a task's
outputs file) must not leave a thread behind, as ``asyncio.to_thread``'s pool
did for good.  Proves, with real processes and a real SQLite file: at every
task start of two runs one after the other, the process holds only the
threads it held before the agent started, plus the database's own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import aiosqlite

from edge_agent.executor import Executor, local_assignment
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from edge_agent.threads import MAX_THREADS_AT_ONCE, in_own_thread
from tideflow.spec import parse_spec


class _AtOnce:
    """Counts the calls inside it at once, from any thread; ``most``: the peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self.most = 0

    def __enter__(self) -> None:
        with self._lock:
            self._inside += 1
            self.most = max(self.most, self._inside)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1


def _the_databases(thread: threading.Thread) -> bool:
    """aiosqlite's connection thread (the store's; it lives as long as the store)."""
    return isinstance(thread, aiosqlite.Connection) or "_connection_worker_thread" in thread.name


def _chain(names: list[str]) -> dict[str, object]:
    tasks: list[dict[str, object]] = []
    for i, name in enumerate(names):
        task: dict[str, object] = {
            "name": name,
            # each writes an outputs file, read off the loop once it exits
            "script": f'echo "n={i}" > "$TIDEFLOW_OUTPUTS"',
        }
        if i:
            task["dependsOn"] = [names[i - 1]]
        tasks.append(task)
    return {"tasks": tasks}


async def test_no_helper_thread_outlives_its_call_while_tasks_start(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    seen: list[tuple[str, set[threading.Thread]]] = []

    def listener(run: RunState, task: TaskState | None) -> None:
        if task is not None and task.phase == "Running":
            seen.append((task.name, set(threading.enumerate()) - before))

    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    executor = Executor(store, work_dir=tmp_path / "work", concurrency=2, listener=listener)
    try:
        for name in ("first", "second"):
            run, _ = await executor.submit(
                local_assignment("default", name, parse_spec(_chain(["a", "b", "c"])))
            )
            final = await asyncio.wait_for(executor.run_to_end(run.run_id), 60)
            assert final.phase == "Succeeded"
            _, tasks = await store.load_run(final.run_id)
            assert [t.outputs for t in tasks] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]
    finally:
        await executor.shutdown()
        await store.close()

    assert len(seen) == 6
    for task, extra in seen:
        others = sorted(t.name for t in extra if not _the_databases(t))
        assert not others, f"task {task} started beside helper threads {others}"


async def test_a_call_in_its_own_thread_returns_raises_and_leaves_nothing() -> None:
    before = set(threading.enumerate())

    def where(x: int) -> tuple[int, str]:
        return x * 2, threading.current_thread().name

    doubled, name = await in_own_thread(where, 21)
    assert doubled == 42 and name != threading.current_thread().name

    def broken() -> None:
        raise ValueError("from the thread")

    try:
        await in_own_thread(broken)
    except ValueError as exc:
        assert str(exc) == "from the thread"
    else:
        raise AssertionError("the call's exception was not raised")
    await asyncio.sleep(0.05)  # (a thread ends just after handing its result over)
    assert set(threading.enumerate()) <= before


async def test_calls_at_once_share_a_few_threads_however_many_runs_start() -> None:
    """A site handed hundreds of runs at once starts them together: each reads its
    starts file off the loop.  They wait for a few threads, not one each."""
    at_once = _AtOnce()

    def read(i: int) -> int:
        with at_once:
            time.sleep(0.01)
        return i

    results = await asyncio.gather(*(in_own_thread(read, i) for i in range(60)))
    assert results == list(range(60))
    assert 1 < at_once.most <= MAX_THREADS_AT_ONCE


async def test_a_cancelled_call_keeps_its_place_until_its_thread_ends() -> None:
    """Cancelling the await does not stop the call: its place is not handed on to
    another thread while it still runs."""
    release = threading.Event()
    at_once = _AtOnce()

    def block() -> None:
        with at_once:
            release.wait(5)

    first = [asyncio.ensure_future(in_own_thread(block)) for _ in range(MAX_THREADS_AT_ONCE)]
    await asyncio.sleep(0.05)
    for call in first:
        call.cancel()
    later = [asyncio.ensure_future(in_own_thread(block)) for _ in range(MAX_THREADS_AT_ONCE)]
    await asyncio.sleep(0.05)
    assert at_once.most == MAX_THREADS_AT_ONCE  # the later ones wait for the first threads
    release.set()
    await asyncio.gather(*later)
    assert all(call.cancelled() for call in first)
