"""The store's inline commit beside threads that hand work to the event loop.

An awaited light write may commit on the loop itself when nothing else is
ready to run (:meth:`edge_agent.store.Store._may_commit_inline`).  Whether
anything is ready is read from the loop's queue of ready callbacks, which
other threads append to at any moment (``call_soon_threadsafe``: the
database's own thread, the MQTT link's, the agent's helper threads of
:mod:`edge_agent.threads`).  Proves, with a real SQLite file and a real
thread doing that while thousands of writes commit: no write fails and none
is lost.  Iterating that queue raised "deque mutated during iteration": from
a write's own call, or from the callback that ends a commit, where it lost
the batch it had taken and left the store committing nothing ever again
(a site agent under 150 runs at once stopped for good, found by a hostile
pass).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.state import RunState, TaskState
from edge_agent.store import Store


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Threads switch as often as the interpreter can (the race in milliseconds)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


async def test_writes_commit_while_another_thread_hands_callbacks_to_the_loop(
    tmp_path: Path, busy_switching: None
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    store = await Store.open(tmp_path / "site.db", synchronous="OFF")
    stop = threading.Event()

    def hand_over() -> None:
        while not stop.is_set():
            loop.call_soon_threadsafe(lambda: None)
            time.sleep(0.0001)

    run = RunState("r.1", "r", 1, "default", "wf", "{}")
    await store.create_run(run, [TaskState("r.1", "t")])
    helper = threading.Thread(target=hand_over)
    helper.start()
    writes, end = 0, time.monotonic() + 3
    try:
        while time.monotonic() < end:
            await asyncio.wait_for(store.save_run(run), 10)  # (lost: never resolved)
            writes += 1
    finally:
        stop.set()
        helper.join()
        await asyncio.wait_for(store.close(), 10)
    assert not errors, errors[0]
    assert writes > 1000


async def test_a_batch_whose_commit_could_not_be_placed_fails_and_the_store_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong between taking a batch and committing it fails that
    batch's writes, and the next write commits: the store never stops for good."""
    store = await Store.open(tmp_path / "site.db", synchronous="OFF")
    run = RunState("r.1", "r", 1, "default", "wf", "{}")
    await store.create_run(run, [TaskState("r.1", "t")])
    real = Store._may_commit_inline
    calls = [0]

    def fails_once(self: Store, loop: asyncio.AbstractEventLoop, jobs: list[Any]) -> bool:
        calls[0] += 1
        if calls[0] == 2:  # the flush's own decision, after the write's
            raise RuntimeError("deciding where to commit failed")
        return real(self, loop, jobs)

    monkeypatch.setattr(Store, "_may_commit_inline", fails_once)
    try:
        with pytest.raises(RuntimeError, match="deciding where to commit failed"):
            await asyncio.wait_for(store.save_run(run), 10)
        monkeypatch.setattr(Store, "_may_commit_inline", real)
        run.message = "after"
        await asyncio.wait_for(store.save_run(run), 10)
        stored, _ = await store.load_run("r.1")
        assert stored.message == "after"
    finally:
        await asyncio.wait_for(store.close(), 10)
