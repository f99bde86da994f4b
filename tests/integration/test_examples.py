"""Every example manifest really runs: ``tideflow-agent run-local`` as a subprocess.

Proves: each ``examples/*.yaml`` succeeds on this machine with only Debian's
``sh``, ``sleep``, ``echo`` and ``python3`` (placement is ignored by
``run-local``); the fan-out/fan-in runs its 50 tasks with concurrency 4 and
its merge checks the total; the retry showcase succeeds *because of* its
retries (the attempt counts are the ones it was written to need); the nightly
ETL loads its report, and with ``fail_load=yes`` fails (exit 1) after the
load wrote into the warehouse, after which the compensation tasks ran and
removed what was loaded.  Files the examples write go to the test's own
folder (the ``data_dir`` parameter is pointed there).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONCURRENCY = {"fan-out-fan-in.yaml": 4}


def run_local(
    tmp_path: Path, example: str, params: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / example).read_text())
    spec_params = manifest["spec"].setdefault("params", {})
    if "data_dir" in spec_params:
        spec_params["data_dir"] = str(tmp_path / "data")
    spec_params.update(params or {})
    path = tmp_path / example
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    argv = [sys.executable, "-m", "edge_agent.cli", "run-local", str(path)]
    argv += ["--db", str(tmp_path / "site.db")]  # absolute: tasks run in scratch folders
    if example in CONCURRENCY:
        argv += ["--concurrency", str(CONCURRENCY[example])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def task_runs(tmp_path: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(tmp_path / "site.db") as conn:
        rows = conn.execute("SELECT task, phase, attempt FROM task_runs").fetchall()
    return {task: (phase, attempt) for task, phase, attempt in rows}


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


# Examples with a test of their own below; every other manifest gets the generic one.
OWN_TESTS = {"fan-out-fan-in.yaml", "retry-and-timeout.yaml", "nightly-etl.yaml"}


def test_the_examples_with_own_tests_exist() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} >= OWN_TESTS


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "example",
    sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name not in OWN_TESTS),
    ids=lambda name: name,
)
def test_example_runs_to_success(tmp_path: Path, example: str) -> None:
    result = run_local(tmp_path, example)
    assert result.returncode == 0, explain(result)
    assert "Succeeded" in result.stdout.splitlines()[-1]
    manifest = yaml.safe_load((EXAMPLES / example).read_text())
    runs = task_runs(tmp_path)
    for task in manifest["spec"]["tasks"]:
        assert runs[task["name"]][0] == "Succeeded", (task["name"], explain(result))
    for task in manifest["spec"].get("onFailure", []):
        assert runs[task["name"]][0] == "Skipped", task["name"]


@pytest.mark.timeout(60)
def test_fan_out_fan_in_merges_all_fifty(tmp_path: Path) -> None:
    result = run_local(tmp_path, "fan-out-fan-in.yaml")
    assert result.returncode == 0, explain(result)
    runs = task_runs(tmp_path)
    assert len(runs) == 50
    assert all(phase == "Succeeded" for phase, _ in runs.values()), explain(result)
    with sqlite3.connect(tmp_path / "site.db") as conn:
        (outputs,) = conn.execute("SELECT outputs FROM task_runs WHERE task='merge'").fetchone()
    n = 48 * 1000
    assert f'"total": "{n * (n - 1) // 2}"' in outputs


@pytest.mark.timeout(60)
def test_retry_showcase_succeeds_because_of_its_retries(tmp_path: Path) -> None:
    result = run_local(tmp_path, "retry-and-timeout.yaml")
    assert result.returncode == 0, explain(result)
    assert task_runs(tmp_path) == {
        "flaky-upload": ("Succeeded", 3),
        "hung-sensor": ("Succeeded", 2),
        "oom-victim": ("Succeeded", 2),
        "slow-aggregate": ("Succeeded", 1),
        "report": ("Succeeded", 1),
    }
    assert "timed out after 1s; process group killed" in result.stdout
    assert "killed by signal SIGKILL" in result.stdout


@pytest.mark.timeout(60)
def test_nightly_etl_loads_the_report(tmp_path: Path) -> None:
    result = run_local(tmp_path, "nightly-etl.yaml")
    assert result.returncode == 0, explain(result)
    runs = task_runs(tmp_path)
    assert all(runs[t] == ("Succeeded", 1) for t in ("prepare", "transform", "load", "cleanup"))
    assert runs["rollback"][0] == runs["notify"][0] == "Skipped"
    report = tmp_path / "data" / "warehouse" / "report-2026-11-26.csv"
    assert len(report.read_text().splitlines()) == 41  # header + 40 SKUs
    assert not (tmp_path / "data" / "2026-11-26" / "staging").exists()  # cleanup ran


@pytest.mark.timeout(60)
def test_nightly_etl_failure_is_compensated(tmp_path: Path) -> None:
    result = run_local(tmp_path, "nightly-etl.yaml", {"fail_load": "yes"})
    assert result.returncode == 1, explain(result)
    runs = task_runs(tmp_path)
    assert runs["load"] == ("Failed", 2)  # retried once, as its policy says
    assert runs["publish"][0] == runs["cleanup"][0] == "Skipped"
    assert runs["rollback"] == ("Succeeded", 1)
    assert runs["notify"] == ("Succeeded", 1)
    batch_dir = tmp_path / "data" / "2026-11-26"
    assert (batch_dir / "ROLLED_BACK").read_text() == "rolled back batch 2026-11-26\n"
    assert list((tmp_path / "data" / "warehouse").iterdir()) == []  # the load was undone
    assert not (batch_dir / "staging").exists()
