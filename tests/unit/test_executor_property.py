"""Property: on any DAG, the real executor and store keep order, limits and reports exact.

For random DAGs (up to 25 tasks, edges from lower to higher index, listed in
a random order, optional compensation tasks) and a random concurrency of
1..4, executed through the real Executor and a real SQLite Store with an
in-process recording runner:

* a task starts only after every dependency finished (succeeded);
* at most ``concurrency`` attempts run at once;
* on a clean run every task runs and succeeds exactly once, compensation
  tasks never run and end Skipped;
* the outbox holds exactly the records of the transitions: Running then
  Succeeded per task, Skipped per compensation task, and the run's Pending,
  Running and Succeeded records, in seq order.

The stronger rule the executor documents -- a dependant starts only after the
dependency's Succeeded has *committed* -- is checked by a deterministic
reproducer (a slow commit).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.executor import Executor, local_assignment
from edge_agent.runner import AttemptRequest, AttemptResult
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from tideflow.spec import parse_spec


@dataclass(frozen=True)
class Dag:
    deps: dict[str, list[str]]  # task -> its dependencies
    listing: list[str]  # the order the tasks appear in the manifest
    delays: dict[str, float]
    compensation: list[str]
    concurrency: int


@st.composite
def dags(draw: st.DrawFn) -> Dag:
    n = draw(st.integers(1, 25))
    names = [f"t{i}" for i in range(n)]
    deps = {
        names[i]: [
            names[j] for j in draw(st.lists(st.integers(0, i - 1), unique=True, max_size=min(i, 4)))
        ]
        if i
        else []
        for i in range(n)
    }
    listing = draw(st.permutations(names))
    delays = {name: draw(st.sampled_from([0.0, 0.0005, 0.001, 0.003])) for name in names}
    compensation = [f"undo{i}" for i in range(draw(st.integers(0, 2)))]
    return Dag(deps, list(listing), delays, compensation, draw(st.integers(1, 4)))


@dataclass
class Recorder:
    """A TaskRunner that runs nothing, recording what the executor asks of it."""

    dag: Dag
    events: list[tuple[str, str]] = field(default_factory=list)  # (what, task)
    running: int = 0
    peak: int = 0
    attempts: list[AttemptRequest] = field(default_factory=list)

    async def run(self, request: AttemptRequest) -> AttemptResult:
        request.on_started(0, None)
        self.attempts.append(request)
        self.events.append(("start", request.task))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.dag.delays.get(request.task, 0.0))
        finally:
            self.running -= 1
        self.events.append(("finish", request.task))
        return AttemptResult(0, outputs={"done": request.task})

    def listener(self, run: RunState, task: TaskState | None) -> None:
        # Called by the executor after a transition's checkpoint has committed.
        if task is not None and task.phase == "Succeeded":
            self.events.append(("committed", task.name))


def manifest(dag: Dag) -> dict[str, object]:
    return {
        "tasks": [
            {"name": name, "command": ["true", name], "dependsOn": dag.deps[name]}
            for name in dag.listing
        ],
        "onFailure": [{"name": name, "command": ["undo"]} for name in dag.compensation],
    }


async def execute(dag: Dag, directory: Path) -> None:
    spec = parse_spec(manifest(dag))
    recorder = Recorder(dag)
    store = await Store.open(directory / "site.db", synchronous="NORMAL")
    try:
        executor = Executor(
            store,
            work_dir=directory / "work",
            concurrency=dag.concurrency,
            runner=recorder,
            listener=recorder.listener,
        )
        run, created = await executor.submit(local_assignment("ns", "prop", spec))
        assert created
        final = await asyncio.wait_for(executor.run_to_end(run.run_id), 30)
        assert final.phase == "Succeeded", final

        events = recorder.events
        position = {event: i for i, event in enumerate(events)}

        # every task ran exactly once, as attempt 1; compensation never ran
        started = [task for what, task in events if what == "start"]
        assert sorted(started) == sorted(dag.listing)
        assert all(request.attempt == 1 for request in recorder.attempts)
        assert all(request.argv == ["true", request.task] for request in recorder.attempts)

        # a task starts only after its dependencies finished
        for task, deps in dag.deps.items():
            for dep in deps:
                assert position[("finish", dep)] < position[("start", task)], (dep, task)
        # each task's success was committed (and reported) exactly once
        committed = [task for what, task in events if what == "committed"]
        assert sorted(committed) == sorted(dag.listing)

        # the concurrency limit holds (and the executor reported nothing left running)
        assert 1 <= recorder.peak <= dag.concurrency
        assert executor.running_count() == 0

        # stored state: all Succeeded with their outputs, compensation Skipped
        _, tasks = await store.load_run(run.run_id)
        by_name = {t.name: t for t in tasks}
        for name in dag.listing:
            assert by_name[name].phase == "Succeeded" and by_name[name].attempt == 1
            assert by_name[name].outputs == {"done": name}
        for name in dag.compensation:
            assert by_name[name].phase == "Skipped" and by_name[name].attempt == 0

        # the outbox: exactly one record per transition, in a valid order
        records = await store.outbox_records()
        seqs = [r.seq for r in records]
        assert seqs == sorted(set(seqs))
        run_phases = [json.loads(r.body)["phase"] for r in records if r.kind == "run"]
        assert run_phases == ["Pending", "Running", "Succeeded"]
        task_phases: dict[str, list[str]] = {}
        for r in records:
            if r.kind == "task":
                body = json.loads(r.body)
                task_phases.setdefault(body["task"], []).append(body["phase"])
        # A task's Running record is left out when its outcome committed in the
        # same transaction (decision 0042); otherwise it comes first, once.
        assert set(task_phases) == set(dag.listing) | set(dag.compensation)
        for name in dag.listing:
            assert task_phases[name] in (["Running", "Succeeded"], ["Succeeded"]), name
        for name in dag.compensation:
            assert task_phases[name] == ["Skipped"], name
        assert {r.kind for r in records} <= {"run", "task"}
        assert len(records) == 3 + sum(len(p) for p in task_phases.values())
        # the run's final record comes after every task record
        assert records[-1].kind == "run"
        assert await store.integrity_check() == "ok"
    finally:
        await store.close()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_random_dag_runs_in_dependency_order_within_limits(dag: Dag) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(execute(dag, Path(directory)))


def test_a_chain_runs_strictly_in_order() -> None:
    """A fixed example, so the property's checks are seen working on a known case."""
    dag = Dag(
        deps={"t0": [], "t1": ["t0"], "t2": ["t1"], "t3": []},
        listing=["t2", "t3", "t1", "t0"],
        delays={"t0": 0.002, "t1": 0.0, "t2": 0.001, "t3": 0.003},
        compensation=["undo0"],
        concurrency=2,
    )
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(execute(dag, Path(directory)))


class SlowCommitStore(Store):
    """A store whose commit of one transition is slow (think fsync on tired flash).

    The slow write is held until ``release`` is set, then a little longer.
    """

    slow: tuple[str, str] = ("", "")
    release: asyncio.Event

    def save_task(
        self,
        run: RunState,
        task: TaskState,
        logs: dict[str, bytes] | None = None,
        *,
        also_run: bool = False,
        awaited: bool = False,
        progress: bool = False,
    ) -> Awaitable[None]:
        write = super().save_task(
            run, task, logs, also_run=also_run, awaited=awaited, progress=progress
        )
        if (task.name, task.phase) != self.slow:
            return write

        async def slowly() -> None:
            await self.release.wait()
            await asyncio.sleep(0.1)  # time for the executor to react to what happened
            await write

        return slowly()


def test_dependant_starts_only_after_dependency_success_committed() -> None:
    """a -> b, plus an unrelated c that ends while a's Succeeded is still committing."""

    async def scenario(directory: Path) -> None:
        dag = Dag(
            deps={"a": [], "b": ["a"], "c": []},
            listing=["a", "b", "c"],
            delays={"a": 0.0, "b": 0.0, "c": 0.01},
            compensation=[],
            concurrency=2,
        )
        recorder = Recorder(dag)
        store = await SlowCommitStore.open(directory / "site.db", synchronous="NORMAL")
        assert isinstance(store, SlowCommitStore)
        store.slow, store.release = ("a", "Succeeded"), asyncio.Event()

        def listener(run: RunState, task: TaskState | None) -> None:
            recorder.listener(run, task)
            if task is not None and (task.name, task.phase) == ("c", "Succeeded"):
                store.release.set()  # c has ended while a's success is still committing

        try:
            executor = Executor(
                store,
                work_dir=directory / "work",
                concurrency=2,
                runner=recorder,
                listener=listener,
            )
            spec = parse_spec(manifest(dag))
            run, _ = await executor.submit(local_assignment("ns", "slow", spec))
            assert (await executor.run_to_end(run.run_id)).phase == "Succeeded"
            position = {event: i for i, event in enumerate(recorder.events)}
            assert position[("committed", "a")] < position[("start", "b")], recorder.events
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory)))
