"""What validating a Workflow spec costs as it grows: time and peak memory.

The operator validates every applied Workflow and the agent every assignment
and local manifest with :func:`tideflow.spec.parse_spec`, so its cost is what
a hostile or merely large manifest can make either side pay.  It used to hold
every task's full ancestor set (a 10,000-task chain: 11 s and 2.3 GB); this
benchmark shows it is now linear.

Cases, one subprocess per shape:

* ``chain N``: N tasks in a line, each reading its parent's output *and* the
  root's (``{{tasks.t0.outputs.r}}``, N-1 levels up for the last task: the
  reference the old check paid for with ancestor sets);
* ``fan-out N``: one root and N-1 tasks depending on it, each reading the
  root's output;
* ``largest manifest``: a YAML file just under
  :data:`tideflow.manifest.MAX_MANIFEST_BYTES` of chain tasks, read with
  :func:`tideflow.manifest.read_manifest` and validated (what ``run-local`` does).

Per case: the fastest of 11 rounds after a warm-up (the small and the large
case of a shape alternate in one child, the small one repeated to cover as
many tasks as the large one, so load from other processes on a shared
machine hits both alike), the tracemalloc peak of one more validation
(Python allocations made while validating, not the input), and the child's
peak RSS (``VmHWM``: interpreter, inputs and all).  Baseline: the 1,000-task case
of the same shape, same run; printed as ``ratio`` lines against the targets
(10x the tasks within 12x the time and memory; under 1 s and 150 MB).

Run ``python -m bench.validation_cost [--quick] [--large N]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import print_table, python_info, ratio_line, scratch_dir

MB = 1024 * 1024
TARGET_RATIO = 12.0
TARGET_SECONDS = 1.0
TARGET_MB = 150.0

CHILD = r"""
import gc, json, sys, time, tracemalloc
from tideflow.manifest import read_manifest
from tideflow.spec import parse_spec, parse_workflow

shape, sizes, path = sys.argv[1], [int(n) for n in sys.argv[2].split(",")], sys.argv[3]

def chain(n):
    tasks = [{"name": "t0", "command": ["extract"]}]
    for i in range(1, n):
        tasks.append({
            "name": f"t{i}",
            "command": ["step", "{{tasks.t%d.outputs.rows}}" % (i - 1)],
            "env": {"ROOT": "{{tasks.t0.outputs.r}}"},
            "dependsOn": [f"t{i - 1}"],
        })
    return {"tasks": tasks}

def fan_out(n):
    tasks = [{"name": "root", "command": ["split"]}]
    tasks += [
        {"name": f"leaf{i}", "command": ["work", "{{tasks.root.outputs.part}}"],
         "dependsOn": ["root"]}
        for i in range(n - 1)
    ]
    return {"tasks": tasks}

def validator(n):
    if shape == "manifest":
        return lambda: parse_workflow(read_manifest(path))
    data = {"chain": chain, "fan-out": fan_out}[shape](n)
    return lambda: parse_spec(data)

cases = {n: validator(n) for n in sizes}
tasks = {n: len(validate().spec.tasks if shape == "manifest" else validate().tasks)
         for n, validate in cases.items()}  # also the warm-up
# Rounds alternate the sizes, so a burst of load from other processes on a
# shared machine hits both alike; a small case is timed over as many tasks as
# the largest, and the fastest round of each is kept (load only adds time).
best = dict.fromkeys(sizes, float("inf"))
for _ in range(1 if shape == "manifest" else 11):
    for n, validate in cases.items():
        reps = max(1, max(sizes) // n)
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(reps):
            validate()
        best[n] = min(best[n], (time.perf_counter() - t0) / reps)
peaks = {}
for n, validate in cases.items():
    gc.collect()
    tracemalloc.start()
    validate()
    peaks[n] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
with open("/proc/self/status") as status:
    hwm = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
print(json.dumps({str(n): {"tasks": tasks[n], "seconds": best[n], "peak": peaks[n]}
                  for n in sizes} | {"rss": hwm}))
"""


def write_largest_manifest(path: Path, limit: int) -> int:
    """A chain manifest of as many tasks as fit just under ``limit`` bytes."""
    head = "apiVersion: tideflow.io/v1alpha1\nkind: Workflow\nmetadata: {name: big}\nspec:\n"
    lines = [head, "  tasks:\n", "    - {name: t0, command: [extract]}\n"]
    size = sum(len(line) for line in lines)
    n = 1
    while True:
        line = (
            f"    - {{name: t{n}, dependsOn: [t{n - 1}], "
            f"command: [step, '{{{{tasks.t{n - 1}.outputs.rows}}}}'], "
            "env: {ROOT: '{{tasks.t0.outputs.r}}'}}\n"
        )
        if size + len(line) > limit:
            break
        lines.append(line)
        size += len(line)
        n += 1
    path.write_text("".join(lines))
    return n


def measure(shape: str, sizes: list[int], path: Path | None = None) -> dict[str, Any]:
    """Time and tracemalloc peak per size, all sizes in one child, and its peak RSS."""
    sizes_arg = ",".join(str(n) for n in sizes)
    argv = [sys.executable, "-c", CHILD, shape, sizes_arg, str(path or "")]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{shape} {sizes_arg} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validation_cost", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 tasks: a smoke run")
    parser.add_argument("--large", type=int, default=10_000, help="the large case (10,000)")
    parser.add_argument("--base", type=int, default=1_000, help="the baseline case (1,000)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also print microseconds per task from 1,000 to 20,000 tasks (one child per shape)",
    )
    args = parser.parse_args(argv)
    base, large = (100, 1_000) if args.quick else (args.base, args.large)

    from tideflow.manifest import MAX_MANIFEST_BYTES

    print(f"validation cost: {python_info()}")
    rows: list[list[Any]] = []
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for shape in ("chain", "fan-out"):
        measured = measure(shape, [base, large])
        for n in (base, large):
            r = results[(shape, n)] = measured[str(n)]
            rss = f"{measured['rss'] / MB:.1f}" if n == large else "-"
            rows.append([f"{shape} {n:,}", r["tasks"], r["seconds"] * 1e3, r["peak"] / MB, rss])
    with scratch_dir("validation-cost") as tmp:
        path = tmp / "largest.yaml"
        n = write_largest_manifest(path, MAX_MANIFEST_BYTES - 1024)
        measured = measure("manifest", [n], path)
        r = measured[str(n)]
        size = f"{path.stat().st_size / MB:.2f} MiB"
        rows.append(
            [
                f"largest manifest ({size}: read + validated)",
                r["tasks"],
                r["seconds"] * 1e3,
                r["peak"] / MB,
                f"{measured['rss'] / MB:.1f}",
            ]
        )
    headers = ["case", "tasks", "ms", "peak MB (tracemalloc)", "child max RSS MB"]
    print_table(headers, rows)
    print()
    for shape in ("chain", "fan-out"):
        small, big = results[(shape, base)], results[(shape, large)]
        print(
            ratio_line(
                f"{shape} {large:,} / {base:,} time",
                big["seconds"] / small["seconds"],
                f"<= {TARGET_RATIO:.0f}x",
            )
        )
        print(
            ratio_line(
                f"{shape} {large:,} / {base:,} peak memory",
                big["peak"] / small["peak"],
                f"<= {TARGET_RATIO:.0f}x",
            )
        )
        within = big["seconds"] < TARGET_SECONDS and big["peak"] / MB < TARGET_MB
        print(
            f"{shape} {large:,}: {big['seconds']:.3f} s, {big['peak'] / MB:.1f} MB "
            f"(target < {TARGET_SECONDS:.0f} s and < {TARGET_MB:.0f} MB: "
            f"{'met' if within else 'MISSED'})"
        )
    if args.sweep:
        sizes = [1_000, 2_000, 5_000, 10_000, 20_000]
        print()
        sweep = []
        for shape in ("chain", "fan-out"):
            measured = measure(shape, sizes)
            sweep.append(
                [shape]
                + [measured[str(n)]["seconds"] * 1e6 / measured[str(n)]["tasks"] for n in sizes]
                + [measured[str(n)]["peak"] / measured[str(n)]["tasks"] / 1024 for n in sizes[-1:]]
            )
        print_table(
            ["us per task", *(f"{n:,}" for n in sizes), "KiB/task at 20,000"],
            sweep,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
