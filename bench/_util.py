"""Helpers shared by the benchmarks: scratch directories, DAG specs, tables.

Scratch directories live under ``<repo>/.bench-tmp`` on purpose: the
benchmarks measure fsync-bound work, so their databases must sit on the same
filesystem as the repository (a tmpfs ``/tmp`` would make every commit free
and every ratio meaningless).  Each run gets a fresh directory that is removed
afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRATCH_ROOT = REPO / ".bench-tmp"


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory on the repository's filesystem, removed on exit."""
    SCRATCH_ROOT.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=SCRATCH_ROOT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            SCRATCH_ROOT.rmdir()  # only if no other run is using it


def filesystem_of(path: Path) -> str:
    """``device fstype mountpoint`` of the filesystem holding ``path``."""
    try:
        out = subprocess.run(
            ["df", "--output=source,fstype,target", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        return " ".join(out[-1].split())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def chain_spec(n: int, command: Sequence[str] = ("true",)) -> dict[str, Any]:
    """Spec mapping: ``n`` tasks, each depending on the one before."""
    tasks: list[dict[str, Any]] = [{"name": "t0", "command": list(command)}]
    tasks += [
        {"name": f"t{i}", "command": list(command), "dependsOn": [f"t{i - 1}"]} for i in range(1, n)
    ]
    return {"tasks": tasks}


def independent_spec(n: int, command: Sequence[str] = ("true",)) -> dict[str, Any]:
    """Spec mapping: ``n`` tasks with no dependencies at all."""
    return {"tasks": [{"name": f"t{i}", "command": list(command)} for i in range(n)]}


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain left/right aligned text table (numbers right-aligned)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio_line(label: str, value: float, target: str | None = None) -> str:
    shown = f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"
    text = f"ratio {label}: {shown}x"
    if target is not None:
        text += f"  (target {target})"
    return text


def python_info() -> str:
    return f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs"


def load_test_service(name: str) -> ModuleType:
    """Import ``tests/services/<name>.py`` by path (``tests/`` stays off sys.path)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "services" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tideflow_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
