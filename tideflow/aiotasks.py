"""Supervised background tasks: a daemon never limps on after one of its workers died.

An asyncio task that nobody awaits dies silently: its exception waits in the
task object until the garbage collector logs it, and the process keeps
saying it is healthy.  Both daemons (the agent and the operator) start their
long-lived workers through a :class:`Supervisor`: the first worker to die (an
exception, or a worker meant to run forever that returns) is recorded, logged
with its cause, and the daemon is told to stop; it then exits non-zero with
that cause.  kopf's ``aiotasks.guard`` is the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTaskDied(RuntimeError):
    """A daemon's background task died: the daemon stops with this as its cause."""


class Supervisor:
    """Starts, names and guards a daemon's background tasks.

    The first task to die (an exception, or a ``forever`` task that returns)
    is recorded as :attr:`failure` and ``on_failure`` is called once; the
    daemon then stops.  Cancellation is not a death, and neither is anything
    that happens once :meth:`stop` has begun (it is logged).  Tasks the
    daemon starts itself (:meth:`spawn`) are cancelled by :meth:`stop`; tasks
    it only watches are stopped by their owner.  Exceptions of a
    ``passthrough`` type (the agent's store errors, which carry their own exit
    code) are raised as they are; anything else as ``failure_type``.
    """

    def __init__(
        self,
        on_failure: Callable[[], None],
        *,
        passthrough: tuple[type[BaseException], ...] = (),
        failure_type: type[BackgroundTaskDied] = BackgroundTaskDied,
    ) -> None:
        self._on_failure = on_failure
        self._passthrough = passthrough
        self._failure_type = failure_type
        self._owned: set[asyncio.Task[Any]] = set()
        self._forever: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.failure: BaseException | None = None
        self.failed_task: str | None = None

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, forever: bool = False
    ) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        if forever:
            self._forever.add(task)
        return self.watch(task)

    def watch(self, task: asyncio.Task[Any], *, forever: bool = False) -> asyncio.Task[Any]:
        """Guard a task started elsewhere (its owner stops it); ``forever``: it must not end."""
        if forever:
            self._forever.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._owned.discard(task)
        forever = task in self._forever
        self._forever.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is None and not forever:
            return
        name = task.get_name()
        if self._stopping or self.failure is not None:
            if error is not None:
                log.warning("while stopping, %s ended with: %s", name, error)
            return
        self.failure = error or self._failure_type(f"{name} returned; it must run until stopped")
        self.failed_task = name
        if isinstance(error, self._passthrough):
            log.error("stopping: %s: %s", name, error)
        else:
            log.error("stopping: background task %s died: %r", name, self.failure, exc_info=error)
        self._on_failure()

    async def stop(self) -> None:
        """Cancel the tasks this supervisor started and wait for them.

        A task that swallowed its cancellation (Python 3.11's ``wait_for``
        does, when the cancel lands as its timeout fires) is cancelled again,
        every second, until it ends: a stopping daemon must not wait for ever.
        """
        self._stopping = True
        tasks = list(self._owned)
        for task in tasks:
            task.cancel()
        for task in tasks:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if not task.done():
                    log.warning("%s did not stop when cancelled; cancelling again", task.get_name())
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()

    def raise_failure(self) -> None:
        """Raise what stopped the daemon, if a task died."""
        failure = self.failure
        if failure is None:
            return
        if isinstance(failure, (*self._passthrough, BackgroundTaskDied)):
            raise failure
        raise self._failure_type(
            f"background task {self.failed_task} died: {failure!r}"
        ) from failure


__all__ = ["BackgroundTaskDied", "Supervisor"]
