"""Round 19: the leader election's thread outlives an API server it cannot reach.

The Lease is renewed by the ``kubernetes`` library's election loop in a thread
of its own (``cli.LeaderLease``).  Its lock catches the API server's answers
(``ApiException``) but not a connection it cannot make: a refused or reset
connection (an API server restarting, a partitioned node) raised out of the
loop and ended the thread.  A standby then never took the Lease over, and a
leader stopped renewing it without exiting: when the Lease ran out, a standby
took it while the old leader went on acting, two active operators.  A try
that cannot reach the API server is now a failed try (said in the log), which
the loop retries: a standby keeps waiting, a leader keeps renewing, or exits
once its renew deadline passes, as on any failed renewal.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from test_leader_lease import an_unreachable_cluster

from tideflow_operator.cli import LeaderLease, build_parser, config_from_args


def _lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LeaderLease:
    an_unreachable_cluster(tmp_path, monkeypatch)
    config = config_from_args(
        build_parser().parse_args(["run", "--broker", "mqtt://127.0.0.1:1", "--leader-election"])
    )
    return LeaderLease(config)


def test_a_try_that_cannot_reach_the_api_server_is_a_failed_try_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lease = _lease(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="tideflow_operator.cli"):
        assert lease._election.try_acquire_or_renew() is False
    assert "leader lease" in caplog.text and "cannot reach" in caplog.text, caplog.text


def test_the_election_thread_goes_on_trying_while_the_api_server_is_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = _lease(tmp_path, monkeypatch)
    monkeypatch.setattr(lease._election.election_config, "retry_period", 0.1)
    failures: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    thread = threading.Thread(target=lease._election.run, daemon=True)
    thread.start()
    time.sleep(1.5)
    alive = thread.is_alive()
    lease.release()  # (its tries answer at once from now on; the daemon thread idles)
    assert alive, f"the election thread ended: {failures!r}"
    assert failures == []
