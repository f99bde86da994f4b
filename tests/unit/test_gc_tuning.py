"""Both daemons collect garbage less often than CPython's default (issue 15).

Proves: ``tideflow.gc_tuning.tune_gc`` moves what exists at start-up out of collection and raises
only the young generation's threshold (older generations keep theirs, cycles
are still collected), in a fresh interpreter; and ``tideflow-agent`` applies
it when it is about to run steps (``run``, ``run-local`` past their checks),
not for readers nor for refused flags or manifests.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import cli as agent_cli
from edge_agent import commands as agent_commands
from tideflow.gc_tuning import GC_YOUNG_THRESHOLD


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    code = (
        "import gc, json; from tideflow.gc_tuning import tune_gc; before = gc.get_threshold();"
        "tune_gc(); a = []; a.append(a); del a;"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), gc.collect()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, frozen, collected = json.loads(out.stdout)
    assert after == [GC_YOUNG_THRESHOLD, before[1], before[2]]
    assert frozen > 1000, "the imported modules' objects are out of collection"
    assert collected >= 1, "a cycle made afterwards is still collected"


@pytest.mark.parametrize(
    ("command", "tuned"),
    [("run-local", True), ("run-local-invalid", False), ("runs", False), ("run-bad-flags", False)],
)
def test_the_agent_tunes_gc_when_it_runs_steps(
    command: str, tuned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run-local with a valid manifest tunes it; readers and refused flags do not."""
    calls: list[str] = []
    # (the commands are in edge_agent.commands, behind cli's entry point)
    monkeypatch.setattr(agent_commands, "tune_gc", lambda: calls.append(command))
    before = gc.get_threshold()
    db = str(tmp_path / "site.db")
    manifest = tmp_path / "wf.yaml"
    manifest.write_text(
        "apiVersion: tideflow.io/v1alpha1\nkind: Workflow\nmetadata: {name: wf}\n"
        'spec: {tasks: [{name: a, command: ["true"]}]}\n'
        if command == "run-local"
        else "not: [a workflow\n"
    )
    argv = {
        "run-local": ["run-local", "--db", db, "--quiet", str(manifest)],
        "run-local-invalid": ["run-local", "--db", db, str(manifest)],
        "runs": ["runs", "--db", db],
        "run-bad-flags": ["run", "--site", "s", "--broker", "mqtt://a:1,,mqtt://b:2", "--db", db],
    }[command]
    code = agent_cli.main(argv)
    assert calls == ([command] if tuned else []), code
    assert code == 0 if tuned else code != 0
    assert gc.get_threshold() == before
