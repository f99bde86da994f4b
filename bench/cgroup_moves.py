"""What moving the agent into an attempt's cgroup and back costs, by its threads.

With attempt cgroups the agent starts each task by moving itself into the
attempt's cgroup, ``vfork``-ing the task there and moving back (decision 0043,
:meth:`edge_agent.runner.ProcessRunner._spawn`).  A write of ``0`` to a
``cgroup.procs`` moves every thread of the process, and the kernel's cost for
it grows with them.  This times the two writes in a process with 0 to N idle
threads beside the main one (blocked, as the agent's database, link, metrics
and reader threads mostly are), against the same process with none: the
baseline measured in the same run.

Each row is also timed with the process and its threads confined to one CPU:
what grows with the threads is a call the kernel makes on each moved thread's
last CPU, and waits for (cgroup v2's perf_event controller, always attached:
``perf_cgroup_attach``), which costs nothing when that CPU is this one
(bench/README.md, "Issue 15, fourteenth pass").

Needs a writable cgroup v2 subtree (root on a cgroup v2 host, or a unit with
``Delegate=yes``), as the agent's cgroups do; says so and exits 0 elsewhere.

Run ``python -m bench.cgroup_moves [--threads 0,1,2,3,4,6] [--moves 2000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from statistics import median

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import print_table, python_info
from edge_agent.runner import CgroupScope, agent_mark


def _moves(
    scope: CgroupScope, attempt: Path, threads: int, moves: int, *, one_cpu: bool = False
) -> float:
    """Seconds per move in and back, with ``threads`` idle threads beside this one
    (``one_cpu``: this thread and those it starts confined to the CPU it is on)."""
    assert scope.home is not None
    allowed = os.sched_getaffinity(0)
    if one_cpu:  # (threads started from here on inherit it)
        os.sched_setaffinity(0, {_current_cpu()})
    idle = threading.Event()
    helpers = [threading.Thread(target=idle.wait, daemon=True) for _ in range(threads)]
    for helper in helpers:
        helper.start()
    into = os.open(attempt / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    back = os.open(scope.home / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    try:
        start = time.perf_counter()
        for _ in range(moves):
            os.write(into, b"0")
            os.write(back, b"0")
        return (time.perf_counter() - start) / moves
    finally:
        os.close(into)
        os.close(back)
        idle.set()
        for helper in helpers:
            helper.join()
        os.sched_setaffinity(0, allowed)


def _current_cpu() -> int:
    """The CPU this thread is running on (field 39 of /proc/thread-self/stat)."""
    with open("/proc/thread-self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[36])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="0,1,2,3,4,6", help="idle threads to try")
    parser.add_argument("--moves", type=int, default=2000, help="moves in and back per figure")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians printed)")
    args = parser.parse_args(argv)
    counts = sorted({0, *(int(n) for n in args.threads.split(","))})

    scope = CgroupScope.detect(agent_mark(Path.cwd() / f".bench-cgroup-{os.getpid()}"))
    if scope is None or scope.home is None:
        print("no writable cgroup v2 subtree here: nothing to measure")
        return 0
    scope.root.mkdir(exist_ok=True)
    attempt = scope.root / "bench-attempt"
    attempt.mkdir(exist_ok=True)
    try:
        seconds: dict[int, list[float]] = {n: [] for n in counts}
        one_cpu: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:  # interleaved, so a busy moment spreads over all
                seconds[n].append(_moves(scope, attempt, n, args.moves))
                one_cpu[n].append(_moves(scope, attempt, n, args.moves, one_cpu=True))
    finally:
        attempt.rmdir()
        scope.remove_root()

    base = median(seconds[0])
    print(f"moving a process into a cgroup and back (two cgroup.procs writes); {python_info()}")
    print(f"{args.moves} moves per figure, {args.rounds} interleaved rounds, medians")
    print()
    print_table(
        [
            "threads besides the main one",
            "us per move in and back",
            "ratio to none",
            "all on one CPU: us",
            "ratio",
        ],
        [
            [
                n,
                median(seconds[n]) * 1e6,
                f"{median(seconds[n]) / base:.2f}x",
                median(one_cpu[n]) * 1e6,
                f"{median(one_cpu[n]) / base:.2f}x",
            ]
            for n in counts
        ],
    )
    print()
    print(
        "what grows with the threads is a call made on each thread's last CPU, if another:"
        " all on one CPU it all but goes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
