"""A cancel that arrives while a just-assigned run is starting must cancel it.

The agent's daemon submits an assignment, starts its run and goes on to the
next message; when the next one is that run's cancel (the operator re-sends
an assignment and then its cancel back to back when a site comes online),
the cancel reaches a run whose driver has not loaded its state yet.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_agent.executor import Executor, local_assignment
from edge_agent.store import Store
from tideflow.spec import parse_spec


async def test_a_cancel_right_after_start_cancels_the_run(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    store = await Store.open(tmp_path / "site.db")
    executor = Executor(store, work_dir=tmp_path / "work", grace_seconds=0.5)
    try:
        spec = parse_spec({"tasks": [{"name": "t", "script": f'echo t >> "{journal}"'}]})
        run, created = await executor.submit(local_assignment("default", "wf", spec))
        assert created
        driver = executor.start(run.run_id)
        assert await executor.cancel(run.run_id, "cancelled by the cloud")
        final = await asyncio.wait_for(driver, 30)
        assert final.phase == "Cancelled"
        assert not journal.exists(), "a task of the cancelled run ran"
    finally:
        await executor.shutdown()
        await store.close()
