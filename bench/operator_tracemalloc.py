"""``tideflow-operator`` under tracemalloc, for ``bench/fleet.py --tracemalloc FILE``.

Why: the operator's memory at a fleet's scale (issue 13: at most 400 MB at
10,000 Workflows) is RSS as the kernel sees it; what grows is only found by
asking Python.  This runs the operator's own CLI with ``tracemalloc`` on and,
every ``TIDEFLOW_BENCH_TRACEMALLOC_SECONDS`` (default 20), writes the largest
live allocation sites (grouped by the innermost frames of the operator,
kopf, the Kubernetes client) to the file named by
``TIDEFLOW_BENCH_TRACEMALLOC``, replacing it: the last one written before the
benchmark stops the operator shows what it held with every Workflow loaded.
Tracing slows the operator: read its latencies from a run without it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 12
TOP = 40


def _report(path: Path) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"{time.strftime('%H:%M:%S')} traced {current / 1e6:.1f} MB (peak {peak / 1e6:.1f})"]
    for title, key in (("by file", "filename"), ("by line", "lineno")):
        lines.append(f"--- {title}")
        for stat in snapshot.statistics(key)[:TOP]:
            frame = stat.traceback[0]
            lines.append(
                f"{stat.size / 1e6:8.2f} MB {stat.count:8d}  {frame.filename}:{frame.lineno}"
            )
    lines.append("--- by traceback (top 10)")
    for stat in snapshot.statistics("traceback")[:10]:
        lines.append(f"{stat.size / 1e6:8.2f} MB {stat.count:8d}")
        lines.extend(f"    {line}" for line in stat.traceback.format()[-2 * FRAMES :])
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main() -> int:
    path = Path(os.environ["TIDEFLOW_BENCH_TRACEMALLOC"])
    every = float(os.environ.get("TIDEFLOW_BENCH_TRACEMALLOC_SECONDS", "20"))
    tracemalloc.start(FRAMES)

    def loop() -> None:
        while True:
            time.sleep(every)
            _report(path)

    threading.Thread(target=loop, name="tracemalloc-report", daemon=True).start()
    from tideflow_operator.cli import main as operator_main

    sys.argv = ["tideflow-operator", *sys.argv[1:]]
    return int(operator_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
