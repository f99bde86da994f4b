"""A site in one process: a real Store (an SQLite file) and an Executor, no link.

The executor's own tests (a chain in one asyncio task, wide runs, the hostile
property over random DAGs) drive runs in process with a runner of their own
that records or checks each attempt.  What they share is the site around that
runner: the store opened and closed, an executor made again as after a
restart, a run submitted by name, the phases read back from the database.
Each test module keeps its runner; this keeps the rest in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from edge_agent.executor import Executor, local_assignment
from edge_agent.runner import TaskRunner
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from tideflow.spec import parse_spec

Listener = Callable[[RunState, TaskState | None], None]


class InProcessSite:
    """``async with InProcessSite(tmp, runner, concurrency=4) as site``: store and executor."""

    def __init__(
        self,
        tmp: Path,
        runner: TaskRunner,
        *,
        concurrency: int,
        listener: Listener | None = None,
    ) -> None:
        self.tmp = tmp
        self.runner = runner
        self.concurrency = concurrency
        self.listener = listener
        self.store: Store
        self.executor: Executor

    async def __aenter__(self) -> Self:
        await self.open(Store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.executor.shutdown()
        await self.store.close()

    async def open(self, store_class: type[Store]) -> Store:
        """Open the site's database with ``store_class`` (a Store a test has changed)."""
        self.store = await store_class.open(self.tmp / "site.db", synchronous="NORMAL")
        self.executor = self.new_executor()
        return self.store

    def new_executor(self) -> Executor:
        """A fresh executor on the same store: what an agent's restart makes."""
        return Executor(
            self.store,
            work_dir=self.tmp / "work",
            concurrency=self.concurrency,
            runner=self.runner,
            listener=self.listener,
        )

    async def submit(self, body: dict[str, Any], name: str = "wf") -> RunState:
        run, created = await self.executor.submit(
            local_assignment("default", name, parse_spec(body))
        )
        assert created
        return run

    async def phases(self, run_id: str) -> tuple[RunState, dict[str, str]]:
        run, tasks = await self.store.load_run(run_id)
        return run, {t.name: t.phase for t in tasks}
