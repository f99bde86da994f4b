"""Durable no-op steps per second: Tideflow's executor + store against baselines.

What is measured (all in one run, on the filesystem holding the repository):

* **ours** - a workflow of N no-op tasks through :class:`Executor` and
  :class:`Store` with :class:`NoopRunner` (no processes: executor + store
  alone), as a sequential chain and as N independent tasks at concurrency 8,
  with ``synchronous=FULL`` and ``NORMAL``.  Every task is checkpointed as the
  agent always does: its outcome with its outbox record (a no-op ends well
  within the 20 ms after which a Running checkpoint is written, decision 0042).
  Timed from ``submit`` to the run's end (spec parsing included).
* **raw commit** - python ``sqlite3``, WAL, one single-row INSERT per
  transaction: the rate the disk allows one committer.
* **floor** - the writes a chain step cannot do without (its ``task_runs`` row
  and its outcome record, the agent's schema, one transaction) from one asyncio
  task per step, committed on the loop: what the rules alone cost, so that
  ``ours / floor`` is what the executor adds.
* **DBOS** - DBOS Transact (``dbos`` on PyPI) with its default SQLite system
  database, in a subprocess per configuration: a workflow of N ``@DBOS.step()``
  no-ops called one after another, and an async workflow running N async
  no-op steps through ``asyncio.gather`` at concurrency 8.  Configurations:
  *shipped* (DBOS sets no journal mode, so SQLite's rollback journal with
  ``synchronous=FULL``), *WAL* (the database file created in WAL mode before
  DBOS opens it; still FULL), *WAL+NORMAL* (plus ``synchronous=NORMAL`` on
  each connection through a SQLAlchemy connect hook).

Each timed workflow follows a small warm-up workflow in the same process.
Run ``python -m bench.durable_steps [--quick] [-n N] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import (
    chain_spec,
    filesystem_of,
    independent_spec,
    print_table,
    python_info,
    rate,
    ratio_line,
    scratch_dir,
)
from tideflow.gc_tuning import GC_YOUNG_THRESHOLD, tune_gc

CONCURRENCY = 8
WARMUP = 20
DBOS_APP = "bench-steps"  # DBOS names its default database after the app


# ------------------------------------------------------------------- ours
async def _ours(
    workdir: Path,
    shape: str,
    n: int,
    synchronous: str,
    profile: cProfile.Profile | None,
    tracing: bool = False,
) -> dict[str, Any]:
    from edge_agent.executor import Executor, local_assignment
    from edge_agent.runner import NoopRunner
    from edge_agent.store import Store
    from edge_agent.tracing import AgentTracer
    from tideflow.spec import parse_spec

    make = chain_spec if shape == "chain" else independent_spec
    store = await Store.open(workdir / "agent.db", synchronous=synchronous)
    try:
        executor = Executor(
            store,
            work_dir=workdir / "work",
            concurrency=CONCURRENCY,
            runner=NoopRunner(),
            tracer=AgentTracer(store, "bench") if tracing else None,
        )
        warm = local_assignment("bench", "warmup", parse_spec(make(WARMUP)))
        await executor.submit(warm)
        await executor.run_to_end(warm.run_id)

        spec = parse_spec(make(n))  # built outside the clock, like DBOS's decorated code
        assignment = local_assignment("bench", f"{shape}-{n}", spec)
        if profile is not None:
            profile.enable()
        cpu = _cpu_seconds()
        start = time.perf_counter()
        await executor.submit(assignment)
        final = await executor.run_to_end(assignment.run_id)
        elapsed = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu
        if profile is not None:
            profile.disable()
        counts = await store.task_counts(assignment.run_id)
        records = len(await store.outbox_records(assignment.run_id))
        # Off the clock: the ack that compacts every record (and files the spans
        # they carry into the spans table, decision 0032), as the link's return does.
        top = (await store.outbox_stats()).last_seq
        ack_cpu = _cpu_seconds()
        await store.ack(top or 0)
        ack_cpu = _cpu_seconds() - ack_cpu
    finally:
        await store.close()
    if final.phase != "Succeeded" or counts.get("Succeeded") != n:
        raise SystemExit(f"ours {shape} {synchronous}: run ended {final.phase} with {counts}")
    return {"seconds": elapsed, "records": records, "cpu": cpu, "ack_cpu": ack_cpu}


def _cpu_seconds() -> float:
    """This process's user + system CPU time (every thread, the fsync path included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_ours(
    shape: str,
    n: int,
    synchronous: str,
    profile: cProfile.Profile | None = None,
    tracing: bool = False,
) -> dict:
    with scratch_dir(f"steps-{shape}-{synchronous.lower()}") as workdir:
        return asyncio.run(_ours(workdir, shape, n, synchronous, profile, tracing))


# ------------------------------------------------------------- raw sqlite
def run_raw(n: int, synchronous: str) -> dict[str, Any]:
    with scratch_dir(f"raw-{synchronous.lower()}") as workdir:
        db = sqlite3.connect(workdir / "raw.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * 200
        start = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", (body,))
            db.execute("COMMIT")
        elapsed = time.perf_counter() - start
        db.close()
    return {"seconds": elapsed}


# ------------------------------------------------------------------ floor
async def _floor(workdir: Path, n: int, synchronous: str) -> float:
    """What the rules alone cost a chain step, in the cheapest asyncio loop.

    The agent's own schema and pragmas (the file is made by :class:`Store`), one
    asyncio task per step, and per step only what a dependant must wait for: the
    step's ``task_runs`` row and its one outcome record (the agent's dict and JSON
    encoder) in one transaction, committed on the loop.  No executor, no
    Running-checkpoint timer, no runner, no bookkeeping: the gap between
    ``ours`` and this is what the executor costs beyond the writes the rules require.
    """
    from edge_agent.state import RunState, TaskState, record_json
    from edge_agent.store import Store

    path = workdir / "floor.db"
    await (await Store.open(path, synchronous=synchronous)).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA foreign_keys=ON")
    start = time.perf_counter()  # (ours is timed from submit: its run's rows included)
    run = RunState("floor.1", "floor", 1, "bench", "floor", "{}", created_at=time.time())
    tasks = [TaskState(run.run_id, f"t{i}") for i in range(n)]
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "INSERT INTO runs (run_id, uid, generation, namespace, name, spec, phase, created_at)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (run.run_id, run.uid, run.generation, run.namespace, run.name, "{}", "Running", 0.0),
    )
    db.executemany(
        "INSERT INTO task_runs (run_id, task, phase) VALUES (?,?,?)",
        [(t.run_id, t.name, t.phase) for t in tasks],
    )
    db.execute("COMMIT")

    async def step(task: TaskState) -> None:
        task.phase, task.attempt = "Succeeded", 1
        task.started_at = task.finished_at = time.time()
        task.exit_code = 0
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE task_runs SET phase=?, attempt=?, started_at=?, finished_at=?, exit_code=?"
            " WHERE run_id=? AND task=?",
            (task.phase, task.attempt, task.started_at, task.finished_at, 0, run.run_id, task.name),
        )
        db.execute(
            "INSERT INTO outbox (kind, run_id, body, created_at) VALUES (?,?,?,?)",
            ("task", run.run_id, record_json(task.to_record(run)), time.time()),
        )
        db.execute("COMMIT")

    for task in tasks:
        await asyncio.create_task(step(task))
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed


def run_floor(n: int, synchronous: str) -> dict[str, Any]:
    with scratch_dir(f"floor-{synchronous.lower()}") as workdir:
        return {"seconds": asyncio.run(_floor(workdir, n, synchronous))}


# ------------------------------------------------------------------- DBOS
def run_dbos(config: str, n: int) -> dict[str, Any]:
    """Run the DBOS child (this file, ``--dbos-child``) in a fresh directory."""
    with scratch_dir(f"dbos-{config}") as workdir:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--dbos-child", config, "-n", str(n)],
            cwd=workdir,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"DBOS child ({config}) failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def dbos_child(config: str, n: int) -> None:
    """Runs inside the subprocess, in an empty working directory."""
    import logging

    import sqlalchemy as sa
    from dbos import DBOS

    db_file = Path(DBOS_APP.replace("-", "_") + ".sqlite")  # DBOS's default name
    if config in ("wal", "wal-normal"):
        # WAL is persistent: create the file in WAL mode, DBOS then opens it as is.
        pre = sqlite3.connect(db_file)
        assert pre.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        pre.close()
    if config == "wal-normal":

        @sa.event.listens_for(sa.engine.Engine, "connect")
        def _normal(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    DBOS(config={"name": DBOS_APP, "log_level": "WARNING"})
    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    def noop() -> None:
        return None

    @DBOS.workflow()
    def sequential(count: int) -> int:
        for _ in range(count):
            noop()
        return count

    @DBOS.step()
    async def anoop() -> None:
        return None

    @DBOS.workflow()
    async def concurrent(count: int, limit: int) -> int:
        slots = asyncio.Semaphore(limit)

        async def one() -> None:
            async with slots:
                await anoop()

        await asyncio.gather(*(one() for _ in range(count)))
        return count

    DBOS.launch()
    try:
        sequential(WARMUP)
        start = time.perf_counter()
        sequential(n)
        seq_seconds = time.perf_counter() - start

        async def conc() -> float:
            await concurrent(WARMUP, CONCURRENCY)
            begin = time.perf_counter()
            await concurrent(n, CONCURRENCY)
            return time.perf_counter() - begin

        conc_seconds = asyncio.run(conc())
        steps = sa.create_engine(f"sqlite:///{db_file}")
        with steps.connect() as conn:
            recorded = conn.execute(sa.text("SELECT count(*) FROM operation_outputs")).scalar()
            journal = conn.execute(sa.text("PRAGMA journal_mode")).scalar()
            sync = conn.execute(sa.text("PRAGMA synchronous")).scalar()
        steps.dispose()
    finally:
        DBOS.destroy()
    expected = 2 * (n + WARMUP)
    if recorded != expected:
        raise SystemExit(f"DBOS recorded {recorded} steps, expected {expected}")
    print(
        json.dumps(
            {
                "seq_seconds": seq_seconds,
                "conc_seconds": conc_seconds,
                "journal_mode": journal,
                "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(sync, sync),
                "version": _dbos_version(),
            }
        )
    )


def _dbos_version() -> str:
    from importlib.metadata import version

    return version("dbos")


# ------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=None, help="steps per workflow (default 2000)")
    parser.add_argument("--quick", action="store_true", help="short smoke run (n=200)")
    parser.add_argument("--no-dbos", action="store_true", help="skip the DBOS baselines")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of ours and raw (default 5, quick 1)"
    )
    parser.add_argument(
        "--profile",
        choices=["chain", "independent"],
        help="also cProfile ours (FULL) for this shape and print the top functions",
    )
    parser.add_argument("--dbos-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n = args.n or (200 if args.quick else 2000)
    args.rounds = args.rounds or (1 if args.quick else 5)
    if args.dbos_child:
        dbos_child(args.dbos_child, n)
        return 0

    # The agent process's garbage-collector settings (tideflow-agent run / run-local
    # apply them at start-up); the baselines in this process get them too.
    tune_gc()
    print(f"durable no-op steps, N={n}, concurrency {CONCURRENCY}; {python_info()}")
    print(f"gc: as the agent sets it (start-up heap frozen, young gen. {GC_YOUNG_THRESHOLD:,})")
    with scratch_dir("probe") as probe:
        print(f"disk: {filesystem_of(probe)}")
    print()

    rows: list[list[Any]] = []
    results: dict[str, float] = {}
    # Every configuration of ours and the raw baseline runs once per round, the
    # rounds one after another: a ratio is taken within a round (the same minute
    # of a shared machine's load) and the median of the rounds is printed.
    rounds: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    labels: dict[str, tuple[str, str]] = {}

    cpu: dict[str, list[float]] = {}  # CPU seconds per run of ours, per key
    ack_cpu: dict[str, list[float]] = {}  # CPU seconds of the compacting ack, per key

    def measure(key: str, what: str, sync: str, seconds: float, note: str = "") -> None:
        rounds.setdefault(key, []).append(seconds)
        labels[key] = (what, sync)
        notes[key] = note

    def ours(shape: str, sync: str, tracing: bool = False) -> None:
        res = run_ours(shape, n, sync, tracing=tracing)
        label = "ours chain" if shape == "chain" else f"ours independent, c={CONCURRENCY}"
        key = f"ours-{shape}-{sync}"
        if tracing:
            # A span per attempt (inside its outcome's outbox record, filed into the
            # spans table in bulk: decision 0022) and per run.
            key, label = key + "-traced", label + ", tracing on"
        measure(key, label, sync, res["seconds"], f"{res['records'] / n:.1f} outbox records/step")
        cpu.setdefault(key, []).append(res["cpu"])
        ack_cpu.setdefault(key, []).append(res["ack_cpu"])

    for index in range(args.rounds):
        # What a ratio compares runs back to back; the order of each pair
        # alternates between rounds, so a drift of the load favours neither.
        flip = index % 2 == 1
        for sync in ("FULL", "NORMAL"):
            pair = [
                lambda sync=sync: measure(
                    f"raw-{sync}",
                    "raw sqlite3 1-row commits (WAL)",
                    sync,
                    run_raw(n, sync)["seconds"],
                ),
                lambda sync=sync: ours("chain", sync),
                lambda sync=sync: measure(
                    f"floor-{sync}",
                    "floor: a step's row + outcome record",
                    sync,
                    run_floor(n, sync)["seconds"],
                    "1 outbox record/step; one asyncio task per step, nothing else",
                ),
            ]
            for step in reversed(pair) if flip else pair:
                step()
        for shape in ("chain", "independent"):
            pair = [lambda shape=shape: ours(shape, "FULL", tracing=True)]
            if shape == "independent":
                pair.append(lambda: ours("independent", "FULL"))
            else:
                pair.insert(0, lambda: None)  # chain FULL ran just above
            for step in reversed(pair) if flip else pair:
                step()
        ours("independent", "NORMAL")

    def add(key: str, what: str, sync: str, seconds: float, note: str = "") -> None:
        results[key] = rate(n, seconds)
        rows.append([what, sync, round(seconds, 3), results[key], note])

    order = [
        "raw-FULL", "raw-NORMAL", "floor-FULL", "floor-NORMAL",
        "ours-chain-FULL", "ours-independent-FULL",
        "ours-chain-NORMAL", "ours-independent-NORMAL",
        "ours-chain-FULL-traced", "ours-independent-FULL-traced",
    ]  # fmt: skip
    for key in sorted(rounds, key=order.index):
        seconds = rounds[key]
        spread = ""
        if len(seconds) > 1:
            spread = f"; {rate(n, max(seconds)):,.0f}-{rate(n, min(seconds)):,.0f}/s"
        if key in cpu:
            spread += f"; CPU {statistics.median(cpu[key]) / n * 1e6:,.0f} us/step"
        add(key, *labels[key], statistics.median(seconds), notes[key] + spread)

    def round_ratio(ours: str, base: str) -> float:
        """Median over the rounds of (ours steps/s) / (base steps/s) in the same round."""
        return statistics.median(b / o for o, b in zip(rounds[ours], rounds[base], strict=True))

    dbos_version = None
    if not args.no_dbos:
        configs = (
            ("shipped", "DBOS as shipped"),
            ("wal", "DBOS WAL forced"),
            ("wal-normal", "DBOS WAL forced"),
        )
        for config, label in configs:
            res = run_dbos(config, n)
            dbos_version = res["version"]
            journal = f"journal={res['journal_mode']}"
            sync = res["synchronous"]
            add(f"dbos-{config}-seq", f"{label}, sequential", sync, res["seq_seconds"], journal)
            add(
                f"dbos-{config}-conc",
                f"{label}, gather c={CONCURRENCY}",
                sync,
                res["conc_seconds"],
                journal,
            )

    print_table(["what", "sync", "seconds", "steps/s", "note"], rows)
    print()
    if dbos_version:
        print(f"DBOS Transact {dbos_version}, default SQLite system database")
    lines = [
        ("ours chain FULL / raw commit FULL", "ours-chain-FULL", "raw-FULL", ">= 0.8x"),
        ("floor chain FULL / raw commit FULL", "floor-FULL", "raw-FULL", None),
        ("ours chain FULL / floor FULL", "ours-chain-FULL", "floor-FULL", None),
        ("ours independent FULL / raw commit FULL", "ours-independent-FULL", "raw-FULL", None),
        ("ours chain NORMAL / raw commit NORMAL", "ours-chain-NORMAL", "raw-NORMAL", None),
        (
            "ours chain FULL / DBOS shipped sequential (FULL)",
            "ours-chain-FULL",
            "dbos-shipped-seq",
            ">= 5x",
        ),
        (
            "ours independent FULL / DBOS shipped gather (FULL)",
            "ours-independent-FULL",
            "dbos-shipped-conc",
            ">= 5x",
        ),
        ("ours chain FULL / DBOS WAL sequential (FULL)", "ours-chain-FULL", "dbos-wal-seq", None),
        (
            "ours independent FULL / DBOS WAL gather (FULL)",
            "ours-independent-FULL",
            "dbos-wal-conc",
            None,
        ),
        (
            "ours chain NORMAL / DBOS WAL sequential (NORMAL)",
            "ours-chain-NORMAL",
            "dbos-wal-normal-seq",
            None,
        ),
        (
            "ours independent NORMAL / DBOS WAL gather (NORMAL)",
            "ours-independent-NORMAL",
            "dbos-wal-normal-conc",
            None,
        ),
    ]
    print(f"ours and raw: median of {args.rounds} round(s); ratios: median of per-round ratios")
    for label, ours, base, target in lines:
        if ours in rounds and base in rounds:
            print(ratio_line(label, round_ratio(ours, base), target))
        elif ours in results and base in results:
            print(ratio_line(label, results[ours] / results[base], target))
    for shape in ("chain", "independent"):
        ratio = round_ratio(f"ours-{shape}-FULL-traced", f"ours-{shape}-FULL")
        print(
            ratio_line(f"ours {shape} FULL tracing on / off", ratio, ">= 0.9x")
            + f"  ({(1 - ratio) * 100:.0f}% fewer steps/s)"
        )
        on, off = cpu[f"ours-{shape}-FULL-traced"], cpu[f"ours-{shape}-FULL"]
        added = statistics.median(a - b for a, b in zip(on, off, strict=True)) / n * 1e6
        print(
            f"ours {shape} FULL tracing: CPU per step on / off (median of per-round ratios)"
            f" {statistics.median(b / a for a, b in zip(on, off, strict=True)):.2f}x;"
            f" {added:,.0f} us/step added"
        )
        acks_on = ack_cpu[f"ours-{shape}-FULL-traced"]
        acks_off = ack_cpu[f"ours-{shape}-FULL"]
        filing = statistics.median(a - b for a, b in zip(acks_on, acks_off, strict=True)) / n
        print(
            f"ours {shape} FULL tracing: the ack compacting the run (off the clock), CPU per step"
            " on / off"
            f" {statistics.median(acks_on) / n * 1e6:,.1f}"
            f" / {statistics.median(acks_off) / n * 1e6:,.1f}"
            f" us ({filing * 1e6:,.1f} us more per span: what a run's end left to file)"
        )

    if args.profile:
        profile = cProfile.Profile()
        run_ours(args.profile, n, "FULL", profile)
        print(f"\ncProfile of ours {args.profile} FULL, N={n} (top 25 by cumulative time):")
        pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
