"""``tideflow-agent``: the command an operator of a site types.

Subcommands that only read (``status``, ``runs``, ``logs``) open the database
read-only, so they work on site with no link and beside a running daemon.
``run-local`` runs one manifest with no cloud at all; run again on the same
database it resumes the unfinished run of that workflow.

Exit codes: 0 the run Succeeded (``run``: the daemon stopped cleanly), 1 it
Failed or was Cancelled (``run``: a background task died; the log says why),
2 invalid manifest or options, 3 the database cannot be used (corrupt, not
ours, or in use by another agent: one agent per database), 4 the disk is
full, 130 interrupted.  ``run`` and ``run-local`` stop cleanly on a stop
signal that comes before their start finished too (:mod:`edge_agent.stops`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.executor import Executor, local_assignment
from edge_agent.retention import DEFAULT_INTERVAL_SECONDS, DEFAULT_RETENTION_SECONDS
from edge_agent.runner import use_pidfd_child_watcher
from edge_agent.state import RunState, TaskState
from edge_agent.stops import (
    STOPPED_EARLY,
    early_stop_requested,
    on_stop_signals,
    release_early_stops,
)
from edge_agent.store import Store, StoreError, StoreFullError
from edge_agent.sync import SyncConfig
from edge_agent.tracing import AgentTracer
from tideflow import wire
from tideflow.gc_tuning import tune_gc
from tideflow.logs import configure_logging
from tideflow.manifest import read_manifest
from tideflow.phases import RunPhase
from tideflow.settings import (
    EnvOptions,
    attempt_number,
    broker_from_args,
    file_path,
    log_level,
    port_number,
    positive_int,
    positive_seconds,
    records_per_batch,
    seconds_at_least_zero,
    utf8_text,
)
from tideflow.spec import SpecError, parse_workflow, validate_site_name

if TYPE_CHECKING:  # the daemon (and MQTT) load only for ``run``
    from edge_agent.daemon import AgentConfig

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_DB, EXIT_FULL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_PIPE = 128 + signal.SIGPIPE  # the output's reader went away, as a tool SIGPIPE killed
#: The commands that only read the database.
READERS = frozenset({"status", "runs", "schedules", "logs", "trace"})
#: The commands a stop signal stops cleanly, even one that comes before their start finished.
STOPPED_CLEANLY = frozenset({"run", "run-local"})


def _add_concurrency(options: EnvOptions, field: str | None = None) -> None:
    # A string default goes through ``type`` too, so TIDEFLOW_CONCURRENCY is
    # checked the same way as the flag.
    options.option(
        "--concurrency",
        field=field,
        type=positive_int,
        help="task processes at once (default: the number of CPUs)",
    )


def _add_db_max_bytes(options: EnvOptions, field: str | None = None) -> None:
    options.option(
        "--db-max-bytes",
        field=field,
        type=positive_int,
        help="cap the database size; beyond it the agent stops as on a full disk (exit 4)",
    )


def _add_synchronous(options: EnvOptions, field: str | None = None) -> None:
    options.option(
        "--synchronous",
        field=field,
        default="FULL",
        choices=["FULL", "NORMAL", "EXTRA"],
        type=str.upper,
        help="SQLite's synchronous setting",
    )


def _with_db(options: EnvOptions, field: str | None = None) -> EnvOptions:
    options.option(
        "--db", field=field, default="tideflow-agent.db", type=file_path, help="SQLite database"
    )
    return options


def _with_task_env(options: EnvOptions, field: str | None = None) -> EnvOptions:
    options.option(
        "--pass-env",
        field=field,
        default="",
        help="comma-separated names or patterns (AWS_*) of the agent's environment "
        "that tasks also get; by default they get only PATH, HOME, LANG, LC_*, TZ, "
        "TMPDIR and USER",
    )
    return options


def _daemon_options(daemon: argparse.ArgumentParser) -> EnvOptions:
    """``run``'s options: one per AgentConfig field (``fields`` says which)."""
    options = _with_task_env(_with_db(EnvOptions(daemon), "db"), "pass_env")
    options.option("--site", field="site", required=True, help="this site's name")
    options.broker(default="mqtt://127.0.0.1:1883")
    _add_concurrency(options, "concurrency")
    options.option(
        "--metrics-port", field="metrics_port", type=port_number,
        help="serve Prometheus metrics, and /healthz for the liveness probe, on this port",
    )  # fmt: skip
    options.option(
        "--labels", field="labels", default="", type=utf8_text,
        help="k=v,k=v reported to the cloud",
    )  # fmt: skip
    _add_synchronous(options, "synchronous")
    options.option(
        "--heartbeat-seconds", field="heartbeat_seconds", type=positive_seconds, default=15.0
    )
    options.option(
        "--max-message-bytes",
        field="max_message_bytes",
        type=positive_int,
        default=wire.DEFAULT_MAX_MESSAGE_BYTES,
        help="larger MQTT messages are dropped (with a reason) before decoding",
    )
    options.switch("--no-tracing", field="tracing", help="do not record spans")
    options.option(
        "--outbox-budget-bytes",
        field="sync.budget_bytes",
        type=int,
        default=SyncConfig.budget_bytes,
        help="above this, new assignments are refused (records are never dropped)",
    )
    options.option(
        "--ack-timeout",
        field="sync.ack_timeout",
        type=positive_seconds,
        default=10.0,
        help="the shortest silence before a resend (the acks' round trips may teach a longer one)",
    )
    options.option(
        "--max-ack-timeout",
        field="sync.max_ack_timeout",
        type=positive_seconds,
        default=SyncConfig.max_ack_timeout,
        help="the longest silence before a resend: learnt timeouts and their backing off stop here",
    )
    options.option(
        "--sync-batch-count",
        field="sync.batch_count",
        type=records_per_batch,
        default=SyncConfig.batch_count,
        help="outbox records per message to the cloud at most",
    )
    options.option(
        "--sync-batch-bytes",
        field="sync.batch_bytes",
        type=positive_int,
        default=SyncConfig.batch_bytes,
        help="bytes of records per message to the cloud at most",
    )
    options.option(
        "--sync-window-batches",
        field="sync.window_batches",
        type=positive_int,
        default=SyncConfig.window_batches,
        help="messages in flight (sent, not yet acknowledged) at first, after a silent resend"
        " and after a reconnect",
    )
    options.option(
        "--sync-max-window-batches",
        field="sync.max_window_batches",
        type=positive_int,
        default=SyncConfig.max_window_batches,
        help="messages in flight at most: the window doubles per round trip while acks"
        " come back within --sync-fast-ack-seconds, and halves when one does not",
    )
    options.option(
        "--sync-fast-ack-seconds",
        field="sync.fast_ack_seconds",
        type=positive_seconds,
        default=SyncConfig.fast_ack_seconds,
        help="an ack this soon after its message widens the window",
    )
    options.option(
        "--sync-idle-poll",
        field="sync.idle_poll",
        type=positive_seconds,
        default=SyncConfig.idle_poll,
        help="seconds between looks at an idle outbox",
    )
    options.option(
        "--retention-seconds",
        field="retention_seconds",
        type=seconds_at_least_zero,
        default=float(DEFAULT_RETENTION_SECONDS),
        help="finished runs the cloud has acknowledged are deleted this long after they end,"
        " their pages returned to the file system",
    )
    options.option(
        "--retention-interval",
        field="retention_interval",
        type=positive_seconds,
        default=float(DEFAULT_INTERVAL_SECONDS),
        help="seconds between retention passes",
    )
    _add_db_max_bytes(options, "db_max_bytes")
    return options


def build_parser(fields: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; ``fields`` (if given) gets each AgentConfig field's ``run`` flag."""
    parser = argparse.ArgumentParser(prog="tideflow-agent", description=__doc__.split("\n")[0])
    top = EnvOptions(parser)
    top.option("--log-level", default="WARNING", type=log_level)
    top.switch("--log-json", help="log JSON lines (with trace_id/span_id inside traced work)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        _with_db(EnvOptions(p))
        return p

    local = sub.add_parser("run-local", help="run one workflow manifest, no cloud")
    options = _with_task_env(_with_db(EnvOptions(local)))
    local.add_argument("manifest", type=Path)
    local.add_argument("--new-run", action="store_true", help="start a new run even if one exists")
    _add_concurrency(options)
    _add_synchronous(options)
    local.add_argument("--quiet", action="store_true", help="no live progress")
    local.add_argument("--no-tracing", action="store_true", help="do not record spans")
    _add_db_max_bytes(options)

    daemon = _daemon_options(sub.add_parser("run", help="the site daemon: assignments over MQTT"))
    if fields is not None:
        fields.update(daemon.fields)

    with_db(sub.add_parser("status", help="runs in progress, outbox and link state"))
    runs = with_db(sub.add_parser("runs", help="list runs"))
    runs.add_argument("--json", action="store_true")
    schedules = with_db(
        sub.add_parser("schedules", help="CronWorkflows held at the site, with next fire times")
    )
    schedules.add_argument("--json", action="store_true")
    traces = with_db(sub.add_parser("trace", help="the span tree of a workflow's latest run"))
    traces.add_argument("workflow", type=utf8_text, help="workflow name, or namespace/name")
    logs = with_db(sub.add_parser("logs", help="stdout/stderr tails of a task"))
    logs.add_argument("workflow", type=utf8_text, help="workflow name, or namespace/name")
    logs.add_argument("task", type=utf8_text)
    logs.add_argument("--attempt", type=attempt_number)
    return parser


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The daemon's settings object from ``run``'s parsed command line."""
    from edge_agent.daemon import AgentConfig

    return AgentConfig(
        site=args.site,
        broker=broker_from_args(args),
        db=Path(args.db),
        concurrency=args.concurrency,
        pass_env=_patterns(args.pass_env),
        synchronous=args.synchronous,
        heartbeat_seconds=args.heartbeat_seconds,
        max_message_bytes=args.max_message_bytes,
        metrics_port=int(args.metrics_port) if args.metrics_port else None,
        tracing=not args.no_tracing,
        labels=dict(kv.split("=", 1) for kv in args.labels.split(",") if "=" in kv),
        sync=SyncConfig(
            batch_count=args.sync_batch_count,
            batch_bytes=args.sync_batch_bytes,
            window_batches=args.sync_window_batches,
            max_window_batches=args.sync_max_window_batches,
            fast_ack_seconds=args.sync_fast_ack_seconds,
            ack_timeout=args.ack_timeout,
            max_ack_timeout=args.max_ack_timeout,
            idle_poll=args.sync_idle_poll,
            budget_bytes=args.outbox_budget_bytes,
        ),
        db_max_bytes=args.db_max_bytes,
        retention_seconds=args.retention_seconds,
        retention_interval=args.retention_interval,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command; call it through :func:`edge_agent.cli.main`, which holds stop
    signals from the process's first line (:mod:`edge_agent.stops`)."""
    _escape_what_the_output_cannot_encode()
    args = build_parser().parse_args(argv)
    if args.command not in STOPPED_CLEANLY:
        release_early_stops(replay=True)  # (a reader ends as it always did)
    configure_logging(args.log_level, json_lines=args.log_json)
    handler = {
        "run": _run_daemon,
        "run-local": _run_local,
        "status": _status,
        "runs": _runs,
        "schedules": _schedules,
        "logs": _logs,
        "trace": _trace,
    }[args.command]
    try:
        return asyncio.run(_with_pidfd_watcher(handler(args)))
    except BrokenPipeError:
        # The output's reader went away (``| head``): it has what it wanted.  Ended
        # as a tool killed by SIGPIPE would be, without the traceback.
        _stdout_to_devnull()
        return EXIT_PIPE
    except StoreFullError as exc:
        print(f"tideflow-agent: {exc}", file=sys.stderr)
        return EXIT_FULL
    except StoreError as exc:
        print(f"tideflow-agent: {exc}", file=sys.stderr)
        return EXIT_DB
    except (ValueError, TypeError, KeyError) as exc:
        if args.command not in READERS:
            raise
        # A row whose bytes took damage its page's structure does not show (a
        # JSON body broken by one byte): one line, as for any corrupt file.
        print(
            f"tideflow-agent: database {args.db}: a stored row cannot be read "
            f"({type(exc).__name__}: {str(exc)[:200]}); it may be corrupt",
            file=sys.stderr,
        )
        return EXIT_DB
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _escape_what_the_output_cannot_encode() -> None:
    """Output to a terminal that is not UTF-8 (PYTHONIOENCODING, a Latin-1 locale, a
    serial console) shows what it cannot encode as escapes.  A task's non-ASCII
    output made ``logs`` say its sound database "may be corrupt" (the print's
    UnicodeEncodeError), and a summary's em dash ended ``run-local`` in a traceback."""
    stream = sys.stdout
    if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
        stream.reconfigure(errors="backslashreplace")


async def _with_pidfd_watcher(work: Coroutine[Any, Any, int]) -> int:
    installed = use_pidfd_child_watcher()
    try:
        return await work
    finally:
        if installed:  # it is bound to this loop: later loops get the default again
            asyncio.get_event_loop_policy().set_child_watcher(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- run-local
def _patterns(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _stdout_to_devnull() -> None:
    """From now on stdout goes nowhere (its reader went away); the interpreter's
    last flush of it then raises nothing either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _say(line: str) -> None:
    """One line of ``run-local``'s output; a reader that went away (``| head``) ends
    the output, not the run: the rest goes to /dev/null, and the exit code still
    says how the run ended (the first write to the closed pipe used to raise,
    each progress line was logged as an error, and the summary's print ended the
    agent with a traceback and exit 1, whatever the run did)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _stdout_to_devnull()


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.time()

    def __call__(self, run: RunState, task: TaskState | None) -> None:
        if self.quiet:
            return
        stamp = f"{time.time() - self.t0:7.2f}s"
        if task is None:
            extra = " (suspended)" if run.suspended else ""
            _say(f"{stamp}  workflow {run.name:<22} {run.phase}{extra}")
            return
        detail = f"attempt {task.attempt}" if task.attempt else ""
        if task.message:
            detail = f"{detail}: {task.message}" if detail else task.message
        _say(f"{stamp}  task     {task.name:<22} {task.phase:<9} {detail}")


def _summary(run: RunState, tasks: list[TaskState]) -> str:
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.phase] = counts.get(task.phase, 0) + 1
    parts = ", ".join(f"{n} {phase.lower()}" for phase, n in sorted(counts.items()))
    why = f" ({run.message})" if run.message and run.phase != RunPhase.SUCCEEDED else ""
    return f"workflow {run.namespace}/{run.name} run {run.run_id}: {run.phase}{why} — {parts}"


async def _run_local(args: argparse.Namespace) -> int:
    try:
        workflow = parse_workflow(read_manifest(args.manifest))
    except SpecError as exc:
        print(f"invalid manifest {args.manifest}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    tune_gc()  # a process that runs steps (the readers do not)
    db_path = Path(args.db)
    store = await Store.open(db_path, synchronous=args.synchronous, max_bytes=args.db_max_bytes)
    try:
        meta = workflow.metadata
        progress = _Progress(args.quiet)
        executor = Executor(
            store,
            work_dir=db_path.with_name(db_path.name + ".work"),
            concurrency=args.concurrency,
            listener=progress,
            pass_env=_patterns(args.pass_env),
            tracer=None if args.no_tracing else AgentTracer(store),
        )
        run = await store.latest_run(meta.namespace, meta.name)
        if run is not None and run.done and not args.new_run:
            _, tasks = await store.load_run(run.run_id)
            _say(_summary(run, tasks))
            _say("finished earlier; pass --new-run to run it again")
            return EXIT_OK if run.phase == RunPhase.SUCCEEDED else EXIT_FAILED
        if run is not None and not run.done and not args.new_run:
            _say(f"resuming run {run.run_id} of {meta.namespace}/{meta.name}")
            if json.loads(run.spec_json) != workflow.spec.dump():
                print(
                    "note: the manifest changed since this run started; the run keeps "
                    "its original spec",
                    file=sys.stderr,
                )
        else:
            run, _ = await executor.submit(
                local_assignment(meta.namespace, meta.name, workflow.spec)
            )
            _say(f"started run {run.run_id} of {meta.namespace}/{meta.name}")
        if early_stop_requested():  # nothing started yet: nothing to record
            print(f"interrupted ({STOPPED_EARLY}); run again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        driver = executor.start(run.run_id)
        loop = asyncio.get_running_loop()
        stops: list[asyncio.Task[None]] = []

        def stop() -> None:
            # First signal: stop cleanly (attempts recorded Interrupted); second: at once.
            if stops:
                driver.cancel()
            else:
                stops.append(asyncio.ensure_future(executor.shutdown()))

        on_stop_signals(loop, stop, executor)
        try:
            final = await driver
        except asyncio.CancelledError:
            final = None
        if final is None or not final.done:
            print("interrupted; run again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        _, tasks = await store.load_run(final.run_id)
        _say(_summary(final, tasks))
        return EXIT_OK if final.phase == RunPhase.SUCCEEDED else EXIT_FAILED
    finally:
        await store.close()


# ------------------------------------------------------------------- daemon
async def _run_daemon(args: argparse.Namespace) -> int:
    from edge_agent.daemon import Agent, AgentFailure, CannotStart

    try:
        validate_site_name(args.site, field="--site")
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    config = config_from_args(args)
    try:
        config.broker.addresses()
    except ValueError as exc:
        print(f"--broker: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if len(config.labels) > wire.MAX_STATE_LABELS:  # (the cloud refuses such a heartbeat)
        print(f"--labels: {len(config.labels)} labels, at most {wire.MAX_STATE_LABELS}",
              file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    tune_gc()  # a process that runs steps (the readers do not)
    agent = Agent(config)
    try:
        await agent.run()
    except (AgentFailure, CannotStart) as exc:  # (the first already logged with its cause)
        print(f"tideflow-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------- readers
async def _status(args: argparse.Namespace) -> int:
    store = await Store.open(args.db, readonly=True)
    try:
        stats = await store.outbox_stats()
        link = await store.get_meta("link_state") or "never connected"
        changed = await store.get_meta("link_changed_at")
        site = await store.get_meta("site") or "(local)"
        print(f"site:            {site}")
        line = f"link:            {link}"
        if changed and link != "online":
            line += f" (offline for {time.time() - float(changed):.0f}s)"
        print(line)
        print(f"outbox:          {stats.depth} records, {stats.bytes} bytes")
        print(f"last acked seq:  {stats.last_acked_seq}")
        unfinished = await store.list_runs(unfinished=True)
        print(f"runs in progress: {len(unfinished)}")
        for run in unfinished:
            counts = await store.task_counts(run.run_id)
            total = sum(counts.values())
            print(
                f"  {run.namespace}/{run.name} {run.phase}"
                f"{' (suspended)' if run.suspended else ''}"
                f" {counts.get('Succeeded', 0)}/{total} succeeded"
            )
    finally:
        await store.close()
    return EXIT_OK


async def _runs(args: argparse.Namespace) -> int:
    store = await Store.open(args.db, readonly=True)
    try:
        runs = await store.list_runs()
        rows = []
        for run in runs:
            counts = await store.task_counts(run.run_id)
            rows.append((run, counts))
        if args.json:
            print(
                json.dumps(
                    [
                        {**run.to_record(), "runId": run.run_id, "tasks": counts}
                        for run, counts in rows
                    ],
                    indent=2,
                )
            )
            return EXIT_OK
        print(f"{'WORKFLOW':<32} {'RUN':<46} {'PHASE':<10} PROGRESS")
        for run, counts in rows:
            total = sum(counts.values())
            print(
                f"{run.namespace + '/' + run.name:<32} {run.run_id:<46} {run.phase:<10} "
                f"{counts.get('Succeeded', 0)}/{total}"
            )
    finally:
        await store.close()
    return EXIT_OK


async def _schedules(args: argparse.Namespace) -> int:
    from edge_agent.scheduler import next_fire_time

    def iso(ts: float | None) -> str:
        return "-" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")

    store = await Store.open(args.db, readonly=True)
    try:
        now = time.time()
        rows = []
        for row in await store.list_schedules():
            spec = json.loads(row.spec_json)
            active = len(await store.schedule_runs(row.uid, unfinished=True))
            rows.append((row, spec, next_fire_time(row, now), active))
    finally:
        await store.close()
    if args.json:
        out = [
            {
                **row.record("Held"),
                "schedule": spec.get("schedule"),
                "timezone": spec.get("timezone", "UTC"),
                "suspend": bool(spec.get("suspend", False)),
                "nextTime": next_at,
                "lastFiredTime": row.last_fired,
                "active": active,
            }
            for row, spec, next_at, active in rows
        ]
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print(
        f"{'CRONWORKFLOW':<32} {'SCHEDULE':<16} {'TIMEZONE':<16} {'NEXT':<26} "
        f"{'LAST FIRED':<26} {'ACTIVE':<6} MISSED"
    )
    for row, spec, next_at, active in rows:
        next_text = "suspended" if spec.get("suspend") else iso(next_at)
        print(
            f"{row.namespace + '/' + row.name:<32} {spec.get('schedule', ''):<16} "
            f"{spec.get('timezone', 'UTC'):<16} {next_text:<26} {iso(row.last_fired):<26} "
            f"{active:<6} {row.missed_count}"
        )
    return EXIT_OK


async def _logs(args: argparse.Namespace) -> int:
    namespace, _, name = args.workflow.rpartition("/")
    store = await Store.open(args.db, readonly=True)
    try:
        run = await store.latest_run(namespace or "default", name)
        if run is None:
            print(f"no run of workflow {args.workflow} in {args.db}", file=sys.stderr)
            return EXIT_FAILED
        tails = await store.log_tails(run.run_id, args.task, args.attempt)
        if not tails:
            print(f"no logs for task {args.task} of {args.workflow}", file=sys.stderr)
            return EXIT_FAILED
        for attempt, stream, tail in tails:
            print(f"--- {args.task} attempt {attempt} {stream} ---")
            sys.stdout.write(tail.decode("utf-8", "replace"))
            if tail and not tail.endswith(b"\n"):
                print()
    finally:
        await store.close()
    return EXIT_OK


async def _trace(args: argparse.Namespace) -> int:
    namespace, _, name = args.workflow.rpartition("/")
    store = await Store.open(args.db, readonly=True)
    try:
        run = await store.latest_run(namespace or "default", name)
        if run is None or run.trace_id is None:
            print(f"no traced run of workflow {args.workflow} in {args.db}", file=sys.stderr)
            return EXIT_FAILED
        spans = await store.spans_for_trace(run.trace_id)
    finally:
        await store.close()
    print(f"trace {run.trace_id}  run {run.run_id}  {run.phase}")
    for line in span_tree_lines(spans, open_span=run.span_id if not run.done else None):
        print(line)
    return EXIT_OK


def span_tree_lines(spans: list[dict[str, Any]], open_span: str | None = None) -> list[str]:
    """Indented lines, parents before children, siblings by start time."""
    by_id = {s["spanId"]: s for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span.get("parentSpanId")
        children.setdefault(parent if parent in by_id else None, []).append(span)
    lines: list[str] = []
    if open_span and open_span not in by_id:
        lines.append(f"{open_span}  (run still in progress)")

    def started(parent: str | None) -> list[dict[str, Any]]:
        return sorted(children.get(parent, []), key=lambda s: s["startTimeUnixNano"])

    # Depth first without recursion: a damaged database can chain spans deeper
    # than Python's recursion limit.
    pending = [(span, 1 if open_span and open_span not in by_id else 0)
               for span in reversed(started(None))]  # fmt: skip
    while pending:
        span, depth = pending.pop()
        seconds = (span["endTimeUnixNano"] - span["startTimeUnixNano"]) / 1e9
        attrs = span.get("attributes", {})
        outcome = attrs.get("tideflow.outcome", span.get("status", {}).get("code", ""))
        extra = "  [interrupted]" if attrs.get("tideflow.interrupted") else ""
        lines.append(
            f"{'  ' * depth}{span['name']:<{max(8, 40 - 2 * depth)}} "
            f"{seconds:9.3f}s  {outcome}{extra}"
        )
        pending.extend((child, depth + 1) for child in reversed(started(span["spanId"])))
    return lines
