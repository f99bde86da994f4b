"""Whether the agent is alive, for the liveness probe: its event loop still turns.

Everything the agent does (runs, the link's messages, the sync, the store's
commits) is driven from one event loop, so an agent whose loop has stopped
turning is dead to its site even though its process is there: stopped or
frozen (a task that froze the cgroup the agent was in at its start, see
``CgroupScope``), or blocked in a call that never returns.  The probe used to
be a TCP connect to the metrics port, which the kernel accepts for a stopped,
frozen or blocked process alike.

:class:`LoopHeartbeat` is a timestamp the loop sets every second; the HTTP
server's thread (:meth:`edge_agent.metrics.AgentMetrics.serve`) reads it to
answer ``/healthz``.  A frozen or stopped process answers nothing, and the
probe's timeout fails it.
"""

from __future__ import annotations

import asyncio
import time

TICK_SECONDS = 1.0
DEFAULT_STALE_SECONDS = 60.0
MIN_STALE_SECONDS = 3 * TICK_SECONDS


class LoopHeartbeat:
    """The last time the agent's event loop ran a tick, and whether that is too long ago."""

    def __init__(self, stale_after: float = DEFAULT_STALE_SECONDS) -> None:
        # Below a few ticks, a tick late by a busy moment would fail the probe.
        self.stale_after = max(stale_after, MIN_STALE_SECONDS)
        self._tick: float | None = None  # not ticking yet: starting (the startup probe's time)

    async def run(self) -> None:
        """Tick on the loop for ever (a supervised background task)."""
        while True:
            self._tick = time.monotonic()
            await asyncio.sleep(TICK_SECONDS)

    def problem(self) -> str | None:
        """None while the loop ticks; else why the agent should be restarted.

        Called from another thread: one float read under the GIL.
        """
        tick = self._tick
        if tick is None:
            return None
        quiet = time.monotonic() - tick
        if quiet <= self.stale_after:
            return None
        return f"the agent's event loop has not run for {quiet:.0f}s"
