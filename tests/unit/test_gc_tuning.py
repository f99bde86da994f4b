"""The agent process collects garbage less often than CPython's default (issue 15).

Proves: ``tune_gc`` moves what exists at start-up out of collection and raises
only the young generation's threshold (older generations keep theirs, cycles
are still collected), in a fresh interpreter; and ``tideflow-agent`` applies
it for the commands that run steps (``run``, ``run-local``), not for readers.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import cli as agent_cli
from edge_agent.executor import GC_YOUNG_THRESHOLD


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    code = (
        "import gc, json; from edge_agent.executor import tune_gc; before = gc.get_threshold();"
        "tune_gc(); a = []; a.append(a); del a;"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), gc.collect()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, frozen, collected = json.loads(out.stdout)
    assert after == [GC_YOUNG_THRESHOLD, before[1], before[2]]
    assert frozen > 1000, "the imported modules' objects are out of collection"
    assert collected >= 1, "a cycle made afterwards is still collected"


@pytest.mark.parametrize(("command", "tuned"), [("run-local", True), ("runs", False)])
def test_the_agent_tunes_gc_for_the_commands_that_run_steps(
    command: str, tuned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(agent_cli, "tune_gc", lambda: calls.append(command))
    before = gc.get_threshold()
    argv = [command, "--db", str(tmp_path / "site.db")]
    if command == "run-local":
        argv.append(str(tmp_path / "missing.yaml"))  # refused before any database is opened
    agent_cli.main(argv)
    assert calls == ([command] if tuned else [])
    assert gc.get_threshold() == before
