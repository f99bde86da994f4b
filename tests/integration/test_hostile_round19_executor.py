"""Hostile round 19: a run that keeps few attempts waiting for a slot (decision 0046).

Since decision 0046 a run keeps at most ``concurrency`` attempts waiting for a
slot; its other ready tasks wait as names (``_RunDriver.ready``) and are
launched as the waiting attempts take their slots, or give them up.  These
tests press on that hand-over, on a real Store (SQLite file) with an
in-process runner that notes every attempt and checks the executor's rules
at each start:

* no task starts while a dependency has not committed Succeeded;
* never more attempts run at once than the agent's concurrency;
* no task runs twice at once, and a retry never starts before its backoff;
* once a run's deadline, cancel or the agent's stop has come, no attempt of
  the run starts, and the run ends in a state the store can explain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.executor import Executor, local_assignment
from edge_agent.runner import AttemptRequest, AttemptResult
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from tideflow.spec import parse_spec


@dataclass
class Behaviour:
    seconds: float = 0.002
    fail_first: int = 0  # attempts that exit 1 before one succeeds
    always_fail: bool = False
    block_until: float = 0.0  # keeps the loop busy (time.sleep) until then, once started


@dataclass
class Probe:
    """A TaskRunner that sleeps (aborted at once by the attempt's abort) and checks rules."""

    concurrency: int
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    starts: list[tuple[str, str, int, float]] = field(default_factory=list)  # run, task, n, t
    running: set[tuple[str, str]] = field(default_factory=set)
    committed: set[tuple[str, str]] = field(default_factory=set)
    deps: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    retry_due: dict[tuple[str, str], float] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)  # runs past a deadline, cancel or stop
    violations: list[str] = field(default_factory=list)
    peak: int = 0
    on_start: Callable[[int], None] | None = None

    async def run(self, request: AttemptRequest) -> AttemptResult:
        key = (request.run_id, request.task)
        now = time.time()
        if key in self.running:
            self.violations.append(f"{key} started twice at once")
        if request.run_id in self.closed:
            self.violations.append(f"{key} started after its run was closed")
        for dep in self.deps.get(key, []):
            if (request.run_id, dep) not in self.committed:
                self.violations.append(f"{key} started before {dep} committed Succeeded")
        due = self.retry_due.get(key)
        if due is not None and now < due - 0.001:
            self.violations.append(f"{key} retried {due - now:.3f}s before its backoff")
        request.on_started(0, None)
        self.running.add(key)
        self.peak = max(self.peak, len(self.running))
        if len(self.running) > self.concurrency:
            self.violations.append(f"{len(self.running)} running at concurrency {self.concurrency}")
        self.starts.append((request.run_id, request.task, request.attempt, now))
        if self.on_start is not None:
            self.on_start(len(self.starts))
        how = self.behaviour.get(request.task, Behaviour())
        if how.block_until:
            time.sleep(max(0.0, how.block_until - time.time()))
        try:
            stop = request.abort.future()
            try:
                await asyncio.wait_for(asyncio.shield(stop), how.seconds)
                return AttemptResult(None, aborted=True, message="aborted")
            except TimeoutError:
                pass
        finally:
            self.running.discard(key)
        if how.always_fail or request.attempt <= how.fail_first:
            return AttemptResult(1, message="exit 1")
        return AttemptResult(0)

    def listener(self, run: RunState, task: TaskState | None) -> None:
        if task is None:
            return
        key = (run.run_id, task.name)
        if task.phase == "Succeeded":
            self.committed.add(key)
        elif task.phase == "Retrying" and task.next_attempt_at is not None:
            self.retry_due[key] = task.next_attempt_at

    def attempts_of(self, run_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run, task, _, _ in self.starts:
            if run == run_id:
                counts[task] = counts.get(task, 0) + 1
        return counts


class Site:
    def __init__(self, tmp: Path, concurrency: int) -> None:
        self.tmp = tmp
        self.probe = Probe(concurrency)
        self.concurrency = concurrency
        self.store: Store
        self.executor: Executor

    async def __aenter__(self) -> Site:
        self.store = await Store.open(self.tmp / "site.db", synchronous="NORMAL")
        self.executor = self.new_executor()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.executor.shutdown()
        await self.store.close()

    def new_executor(self) -> Executor:
        return Executor(
            self.store,
            work_dir=self.tmp / "work",
            concurrency=self.concurrency,
            runner=self.probe,
            listener=self.probe.listener,
        )

    async def submit(self, name: str, body: dict[str, Any]) -> RunState:
        run, created = await self.executor.submit(
            local_assignment("default", name, parse_spec(body))
        )
        assert created
        for task in (*body.get("tasks", []), *body.get("onFailure", [])):
            self.probe.deps[(run.run_id, task["name"])] = list(task.get("dependsOn", []))
        return run

    async def phases(self, run_id: str) -> tuple[RunState, dict[str, str]]:
        run, tasks = await self.store.load_run(run_id)
        return run, {t.name: t.phase for t in tasks}


def fan(width: int, *, head: bool = False, tail: bool = False, **extra: Any) -> dict[str, Any]:
    tasks: list[dict[str, Any]] = []
    if head:
        tasks.append({"name": "head", "command": ["true"]})
    for i in range(width):
        tasks.append({"name": f"t{i}", "command": ["true"], "dependsOn": ["head"] if head else []})
    if tail:
        tasks.append(
            {"name": "tail", "command": ["true"], "dependsOn": [f"t{i}" for i in range(width)]}
        )
    return {"tasks": tasks, **extra}


# ---------------------------------------------------------------- deadlines
async def test_a_deadline_in_a_wide_run_starts_nothing_after_it_and_the_run_fails_cleanly(
    tmp_path: Path,
) -> None:
    """The deadline aborts the attempts waiting for a slot; each gave its place to a name.

    Found: an attempt aborted while it waited called ``_launch_ready``, which
    launched the next names of the run, after the deadline and outside the
    set of attempts ``_deadline_exceeded`` was stopping.  The deadline then
    cancelled those tasks under the new attempts, which ran on; the first to
    end made an illegal transition (Cancelled -> Succeeded), which killed the
    run's driver, leaving the run Running in the store.
    """
    async with Site(tmp_path, concurrency=2) as site:
        site.probe.behaviour = {f"t{i}": Behaviour(seconds=0.3) for i in range(30)}
        run = await site.submit("late", fan(30, deadlineSeconds=1))
        final = await asyncio.wait_for(site.executor.start(run.run_id), 20)
        assert final.phase == "Failed" and final.reason == "DeadlineExceeded", final
        assert final.deadline_at is not None
        late = [s for s in site.probe.starts if s[3] >= final.deadline_at]
        assert not late, late
        _, phases = await site.phases(run.run_id)
        assert all(phase in ("Succeeded", "Failed", "Cancelled") for phase in phases.values())
        assert sum(phase == "Cancelled" for phase in phases.values()) >= 20, phases
        assert not site.probe.violations, site.probe.violations


async def test_an_attempt_that_takes_its_slot_after_the_deadline_does_not_start(
    tmp_path: Path,
) -> None:
    """The slot comes free past the deadline, before the driver's deadline pass runs.

    The task holding the only slot keeps the loop busy past the deadline, then
    ends: the attempt waiting for its slot is woken before the driver's timer,
    and must not start its process (a workflow's deadline is when its work
    stops starting; the dependants' hand-over already checks it).
    """
    async with Site(tmp_path, concurrency=1) as site:
        run_state = await site.submit("late", fan(3, deadlineSeconds=1))
        busy = Behaviour(seconds=0.0, block_until=time.time() + 1.05)  # (the first one to run)
        site.probe.behaviour = {f"t{i}": busy for i in range(3)}
        final = await asyncio.wait_for(site.executor.start(run_state.run_id), 20)
        assert final.phase == "Failed" and final.reason == "DeadlineExceeded", final
        assert final.deadline_at is not None
        late = [s for s in site.probe.starts if s[3] >= final.deadline_at]
        assert not late, late
        _, phases = await site.phases(run_state.run_id)
        ran = {task for _, task, _, _ in site.probe.starts}
        assert len(ran) == 1, ran
        assert phases == {t: "Succeeded" if t in ran else "Cancelled" for t in phases}, phases
