"""The durable DAG executor: turns a stored run into finished tasks.

It does not care where a run came from (a local manifest or an MQTT
assignment): callers hand it an :class:`Assignment`, it persists the run and
drives it, checkpointing every transition through the store (which writes the
matching outbox record in the same transaction).

Rules it keeps:

* A task starts only after every ``dependsOn`` task has *committed* Succeeded,
  so a dependant never acts on outputs that a crash could take back.
* At most ``concurrency`` attempts run at once, across all runs of the agent
  (an attempt holds its place until its process has ended, not while its
  outcome commits).
* A failed task skips its dependants; when the main DAG is settled and any
  task failed, the ``onFailure`` tasks run, then the run is Failed.
* A stop of the agent is not a task failure.  An attempt cut short because
  the agent stopped (SIGTERM/SIGINT, kill -9, reboot, a full disk) is
  *Interrupted*: it runs again on resume without using ``retry.limit``, with
  ``TIDEFLOW_ATTEMPT`` increased and the same ``TIDEFLOW_IDEMPOTENCY_KEY``.
  After ``maxInterruptions`` consecutive interruptions the task fails
  (``InterruptedTooOften``), so a task that takes the agent down cannot loop
  for ever; a task with ``onInterruption: Fail`` fails instead of re-running.
  A clean stop records its interrupted attempts (one transaction) before the
  process exits; after a crash, recovery finds them Running.
* No attempt starts once a stop signal has arrived, even one that arrived
  while the loop was busy committing the step before (``note_stop_signal``,
  set from the signal handler itself, is read wherever an attempt may start).
* No attempt of a run's main DAG starts once the run's deadline has passed,
  even one whose slot came free before the driver's deadline pass ran; that
  pass cancels every such task not started (its onFailure tasks still run).
* Before any attempt of a new agent process starts, every process an earlier
  one left behind is killed, found by cgroup and by the attempt mark in its
  environment, whether or not its pid was ever checkpointed (runner.py).
  An attempt that left nothing alive is still found by the start the runner
  noted in the run's workspace before the process existed.
  A task that committed Succeeded never runs again.
* The "Running" checkpoint is written behind the process start (not waited
  for); the outcome checkpoint is waited for before dependants are released.
  A crash between the two leaves the task Pending or Running, and either way
  it runs again, which the at-least-once rule allows.
* Every phase change goes through one transition table (``TASK_TRANSITIONS``,
  ``RUN_TRANSITIONS``); an illegal one raises :class:`IllegalTransition`.
  ``_commit`` writes transitions with their outbox records and tells the
  listener.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from opentelemetry.trace import Span

from edge_agent.runner import (
    Abort,
    AttemptRequest,
    AttemptResult,
    CgroupScope,
    OrphanAttempt,
    ProcessRunner,
    TaskRunner,
    agent_mark,
    kill_orphaned_group,
    reap_orphans,
    recorded_starts,
)
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store, StoreError
from edge_agent.threads import in_own_thread
from edge_agent.tracing import AgentTracer, AttemptIds, finish_run_span
from tideflow.failpoints import failpoint
from tideflow.logs import log_ids, reset_log_ids
from tideflow.phases import RunPhase, TaskPhase
from tideflow.spec import (
    Retry,
    Task,
    WorkflowSpec,
    parse_spec,
    render,
    template_refs,
    template_values,
)
from tideflow.tracing import attempt_span_of, checked_traceparent, run_id_for

log = logging.getLogger(__name__)


class TaskEvent(StrEnum):
    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    RETRY = "retry"
    INTERRUPT = "interrupt"
    SKIP = "skip"
    CANCEL = "cancel"


class RunEvent(StrEnum):
    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"


_P = TaskPhase
TASK_TRANSITIONS: dict[tuple[TaskPhase, TaskEvent], TaskPhase] = {
    (_P.PENDING, TaskEvent.START): _P.RUNNING,
    (_P.RETRYING, TaskEvent.START): _P.RUNNING,
    (_P.INTERRUPTED, TaskEvent.START): _P.RUNNING,
    (_P.RUNNING, TaskEvent.SUCCEED): _P.SUCCEEDED,
    (_P.RUNNING, TaskEvent.FAIL): _P.FAILED,
    (_P.RUNNING, TaskEvent.RETRY): _P.RETRYING,
    (_P.RUNNING, TaskEvent.INTERRUPT): _P.INTERRUPTED,
    (_P.RUNNING, TaskEvent.CANCEL): _P.CANCELLED,
    # An attempt whose Running checkpoint never landed (decision 0042), found
    # alive by its mark on recovery, was interrupted from the stored phase.
    (_P.PENDING, TaskEvent.INTERRUPT): _P.INTERRUPTED,
    (_P.RETRYING, TaskEvent.INTERRUPT): _P.INTERRUPTED,
    (_P.INTERRUPTED, TaskEvent.INTERRUPT): _P.INTERRUPTED,
    # Too many interruptions, or a task that must never run twice.
    (_P.INTERRUPTED, TaskEvent.FAIL): _P.FAILED,
    (_P.PENDING, TaskEvent.SKIP): _P.SKIPPED,
    (_P.PENDING, TaskEvent.CANCEL): _P.CANCELLED,
    (_P.RETRYING, TaskEvent.CANCEL): _P.CANCELLED,
    (_P.INTERRUPTED, TaskEvent.CANCEL): _P.CANCELLED,
}
del _P
RUN_TRANSITIONS: dict[tuple[RunPhase, RunEvent], RunPhase] = {
    (RunPhase.PENDING, RunEvent.START): RunPhase.RUNNING,
    (RunPhase.RUNNING, RunEvent.SUCCEED): RunPhase.SUCCEEDED,
    (RunPhase.RUNNING, RunEvent.FAIL): RunPhase.FAILED,
    (RunPhase.PENDING, RunEvent.CANCEL): RunPhase.CANCELLED,
    (RunPhase.RUNNING, RunEvent.CANCEL): RunPhase.CANCELLED,
}


class Stage(StrEnum):
    """Which part of a run a task belongs to: its DAG, or the onFailure tasks."""

    MAIN = "main"
    COMPENSATION = "compensation"

    @classmethod
    def of(cls, state: TaskState) -> Stage:
        return cls.COMPENSATION if state.compensation else cls.MAIN


class IllegalTransition(RuntimeError):
    """A phase change the state machine does not allow: a bug, never input."""


def _move(
    table: Mapping[tuple[Any, Any], str], subject: str, state: TaskState | RunState,
    event: StrEnum, changes: dict[str, Any],
) -> None:  # fmt: skip
    target = table.get((state.phase, event))
    if target is None:
        raise IllegalTransition(f"{subject}: {event} not allowed from {state.phase}")
    state.phase = target
    for key, value in changes.items():
        setattr(state, key, value)


def task_transition(state: TaskState, event: TaskEvent, **changes: Any) -> TaskState:
    """Move ``state`` by ``event`` (and set ``changes``), or raise IllegalTransition."""
    _move(TASK_TRANSITIONS, f"task {state.name}", state, event, changes)
    return state


def run_transition(run: RunState, event: RunEvent, **changes: Any) -> RunState:
    _move(RUN_TRANSITIONS, f"run {run.run_id}", run, event, changes)
    return run


Listener = Callable[[RunState, TaskState | None], None]


@dataclass(frozen=True)
class Assignment:
    """A run to execute: who it is (uid, generation) and what (spec)."""

    uid: str
    generation: int
    namespace: str
    name: str
    spec: WorkflowSpec
    traceparent: str | None = None
    # Which schedule fired this run, for which time (see edge_agent/scheduler.py).
    cron: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        return run_id_for(self.uid, self.generation)


def local_assignment(namespace: str, name: str, spec: WorkflowSpec) -> Assignment:
    return Assignment(f"local-{uuid.uuid4()}", 1, namespace, name, spec)


def retry_delay(retry: Retry, failed_attempt: int, rng: random.Random) -> float:
    backoff = retry.backoff
    exponent = failed_attempt - 1
    # Compare in log space: factor**exponent overflows a float for large retry limits.
    if math.log(backoff.seconds) + exponent * math.log(backoff.factor) >= math.log(
        backoff.max_seconds
    ):
        base = backoff.max_seconds
    else:
        base = backoff.seconds * backoff.factor**exponent
    return base * (1 - retry.jitter * rng.random())


class Executor:
    """Runs assignments to completion; one per agent process."""

    def __init__(
        self,
        store: Store,
        *,
        work_dir: Path,
        concurrency: int | None = None,
        runner: TaskRunner | None = None,
        grace_seconds: float = 5.0,
        listener: Listener | None = None,
        rng: random.Random | None = None,
        tracer: AgentTracer | None = None,
        pass_env: Sequence[str] = (),
        cgroups: bool = True,
    ) -> None:
        self.store = store
        if work_dir.is_symlink():
            # The agent removes, at its start, every directory there named as a run is
            # that no run holds: through a link to /usr/lib that was python3.11.
            raise StoreError(
                f"{work_dir} (the runs' workspaces) is a symbolic link; refusing to "
                "use it: put the database where the workspaces should be, or mount it there"
            )
        self.work_dir = work_dir.resolve()
        self.concurrency = concurrency or os.cpu_count() or 1
        self.mark = agent_mark(self.work_dir)
        self.cgroups = CgroupScope.detect(self.mark) if cgroups and runner is None else None
        self.runner = runner or ProcessRunner(
            mark=self.mark, pass_env=pass_env, cgroups=self.cgroups
        )
        self.grace_seconds = grace_seconds
        self.listener = listener
        self.rng = rng or random.Random()
        self.tracer = tracer
        self._slots = asyncio.Semaphore(self.concurrency)
        self._drivers: dict[str, _RunDriver] = {}
        # Specs of runs submitted by this process, so their drivers need not parse
        # the stored JSON again (a 2,000-task spec takes ~30 ms to validate).
        self._parsed: dict[str, WorkflowSpec] = {}
        self._reaped: asyncio.Task[dict[tuple[str, str], int]] | None = None
        # A stop signal arrived (note_stop_signal): no attempt starts from then on.
        self.stop_signalled = False

    # ---------------------------------------------------------------- public
    async def submit(self, assignment: Assignment) -> tuple[RunState, bool]:
        """Persist the assignment as a run; (run, False) if it was already held."""
        existing = await self.store.find_run(assignment.uid, assignment.generation)
        if existing is not None:
            return existing, False
        spec = assignment.spec
        run = RunState(
            run_id=assignment.run_id,
            uid=assignment.uid,
            generation=assignment.generation,
            namespace=assignment.namespace,
            name=assignment.name,
            spec_json=json.dumps(spec.dump(), sort_keys=True),
            suspended=spec.suspend,
            created_at=time.time(),
            traceparent=checked_traceparent(assignment.traceparent),  # (else ignored)
            cron=assignment.cron,
        )
        tasks = [TaskState(run.run_id, t.name) for t in spec.tasks]
        tasks += [TaskState(run.run_id, t.name, compensation=True) for t in spec.on_failure]
        created = await self.store.create_run(run, tasks)
        if not created:
            held = await self.store.find_run(assignment.uid, assignment.generation)
            assert held is not None
            return held, False
        self._parsed[run.run_id] = spec
        while len(self._parsed) > _PARSED_KEPT:  # submitted, never started: forget
            del self._parsed[next(iter(self._parsed))]
        self._notify(run, None)
        return run, True

    def start(self, run_id: str) -> asyncio.Task[RunState]:
        """Drive a stored run (new or interrupted) in the background."""
        driver = self._drivers.get(run_id)
        if driver is None:
            driver = _RunDriver(self, run_id)
            self._drivers[run_id] = driver
            driver.task = asyncio.create_task(driver.drive(), name=f"run-{run_id}")
            driver.task.add_done_callback(lambda _t: self._drivers.pop(run_id, None))
        assert driver.task is not None
        return driver.task

    async def recover(self) -> list[str]:
        """Resume every unfinished run in the database; returns their ids."""
        runs = await self.store.list_runs(unfinished=True)
        for run in runs:
            self.start(run.run_id)
        return [run.run_id for run in runs]

    async def run_to_end(self, run_id: str) -> RunState:
        return await self.start(run_id)

    async def cancel(self, run_id: str, reason: str = "cancelled") -> bool:
        driver = self._drivers.get(run_id)
        if driver is not None:
            driver.request_cancel(reason)
            # Committed now, not only with the run's end: a kill before that end
            # must not resume the run as if never asked.
            await self.store.request_cancel(run_id, reason)
            return True
        run, _ = await self.store.load_run(run_id)
        if run.done:
            return False
        # Not live in this process: record the request; it is honoured on start.
        run.cancel_requested = True
        run.message = reason
        await self.store.save_run(run)
        return True

    async def suspend(self, run_id: str, suspended: bool) -> bool:
        driver = self._drivers.get(run_id)
        if driver is not None:
            await driver.set_suspended(suspended)
            return True
        run, _ = await self.store.load_run(run_id)
        if run.done or run.suspended == suspended:
            return False
        run.suspended = suspended
        await self.store.save_run(run)
        return True

    def running_count(self) -> int:
        return sum(len(d.attempts) for d in self._drivers.values())

    def note_stop_signal(self) -> None:
        """A stop signal arrived: start no attempt from now on.  For a signal handler.

        Python runs a signal handler between two bytecodes of the main thread,
        even while the loop is busy (a step's outcome committing on it, decision
        0027), whereas asyncio calls the stop's own callback (which calls
        :meth:`request_stop`) only at its loop's next ``select``: a chain's next
        step would start its process in between (decision 0044).  This sets one
        attribute and nothing else; a callback scheduled or an event set from a
        signal handler could land in the middle of the loop's own bookkeeping.
        """
        self.stop_signalled = True

    def request_stop(self) -> None:
        """Mark every run as stopping, at once (the first thing a stop does).

        From here on an attempt that ends is Interrupted, including one whose
        task died of the same stop signal a moment before the agent got it.
        """
        for driver in self._drivers.values():
            driver.request_stop()

    def abort(self) -> None:
        """Stop at once (a second stop signal): attempts are killed without grace.

        Nothing more is recorded; the next start finds them Running, as after a crash.
        """
        for driver in self._drivers.values():
            if driver.task is not None:
                driver.task.cancel()

    async def shutdown(self) -> None:
        """Stop every run for a restart: attempts are killed and recorded Interrupted.

        The runs stay unfinished and resume on the next start, their
        interrupted attempts running again without using their retry budget.
        """
        self.request_stop()
        drivers = [d for d in self._drivers.values() if d.task is not None]
        for driver in drivers:
            assert driver.task is not None
            try:
                await driver.task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the store failed while stopping: recovery copes
                log.warning("run %s stopped with an error: %s", driver.run_id, exc)

    async def orphans(self) -> dict[tuple[str, str], int]:
        """Kill what an earlier agent on this database left running (once per process).

        Returns the highest attempt found alive per (run id, task).
        """
        return await asyncio.shield(self.reap_leftovers())

    def reap_leftovers(self) -> asyncio.Task[dict[tuple[str, str], int]]:
        """Start :meth:`orphans`' look (once per process) without waiting for a run.

        The daemon calls it at its start: an earlier agent killed while idle, or
        as its last run ended, left its free slots, its cgroup root and maybe
        that run's workspace, and an agent with nothing to run kept them, through
        any number of restarts, until its next assignment.
        """
        if self._reaped is None:
            self._reaped = asyncio.ensure_future(self._reap())
            self._reaped.add_done_callback(_log_reap_failure)
        return self._reaped

    async def _reap(self) -> dict[tuple[str, str], int]:
        if not isinstance(self.runner, ProcessRunner):
            return {}
        found: list[OrphanAttempt] = await in_own_thread(reap_orphans, self.mark, self.cgroups)
        if found:
            log.warning("killed %d task process(es) left by an earlier agent", len(found))
        # No workspace of this process exists yet (every run's driver waits for
        # this before its first attempt): any but an unfinished run's is left over.
        keep = {run.run_id for run in await self.store.list_runs(unfinished=True)}
        await in_own_thread(_remove_workspaces_but, self.work_dir, keep)
        latest: dict[tuple[str, str], int] = {}
        for orphan in found:
            key = (orphan.run_id, orphan.task)
            latest[key] = max(latest.get(key, 0), orphan.attempt)
        return latest

    def _notify(self, run: RunState, task: TaskState | None) -> None:
        if self.listener is not None:
            try:
                self.listener(run, task)
            except Exception:  # a display problem must never stop a run
                log.exception("progress listener failed")


class _RunDriver:
    def __init__(self, executor: Executor, run_id: str) -> None:
        self.ex = executor
        self.store = executor.store
        self.run_id = run_id
        self.task: asyncio.Task[RunState] | None = None
        self.wake = asyncio.Event()
        self.attempts: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self.fatal: BaseException | None = None
        self.span: Span | None = None
        self.run: RunState
        self.spec: WorkflowSpec
        self.tasks: dict[str, TaskState] = {}
        # Incremental scheduling: only tasks whose inputs changed are examined.
        self.defs: dict[str, Task] = {}
        self.children: dict[str, list[str]] = {}
        self.open: dict[Stage, set[str]] = {Stage.MAIN: set(), Stage.COMPENSATION: set()}
        self.candidates: set[str] = set()
        self.retry_heap: list[tuple[float, str]] = []
        self.held: set[str] = set()  # ready, but the run is suspended
        # Ready tasks not launched yet: at most ``concurrency`` of a run's attempts
        # wait for a slot at once (see _launch_ready); the rest wait here, as names.
        self.ready: collections.deque[str] = collections.deque()
        self.queued: set[str] = set()  # what self.ready holds
        self.unslotted = 0  # attempts in self.attempts that do not hold a slot yet
        self.main_failed = False
        self.compensating = False
        self.stopping = False  # the agent is stopping: attempts end Interrupted
        self.stop_requested = asyncio.Event()
        self.interrupted: list[TaskState] = []
        self.template_sources: dict[str, set[str]] = {}
        self.templated: set[str] = set()  # tasks whose command or env hold a {{template}}
        self.workspace: Path | None = None
        # A cancel that arrives before drive() has loaded the run (right after
        # start: a Replace, a cancel racing its assignment) is applied on load.
        self.early_cancel: str | None = None
        self.early_suspend: bool | None = None  # the same for a suspend or a resume

    # ------------------------------------------------------------ signals
    def request_stop(self) -> None:
        self.stopping = True
        self.stop_requested.set()
        self.wake.set()

    def request_cancel(self, reason: str) -> None:
        if not hasattr(self, "run"):
            self.early_cancel = reason
            return
        if not self.run.done:
            self.run.cancel_requested = True
            self.run.message = reason
            self.wake.set()

    async def set_suspended(self, suspended: bool) -> None:
        if not hasattr(self, "run"):  # (drive() applies it once the run is loaded)
            self.early_suspend = suspended
            return
        if self.run.done or self.run.suspended == suspended:
            return
        self.run.suspended = suspended
        await self.store.save_run(self.run)
        self.ex._notify(self.run, None)
        if not suspended:
            self.candidates.update(self.held)
            self.held.clear()
        self.wake.set()

    # ------------------------------------------------------------ main loop
    async def drive(self) -> RunState:
        self.run, tasks = await self.store.load_run(self.run_id)
        self.tasks = {t.name: t for t in tasks}
        parsed = self.ex._parsed.pop(self.run_id, None)
        self.spec = parsed if parsed is not None else parse_spec(json.loads(self.run.spec_json))
        if self.run.done:
            return self.run
        if self.early_cancel is not None:
            self.request_cancel(self.early_cancel)
        if self.early_suspend is not None and self.early_suspend != self.run.suspended:
            self.run.suspended = self.early_suspend
            if self.run.phase != RunPhase.PENDING:  # (else saved with its start, below)
                await self.store.save_run(self.run)
                self.ex._notify(self.run, None)
        self._index_definitions()
        orphans = dict(await self.ex.orphans())
        starts = await in_own_thread(recorded_starts, self.ex.work_dir / self.run_id)
        for task, attempt in starts.items():  # started, though maybe nothing is left alive
            key = (self.run_id, task)
            orphans[key] = max(orphans.get(key, 0), attempt)
        if self.run.phase == RunPhase.PENDING:
            now = time.time()
            run_transition(self.run, RunEvent.START, started_at=now)
            if self.spec.deadline_seconds:
                self.run.deadline_at = now + self.spec.deadline_seconds
            self._start_run_span()
            await self.store.save_run(self.run)
            self.ex._notify(self.run, None)
        else:
            self._start_run_span()
        await self._recover_interrupted(orphans)
        self._build_graph()
        try:
            while not await self._step():
                await self._sleep_until_needed()
        except asyncio.CancelledError:
            await self._stop_attempts("agent shutting down", record=False)
            raise
        if self.run.done:
            failpoint("run-finished")  # committed; its workspace not removed yet
            await in_own_thread(self._cleanup_scratch)
        return self.run

    def _start_run_span(self) -> None:
        if self.ex.tracer is not None:
            self.span = self.ex.tracer.run_span(self.run)

    def _end_run_span(self) -> None:
        if self.span is not None:
            finish_run_span(self.span, self.run)

    async def _recover_interrupted(self, orphans: dict[tuple[str, str], int]) -> None:
        """Settle the attempts an earlier agent process did not finish.

        Found Running (a crash), Interrupted (a clean stop), or alive by their
        mark or noted as started though the Running checkpoint never landed
        (``orphans``: the highest such attempt per task): each counts one
        interruption (never a retry), then runs again or fails by the task's
        interruption policy.
        """
        changed: list[TaskState] = []
        now = time.time()
        for task in self.tasks.values():
            if task.done:
                continue
            seen_alive = orphans.get((self.run.run_id, task.name))
            if task.phase == TaskPhase.RUNNING or (
                seen_alive is not None and seen_alive > task.attempt
            ):
                if kill_orphaned_group(task.pid, task.pid_start):
                    log.warning("killed orphaned process group of %s/%s", self.run.name, task.name)
                if self.ex.tracer is not None and self.span is not None and task.span_id:
                    self.ex.tracer.interrupted(self.span, self.run, task)
                attempt = max(task.attempt, seen_alive or 0)
                task_transition(
                    task,
                    TaskEvent.INTERRUPT,
                    attempt=attempt,
                    interruptions=task.interruptions + 1,
                    message=f"attempt {attempt} interrupted: the agent stopped mid-attempt",
                )
                task.pid = task.pid_start = task.span_id = None
                self._apply_interruption_policy(task, now)
                changed.append(task)
            elif task.phase == TaskPhase.INTERRUPTED:
                # Recorded by a clean stop (or a recovery cut short): no new record
                # unless the policy now fails it.
                self._apply_interruption_policy(task, now)
                if task.phase != TaskPhase.INTERRUPTED:
                    changed.append(task)
        if changed:
            await self.store.save_many(self.run, changed)
            for task in changed:
                self.ex._notify(self.run, task)

    def _apply_interruption_policy(self, task: TaskState, now: float) -> None:
        """An Interrupted task runs again, unless its policy or the crash-loop bound says no."""
        definition = self.defs_for_policy(task.name)
        limit = self.spec.max_interruptions_for(definition)
        if self.spec.on_interruption_for(definition) == "Fail":
            task_transition(
                task,
                TaskEvent.FAIL,
                finished_at=now,
                message=(
                    f"InterruptedNotRerun: attempt {task.attempt} was interrupted by an agent "
                    "stop and the task must not run twice (onInterruption: Fail)"
                ),
            )
        elif task.interruptions >= limit:
            task_transition(
                task,
                TaskEvent.FAIL,
                finished_at=now,
                message=(
                    f"InterruptedTooOften: interrupted {task.interruptions} times in a row "
                    f"(maxInterruptions: {limit}); the task may be stopping the agent"
                ),
            )
        else:
            task.next_attempt_at = now

    def defs_for_policy(self, name: str) -> Task:
        return self.defs[name]

    def _index_definitions(self) -> None:
        self.defs = {t.name: t for t in (*self.spec.tasks, *self.spec.on_failure)}

    def _build_graph(self) -> None:
        if not self.defs:
            self._index_definitions()
        self.children = {name: [] for name in self.defs}
        for task in self.defs.values():
            for dep in set(task.depends_on):
                self.children[dep].append(task.name)
            refs = [arg for arg in (task.command or [])] + list(task.env.values())
            matches = [match for text in refs for match in template_refs(text)]
            self.template_sources[task.name] = {
                match.split(".")[1] for match in matches if match.startswith("tasks.")
            }
            if matches:
                self.templated.add(task.name)
        for state in self.tasks.values():
            if state.done:
                if not state.compensation and state.phase != TaskPhase.SUCCEEDED:
                    self.main_failed = True
                continue
            self.open[Stage.of(state)].add(state.name)
            if state.phase == TaskPhase.RETRYING:
                heapq.heappush(self.retry_heap, (state.next_attempt_at or 0.0, state.name))
        self.candidates = set(self.open[Stage.MAIN])

    def _changed(self, state: TaskState) -> None:
        """A task's phase changed: update the open sets and look at its dependants."""
        if state.done:
            self.open[Stage.of(state)].discard(state.name)
            if not state.compensation and state.phase != TaskPhase.SUCCEEDED:
                self.main_failed = True
            self.candidates.update(self.children[state.name])
        elif state.phase == TaskPhase.RETRYING:
            heapq.heappush(self.retry_heap, (state.next_attempt_at or 0.0, state.name))
        else:
            self.candidates.add(state.name)

    def _stage(self) -> Stage | None:
        """The stage to advance: the main DAG, then compensation; None: nothing left."""
        if self.open[Stage.MAIN]:
            return Stage.MAIN
        if not self.main_failed:
            return None
        if not self.compensating:
            self.compensating = True
            self.candidates.update(self.open[Stage.COMPENSATION])
        return Stage.COMPENSATION

    async def _step(self) -> bool:
        """Advance the run; True when it has finished or the agent is stopping."""
        run = self.run
        while True:
            if self.fatal is not None:
                await self._stop_attempts("store failure", record=False)
                raise self.fatal
            if self.stopping:
                await self._stop_attempts("agent stopping")
                if self.fatal is not None:
                    raise self.fatal
                if self.interrupted:
                    await self.store.save_many(run, self.interrupted)
                    for state in self.interrupted:
                        self.ex._notify(run, state)
                    self.interrupted.clear()
                return True
            if run.cancel_requested:
                await self._finish_cancelled()
                return True
            if (
                self.open[Stage.MAIN]
                and run.deadline_at is not None
                and time.time() >= run.deadline_at
                and run.reason != "DeadlineExceeded"
            ):
                await self._deadline_exceeded()
            stage = self._stage()
            if stage is not None and await self._advance(stage):
                continue  # skipping settled tasks: the stage may have changed
            if self.attempts or (stage is not None and self.open[stage]):
                return False
            await self._finish()
            return True

    async def _advance(self, stage: Stage) -> bool:
        """Skip what is blocked and launch what is ready; True if anything was skipped."""
        now = time.time()
        while self.retry_heap:
            due, name = self.retry_heap[0]
            state = self.tasks[name]
            if due - now > self.spec.retry_for(self.defs[name]).backoff.max_seconds:
                # No retry delay exceeds maxSeconds: the wall clock was stepped back
                # (NTP, an RTC that ran ahead).  Due now, not an hour from now.
                due = now
                if state.phase == TaskPhase.RETRYING:
                    state.next_attempt_at = now
            if due > now:
                break
            heapq.heappop(self.retry_heap)
            self.candidates.add(name)
        pending = [name for name in self.candidates if name in self.open[stage]]
        self.candidates.difference_update(pending)
        skipped: list[TaskState] = []
        while pending:
            name = pending.pop()
            state = self.tasks[name]
            if state.done or name in self.attempts:
                continue
            deps = self.defs[name].depends_on
            if state.phase == TaskPhase.PENDING:
                blocker = next(
                    (
                        d
                        for d in deps
                        if self.tasks[d].phase in _BLOCKING and d not in self.attempts
                    ),
                    None,
                )
                if blocker is not None:
                    task_transition(
                        state,
                        TaskEvent.SKIP,
                        finished_at=now,
                        message=f"dependency {blocker} {self.tasks[blocker].phase.lower()}",
                    )
                    skipped.append(state)
                    self.open[stage].discard(name)
                    if not state.compensation:
                        self.main_failed = True
                    pending.extend(self.children[name])
                    continue
                # A dependency still in self.attempts has not committed its outcome yet.
                if any(
                    self.tasks[d].phase != TaskPhase.SUCCEEDED or d in self.attempts for d in deps
                ):
                    continue
            elif state.phase == TaskPhase.RETRYING:
                if state.next_attempt_at is not None and state.next_attempt_at > now:
                    heapq.heappush(self.retry_heap, (state.next_attempt_at, name))
                    continue
            elif state.phase != TaskPhase.INTERRUPTED:
                continue
            if self.stopping or self.ex.stop_signalled:
                continue
            if self.run.suspended:
                self.held.add(name)
                continue
            self._queue_ready(name)
        self._launch_ready()
        if skipped:
            await self.store.save_many(self.run, skipped)
            for state in skipped:
                self.ex._notify(self.run, state)
        return bool(skipped)

    def _queue_ready(self, name: str) -> None:
        if name not in self.queued:
            self.queued.add(name)
            self.ready.append(name)

    def _launch_ready(self) -> None:
        """Give ready tasks asyncio tasks of their own, while few of this run's wait for a slot.

        An attempt waiting for a slot is an asyncio task, its coroutines, its
        abort's future and callbacks: some 27 objects, which the garbage
        collector walks again at each of its passes.  A run of 20,000 ready
        tasks made all of them at once (90 MB, and most of an independent no-op
        step's collection time, issue 15).  A run keeps at most ``concurrency``
        attempts waiting, enough that a slot given back is taken at once; the
        others wait in ``self.ready`` as names, in the order they became ready,
        launched as waiting attempts take their slots.  Each is checked again
        when its turn comes: it may have been settled (a cancel, a deadline), or
        the run suspended or stopping meanwhile.

        Past the run's deadline a main-DAG name is dropped, not launched: the
        deadline's pass cancels it.  (The attempts that pass aborts, waiting
        for a slot, call this as they give their places up: the next names got
        attempts the pass did not abort, and it cancelled their tasks under
        them, an illegal Cancelled -> Running that killed the run's driver.)
        """
        limit = self.ex.concurrency
        while self.ready and self.unslotted < limit:
            if self.stopping or self.ex.stop_signalled or self.run.cancel_requested:
                return  # left to the stop or the cancel, as every task not started
            name = self.ready.popleft()
            self.queued.discard(name)
            state = self.tasks[name]
            if state.done or name in self.attempts or name not in self.open[Stage.of(state)]:
                continue
            if self._past_deadline(state):
                continue  # the driver's deadline pass cancels it
            if self.run.suspended:
                self.held.add(name)
                continue
            self._launch(state)

    def _launch(self, state: TaskState) -> None:
        abort = Abort()
        attempt = asyncio.create_task(self._attempt(state, self.defs[state.name], abort))
        self.attempts[state.name] = (attempt, abort)
        self.unslotted += 1

    async def _sleep_until_needed(self) -> None:
        deadlines = [self.retry_heap[0][0]] if self.retry_heap else []
        if self.run.deadline_at is not None and self.run.reason != "DeadlineExceeded":
            self._rebase_deadline()
            deadlines.append(self.run.deadline_at)
        timeout = max(0.0, min(deadlines) - time.time()) if deadlines else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()

    def _rebase_deadline(self) -> None:
        """A deadline further off than ``deadlineSeconds``: the wall clock stepped back.

        The run started while the clock read ahead (an RTC that ran fast, set
        right by NTP since): its deadline, set from that reading, lay up to a
        year away and the run ran on past it.  How long it really ran is not
        known; it gets its whole budget again from now (at most twice it in
        all), never more (decision 0049).
        """
        budget = self.spec.deadline_seconds
        deadline = self.run.deadline_at
        now = time.time()
        if not budget or deadline is None or deadline - now <= budget:
            return
        log.warning(
            "run %s: its deadline %s is more than its %ss away (the clock stepped back "
            "since it started); it ends %ss from now",
            self.run.name, datetime.fromtimestamp(deadline, UTC).isoformat(), budget, budget,
        )  # fmt: skip
        self.run.deadline_at = now + budget

    # ------------------------------------------------------------ attempts
    async def _attempt(self, state: TaskState, task: Task, abort: Abort) -> None:
        """Run an attempt, then the dependant its committed success hands on to this task.

        A chain's next attempt runs on in this asyncio task, in this loop (a
        chain can be thousands of steps long: never a call): a task of its own
        per step, made, scheduled and its coroutine started, cost ~30 us of a
        ~550 us durable step (issue 15).  Each turn is a whole attempt, as in a
        task of its own: its own slot, the same checks once it holds it, its
        own entry in ``self.attempts`` (so a stop, a cancel or a deadline aborts
        it, and ``_stop_attempts`` awaits or cancels this task for it).  The
        loop gets no turn of its own between two steps, only those inside the
        attempts (the runner waits for the process's exit; ``NoopRunner``
        yields once, for the same reason).
        """
        while True:
            committed = False
            slot = _Slot(self.ex._slots)
            unslotted = True
            try:
                taken = await slot.acquire(abort)
                unslotted = False
                self.unslotted -= 1
                if self.ready:
                    self._launch_ready()  # a waiting place is free: the next one takes it
                if not taken:
                    return  # stopped, cancelled or past its deadline while waiting
                try:
                    if (
                        abort.is_set()
                        or self.stopping
                        or self.ex.stop_signalled
                        or self.run.cancel_requested
                        or self.run.suspended
                        or self._past_deadline(state)
                    ):
                        return
                    committed = await self._run_attempt(state, task, abort, slot)
                finally:
                    slot.release()
            except Exception as exc:  # the store failed (e.g. disk full): stop this run
                self.fatal = exc
            finally:
                if unslotted:  # (cancelled while it waited for a slot)
                    self.unslotted -= 1
                self.attempts.pop(state.name, None)
                self._changed(state)
                if not committed:
                    self.wake.set()
            follow = self._launch_dependants(state) if committed else None
            if follow is None:
                return
            state, task, abort = follow

    def _past_deadline(self, state: TaskState) -> bool:
        """A main-DAG task whose run's deadline has passed: it must not start.

        A slot can come free past the deadline before the driver's timer fires
        (the task holding it kept the loop busy): the attempt that waited for it
        leaves the task to the driver's deadline pass, which cancels it.
        """
        deadline = self.run.deadline_at
        return deadline is not None and not state.compensation and time.time() >= deadline

    def _launch_dependants(self, state: TaskState) -> tuple[TaskState, Task, Abort] | None:
        """Start the dependants a committed success made ready, without the driver.

        The common step of a DAG, taken here to spare a wake-up of the driver
        (on the path of every step of a chain).  Only the plain case: a
        Succeeded outcome that is committed, a main-DAG dependant whose
        dependencies have all committed Succeeded, nothing stopping, cancelled,
        suspended or past its deadline.  Anything else is left to the driver
        (``_advance``), which makes the same decisions; it is woken unless it
        has nothing left to look at.  Called from the committed attempt's own
        task: the first dependant is returned to run on in it (registered as
        such in ``self.attempts``), any others get tasks of their own.
        """
        run = self.run
        if (
            state.phase != TaskPhase.SUCCEEDED
            or state.compensation
            or self.fatal is not None
            or self.stopping
            or self.ex.stop_signalled
            or run.cancel_requested
            or run.suspended
            or self.compensating
            or (run.deadline_at is not None and time.time() >= run.deadline_at)
        ):
            self.wake.set()
            return None
        follow: tuple[TaskState, Task, Abort] | None = None
        opened = self.open[Stage.MAIN]
        for name in self.children[state.name]:
            if name not in self.candidates or name not in opened or name in self.attempts:
                continue
            child = self.tasks[name]
            if child.phase != TaskPhase.PENDING or any(
                self.tasks[d].phase != TaskPhase.SUCCEEDED or d in self.attempts
                for d in self.defs[name].depends_on
            ):
                continue
            self.candidates.discard(name)
            if follow is None:
                current = asyncio.current_task()
                assert current is not None
                abort = Abort()
                follow = (child, self.defs[name], abort)
                self.attempts[name] = (current, abort)
                self.unslotted += 1
            else:
                self._queue_ready(name)
        self._launch_ready()
        if not self.attempts or self.candidates:
            self.wake.set()
        return follow

    async def _run_attempt(
        self, state: TaskState, task: Task, abort: asyncio.Event, slot: _Slot
    ) -> bool:
        """Run one attempt; True once its outcome is committed."""
        span: AttemptIds | None = None
        state.attempt += 1
        if self.ex.tracer is None or self.span is None:
            return await self._attempt_in_span(state, task, abort, None, slot)
        span = self.ex.tracer.attempt_ids(self.span, self.run, state)
        # Log lines while the attempt runs carry its ids (tideflow.logs.log_ids).
        token = log_ids(span.trace_id_hex, span.span_id_hex)
        try:
            return await self._attempt_in_span(state, task, abort, span, slot)
        finally:
            reset_log_ids(token)

    async def _attempt_in_span(
        self,
        state: TaskState,
        task: Task,
        abort: asyncio.Event,
        span: AttemptIds | None,
        slot: _Slot,
    ) -> bool:
        run = self.run
        task_transition(
            state,
            TaskEvent.START,
            started_at=time.time(),
            finished_at=None,
            exit_code=None,
            next_attempt_at=None,
            message=None,
            outputs={},
        )
        try:
            argv, env = self._render(task)
        except KeyError as missing:
            task_transition(
                state,
                TaskEvent.FAIL,
                finished_at=time.time(),
                message=f"template {{{{{missing.args[0]}}}}} has no value (output not produced)",
            )
            state.span_ref = self._span_ref(span, state, None)
            write = self.store.save_task(run, state, awaited=True)  # captures the span's ref
            state.span_ref = None
            await write
            self.ex._notify(run, state)
            return True
        attempt = state.attempt
        checkpoint: list[asyncio.TimerHandle] = []

        def checkpoint_running() -> None:
            if state.phase != TaskPhase.RUNNING or state.attempt != attempt:
                return
            try:  # not awaited: the attempt goes on whatever happens to it
                write = self.store.save_task(run, state, progress=True)
            except StoreError as exc:  # (closed, or refused: the outcome's write says so)
                log.warning("task %s/%s: its Running checkpoint: %s", run.name, task.name, exc)
                return
            write.add_done_callback(_log_write_failure)

        def started(pid: int, pid_start: str | None) -> None:
            state.pid, state.pid_start = (pid or None), pid_start
            failpoint("attempt-started")
            # Decision 0042: the Running checkpoint (with the pid) is written if
            # the attempt is still running RUNNING_CHECKPOINT_SECONDS after its
            # start; a shorter one is reported by its outcome alone, so a chain
            # of short tasks writes (and fsyncs) once per step.
            checkpoint.append(
                asyncio.get_running_loop().call_later(
                    RUNNING_CHECKPOINT_SECONDS, checkpoint_running
                )
            )
            self.ex._notify(run, state)

        if span is not None:
            env["TRACEPARENT"] = span.traceparent
        log.info("task %s/%s attempt %d starting", run.name, task.name, state.attempt)
        request = AttemptRequest(
            run_id=run.run_id,
            task=task.name,
            attempt=state.attempt,
            argv=argv,
            env=env,
            working_dir=task.working_dir,
            timeout=self.spec.timeout_for(task),
            scratch=self._scratch(task.name, state.attempt),
            grace_seconds=self.ex.grace_seconds,
            abort=abort,
            on_started=started,
        )
        try:
            result = await self.ex.runner.run(request)
        finally:
            for handle in checkpoint:
                handle.cancel()
        # The process has ended: its slot goes to the next attempt while this one's
        # outcome commits (dependants still wait for that commit).
        slot.release()
        failpoint("process-exited")
        if _died_of_a_stop_signal(result) and not self.stopping:
            # systemd's stop (KillMode=control-group) and a clean reboot signal
            # every process at once: the task may die of it before the agent gets
            # its own.  Give the agent's stop a moment to show up before this
            # counts as the task's failure.
            log.info(
                "task %s/%s attempt %d %s; waiting %.1fs for an agent stop before "
                "counting it as a failure", run.name, task.name, state.attempt,
                result.message, STOP_SIGNAL_GRACE_SECONDS,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), STOP_SIGNAL_GRACE_SECONDS)
        delay = self._settle(state, task, result)
        log.info(
            "task %s/%s attempt %d %s%s", run.name, task.name, state.attempt, state.phase,
            f": {state.message}" if state.message else "",
        )  # fmt: skip
        # The span's ids travel inside the outcome's own record, the span is derived
        # from it (decisions 0022, 0036).
        ref = self._span_ref(span, state, delay)
        state.span_id = None
        if state.phase == TaskPhase.INTERRUPTED:
            if ref is not None:  # (rare: as a span record of its own, whole)
                derived = attempt_span_of({**state.to_record(run), "attemptSpan": ref})
                assert derived is not None
                self.store.queue_span(derived)
            self.interrupted.append(state)  # committed together by _step, one transaction
            return False
        tails = {stream: tail for stream, tail in result.logs.items() if tail}
        state.span_ref = ref
        # (Awaited at once: on an idle loop it commits before save_task returns.)
        write = self.store.save_task(run, state, tails or None, awaited=True)
        state.span_ref = None
        await write
        failpoint("outcome-committed")
        self.ex._notify(run, state)
        return True

    def _span_ref(
        self, span: AttemptIds | None, state: TaskState, delay: float | None
    ) -> dict[str, Any] | None:
        if span is None or self.ex.tracer is None:
            return None
        return self.ex.tracer.attempt_span_ref(span, state, delay)

    def _settle(self, state: TaskState, task: Task, result: AttemptResult) -> float | None:
        """Apply an attempt's result to the task; returns the retry delay if retrying."""
        now = time.time()
        state.exit_code, state.pid, state.pid_start = result.exit_code, None, None
        state.message = result.message
        if self.stopping and not result.ok and (result.aborted or _died_of_a_stop_signal(result)):
            # The agent is stopping: not the task's failure, and not a retry.
            task_transition(
                state,
                TaskEvent.INTERRUPT,
                interruptions=state.interruptions + 1,
                message=f"attempt {state.attempt} interrupted: the agent stopped",
            )
            return None
        state.interruptions = 0
        if result.ok:
            task_transition(state, TaskEvent.SUCCEED, finished_at=now, outputs=result.outputs)
            return None
        if result.aborted:
            if self.run.reason == "DeadlineExceeded":
                task_transition(
                    state,
                    TaskEvent.FAIL,
                    finished_at=now,
                    message="workflow deadline exceeded; process group killed",
                )
            else:
                task_transition(state, TaskEvent.CANCEL, finished_at=now)
            return None
        retry = self.spec.retry_for(task)
        state.failures += 1
        if not result.permanent and state.failures <= retry.limit:
            delay = retry_delay(retry, state.failures, self.ex.rng)
            task_transition(
                state,
                TaskEvent.RETRY,
                next_attempt_at=now + delay,
                message=f"{result.message}; retry {state.failures}/{retry.limit} in {delay:.1f}s",
            )
            return delay
        task_transition(state, TaskEvent.FAIL, finished_at=now)
        return None

    def _render(self, task: Task) -> tuple[list[str], dict[str, str]]:
        if task.name not in self.templated:  # nothing to substitute (most tasks)
            env = dict(task.env)
            env["TIDEFLOW_WORKFLOW"] = self.run.name
            if traceparent := checked_traceparent(self.run.traceparent):  # (older rows)
                env.setdefault("TRACEPARENT", traceparent)
            return task.argv_templates(), env
        sources = self.template_sources.get(task.name, set())
        outputs = {
            n: self.tasks[n].outputs for n in sources if self.tasks[n].phase == TaskPhase.SUCCEEDED
        }
        values = template_values(
            self.spec,
            name=self.run.name,
            namespace=self.run.namespace,
            uid=self.run.uid,
            outputs=outputs,
        )
        argv = task.argv_templates()
        if task.command is not None:
            argv = [render(arg, values) for arg in argv]
        env = {key: render(value, values) for key, value in task.env.items()}
        env["TIDEFLOW_WORKFLOW"] = self.run.name
        if traceparent := checked_traceparent(self.run.traceparent):
            env.setdefault("TRACEPARENT", traceparent)
        return argv, env

    def _scratch(self, task: str, attempt: int) -> Path:
        """The run's workspace: the default working directory of its tasks."""
        if self.workspace is None:
            self.workspace = self.ex.work_dir / self.run.run_id
        return self.workspace

    def _cleanup_scratch(self) -> None:
        shutil.rmtree(self.ex.work_dir / self.run.run_id, ignore_errors=True)

    # ------------------------------------------------------------ endings
    async def _stop_attempts(self, reason: str, *, record: bool = True) -> None:
        attempts = list(self.attempts.values())
        for _, abort in attempts:
            abort.set()
        if not record:
            for attempt, _ in attempts:
                attempt.cancel()
        for attempt, _ in attempts:
            with contextlib.suppress(asyncio.CancelledError):
                await attempt

    async def _deadline_exceeded(self) -> None:
        run = self.run
        run.reason = "DeadlineExceeded"
        run.message = f"deadline of {self.spec.deadline_seconds}s exceeded"
        await self._stop_attempts(run.message)
        now = time.time()
        stopped = []
        for state in self.tasks.values():
            if not state.compensation and not state.done:
                task_transition(
                    state, TaskEvent.CANCEL, finished_at=now, message="workflow deadline exceeded"
                )
                stopped.append(state)
        if stopped:
            await self.store.save_many(run, stopped)
        for state in stopped:
            self._changed(state)
        await self.store.save_run(run)
        self.ex._notify(run, None)

    async def _finish_cancelled(self) -> None:
        run = self.run
        await self._stop_attempts(run.message or "cancelled")
        now = time.time()
        stopped = [t for t in self.tasks.values() if not t.done]
        for state in stopped:
            task_transition(state, TaskEvent.CANCEL, finished_at=now, message="run cancelled")
        if stopped:
            await self.store.save_many(run, stopped)
        run_transition(run, RunEvent.CANCEL, finished_at=now, reason=run.reason or "Cancelled")
        self._end_run_span()
        await self.store.save_run(run)
        self.ex._notify(run, None)

    async def _finish(self) -> None:
        run = self.run
        main = [t for t in self.tasks.values() if not t.compensation]
        now = time.time()
        if all(t.phase == TaskPhase.SUCCEEDED for t in main):
            run_transition(run, RunEvent.SUCCEED, finished_at=now, reason="Succeeded", message=None)
            unneeded = [t for t in self.tasks.values() if t.compensation and not t.done]
            for state in unneeded:
                task_transition(
                    state,
                    TaskEvent.SKIP,
                    finished_at=now,
                    message="not needed: the workflow succeeded",
                )
            if unneeded:
                await self.store.save_many(run, unneeded)
        else:
            failed = [t.name for t in main if t.phase == TaskPhase.FAILED]
            run_transition(run, RunEvent.FAIL, finished_at=now)
            if run.reason != "DeadlineExceeded":
                run.reason = "TaskFailed"
                run.message = f"task(s) failed: {', '.join(failed)}"
        self._end_run_span()
        await self.store.save_run(run)
        self.ex._notify(run, None)


class _Slot:
    """One attempt's place under the concurrency limit, given back once."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: asyncio.Semaphore) -> None:
        self.limit = limit
        self.held = False

    async def acquire(self, abort: Abort) -> bool:
        """Take a place, waiting for one; False (none taken) if ``abort`` comes first.

        The places are the agent's, shared by its runs: a stop, a cancel or a
        deadline of this run must not wait for another run's task to give its
        place back (a cancel took as long as that task).  A free place is taken
        at once; a wait is cut by cancelling it (nothing made to wait beside
        it: N ready tasks at concurrency 8 mostly wait).
        """
        limit = self.limit
        if not limit.locked():
            await limit.acquire()  # (does not wait)
            self.held = True
            return True
        if abort.is_set():
            return False
        current = asyncio.current_task()
        assert current is not None
        waiting, cut = [True], [False]

        def on_abort(_: object) -> None:
            if waiting[0]:  # (run a turn after the abort: the wait may be over)
                cut[0] = True
                current.cancel()  # (an acquire cancelled once woken passes its place on)

        stop = abort.future()
        stop.add_done_callback(on_abort)
        try:
            await limit.acquire()
        except asyncio.CancelledError:
            if cut[0] and current.uncancel() == 0:  # only the abort's cancel: not taken
                return False
            raise
        finally:
            waiting[0] = False
            stop.remove_done_callback(on_abort)
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.limit.release()


_BLOCKING = frozenset({TaskPhase.FAILED, TaskPhase.SKIPPED, TaskPhase.CANCELLED})
_PARSED_KEPT = 64
# Signals a stop of the whole machine or service sends to every process.
_STOP_SIGNALS = frozenset({-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP})
STOP_SIGNAL_GRACE_SECONDS = 1.0
# An attempt still running this long after its start is checkpointed Running
# (decision 0042); one that ends sooner writes only its outcome.
RUNNING_CHECKPOINT_SECONDS = 0.02


# A run's workspace is named by its run id (tideflow.tracing.run_id_for).
_RUN_WORKSPACE = re.compile(r"[A-Za-z0-9_.-]+\.[0-9]+")


def _remove_workspaces_but(work_dir: Path, keep: set[str]) -> None:
    """Remove the run workspaces under ``work_dir`` but ``keep``'s (in a thread).

    A run's workspace is removed after its end is committed: an agent killed
    in between, or during the removal, left it (or what was not removed yet)
    for good.  Only directories named as a run is (``<uid>.<generation>``,
    :func:`tideflow.tracing.run_id_for`): anything else someone put there is
    not the agent's to remove.
    """
    try:
        entries = list(os.scandir(work_dir))
    except OSError:
        return
    for entry in entries:
        if (
            entry.name in keep
            or not _RUN_WORKSPACE.fullmatch(entry.name)
            or not entry.is_dir(follow_symlinks=False)
        ):
            continue
        log.info("removing the workspace %s, left by an earlier agent", entry.name)
        shutil.rmtree(entry.path, ignore_errors=True)


def _died_of_a_stop_signal(result: AttemptResult) -> bool:
    """The task was killed by a stop signal the agent did not send."""
    return not result.aborted and not result.timed_out and result.exit_code in _STOP_SIGNALS


def _log_write_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a checkpoint write failed: %s", future.exception())


def _log_reap_failure(future: asyncio.Future[Any]) -> None:
    # (A run's driver that awaits the look raises the same; nothing else awaits it.)
    if not future.cancelled() and future.exception() is not None:
        log.warning("looking for what an earlier agent left failed: %s", future.exception())
