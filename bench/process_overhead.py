"""Per-task overhead of ``command`` tasks against bare subprocess spawns.

Both sides run the same program (``true`` by default) in the same event loop:

* **chain** - a workflow of N tasks, each depending on the one before, through
  :class:`Executor` + :class:`Store` + the real :class:`ProcessRunner`; against
  N sequential ``await asyncio.create_subprocess_exec("true")`` + ``wait()``.
* **independent** - a workflow of M tasks with no dependencies at the
  executor's concurrency limit (``os.cpu_count()``); against M bare spawns
  gated by an ``asyncio.Semaphore`` of the same size.

The workflow is timed from ``submit`` to the run's end, so it includes
everything the agent does per task: spec and template handling, the scratch
directory, stdout/stderr files, a new session, the Running and outcome
checkpoints with their outbox records (``synchronous=FULL`` unless told
otherwise) and the log tails.  The ratio is workflow time / bare time, from
the medians of ``--repeat`` interleaved runs of each side (the machine may be
shared; the best-of ratio is printed beside it).

A chain step must commit its outcome before the next task starts (one fsync
per step with ``synchronous=FULL``), which a bare spawn never does.  So that
the chain's figure can be read on a disk whose fsyncs are slow, each chain
repeat also times as many raw one-row WAL commits (python ``sqlite3``, same
``synchronous``, same filesystem), and a context line prints the chain with
one raw commit per step taken out.

Wall time on a shared machine moves with everyone else's load; the CPU this
process spends per task (``getrusage``: the event loop and, for the bare
side, asyncio's watcher threads; the programs' own CPU is not in it) moves
much less, and is printed beside it.

The agent moves itself, every thread of it, into each attempt's cgroup and back
around the task's start, and the kernel's cost for that grows with its threads
(edge_agent/threads.py): the threads the agent held at each task start are
printed, and ``--idle-threads K`` adds K idle threads for the workflow runs, as a
site daemon has beside its event loop (the MQTT link's, the metrics server's,
the outbox reader's).

Run ``python -m bench.process_overhead [--quick] [--chain N] [--independent M]
[--idle-threads K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import (
    chain_spec,
    filesystem_of,
    independent_spec,
    print_table,
    python_info,
    ratio_line,
    scratch_dir,
)
from edge_agent.runner import CgroupScope, agent_mark
from tideflow.gc_tuning import GC_YOUNG_THRESHOLD, tune_gc


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _bare(program: str, n: int, limit: int) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) for ``n`` bare spawns."""
    slots = asyncio.Semaphore(limit)

    async def one() -> None:
        async with slots:
            proc = await asyncio.create_subprocess_exec(program)
            await proc.wait()

    cpu, start = _cpu(), time.perf_counter()
    if limit == 1:
        for _ in range(n):
            proc = await asyncio.create_subprocess_exec(program)
            await proc.wait()
    else:
        await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - start, _cpu() - cpu


def _raw_commits(workdir: Path, n: int, synchronous: str) -> float:
    """Seconds for ``n`` one-row WAL commits: what one durable step costs the disk."""
    db = sqlite3.connect(workdir / "raw.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * 200
        start = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", (body,))
            db.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        db.close()


async def _workflow(
    workdir: Path,
    program: str,
    shape: str,
    n: int,
    limit: int,
    synchronous: str,
    cgroups: bool = True,
    threads_seen: list[int] | None = None,
) -> tuple[float, float]:
    from edge_agent.executor import Executor, local_assignment
    from edge_agent.store import Store
    from tideflow.spec import parse_spec

    make = chain_spec if shape == "chain" else independent_spec
    store = await Store.open(workdir / "agent.db", synchronous=synchronous)
    try:

        def started(_run: object, task: Any) -> None:
            if threads_seen is not None and task is not None and task.phase == "Running":
                threads_seen.append(threading.active_count())

        executor = Executor(
            store, work_dir=workdir / "work", concurrency=limit, cgroups=cgroups, listener=started
        )
        warm = local_assignment("bench", "warmup", parse_spec(make(4, [program])))
        await executor.submit(warm)
        await executor.run_to_end(warm.run_id)

        spec = parse_spec(make(n, [program]))
        assignment = local_assignment("bench", f"{shape}-{n}", spec)
        cpu, start = _cpu(), time.perf_counter()
        await executor.submit(assignment)
        final = await executor.run_to_end(assignment.run_id)
        elapsed, cpu = time.perf_counter() - start, _cpu() - cpu
        counts = await store.task_counts(assignment.run_id)
    finally:
        await store.close()
    if final.phase != "Succeeded" or counts.get("Succeeded") != n:
        raise SystemExit(f"{shape}: run ended {final.phase} with {counts}")
    return elapsed, cpu


async def _measure(args: argparse.Namespace, program: str) -> dict[str, Any]:
    """Bare and workflow runs interleaved ``repeat`` times; lists of (seconds, CPU seconds)."""
    limit = os.cpu_count() or 1
    await _bare(program, 4, limit)  # warm the spawn path
    with scratch_dir("probe") as probe:
        cgroups = CgroupScope.detect(agent_mark(probe)) is not None
    out: dict[str, Any] = {"limit": limit, "cgroups": cgroups, "raw_chain": [], "threads": []}
    for key, shape, n, conc in (
        ("chain", "chain", args.chain, 1),
        ("indep", "independent", args.independent, limit),
    ):
        out[f"bare_{key}"], out[f"ours_{key}"], out[f"nocg_{key}"] = [], [], []
        for _ in range(args.repeat):
            out[f"bare_{key}"].append(await _bare(program, n, conc))
            with scratch_dir(f"proc-{key}") as workdir:
                out[f"ours_{key}"].append(
                    await _workflow(
                        workdir,
                        program,
                        shape,
                        n,
                        limit,
                        args.synchronous,
                        threads_seen=out["threads"],
                    )
                )
            if cgroups:  # the same without per-attempt cgroups (a host that has none)
                with scratch_dir(f"proc-{key}") as workdir:
                    out[f"nocg_{key}"].append(
                        await _workflow(
                            workdir, program, shape, n, limit, args.synchronous, cgroups=False
                        )
                    )
            if key == "chain":
                with scratch_dir("raw-commit") as workdir:
                    out["raw_chain"].append(_raw_commits(workdir, n, args.synchronous))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (40 / 80 tasks)")
    parser.add_argument("--chain", type=int, default=None, help="chain length (default 200)")
    parser.add_argument(
        "--independent", type=int, default=None, help="independent tasks (default 400)"
    )
    parser.add_argument("--program", default="true", help="program every task runs")
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"], type=str.upper)
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs of each side (default 3, quick 1)"
    )
    parser.add_argument(
        "--idle-threads",
        type=int,
        default=0,
        help="idle threads beside the loop, as a site daemon has (link, metrics, reader)",
    )
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.chain = args.chain or (40 if args.quick else 200)
    args.independent = args.independent or (80 if args.quick else 400)
    program = shutil.which(args.program) or args.program

    # The agent process's garbage-collector settings (tideflow-agent run / run-local
    # apply them at start-up); the baselines in this process get them too.
    tune_gc()
    idle = threading.Event()
    helpers = [threading.Thread(target=idle.wait, daemon=True) for _ in range(args.idle_threads)]
    for helper in helpers:
        helper.start()
    try:
        res = asyncio.run(_measure(args, program))
    finally:
        idle.set()
    limit = res["limit"]
    print(f"per-task overhead of `{args.program}` tasks; {python_info()}")
    print(f"gc: as the agent sets it (start-up heap frozen, young gen. {GC_YOUNG_THRESHOLD:,})")
    with scratch_dir("probe") as probe:
        print(f"disk: {filesystem_of(probe)}; synchronous={args.synchronous}")
    print(f"each side run {args.repeat}x interleaved; medians (best in the last columns)")
    seen = res["threads"]
    print(
        f"agent threads at its task starts: median {median(seen):.0f}, most {max(seen)}"
        f" ({args.idle_threads} idle ones added, --idle-threads)"
    )
    print()
    print(
        "per-attempt cgroups: "
        + ("yes (rows 'no cgroups': the same runs without them)" if res["cgroups"] else "no")
    )
    rows = []
    cpu_rows: list[list[Any]] = []
    ratios = {}
    variants = [("ours", "")] + ([("nocg", ", no cgroups")] if res["cgroups"] else [])
    for (key, label, n, conc), (side, suffix) in (
        (shape, variant)
        for shape in (
            ("chain", "chain", args.chain, 1),
            ("indep", "independent", args.independent, limit),
        )
        for variant in variants
    ):
        bare_s = [seconds for seconds, _ in res[f"bare_{key}"]]
        ours_s = [seconds for seconds, _ in res[f"{side}_{key}"]]
        bare, ours = median(bare_s), median(ours_s)
        best_bare, best_ours = min(bare_s), min(ours_s)
        bare_cpu = median(cpu for _, cpu in res[f"bare_{key}"]) / n * 1000
        ours_cpu = median(cpu for _, cpu in res[f"{side}_{key}"]) / n * 1000
        ratios[key + suffix] = (ours / bare, best_ours / best_bare)
        cpu_rows.append([label + suffix, bare_cpu, ours_cpu, f"{ours_cpu / bare_cpu:.2f}x"])
        rows.append(
            [
                label + suffix,
                n,
                conc,
                round(bare, 3),
                round(ours, 3),
                bare / n * 1000,
                ours / n * 1000,
                (ours - bare) / n * 1000,
                best_bare / n * 1000,
                best_ours / n * 1000,
            ]
        )
    print_table(
        [
            "shape",
            "tasks",
            "conc",
            "bare s",
            "workflow s",
            "bare ms/task",
            "workflow ms/task",
            "overhead ms/task",
            "best bare ms/task",
            "best workflow ms/task",
        ],
        rows,
    )
    print()
    print_table(
        ["shape", "bare CPU ms/task", "workflow CPU ms/task", "CPU ratio"],
        cpu_rows,
    )
    commit = median(res["raw_chain"]) / args.chain
    bare_chain = median(seconds for seconds, _ in res["bare_chain"])
    print()
    print(
        f"raw 1-row WAL commit ({args.synchronous}), same disk, beside each chain run: "
        f"{commit * 1000:.2f} ms (median); what one durable step costs before any work"
    )
    for _side, suffix in variants:
        chain, best_chain = ratios["chain" + suffix]
        print(
            ratio_line(f"chain workflow{suffix} / sequential bare spawns", chain, "<= 1.5x"),
            end="",
        )
        print(f"  [best-of ratio {best_chain:.2f}x]")
        ours_chain = median(seconds for seconds, _ in res[f"{_side}_chain"])
        rest = (ours_chain - commit * args.chain) / bare_chain
        print(f"  context: chain{suffix} less one raw commit per step / bare: {rest:.2f}x")
        indep, best_indep = ratios["indep" + suffix]
        print(
            ratio_line(
                f"independent workflow{suffix} / bare spawns (semaphore {limit})", indep, "<= 1.2x"
            ),
            end="",
        )
        print(f"  [best-of ratio {best_indep:.2f}x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
