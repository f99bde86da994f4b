"""The operator process collects garbage less often than CPython's default (issue 15).

Proves: the bridge's ``tune_gc`` moves what exists at start-up out of
collection and raises only the young generation's threshold (cycles are still
collected), in a fresh interpreter; and ``tideflow-operator run`` applies it
before it operates, while a refused command line does not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any

import pytest

from tideflow_operator import cli
from tideflow_operator.bridge import GC_YOUNG_THRESHOLD


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    code = (
        "import gc, json; from tideflow_operator.bridge import tune_gc;"
        "before = gc.get_threshold(); tune_gc(); a = []; a.append(a); del a;"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), gc.collect()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, frozen, collected = json.loads(out.stdout)
    assert after == [GC_YOUNG_THRESHOLD, before[1], before[2]]
    assert frozen > 1000, "the imported modules' objects are out of collection"
    assert collected >= 1, "a cycle made afterwards is still collected"


@pytest.mark.parametrize(
    ("argv", "tuned"),
    [
        (["run", "--broker", "mqtt://127.0.0.1:1", "--no-leader-election"], True),
        (["run", "--broker", "mqtt://a:1,,mqtt://b:2", "--no-leader-election"], False),
    ],
    ids=["run", "refused-broker"],
)
def test_the_operator_tunes_gc_before_it_operates(
    argv: list[str], tuned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cli, "tune_gc", lambda: calls.append("tuned"))

    def no_operator(coro: Coroutine[Any, Any, None]) -> None:
        calls.append("operate")
        coro.close()

    monkeypatch.setattr(cli.asyncio, "run", no_operator)
    code = cli.main(argv)
    assert calls == (["tuned", "operate"] if tuned else []), code
