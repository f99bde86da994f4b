"""What checking the site database on open costs: ``quick_check`` vs ``integrity_check``.

A writer (``run``, ``run-local``) runs ``PRAGMA quick_check`` on every open so
a corrupt file is refused before anything is written into it.  This builds a
site database of about ``--mb`` MB through the agent's own schema (runs, task
rows, outbox records, spans with their index, log tails), then times, from a
cold start each:

* baseline: opening it read-only and counting its rows (what a reader pays);
* ``Store.open`` as a writer (lock, header, ``quick_check``, schema check);
* ``PRAGMA quick_check`` alone, and ``PRAGMA integrity_check`` alone (which
  also checks that every index entry matches its row).

Run ``python -m bench.store_check [--mb 50] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import filesystem_of, print_table, python_info, ratio_line, scratch_dir
from edge_agent.store import Store

MB = 1024 * 1024


async def build(path: Path, target_mb: float) -> None:
    store = await Store.open(path, synchronous="OFF")
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    run = 0
    while path.stat().st_size < target_mb * MB:
        run += 1
        run_id = f"uid-{run}.1"
        conn.execute(
            "INSERT INTO runs (run_id, uid, generation, namespace, name, spec, phase,"
            " created_at, trace_id) VALUES (?,?,1,'plant-7',?,?,'Succeeded',?,?)",
            (
                run_id,
                f"uid-{run}",
                f"wf-{run}",
                json.dumps({"tasks": []}),
                time.time(),
                f"{run:032x}",
            ),
        )
        for t in range(50):
            conn.execute(
                "INSERT INTO task_runs (run_id, task, phase, attempt, outputs) VALUES"
                " (?,?,'Succeeded',1,?)",
                (run_id, f"t{t}", json.dumps({"rows": str(t)})),
            )
            conn.execute(
                "INSERT INTO task_logs VALUES (?,?,1,'stdout',?)", (run_id, f"t{t}", b"x" * 300)
            )
            body = json.dumps({"uid": f"uid-{run}", "task": f"t{t}", "phase": "Succeeded"})
            conn.execute(
                "INSERT INTO outbox (kind, run_id, body, created_at) VALUES ('task',?,?,?)",
                (run_id, body, time.time()),
            )
            cur = conn.execute(
                "INSERT INTO spans VALUES (?,?,NULL,?,?,?,?,?)",
                (f"{run:032x}", f"{run * 100 + t:016x}", run_id, f"task t{t}", 1, 2, body * 2),
            )
            conn.execute(
                "INSERT INTO outbox (kind, run_id, body, created_at, span_rowid)"
                " VALUES ('span',?,'',?,?)",
                (run_id, time.time(), cur.lastrowid),
            )
        conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def drop_caches(path: Path) -> None:
    """Evict the file from the page cache where the kernel lets us (else: warm)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_pragma(path: Path, sql: str) -> tuple[float, str]:
    drop_caches(path)
    t0 = time.perf_counter()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    result = str(conn.execute(sql).fetchone()[0])
    conn.close()
    return time.perf_counter() - t0, result


async def timed_open(path: Path) -> float:
    drop_caches(path)
    t0 = time.perf_counter()
    store = await Store.open(path)
    elapsed = time.perf_counter() - t0
    await store.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--quick", action="store_true", help="a 5 MB database (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.mb = 5.0
    with scratch_dir("store-check") as work:
        db = work / "site.db"
        asyncio.run(build(db, args.mb))
        size = db.stat().st_size / MB
        print(f"{python_info()}; sqlite {sqlite3.sqlite_version}; {filesystem_of(work)}")
        print(f"database: {size:.1f} MB")
        base, _ = timed_pragma(
            db, "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM spans)"
        )
        quick, quick_result = timed_pragma(db, "PRAGMA quick_check")
        full, full_result = timed_pragma(db, "PRAGMA integrity_check")
        opened = asyncio.run(timed_open(db))
        rows = [
            ("count rows (baseline)", f"{base * 1000:.0f} ms", ""),
            ("PRAGMA quick_check", f"{quick * 1000:.0f} ms", quick_result),
            ("PRAGMA integrity_check", f"{full * 1000:.0f} ms", full_result),
            ("Store.open (writer, with quick_check)", f"{opened * 1000:.0f} ms", ""),
        ]
        print_table(["what", "time", "result"], rows)
        print(ratio_line("integrity_check / quick_check", full / quick))
        print(ratio_line("writer open / baseline row count", opened / base))


if __name__ == "__main__":
    main()
