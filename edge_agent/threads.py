"""Blocking calls off the event loop, each in a thread that ends with the call.

Why not ``asyncio.to_thread``: its pool keeps every thread it has made for the
life of the loop, and an agent with attempt cgroups moves itself, every thread
of it, into an attempt's cgroup and back around each task's start (decision
0043; :meth:`edge_agent.runner.ProcessRunner._spawn`).  The kernel's cost for
that grows with the threads: measured here, the two moves take ~20 us for one
thread, ~70 us for two and ~110-150 us for three or four (bench/README.md,
"Issue 15, thirteenth pass"), as cgroup v2's perf_event controller calls a
function on each moved thread's last CPU and waits for it, an interrupt
through the hypervisor on a virtual machine (the fourteenth pass).  A pool
thread made once for a run's start (reading its starts file) stayed for good
and cost every later ``true`` task of the agent ~40-70 us.

The calls that come here are rare next to task starts: recovery at the agent's
start, a run's start and end, the slow path of freeing a cgroup, a task's
outputs file.  Each gets a thread of its own (~50-100 us to start) that is
gone when it returns.  Where no thread can be started for a moment (the
process limit reached: a fork bomb in another task), the call waits for one,
as a task's start that fails so is retried.  The threads are not daemons: an agent that exits waits
for a call under way, as it waited for ``to_thread``'s pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
# Calls running at once; more wait for one of them to end (a site handed
# hundreds of runs at once would otherwise start a thread for each).
MAX_THREADS_AT_ONCE = 4
# A thread that cannot be started is tried again after this, doubling up to the max.
NO_THREAD_FIRST_WAIT = 0.01
NO_THREAD_MAX_WAIT = 0.5


async def in_own_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``await fn(*args, **kwargs)`` run in a new thread that ends when it returns.

    As ``asyncio.to_thread``: the caller's context variables go with the call,
    its exception is raised here, and cancelling the await does not stop the
    call (its result is then dropped).  At most :data:`MAX_THREADS_AT_ONCE`
    calls run at once; the others wait for a place, as ``to_thread``'s pool
    made them wait for a thread.
    """
    loop = asyncio.get_running_loop()
    places = _places.get(loop)
    if places is None:
        places = _places[loop] = asyncio.Semaphore(MAX_THREADS_AT_ONCE)
    await places.acquire()  # given back when the thread's call ends, not before
    delay = NO_THREAD_FIRST_WAIT
    try:
        while True:
            try:
                future = _start(loop, places, fn, *args, **kwargs)
                break
            except RuntimeError as exc:
                if "can't start new thread" not in str(exc):
                    raise
                # The agent's process limit is reached (another task's fork bomb,
                # systemd's TasksMax): a moment, as a task's start waits for its
                # retry.  The pool's thread, made once, used to hide this.
                if delay == NO_THREAD_FIRST_WAIT:
                    log.warning("cannot start a thread for %s (process limit reached?); "
                                "trying again", _name(fn))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, NO_THREAD_MAX_WAIT)
    except BaseException:
        places.release()
        raise
    return await future


def _start(
    loop: asyncio.AbstractEventLoop,
    places: asyncio.Semaphore,
    fn: Callable[P, T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> asyncio.Future[T]:
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # handed to the caller, as to_thread does
            outcome: tuple[bool, object] = (False, exc)
        else:
            outcome = (True, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_ended, future, places, *outcome)

    threading.Thread(target=work, name=f"tideflow-{_name(fn)}").start()
    return future


# Each loop's places (a Semaphore belongs to the loop it is first used in).
_places: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__name__", "call")


def _ended(future: asyncio.Future[Any], places: asyncio.Semaphore, ok: bool, value: Any) -> None:
    places.release()
    if future.done():  # (its caller was cancelled: the result is dropped)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
