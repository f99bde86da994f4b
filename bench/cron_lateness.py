"""Fire-time lateness of CronWorkflow schedules at a real agent, against a bare asyncio loop.

A real Mosquitto and a real ``tideflow-agent run`` process; the benchmark
sends it ``--schedules`` CronWorkflows at ``@every 1s`` (as the operator
does: re-sent until the agent holds them all), lets them fire for
``--seconds``, then reads the agent's database: each fired run's lateness is
its ``created_at`` (the run committed) minus its scheduled time.  Each run is
one ``true`` task, so the agent also spawns one process per fire.

Baseline, in the same run and the same time window (so both see the same
machine load): a bare asyncio loop in the benchmark process with the same
number of coroutines, each sleeping until the next whole second and noting
how late it woke — what an ideal in-memory scheduler that stores nothing
would get.

Printed: p50/p99/max lateness of both, the ratio of the p99s, fires per
second, and the agent's CPU share (its own process, then with its task
processes) over the firing window.

Run ``python -m bench.cron_lateness [--quick] [--schedules N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import print_table, python_info, ratio_line, scratch_dir
from tideflow import wire
from tideflow.tools.launchers.broker import Mosquitto

SITE = "bench-site"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def schedule_message(i: int) -> bytes:
    payload = wire.SchedulePayload(
        action="put",
        uid=f"bench-{i:04d}",
        generation=1,
        namespace="bench",
        name=f"s{i:04d}",
        spec={
            "schedule": "@every 1s",
            "placement": {"site": SITE},
            "startingDeadlineSeconds": 5,
            "successfulJobsHistoryLimit": 1000,
            "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
        },
    )
    return wire.encode(wire.KIND_SCHEDULE, SITE, payload)


def held_count(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT count(*) FROM schedules").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def fired(db: Path, start: float, end: float) -> list[float]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT created_at - scheduled_at FROM runs"
            " WHERE scheduled_at >= ? AND scheduled_at < ?",
            (start, end),
        ).fetchall()
    finally:
        conn.close()
    return [float(r[0]) for r in rows]


async def bare_loop(n: int, start: float, end: float) -> list[float]:
    """n coroutines, each waking at every whole second in [start, end) and noting the delay."""
    late: list[float] = []

    async def one() -> None:
        t = float(int(start))
        while t < end:
            if t >= start:
                await asyncio.sleep(max(0.0, t - time.time()))
                late.append(time.time() - t)
            t += 1.0

    await asyncio.gather(*(one() for _ in range(n)))
    return late


def cpu_seconds(proc: psutil.Process, children: bool) -> float:
    times = proc.cpu_times()
    total = times.user + times.system
    if children:
        total += times.children_user + times.children_system
    return total


def run(schedules: int, seconds: float) -> dict[str, Any]:
    with scratch_dir("cron-lateness") as tmp, Mosquitto() as broker:
        db = tmp / "site.db"
        log = (tmp / "agent.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--site", SITE, "--broker",
             broker.url, "--db", str(db), "--synchronous", "NORMAL", "--concurrency", "4",
             "--heartbeat-seconds", "5"],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-cloud")
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            deadline = time.monotonic() + 60
            while held_count(db) < schedules:  # re-send until held, as the operator does
                if time.monotonic() > deadline:
                    raise SystemExit("the agent did not take the schedules; see its log")
                for i in range(schedules):
                    client.publish(wire.topic(SITE, wire.ASSIGN), schedule_message(i), 1)
                time.sleep(1.0)
            proc = psutil.Process(agent.pid)
            start = float(int(time.time()) + 2)
            end = start + seconds
            time.sleep(max(0.0, start - time.time()))
            wall0, own0, all0 = time.monotonic(), cpu_seconds(proc, False), cpu_seconds(proc, True)
            baseline = asyncio.run(bare_loop(schedules, start, end))
            wall = time.monotonic() - wall0
            own = cpu_seconds(proc, False) - own0
            everything = cpu_seconds(proc, True) - all0
            time.sleep(1.5)  # the last second's fires are committed
            agent_late = fired(db, start, end)
        finally:
            client.loop_stop()
            client.disconnect()
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
            log.close()
    return {
        "agent": agent_late,
        "baseline": baseline,
        "expected": int(seconds) * schedules,
        "wall": wall,
        "cpu_own": own,
        "cpu_all": everything,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 schedules for 10 s")
    parser.add_argument("--schedules", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args(argv)
    schedules = args.schedules or (20 if args.quick else 100)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    print(f"# cron lateness: {schedules} schedules @every 1s for {seconds:.0f} s; {python_info()}")
    out = run(schedules, seconds)
    rows = []
    for label, late in (("agent (SQLite, fires runs)", out["agent"]),
                        ("bare asyncio loop", out["baseline"])):  # fmt: skip
        rows.append(
            (
                label,
                len(late),
                f"{percentile(late, 0.5) * 1000:.1f}",
                f"{percentile(late, 0.99) * 1000:.1f}",
                f"{max(late, default=float('nan')) * 1000:.1f}",
                f"{statistics.fmean(late) * 1000:.1f}" if late else "nan",
            )
        )
    print_table(("scheduler", "fires", "p50 ms", "p99 ms", "max ms", "mean ms"), rows)
    print(f"expected fires per scheduler: {out['expected']}")
    agent_p99 = percentile(out["agent"], 0.99)
    base_p99 = percentile(out["baseline"], 0.99)
    print(ratio_line("p99 lateness, agent / bare loop", agent_p99 / base_p99 if base_p99 else 0))
    print(
        f"agent CPU share over {out['wall']:.1f} s: own process "
        f"{100 * out['cpu_own'] / out['wall']:.1f}% of one core; with its task processes "
        f"{100 * out['cpu_all'] / out['wall']:.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
