"""``tideflow-operator`` under tracemalloc, for ``bench/fleet.py --tracemalloc FILE``.

Why: the operator's memory at a fleet's scale (issue 13: at most 400 MB at
10,000 Workflows) is RSS as the kernel sees it; what grows is only found by
asking Python.  This runs the operator's own CLI and turns ``tracemalloc`` on
when it receives ``SIGUSR1`` (``bench/fleet.py`` sends it once the sites are
connected, just before the wave: tracing from the start slowed the operator's
start-up past the benchmark's patience, and what a wave adds is the question).
From then on, every ``TIDEFLOW_BENCH_TRACEMALLOC_SECONDS`` (default 20), it
writes the largest live allocation sites made since (by file, by line, and
the largest tracebacks of ``TIDEFLOW_BENCH_TRACEMALLOC_FRAMES`` frames,
default 12) to the file named by ``TIDEFLOW_BENCH_TRACEMALLOC``, replacing
it: the last one written before the benchmark stops the operator shows what
the wave left held.  Tracing slows the operator: read its latencies from a
run without it.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import os
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = int(os.environ.get("TIDEFLOW_BENCH_TRACEMALLOC_FRAMES", "12"))
TOP = 40


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _heap() -> list[str]:
    """Where the RSS is: glibc's heap (in use / free), pymalloc's arenas, live objects by type."""
    lines = []
    with open("/proc/self/status") as f:
        rss = next((line.split()[1] for line in f if line.startswith("VmRSS")), "?")
    lines.append(f"RSS {int(rss) / 1e3:.1f} MB; threads {threading.active_count()}")
    libc = None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        mi = libc.mallinfo2()
        lines.append(
            f"glibc malloc: {mi.arena / 1e6:.1f} MB from sbrk/arenas, in use "
            f"{mi.uordblks / 1e6:.1f} MB, free {mi.fordblks / 1e6:.1f} MB; mmapped "
            f"{mi.hblkhd / 1e6:.1f} MB in {mi.hblks} blocks"
        )
    except (OSError, AttributeError) as exc:
        lines.append(f"glibc malloc: not available ({exc})")
    with tempfile.TemporaryFile("w+") as tmp:  # _debugmallocstats writes to fd 2
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
            if libc is not None:
                libc.malloc_stats()  # per glibc arena: system bytes, in use
                libc.fflush(None)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        wanted = ("# arenas allocated current", "# bytes in allocated blocks",
                  "# bytes in available blocks", "Arena ", "system bytes", "in use bytes",
                  "Total (incl. mmap)", "max mmap")  # fmt: skip
        for line in tmp:
            if line.startswith(wanted):
                text = " ".join(line.split())
                if text.startswith(("system", "in use", "max mmap")) and lines[-1].startswith("  "):
                    lines[-1] += " " + text  # (malloc_stats: one line per arena)
                else:
                    lines.append("  " + text)
    objects = gc.get_objects()
    counts = collections.Counter(type(o).__qualname__ for o in objects)
    lines.append("live objects by type (gc): " + ", ".join(
        f"{name} {n}" for name, n in counts.most_common(25)))  # fmt: skip
    lines.append("queues: " + "; ".join(_queues(objects)))
    tasks = collections.Counter(_awaiting(o) for o in objects if isinstance(o, asyncio.Task))
    lines.append("asyncio tasks by outer coroutine > where it waits: " + "; ".join(
        f"{where} {n}" for where, n in tasks.most_common(12)))  # fmt: skip
    return lines


def _queues(objects: list[object]) -> list[str]:
    """What waits where: paho's outgoing messages, the watch's events, the bridge's inbox."""
    out = []
    for o in objects:
        kind = type(o).__qualname__
        if kind == "Client" and hasattr(o, "_out_messages"):
            queued = sum(
                1 for m in list(o._out_messages.values()) if int(m.state) == 9
            )  # MQTT_MS_QUEUED
            name = getattr(o, "_client_id", b"")
            out.append(
                f"paho {name!r}: {len(o._out_messages)} "
                f"QoS 1 messages unacknowledged ({queued} not sent yet, in flight "
                f"{o._inflight_messages}), {len(o._out_packet)} packets to write",
            )
        elif kind == "WorkflowWatch" and hasattr(o, "queued"):
            out.append(f"watch: {o.queued} events queued or in hand for "
                       f"{len(o._queues)} Workflows, {len(o.waiting)} waiting")  # fmt: skip
        elif kind == "CloudBridge" and hasattr(o, "_inbox"):
            out.append(f"bridge inbox: {o._inbox.qsize()} messages, {o._queued_bytes} bytes "
                       f"of events")  # fmt: skip
    return out


def _awaiting(task: asyncio.Task[object]) -> str:
    """``outer > innermost`` coroutine of a task (what it waits in)."""
    coro: object = task.get_coro()
    outer = getattr(coro, "__qualname__", type(coro).__name__)
    inner = outer
    for _ in range(50):
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if nxt is None or not hasattr(nxt, "__qualname__"):
            break
        coro, inner = nxt, nxt.__qualname__
    return f"{outer} > {inner}"


def _report(path: Path) -> None:
    lines = [time.strftime("%H:%M:%S"), *_heap()]
    if not tracemalloc.is_tracing():
        _write(path, lines)
        return
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    current, peak = tracemalloc.get_traced_memory()
    lines.append(f"traced {current / 1e6:.1f} MB (peak {peak / 1e6:.1f})")
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
    _write(path, lines)


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    with path.with_name(path.name + ".all").open("a") as every:  # (the peak's is among them)
        every.write("\n".join(lines[:12]) + "\n\n")


def main() -> int:
    path = Path(os.environ["TIDEFLOW_BENCH_TRACEMALLOC"])
    every = float(os.environ.get("TIDEFLOW_BENCH_TRACEMALLOC_SECONDS", "20"))
    started = threading.Event()

    def start(signum: int, frame: object) -> None:
        if FRAMES > 0 and not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        started.set()

    signal.signal(signal.SIGUSR1, start)

    def loop() -> None:
        started.wait()
        _write(path.with_name(path.name + ".start"), [time.strftime("%H:%M:%S"), *_heap()])
        while True:
            time.sleep(every)
            _report(path)

    threading.Thread(target=loop, name="tracemalloc-report", daemon=True).start()
    from tideflow_operator.cli import main as operator_main

    sys.argv = ["tideflow-operator", *sys.argv[1:]]
    return int(operator_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
