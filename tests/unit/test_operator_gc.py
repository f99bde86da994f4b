"""The operator process collects garbage less often than CPython's default (issue 15).

Proves: ``tideflow-operator run`` applies ``tune_gc`` before it operates,
while a refused command line does not (what ``tune_gc`` does is proved in
``test_gc_tuning.py``, the agent's and the operator's one setting).
"""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from test_leader_lease import an_unreachable_cluster

from tideflow_operator import cli


@pytest.mark.parametrize(
    ("argv", "tuned"),
    [
        (["run", "--broker", "mqtt://127.0.0.1:1", "--no-leader-election"], True),
        (["run", "--broker", "mqtt://a:1,,mqtt://b:2", "--no-leader-election"], False),
    ],
    ids=["run", "refused-broker"],
)
def test_the_operator_tunes_gc_before_it_operates(
    argv: list[str], tuned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    an_unreachable_cluster(tmp_path, monkeypatch)
    calls: list[str] = []
    monkeypatch.setattr(cli, "tune_gc", lambda: calls.append("tuned"))

    def no_operator(coro: Coroutine[Any, Any, None]) -> None:
        calls.append("operate")
        coro.close()

    monkeypatch.setattr(cli.asyncio, "run", no_operator)
    code = cli.main(argv)
    assert calls == (["tuned", "operate"] if tuned else []), code
