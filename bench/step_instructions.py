"""Instructions per durable step, counted by valgrind: a figure the machine's load cannot move.

``durable_steps`` times steps by the wall clock, and on a shared two-core
machine its ratios move by more than most changes do (rounds of the same tree
0.52x-0.72x, issue 15).  This counts the CPU instructions the process executes
per step instead (``valgrind --tool=callgrind``, user space, every thread):
the same count for the same tree whatever else runs, so two trees, or a change
and its revert, compare exactly.  It cannot see the disk: an fsync costs no
instructions, so steps run with ``synchronous=OFF`` and what is compared is
the CPU a step costs, not its wait.

Per step, in one run (each in a child process under callgrind, at two sizes;
the difference divided by the difference in steps, so start-up and imports
cancel out):

* **ours** - a workflow of N no-op tasks through the executor and the store
  (``bench.durable_steps``' *ours*), as a chain, as N independent tasks at
  concurrency 8, and each with tracing on;
* **floor** - only the writes a chain step cannot do without
  (``bench.durable_steps``' *floor*);
* **raw** - python ``sqlite3``, one single-row INSERT per transaction.

The independent shape is only roughly comparable: callgrind runs one thread
at a time, so the database thread's group commits batch differently than on
the machine.

Run ``python -m bench.step_instructions [--quick] [--steps N]``.  Needs
valgrind (Debian: ``apt install valgrind``); ~3 minutes (callgrind runs ~50x
slower than the machine).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import print_table, python_info, ratio_line

ROOT = Path(__file__).resolve().parent.parent
SMALL = 100
CASES = (
    ("raw", "raw sqlite3 1-row commits"),
    ("floor", "floor: a step's row + outcome record"),
    ("chain", "ours chain"),
    ("independent", "ours independent, c=8"),
    ("chain-traced", "ours chain, tracing on"),
    ("independent-traced", "ours independent, c=8, tracing on"),
)


def child(case: str, n: int) -> None:
    """Run one case in this process (under callgrind when the parent asks)."""
    from bench.durable_steps import run_floor, run_ours, run_raw
    from tideflow.gc_tuning import tune_gc

    tune_gc()  # as the agent and bench.durable_steps do
    if case == "raw":
        run_raw(n, "OFF")
    elif case == "floor":
        run_floor(n, "OFF")
    else:
        shape, _, traced = case.partition("-")
        run_ours(shape, n, "OFF", tracing=bool(traced))


def count(case: str, n: int) -> int:
    """Instructions the whole child process executed (callgrind's total)."""
    result = subprocess.run(
        [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-m", "bench.step_instructions", "--child", case, str(n),
        ],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"{case} n={n}: valgrind failed\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps above the small run")
    parser.add_argument("--quick", action="store_true", help="short smoke run (200 steps)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt install valgrind)")
    steps = 200 if args.quick else args.steps
    per_step: dict[str, float] = {}
    rows = []
    for case, label in CASES:
        small, large = count(case, SMALL), count(case, SMALL + steps)
        per_step[case] = (large - small) / steps
        rows.append([label, round(per_step[case] / 1000, 1)])
    print(f"instructions per durable step (synchronous=OFF), {steps} steps; {python_info()}")
    print_table(["what", "thousand instructions/step"], rows)
    print()
    print(ratio_line("instructions, ours chain / floor", per_step["chain"] / per_step["floor"]))
    print(ratio_line("instructions, floor / raw commit", per_step["floor"] / per_step["raw"]))
    for shape in ("chain", "independent"):
        print(
            ratio_line(
                f"ours {shape} tracing off / on (instructions; as steps/s on / off)",
                per_step[shape] / per_step[f"{shape}-traced"],
                ">= 0.9x by wall time",
            )
        )
    if args.json:
        print(json.dumps(per_step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
