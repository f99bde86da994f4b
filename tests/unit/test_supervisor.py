"""The daemon's task supervisor: the first death stops the daemon with its cause.

(The full-disk case is proved end to end with a real daemon in
``tests/integration/test_agent_daemon.py``.)  Proves: a task that raises, or
a ``forever`` task that returns, is recorded as the failure and stops the
daemon once; a store error is raised as itself (so the CLI exits 3 or 4), a
bug as :class:`AgentFailure` naming the task; cancellation, watched tasks
that finish normally, and anything after :meth:`Supervisor.stop` has begun
are not failures.
"""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.daemon import AgentFailure
from edge_agent.store import StoreError, StoreFullError
from tideflow.aiotasks import Supervisor as _Supervisor


def Supervisor(stops: Stops) -> _Supervisor:
    return _Supervisor(stops, passthrough=(StoreError,), failure_type=AgentFailure)


class Stops:
    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()


async def boom(error: BaseException) -> None:
    await asyncio.sleep(0)
    raise error


async def test_a_bug_in_a_background_task_stops_the_daemon_naming_it() -> None:
    stops = Stops()
    sup = Supervisor(stops)
    sup.spawn(asyncio.sleep(3600), "heartbeat", forever=True)
    sup.spawn(boom(ValueError("bad state")), "inbox", forever=True)
    await asyncio.wait_for(stops.event.wait(), 5)
    sup.spawn(boom(KeyError("second")), "sync", forever=True)
    await sup.stop()
    assert stops.calls == 1
    with pytest.raises(AgentFailure, match=r"inbox.*bad state"):
        sup.raise_failure()


async def test_a_full_disk_is_raised_as_itself() -> None:
    stops = Stops()
    sup = Supervisor(stops)

    async def driver() -> str:
        raise StoreFullError("disk full writing x")

    sup.watch(asyncio.create_task(driver(), name="run-u.1"))
    await asyncio.wait_for(stops.event.wait(), 5)
    with pytest.raises(StoreFullError, match="disk full"):
        sup.raise_failure()


async def test_a_forever_task_that_returns_is_a_death() -> None:
    stops = Stops()
    sup = Supervisor(stops)
    sup.spawn(asyncio.sleep(0), "sync", forever=True)
    await asyncio.wait_for(stops.event.wait(), 5)
    with pytest.raises(AgentFailure, match="sync returned"):
        sup.raise_failure()


async def test_normal_ends_cancellation_and_deaths_while_stopping_are_not_failures() -> None:
    stops = Stops()
    sup = Supervisor(stops)
    finished = sup.watch(asyncio.create_task(asyncio.sleep(0), name="run-done"))
    cancelled = sup.spawn(asyncio.sleep(3600), "record-link")
    await finished
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled

    async def dies_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("noisy shutdown") from None

    sup.spawn(dies_on_cancel(), "heartbeat", forever=True)
    await asyncio.sleep(0)
    await sup.stop()
    assert stops.calls == 0
    sup.raise_failure()  # nothing to raise


async def test_stop_ends_a_task_that_swallowed_its_cancellation() -> None:
    """Python 3.11's ``asyncio.wait_for`` can turn a cancellation that lands as
    its timeout fires into that TimeoutError: the syncer's idle wait swallowed
    the supervisor's cancel and looped on, so a daemon stopping on a full disk
    never exited (1 run in 6 of the daemon's full-filesystem test)."""
    stops = Stops()
    sup = Supervisor(stops)
    swallowed = asyncio.Event()

    async def swallows_one_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(3600)

    task = sup.spawn(swallows_one_cancel(), "sync", forever=True)
    await asyncio.sleep(0)
    stopping = asyncio.create_task(sup.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert done, "stop() still waiting for a task that swallowed its cancellation"
    assert swallowed.is_set() and task.done()
