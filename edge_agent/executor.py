"""The durable DAG executor: turns a stored run into finished tasks.

It does not care where a run came from (a local manifest or an MQTT
assignment): callers hand it an :class:`Assignment`, it persists the run and
drives it, checkpointing every transition through the store (which writes the
matching outbox record in the same transaction).

Rules it keeps:

* A task starts only after every ``dependsOn`` task has *committed* Succeeded,
  so a dependant never acts on outputs that a crash could take back.
* At most ``concurrency`` attempts run at once, across all runs of the agent.
* A failed task skips its dependants; when the main DAG is settled and any
  task failed, the ``onFailure`` tasks run, then the run is Failed.
* Recovery (at-least-once for interrupted tasks): a task found Running when a
  run is resumed was interrupted by a crash.  Its orphaned process group is
  killed, and the attempt counts against the retry budget: it is retried if
  budget remains, else Failed.  A task that committed Succeeded never runs
  again.
* The "Running" checkpoint is written behind the process start (not waited
  for); the outcome checkpoint is waited for before dependants are released.
  A crash between the two leaves the task Pending or Running, and either way
  it is retried, which the at-least-once rule already allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import Span

from edge_agent.runner import (
    AttemptRequest,
    AttemptResult,
    ProcessRunner,
    TaskRunner,
    kill_orphaned_group,
)
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from edge_agent.tracing import AgentTracer, finish_attempt_span, finish_run_span
from tideflow.spec import (
    Retry,
    Task,
    WorkflowSpec,
    parse_spec,
    render,
    template_refs,
    template_values,
)
from tideflow.tracing import format_traceparent

log = logging.getLogger(__name__)

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

    @property
    def run_id(self) -> str:
        return run_id_for(self.uid, self.generation)


def run_id_for(uid: str, generation: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', uid)}.{generation}"


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
    ) -> None:
        self.store = store
        self.work_dir = work_dir.resolve()
        self.concurrency = concurrency or os.cpu_count() or 1
        self.runner = runner or ProcessRunner()
        self.grace_seconds = grace_seconds
        self.listener = listener
        self.rng = rng or random.Random()
        self.tracer = tracer
        self._slots = asyncio.Semaphore(self.concurrency)
        self._drivers: dict[str, _RunDriver] = {}

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
            traceparent=assignment.traceparent,
        )
        tasks = [TaskState(run.run_id, t.name) for t in spec.tasks]
        tasks += [TaskState(run.run_id, t.name, compensation=True) for t in spec.on_failure]
        created = await self.store.create_run(run, tasks)
        if not created:
            held = await self.store.find_run(assignment.uid, assignment.generation)
            assert held is not None
            return held, False
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

    async def shutdown(self) -> None:
        """Stop driving runs without changing their stored state (they resume later)."""
        for driver in list(self._drivers.values()):
            if driver.task is not None:
                driver.task.cancel()
        for driver in list(self._drivers.values()):
            if driver.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await driver.task

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
        self.open: dict[bool, set[str]] = {False: set(), True: set()}  # not done, by stage
        self.candidates: set[str] = set()
        self.retry_heap: list[tuple[float, str]] = []
        self.held: set[str] = set()  # ready, but the run is suspended
        self.main_failed = False
        self.compensating = False
        self.template_sources: dict[str, set[str]] = {}

    # ------------------------------------------------------------ signals
    def request_cancel(self, reason: str) -> None:
        if not self.run.done:
            self.run.cancel_requested = True
            self.run.message = reason
            self.wake.set()

    async def set_suspended(self, suspended: bool) -> None:
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
        self.spec = parse_spec(json.loads(self.run.spec_json))
        if self.run.done:
            return self.run
        self._build_graph()
        if self.run.phase == "Pending":
            self.run.phase = "Running"
            self.run.started_at = time.time()
            if self.spec.deadline_seconds:
                self.run.deadline_at = self.run.started_at + self.spec.deadline_seconds
            self._start_run_span()
            await self.store.save_run(self.run)
            self.ex._notify(self.run, None)
        else:
            self._start_run_span()
        await self._recover_interrupted()
        try:
            while not await self._step():
                await self._sleep_until_needed()
        except asyncio.CancelledError:
            await self._stop_attempts("agent shutting down", record=False)
            raise
        await asyncio.to_thread(self._cleanup_scratch)
        return self.run

    def _start_run_span(self) -> None:
        if self.ex.tracer is not None:
            self.span = self.ex.tracer.run_span(self.run)

    def _end_run_span(self) -> None:
        if self.span is not None:
            finish_run_span(self.span, self.run)

    async def _recover_interrupted(self) -> None:
        interrupted = [t for t in self.tasks.values() if t.phase == "Running"]
        if not interrupted:
            return
        now = time.time()
        for task in interrupted:
            if kill_orphaned_group(task.pid, task.pid_start):
                log.warning("killed orphaned process group of %s/%s", self.run.name, task.name)
            if self.ex.tracer is not None and self.span is not None:
                self.ex.tracer.interrupted(self.span, self.run, task)
            task.span_id = None
            budget = self.spec.retry_for(self.defs[task.name]).limit + 1
            note = f"attempt {task.attempt} interrupted (agent restarted)"
            task.pid = task.pid_start = None
            if task.attempt < budget:
                task.phase, task.next_attempt_at, task.message = "Retrying", now, note
            else:
                task.phase, task.finished_at = "Failed", now
                task.message = f"{note}; retry budget exhausted"
        await self.store.save_many(self.run, interrupted)
        for task in interrupted:
            self._changed(task)

    def _build_graph(self) -> None:
        self.defs = {t.name: t for t in (*self.spec.tasks, *self.spec.on_failure)}
        self.children = {name: [] for name in self.defs}
        for task in self.defs.values():
            for dep in set(task.depends_on):
                self.children[dep].append(task.name)
            refs = [arg for arg in (task.command or [])] + list(task.env.values())
            self.template_sources[task.name] = {
                match.split(".")[1]
                for text in refs
                for match in template_refs(text)
                if match.startswith("tasks.")
            }
        for state in self.tasks.values():
            if state.done:
                if not state.compensation and state.phase != "Succeeded":
                    self.main_failed = True
                continue
            self.open[state.compensation].add(state.name)
            if state.phase == "Retrying":
                heapq.heappush(self.retry_heap, (state.next_attempt_at or 0.0, state.name))
        self.candidates = set(self.open[False])

    def _changed(self, state: TaskState) -> None:
        """A task's phase changed: update the open sets and look at its dependants."""
        if state.done:
            self.open[state.compensation].discard(state.name)
            if not state.compensation and state.phase != "Succeeded":
                self.main_failed = True
            self.candidates.update(self.children[state.name])
        elif state.phase == "Retrying":
            heapq.heappush(self.retry_heap, (state.next_attempt_at or 0.0, state.name))
        else:
            self.candidates.add(state.name)

    def _stage(self) -> bool | None:
        """False: the main DAG; True: compensation; None: nothing left to run."""
        if self.open[False]:
            return False
        if not self.main_failed:
            return None
        if not self.compensating:
            self.compensating = True
            self.candidates.update(self.open[True])
        return True

    async def _step(self) -> bool:
        """Advance the run; True when it has finished."""
        run = self.run
        while True:
            if self.fatal is not None:
                await self._stop_attempts("store failure", record=False)
                raise self.fatal
            if run.cancel_requested:
                await self._finish_cancelled()
                return True
            if (
                self.open[False]
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

    async def _advance(self, stage: bool) -> bool:
        """Skip what is blocked and launch what is ready; True if anything was skipped."""
        now = time.time()
        while self.retry_heap and self.retry_heap[0][0] <= now:
            self.candidates.add(heapq.heappop(self.retry_heap)[1])
        pending = [name for name in self.candidates if name in self.open[stage]]
        self.candidates.difference_update(pending)
        skipped: list[TaskState] = []
        while pending:
            name = pending.pop()
            state = self.tasks[name]
            if state.done or name in self.attempts:
                continue
            deps = self.defs[name].depends_on
            if state.phase == "Pending":
                blocker = next(
                    (
                        d
                        for d in deps
                        if self.tasks[d].phase in _BLOCKING and d not in self.attempts
                    ),
                    None,
                )
                if blocker is not None:
                    state.phase, state.finished_at = "Skipped", now
                    state.message = f"dependency {blocker} {self.tasks[blocker].phase.lower()}"
                    skipped.append(state)
                    self.open[stage].discard(name)
                    if not state.compensation:
                        self.main_failed = True
                    pending.extend(self.children[name])
                    continue
                # A dependency still in self.attempts has not committed its outcome yet.
                if any(self.tasks[d].phase != "Succeeded" or d in self.attempts for d in deps):
                    continue
            elif state.phase == "Retrying":
                if state.next_attempt_at is not None and state.next_attempt_at > now:
                    heapq.heappush(self.retry_heap, (state.next_attempt_at, name))
                    continue
            else:
                continue
            if self.run.suspended:
                self.held.add(name)
                continue
            abort = asyncio.Event()
            attempt = asyncio.create_task(self._attempt(state, self.defs[name], abort))
            self.attempts[name] = (attempt, abort)
        if skipped:
            await self.store.save_many(self.run, skipped)
            for state in skipped:
                self.ex._notify(self.run, state)
        return bool(skipped)

    async def _sleep_until_needed(self) -> None:
        deadlines = [self.retry_heap[0][0]] if self.retry_heap else []
        if self.run.deadline_at is not None and self.run.reason != "DeadlineExceeded":
            deadlines.append(self.run.deadline_at)
        timeout = max(0.0, min(deadlines) - time.time()) if deadlines else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()

    # ------------------------------------------------------------ attempts
    async def _attempt(self, state: TaskState, task: Task, abort: asyncio.Event) -> None:
        try:
            async with self.ex._slots:
                if abort.is_set() or self.run.cancel_requested or self.run.suspended:
                    return
                await self._run_attempt(state, task, abort)
        except Exception as exc:  # the store failed (e.g. disk full): stop this run
            self.fatal = exc
        finally:
            self.attempts.pop(state.name, None)
            self._changed(state)
            self.wake.set()

    async def _run_attempt(self, state: TaskState, task: Task, abort: asyncio.Event) -> None:
        span: Span | None = None
        state.attempt += 1
        if self.ex.tracer is not None and self.span is not None:
            span = self.ex.tracer.attempt_span(self.span, self.run, state)
        scope = trace.use_span(span, end_on_exit=False) if span is not None else nullcontext()
        with scope:
            await self._attempt_in_span(state, task, abort, span)

    async def _attempt_in_span(
        self, state: TaskState, task: Task, abort: asyncio.Event, span: Span | None
    ) -> None:
        run = self.run
        state.phase = "Running"
        state.started_at = time.time()
        state.finished_at = state.exit_code = state.next_attempt_at = None
        state.message = None
        state.outputs = {}
        try:
            argv, env = self._render(task)
        except KeyError as missing:
            state.phase, state.finished_at = "Failed", time.time()
            state.message = f"template {{{{{missing.args[0]}}}}} has no value (output not produced)"
            if span is not None:
                finish_attempt_span(span, state, None)
            await self.store.save_task(run, state)
            self.ex._notify(run, state)
            return
        pending_write: list[asyncio.Future[None]] = []

        def started(pid: int, pid_start: str | None) -> None:
            state.pid, state.pid_start = (pid or None), pid_start
            # Queued, not awaited: the outcome's write is queued after it.
            write = self.store.save_task(run, state)
            write.add_done_callback(_log_write_failure)
            pending_write.append(write)
            self.ex._notify(run, state)

        if span is not None:
            ctx = span.get_span_context()
            env["TRACEPARENT"] = format_traceparent(
                format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
            )
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
        result = await self.ex.runner.run(request)
        delay = self._settle(state, task, result)
        log.info(
            "task %s/%s attempt %d %s%s", run.name, task.name, state.attempt, state.phase,
            f": {state.message}" if state.message else "",
        )  # fmt: skip
        if span is not None:
            finish_attempt_span(span, state, delay)
        state.span_id = None
        tails = {stream: tail for stream, tail in result.logs.items() if tail}
        await self.store.save_task(run, state, tails or None)
        self.ex._notify(run, state)

    def _settle(self, state: TaskState, task: Task, result: AttemptResult) -> float | None:
        """Apply an attempt's result to the task; returns the retry delay if retrying."""
        now = time.time()
        state.exit_code, state.pid, state.pid_start = result.exit_code, None, None
        state.message = result.message
        if result.ok:
            state.phase, state.finished_at, state.outputs = "Succeeded", now, result.outputs
            return None
        if result.aborted:
            state.phase, state.finished_at = "Cancelled", now
            if self.run.reason == "DeadlineExceeded":
                state.phase = "Failed"
                state.message = "workflow deadline exceeded; process group killed"
            return None
        retry = self.spec.retry_for(task)
        if not result.permanent and state.attempt <= retry.limit:
            delay = retry_delay(retry, state.attempt, self.ex.rng)
            state.phase, state.next_attempt_at = "Retrying", now + delay
            state.message = f"{result.message}; retry {state.attempt}/{retry.limit} in {delay:.1f}s"
            return delay
        state.phase, state.finished_at = "Failed", now
        return None

    def _render(self, task: Task) -> tuple[list[str], dict[str, str]]:
        sources = self.template_sources.get(task.name, set())
        outputs = {n: self.tasks[n].outputs for n in sources if self.tasks[n].phase == "Succeeded"}
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
        env.setdefault("TIDEFLOW_WORKFLOW", self.run.name)
        if self.run.traceparent:
            env.setdefault("TRACEPARENT", self.run.traceparent)
        return argv, env

    def _scratch(self, task: str, attempt: int) -> Path:
        """The run's workspace: the default working directory of its tasks."""
        return self.ex.work_dir / self.run.run_id

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
                state.phase, state.finished_at = "Cancelled", now
                state.message = "workflow deadline exceeded"
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
            state.phase, state.finished_at, state.message = "Cancelled", now, "run cancelled"
        if stopped:
            await self.store.save_many(run, stopped)
        run.phase, run.finished_at = "Cancelled", now
        run.reason = run.reason or "Cancelled"
        self._end_run_span()
        await self.store.save_run(run)
        self.ex._notify(run, None)

    async def _finish(self) -> None:
        run = self.run
        main = [t for t in self.tasks.values() if not t.compensation]
        run.finished_at = time.time()
        if all(t.phase == "Succeeded" for t in main):
            run.phase, run.reason, run.message = "Succeeded", "Succeeded", None
            unneeded = [t for t in self.tasks.values() if t.compensation and not t.done]
            for state in unneeded:
                state.phase, state.finished_at = "Skipped", run.finished_at
                state.message = "not needed: the workflow succeeded"
            if unneeded:
                await self.store.save_many(run, unneeded)
        else:
            failed = [t.name for t in main if t.phase == "Failed"]
            run.phase = "Failed"
            if run.reason != "DeadlineExceeded":
                run.reason = "TaskFailed"
                run.message = f"task(s) failed: {', '.join(failed)}"
        self._end_run_span()
        await self.store.save_run(run)
        self.ex._notify(run, None)


_BLOCKING = frozenset({"Failed", "Skipped", "Cancelled"})


def _log_write_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a checkpoint write failed: %s", future.exception())
