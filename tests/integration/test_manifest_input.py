"""``tideflow-agent run-local`` against manifests a careless or hostile user writes.

Proves, with the real CLI as a subprocess: a manifest that is not UTF-8, that
repeats a YAML key, that is over the size limit, whose ``metadata.name`` is a
path, or that puts a template into ``sh -c`` exits 2 with a message naming
the file or the field, never a traceback, and runs nothing (no database is
created); and Argo's ``dag-diamond`` example, ported with its task names
``A``..``D`` unchanged, runs: A first, B and C after it, D last.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tideflow.manifest import MAX_MANIFEST_BYTES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MANIFEST = """\
apiVersion: tideflow.io/v1alpha1
kind: Workflow
metadata: {name: hostile}
spec:
  tasks:
    - name: a
      command: [echo, ok]
"""


def run_local(tmp_path: Path, manifest: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest)]
    argv += ["--db", str(tmp_path / "site.db")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_bytes(data)
    return path


CASES = {
    "not-utf8": (MANIFEST.replace("ok", "caf\xe9").encode("latin-1"), "not UTF-8"),
    "utf16": (MANIFEST.encode("utf-16"), "not UTF-8"),
    "duplicate-key": (
        (MANIFEST + "      command: [rm, -rf, /nonexistent]\n").encode(),
        "duplicate key 'command'",
    ),
    "oversized": (
        MANIFEST.encode() + b"#" * MAX_MANIFEST_BYTES,
        f"over the {MAX_MANIFEST_BYTES}-byte limit",
    ),
    "path-as-name": (
        MANIFEST.replace("{name: hostile}", "{name: '../../x y'}").encode(),
        "metadata.name: '../../x y' is not a Kubernetes object name",
    ),
    "template-in-sh-c": (
        MANIFEST.replace("[echo, ok]", "[sh, -c, 'echo {{workflow.uid}}']").encode(),
        "spec.tasks[0].command[2]: a template in the script of a shell's -c",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_manifest_exits_2_naming_the_problem(tmp_path: Path, case: str) -> None:
    data, fragment = CASES[case]
    result = run_local(tmp_path, write(tmp_path, data))
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert fragment in result.stderr, explain(result)
    assert "wf.yaml" in result.stderr
    assert not (tmp_path / "site.db").exists(), "nothing may run for an invalid manifest"


@pytest.mark.timeout(60)
def test_argo_dag_diamond_runs_unchanged(tmp_path: Path) -> None:
    example = EXAMPLES / "dag-diamond.yaml"
    tasks = yaml.safe_load(example.read_text())["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["A", "B", "C", "D"]
    assert [t.get("dependsOn", []) for t in tasks] == [[], ["A"], ["A"], ["B", "C"]]
    result = run_local(tmp_path, example)
    assert result.returncode == 0, explain(result)
    with sqlite3.connect(tmp_path / "site.db") as conn:
        rows = conn.execute("SELECT task, phase, started_at, finished_at FROM task_runs").fetchall()
    runs = {task: (phase, started, finished) for task, phase, started, finished in rows}
    assert {task: phase for task, (phase, _, _) in runs.items()} == dict.fromkeys(
        "ABCD", "Succeeded"
    )
    assert runs["B"][1] >= runs["A"][2] and runs["C"][1] >= runs["A"][2]
    assert runs["D"][1] >= max(runs["B"][2], runs["C"][2])
    db = str(tmp_path / "site.db")
    logs = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "logs", "--db", db, "dag-diamond", "D"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert logs.returncode == 0, explain(logs)
    assert "D" in logs.stdout.splitlines()[1:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("site", ["+", "x/y", "#", "Line-2"])
def test_agent_refuses_a_site_name_that_breaks_topics(tmp_path: Path, site: str) -> None:
    argv = [sys.executable, "-m", "edge_agent.cli", "run", "--site", site]
    argv += ["--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "site.db")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, explain(result)
    assert f"--site: {site!r} is not a valid site name" in result.stderr, explain(result)
    assert not (tmp_path / "site.db").exists()
