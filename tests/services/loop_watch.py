"""How long the test's own event loop goes between two turns of a task.

What a blocking call on the loop costs everything else on it (the link, the
liveness probe's answer, a running task's wake-up): a task sleeping ``period``
at a time notes each interval it actually got.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType


class LoopWatch:
    """``async with LoopWatch() as watch:``, then ``watch.turns`` and ``watch.worst_lag``."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.intervals: list[float] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def turns(self) -> int:
        return len(self.intervals)

    @property
    def worst_lag(self) -> float:
        """The longest the loop was late for the watch, in seconds."""
        return max((i - self.period for i in self.intervals), default=0.0)

    async def _watch(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            self.intervals.append(now - last)
            last = now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
