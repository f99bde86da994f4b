"""The executor with real processes and a real SQLite file.

Proves what a site relies on: outputs flow to dependants, failures retry with
backoff and then skip dependants and run compensation, timeouts and cancels
kill the whole process group (grandchildren too), a missing program fails the
task with that message, deadlines and suspension work, and a full database
stops the run without corrupting what was committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge_agent.executor import Executor, local_assignment
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store, StoreFullError
from tideflow.spec import parse_spec


def spec(tasks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"tasks": tasks, **extra}


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store: Store
        self.executor: Executor

    async def __aenter__(self) -> Harness:
        self.store = await Store.open(self.tmp / "site.db", synchronous="NORMAL")
        self.executor = Executor(
            self.store, work_dir=self.tmp / "work", concurrency=4, grace_seconds=0.5
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.executor.shutdown()
        await self.store.close()

    async def submit(self, body: dict[str, Any], name: str = "wf") -> RunState:
        run, created = await self.executor.submit(
            local_assignment("default", name, parse_spec(body))
        )
        assert created
        return run

    async def run(self, body: dict[str, Any]) -> tuple[RunState, dict[str, TaskState]]:
        run = await self.submit(body)
        final = await asyncio.wait_for(self.executor.run_to_end(run.run_id), 60)
        _, tasks = await self.store.load_run(final.run_id)
        return final, {t.name: t for t in tasks}


@pytest.fixture
async def h(tmp_path: Path) -> Any:
    async with Harness(tmp_path) as harness:
        yield harness


async def test_outputs_flow_to_dependants_through_argv_and_env(h: Harness) -> None:
    out = h.tmp / "seen"
    body = spec(
        [
            {
                "name": "extract",
                "script": 'echo "rows=42" >> "$TIDEFLOW_OUTPUTS"; echo k=v >> "$TIDEFLOW_OUTPUTS"',
            },
            {
                "name": "load",
                "dependsOn": ["extract"],
                "command": [
                    "sh",
                    "-c",
                    'echo "$0 $ROWS $B" > "$1"',
                    "{{tasks.extract.outputs.rows}}",
                    str(out),
                ],
                "env": {
                    "ROWS": "{{tasks.extract.outputs.k}}",
                    "B": "{{params.batch}}-{{workflow.name}}",
                },
            },
        ],
        params={"batch": "b1"},
    )
    run, tasks = await h.run(body)
    assert run.phase == "Succeeded"
    assert tasks["extract"].outputs == {"rows": "42", "k": "v"}
    assert out.read_text() == "42 v b1-wf\n"


async def test_script_text_is_never_templated(h: Harness) -> None:
    out = h.tmp / "literal"
    body = spec(
        [{"name": "s", "script": f"echo '{{{{params.x}}}}' > {out}"}],
        params={"x": "$(touch /tmp/pwned)"},
    )
    run, _ = await h.run(body)
    assert run.phase == "Succeeded"
    assert out.read_text() == "{{params.x}}\n"


async def test_failure_retries_then_skips_dependants_and_runs_compensation(h: Harness) -> None:
    marker = h.tmp / "compensated"
    body = spec(
        [
            {
                "name": "flaky",
                "command": ["sh", "-c", "echo boom >&2; exit 3"],
                "retry": {"limit": 2, "backoff": {"seconds": 0.05, "factor": 2, "maxSeconds": 0.1}},
            },
            {"name": "after", "dependsOn": ["flaky"], "command": ["true"]},
            {"name": "later", "dependsOn": ["after"], "command": ["true"]},
            {"name": "independent", "command": ["true"]},
        ],
        onFailure=[{"name": "rollback", "command": ["touch", str(marker)]}],
    )
    run, tasks = await h.run(body)
    assert run.phase == "Failed" and run.reason == "TaskFailed"
    assert tasks["flaky"].phase == "Failed" and tasks["flaky"].attempt == 3
    assert tasks["flaky"].exit_code == 3
    assert tasks["after"].phase == tasks["later"].phase == "Skipped"
    assert tasks["independent"].phase == "Succeeded"
    assert tasks["rollback"].phase == "Succeeded" and marker.exists()
    tails = await h.store.log_tails(run.run_id, "flaky", 3)
    assert (3, "stderr", b"boom\n") in tails


async def test_retry_succeeds_on_a_later_attempt(h: Harness) -> None:
    counter = h.tmp / "count"
    # Each attempt outlives the write-behind window, so its Running record is sent
    # (a shorter one's is superseded by its outcome: decision 0042, tested below).
    script = (
        f"sleep 0.1; n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter};"
        " [ $n -ge 3 ]"
    )
    body = spec(
        [
            {
                "name": "t",
                "script": script,
                "retry": {"limit": 5, "backoff": {"seconds": 0.05, "maxSeconds": 0.05}},
            }
        ]
    )
    run, tasks = await h.run(body)
    assert run.phase == "Succeeded"
    assert tasks["t"].attempt == 3
    phases = [
        json.loads(r.body)["phase"]
        for r in await h.store.outbox_records(run.run_id)
        if r.kind == "task"
    ]
    assert phases == ["Running", "Retrying", "Running", "Retrying", "Running", "Succeeded"]


async def test_a_short_attempt_reports_its_outcome_alone_and_a_long_one_its_start_too(
    h: Harness,
) -> None:
    """Decision 0042: an attempt whose outcome commits in the same transaction as its
    write-behind Running checkpoint (it ended within ~20 ms) sends one record, the
    outcome, which carries its start; one that runs longer is reported Running first."""
    body = spec(
        [
            {"name": "quick", "command": ["true"]},
            {"name": "next", "dependsOn": ["quick"], "command": ["true"]},
            {"name": "slow", "dependsOn": ["next"], "command": ["sleep", "0.3"]},
        ]
    )
    run, tasks = await h.run(body)
    assert run.phase == "Succeeded"
    records = [
        json.loads(r.body) for r in await h.store.outbox_records(run.run_id) if r.kind == "task"
    ]
    by_task: dict[str, list[str]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record["phase"])
    assert by_task == {
        "quick": ["Succeeded"],
        "next": ["Succeeded"],
        "slow": ["Running", "Succeeded"],
    }
    for record in records:
        state = tasks[record["task"]]
        assert record["startedAt"] == state.started_at and record["attempt"] == 1
    # (slow outlived the write-behind window; quick and next did not.)
    assert tasks["slow"].finished_at is not None and tasks["slow"].started_at is not None
    assert tasks["slow"].finished_at - tasks["slow"].started_at >= 0.3


async def test_quick_tasks_side_by_side_report_only_their_outcomes(h: Harness) -> None:
    """Decision 0042: no Running checkpoint for an attempt that ends within the window,
    also when other tasks' writes commit meanwhile (they used to carry it along)."""
    body = spec([{"name": f"q{i}", "command": ["true"]} for i in range(8)])
    run, _ = await h.run(body)
    assert run.phase == "Succeeded"
    phases = [
        (json.loads(r.body)["task"], json.loads(r.body)["phase"])
        for r in await h.store.outbox_records(run.run_id)
        if r.kind == "task"
    ]
    assert sorted(phases) == [(f"q{i}", "Succeeded") for i in range(8)]


async def test_a_chain_of_short_tasks_commits_once_per_step(h: Harness) -> None:
    """One transaction, one row update and one record per step of a chain of short
    tasks (with synchronous=FULL, one fsync): its outcome, which its dependant waits
    for; no Running checkpoint of its own (decision 0042)."""
    statements: list[str] = []
    await h.store._db.set_trace_callback(statements.append)
    try:
        run, _ = await h.run(
            spec(
                [
                    {"name": f"s{i}", "command": ["true"], "dependsOn": [f"s{i - 1}"] if i else []}
                    for i in range(8)
                ]
            )
        )
    finally:
        await h.store._db.set_trace_callback(None)
    assert run.phase == "Succeeded"
    transactions: list[list[str]] = [[]]
    for sql in statements:
        if sql.strip().upper() == "COMMIT":
            transactions.append([])
        elif not sql.startswith("SELECT"):
            transactions[-1].append(sql.split(" SET ")[0][:24])
    steps = [t for t in transactions if any(s.startswith("UPDATE task_runs") for s in t)]
    assert len(steps) == 8
    for step in steps:
        assert step == ["BEGIN IMMEDIATE", "UPDATE task_runs", "INSERT INTO outbox (kind"], step


async def test_a_long_attempt_is_checkpointed_running_while_it_runs(h: Harness) -> None:
    """The Running checkpoint (with the process's pid) is committed while the attempt
    runs, soon after its start, not with its outcome."""
    run = await h.submit(spec([{"name": "long", "command": ["sleep", "0.6"]}]))
    driving = h.executor.start(run.run_id)
    seen: TaskState | None = None
    deadline = time.monotonic() + 0.45
    while time.monotonic() < deadline:
        _, tasks = await h.store.load_run(run.run_id)
        if tasks[0].phase == "Running":
            seen = tasks[0]
            break
        await asyncio.sleep(0.01)
    assert seen is not None, "no Running checkpoint while the attempt ran"
    assert seen.pid is not None and seen.pid_start is not None
    final = await asyncio.wait_for(driving, 10)
    assert final.phase == "Succeeded"
    phases = [
        json.loads(r.body)["phase"]
        for r in await h.store.outbox_records(run.run_id)
        if r.kind == "task"
    ]
    assert phases == ["Running", "Succeeded"]


async def test_compensation_is_skipped_when_the_workflow_succeeds(h: Harness) -> None:
    body = spec(
        [{"name": "a", "command": ["true"]}], onFailure=[{"name": "rollback", "command": ["false"]}]
    )
    run, tasks = await h.run(body)
    assert run.phase == "Succeeded"
    assert tasks["rollback"].phase == "Skipped"


async def test_missing_executable_fails_with_its_name_and_is_not_retried(h: Harness) -> None:
    body = spec([{"name": "m", "command": ["/nonexistent/tool", "x"], "retry": {"limit": 3}}])
    run, tasks = await h.run(body)
    assert run.phase == "Failed"
    assert tasks["m"].attempt == 1
    assert tasks["m"].message == "executable not found: /nonexistent/tool"


def _descendants_alive(pid_file: Path) -> list[int]:
    pids = [int(p) for p in pid_file.read_text().split()]
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


async def test_timeout_kills_the_whole_process_group(h: Harness) -> None:
    pids = h.tmp / "pids"
    # The task spawns grandchildren (one ignores SIGTERM) and records their pids.
    script = (
        f"sleep 300 & echo $! >> {pids}; "
        f"sh -c 'trap \"\" TERM; sleep 300' & echo $! >> {pids}; "
        f"echo $$ >> {pids}; wait"
    )
    body = spec([{"name": "slow", "script": script, "timeoutSeconds": 1}])
    started = time.monotonic()
    _run, tasks = await h.run(body)
    assert time.monotonic() - started < 10
    assert tasks["slow"].phase == "Failed"
    assert "timed out after 1s" in (tasks["slow"].message or "")
    await _until_none_alive(pids)


async def test_cancel_kills_running_tasks_and_cancels_the_rest(h: Harness) -> None:
    pids = h.tmp / "pids"
    body = spec(
        [
            {"name": "long", "script": f"sleep 300 & echo $! >> {pids}; wait"},
            {"name": "next", "dependsOn": ["long"], "command": ["true"]},
        ]
    )
    run = await h.submit(body)
    driver = h.executor.start(run.run_id)
    while not pids.exists():
        await asyncio.sleep(0.05)
    assert await h.executor.cancel(run.run_id, "user asked")
    final = await asyncio.wait_for(driver, 10)
    _, tasks = await h.store.load_run(run.run_id)
    phases = {t.name: t.phase for t in tasks}
    assert final.phase == "Cancelled"
    assert phases == {"long": "Cancelled", "next": "Cancelled"}
    await _until_none_alive(pids)


async def test_deadline_fails_the_run_and_runs_compensation(h: Harness) -> None:
    marker = h.tmp / "rolled-back"
    body = spec(
        [
            {"name": "long", "command": ["sleep", "300"]},
            {"name": "b", "dependsOn": ["long"], "command": ["true"]},
        ],
        deadlineSeconds=1,
        onFailure=[{"name": "rollback", "command": ["touch", str(marker)]}],
    )
    started = time.monotonic()
    run, tasks = await h.run(body)
    assert time.monotonic() - started < 10
    assert run.phase == "Failed" and run.reason == "DeadlineExceeded"
    assert tasks["long"].phase == "Failed" and tasks["b"].phase == "Cancelled"
    assert marker.exists()


async def test_suspend_holds_new_tasks_until_resumed(h: Harness) -> None:
    body = spec(
        [
            {"name": "first", "command": ["sleep", "0.5"]},
            {"name": "second", "dependsOn": ["first"], "command": ["true"]},
        ]
    )
    run = await h.submit(body)
    driver = h.executor.start(run.run_id)
    # Suspend while "first" runs (mid-run, not before or after) ...
    assert await _until_phase(h, run.run_id, "first", "Running") == "Running"
    assert await h.executor.suspend(run.run_id, True)
    # ... and once "first" has committed its success, "second" is held, not started.
    await _until_phase(h, run.run_id, "first", "Succeeded")
    _, tasks = await h.store.load_run(run.run_id)
    phases = {t.name: t.phase for t in tasks}
    assert phases == {"first": "Succeeded", "second": "Pending"}
    assert not driver.done()
    assert await h.executor.suspend(run.run_id, False)
    final = await asyncio.wait_for(driver, 10)
    assert final.phase == "Succeeded"


async def test_concurrency_limit_holds_for_real_processes(h: Harness) -> None:
    log = h.tmp / "spans"
    script = f'echo "start $(date +%s.%N)" >> {log}; sleep 0.2; echo "end $(date +%s.%N)" >> {log}'
    body = spec([{"name": f"t{i}", "script": script} for i in range(10)])
    run, _ = await h.run(body)
    assert run.phase == "Succeeded"
    events = sorted(
        (float(ts), kind) for kind, ts in (line.split() for line in log.read_text().splitlines())
    )
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak <= 4
    assert peak >= 2  # they did overlap


async def test_full_database_stops_the_run_and_keeps_what_was_committed(tmp_path: Path) -> None:
    db = tmp_path / "small.db"
    # 8 pages of room beyond the empty schema (21 pages of 4 KiB since migration 10's
    # schedule_fires; 20 since migration 6's index; 19 since migration 5 and
    # incremental vacuum's pointer-map page; 16 before).
    store = await Store.open(db, synchronous="NORMAL", max_bytes=116 * 1024)
    executor = Executor(store, work_dir=tmp_path / "w", concurrency=2)
    noisy = "head -c 20000 /dev/urandom | base64"
    body = spec([{"name": f"t{i}", "script": noisy} for i in range(40)])
    run, _ = await executor.submit(local_assignment("default", "fill", parse_spec(body)))
    with pytest.raises(StoreFullError):
        await asyncio.wait_for(executor.run_to_end(run.run_id), 60)
    await executor.shutdown()
    await store.close()
    reopened = await Store.open(db)
    try:
        assert await reopened.integrity_check() == "ok"
        loaded, tasks = await reopened.load_run(run.run_id)
        assert loaded.phase == "Running"
        assert any(t.phase == "Succeeded" for t in tasks)
    finally:
        await reopened.close()
    assert os.path.getsize(db) <= 200 * 1024


async def _until_none_alive(pids: Path, timeout: float = 5) -> None:
    """The killed process group's members gone (killing is asynchronous), or fail."""
    deadline = time.monotonic() + timeout
    while _descendants_alive(pids):
        assert time.monotonic() < deadline, f"still alive: {_descendants_alive(pids)}"
        await asyncio.sleep(0.02)


async def _until_phase(h: Harness, run_id: str, task: str, phase: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        _, tasks = await h.store.load_run(run_id)
        current = {t.name: t.phase for t in tasks}[task]
        if current == phase:
            return current
        assert time.monotonic() < deadline, f"{task} is {current}, not {phase}"
        await asyncio.sleep(0.02)


async def test_a_cancel_right_after_start_is_honoured(h: Harness) -> None:
    """Before the driver has loaded its run (a Replace, a cancel racing an assign)."""
    run = await h.submit(spec([{"name": "a", "command": ["sleep", "30"]}]))
    task = h.executor.start(run.run_id)
    assert await h.executor.cancel(run.run_id, "replaced")
    final = await asyncio.wait_for(task, 30)
    assert final.phase == "Cancelled"
