"""Blocking calls off the event loop, each in a thread that ends with the call.

Why not ``asyncio.to_thread``: its pool keeps every thread it has made for the
life of the loop, and an agent with attempt cgroups moves itself, every thread
of it, into an attempt's cgroup and back around each task's start (decision
0043; :meth:`edge_agent.runner.ProcessRunner._spawn`).  The kernel's cost for
that grows with the threads: measured here, the two moves take ~20 us for one
thread, ~70 us for two and ~110-150 us for three or four (bench/README.md,
"Issue 15, thirteenth pass").  A pool thread made once for a run's start
(reading its starts file) stayed for good and cost every later ``true`` task
of the agent ~40-70 us.

The calls that come here are rare next to task starts: recovery at the agent's
start, a run's start and end, the slow path of freeing a cgroup, a task's
outputs file.  Each gets a thread of its own (~50-100 us to start) that is
gone when it returns.  The threads are not daemons: an agent that exits waits
for a call under way, as it waited for ``to_thread``'s pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def in_own_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``await fn(*args, **kwargs)`` run in a new thread that ends when it returns.

    As ``asyncio.to_thread``: the caller's context variables go with the call,
    its exception is raised here, and cancelling the await does not stop the
    call (its result is then dropped).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # handed to the caller, as to_thread does
            outcome: tuple[Callable[..., None], object] = (_fail, exc)
        else:
            outcome = (_resolve, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(outcome[0], future, outcome[1])

    threading.Thread(target=work, name=f"tideflow-{_name(fn)}").start()
    return await future


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__name__", "call")


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[object], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
