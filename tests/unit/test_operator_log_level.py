"""The operator refuses a log level that logging does not know, in one line naming the option.

Proves: ``tideflow-operator --log-level LOUD run`` (or ``TIDEFLOW_LOG_LEVEL=LOUD``)
exits 2 with argparse's one line naming ``--log-level``, before it loads a
kubeconfig or takes a Lease; it ended in a ValueError traceback from
``logging`` once the logging was configured (found beside the agent's same
defect, hostile round 19).  A level in any case is taken.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_leader_lease import an_unreachable_cluster

from tideflow_operator import cli


@pytest.mark.parametrize("how", ["option", "environment"])
def test_an_unknown_log_level_is_exit_2_naming_the_option(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    an_unreachable_cluster(tmp_path, monkeypatch)
    argv = ["run", "--broker", "mqtt://127.0.0.1:1", "--no-leader-election"]
    if how == "option":
        argv = ["--log-level", "LOUD", *argv]
    else:
        monkeypatch.setenv("TIDEFLOW_LOG_LEVEL", "LOUD")
    monkeypatch.setattr(cli.asyncio, "run", lambda coro: pytest.fail("it operated"))
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--log-level" in err and "LOUD" in err and "Traceback" not in err, err


def test_a_log_level_in_lower_case_is_taken() -> None:
    args = cli.build_parser().parse_args(["--log-level", "debug", "run", "--broker", "mqtt://h:1"])
    assert args.log_level == "DEBUG"
