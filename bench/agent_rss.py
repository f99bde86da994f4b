"""Peak memory of a real ``tideflow-agent run-local`` running a 1,000-task DAG.

The agent is started as a separate process on a generated manifest: a DAG of
``true`` tasks in stages of varying width (fan-out from one task to many,
fan-in from many to few or one, and many-to-many between wide stages; each
task depends on one to three tasks of the stage before).  While it runs, the
benchmark samples the process every few milliseconds with psutil and reads
the kernel's high-water mark (``VmHWM`` in ``/proc/<pid>/status``), so the
peak is exact even between samples.

Baseline: a bare Python process (same interpreter) that imports the modules
the agent imports for ``run-local`` (``edge_agent.cli`` and everything it
pulls in) and does nothing else.  Printed: both peaks in MB, the difference
(what running the DAG costs), the ratio, and the target (agent peak <= 120 MB).

Run ``python -m bench.agent_rss [--quick] [--tasks N]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._util import print_table, python_info, ratio_line, scratch_dir

TARGET_MB = 120.0
MB = 1024 * 1024
# Stage widths, repeated until the task count is reached: 1 -> 40 is a fan-out,
# 40 -> 5 and 5 -> 1 fan-ins, 120 -> 60 many-to-many.
WIDTHS = (1, 40, 5, 120, 60, 1, 80, 10, 150, 3, 30, 1)
BASELINE_CODE = (
    "import sys, edge_agent.cli, edge_agent.executor, edge_agent.store, edge_agent.runner;"
    "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"
)


def dag_manifest(n: int) -> dict[str, Any]:
    """A Workflow manifest of ``n`` ``true`` tasks, mixed fan-out/fan-in."""
    tasks: list[dict[str, Any]] = []
    previous: list[str] = []
    stage = 0
    while len(tasks) < n:
        width = min(WIDTHS[stage % len(WIDTHS)], n - len(tasks))
        current = []
        for i in range(width):
            name = f"s{stage}-t{i}"
            task: dict[str, Any] = {"name": name, "command": ["true"]}
            if previous:
                k = len(previous)
                deps = {previous[(i * 7 + j * 3) % k] for j in range(1 + i % 3)}
                task["dependsOn"] = sorted(deps)
            tasks.append(task)
            current.append(name)
        previous = current
        stage += 1
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": f"rss-{n}", "namespace": "bench"},
        "spec": {"tasks": tasks},
    }


def _hwm(pid: int) -> int:
    """The kernel's peak RSS of ``pid`` so far, in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _agent_command() -> list[str]:
    script = Path(sys.executable).with_name("tideflow-agent")
    if script.exists():
        return [str(script)]  # the console script users run
    return [sys.executable, "-m", "edge_agent.cli"]


def measure_agent(workdir: Path, n: int, interval: float) -> dict[str, Any]:
    manifest = workdir / "dag.yaml"
    manifest.write_text(yaml.safe_dump(dag_manifest(n), sort_keys=False))
    cmd = [*_agent_command(), "run-local", str(manifest), "--db", str(workdir / "agent.db")]
    cmd.append("--quiet")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak_rss = peak_hwm = samples = 0
    while proc.poll() is None:
        try:
            rss = watched.memory_info().rss
        except psutil.Error:
            break
        peak_rss = max(peak_rss, rss)
        peak_hwm = max(peak_hwm, _hwm(proc.pid))
        samples += 1
        time.sleep(interval)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(out[-2000:] + err[-2000:])
        raise SystemExit(f"tideflow-agent exited {proc.returncode}")
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    return {
        "peak": max(peak_rss, peak_hwm),
        "peak_sampled": peak_rss,
        "samples": samples,
        "seconds": elapsed,
        "summary": summary,
        "command": " ".join(cmd),
    }


def measure_baseline() -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BASELINE_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("baseline process did not start")
    rss = psutil.Process(proc.pid).memory_info().rss
    hwm = _hwm(proc.pid)
    proc.stdin.close()
    proc.wait()
    return {"peak": max(rss, hwm)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (200 tasks)")
    parser.add_argument("--tasks", type=int, default=None, help="DAG size (default 1000)")
    parser.add_argument("--interval", type=float, default=0.005, help="sampling period, s")
    args = parser.parse_args(argv)
    n = args.tasks or (200 if args.quick else 1000)

    baseline = measure_baseline()
    with scratch_dir("rss") as workdir:
        agent = measure_agent(workdir, n, args.interval)
    print(f"peak RSS of tideflow-agent run-local, {n}-task DAG of `true`; {python_info()}")
    print(f"agent: {agent['command'].replace(str(Path.cwd()) + os.sep, '')}")
    print(f"agent result: {agent['summary']}")
    print()
    print_table(
        ["process", "peak RSS MB", "seconds", "note"],
        [
            ["bare python importing edge_agent.cli", baseline["peak"] / MB, "", "VmHWM"],
            [
                f"tideflow-agent run-local ({n} tasks)",
                agent["peak"] / MB,
                round(agent["seconds"], 2),
                f"VmHWM; {agent['samples']} psutil samples, max "
                f"{agent['peak_sampled'] / MB:.1f} MB",
            ],
        ],
    )
    print()
    print(f"agent peak RSS: {agent['peak'] / MB:.1f} MB  (target <= {TARGET_MB:.0f} MB)")
    added = (agent["peak"] - baseline["peak"]) / MB
    print(f"running the DAG adds: {added:.1f} MB over the imports")
    print(ratio_line("agent peak / bare import baseline", agent["peak"] / baseline["peak"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
