"""A chain that runs on in one asyncio task still gives the event loop its turns.

A chain's next attempt runs on in the task of the one before it (issue 15), so
only the turns inside each attempt let anything else run: a signal's handler,
the link, other runs' timers.  With the in-process ``NoopRunner`` (the
benchmark's) and a real SQLite file: a stop signal sent mid-chain is seen
within a step or two, and a timer of someone else's keeps its pace.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from services.loop_watch import LoopWatch

from edge_agent.executor import Executor, local_assignment
from edge_agent.runner import AttemptRequest, AttemptResult, NoopRunner
from edge_agent.store import Store
from tideflow.spec import parse_spec

STEPS = 1500
SIGNAL_AT = 500


class Counting(NoopRunner):
    def __init__(self) -> None:
        self.started = 0
        self.signalled_at: int | None = None

    async def run(self, request: AttemptRequest) -> AttemptResult:
        self.started += 1
        if self.started == SIGNAL_AT:
            self.signalled_at = self.started
            os.kill(os.getpid(), signal.SIGUSR1)  # as a stop signal reaches the agent
        return await super().run(request)


def chain(n: int) -> dict[str, object]:
    return {
        "tasks": [
            {"name": f"t{i}", "command": ["true"], **({"dependsOn": [f"t{i - 1}"]} if i else {})}
            for i in range(n)
        ]
    }


async def test_a_stop_signal_mid_chain_is_seen_within_a_step_or_two(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    runner = Counting()
    executor = Executor(store, work_dir=tmp_path / "w", concurrency=4, runner=runner)
    loop = asyncio.get_running_loop()
    seen_at: list[int] = []

    def on_signal() -> None:
        seen_at.append(runner.started)
        executor.request_stop()

    loop.add_signal_handler(signal.SIGUSR1, on_signal)
    try:
        async with LoopWatch(0.001) as watch:
            spec = parse_spec(chain(STEPS))
            run, _ = await executor.submit(local_assignment("default", "wf", spec))
            final = await asyncio.wait_for(executor.start(run.run_id), 120)
        assert final.phase == "Running"  # stopped for a restart, not finished
        assert runner.signalled_at == SIGNAL_AT
        assert seen_at and seen_at[0] - SIGNAL_AT <= 2, seen_at
        assert runner.started - SIGNAL_AT <= 3, runner.started
        assert watch.turns >= 20, "the watch hardly ran during the chain"
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        await executor.shutdown()
        await store.close()
