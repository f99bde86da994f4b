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

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
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


class Blackhole:
    """A loopback port that takes connections and never answers (a partitioned API
    server: its packets dropped, not refused)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.server.accept()[0])

    def close(self) -> None:
        self.server.close()
        for sock in self.held:
            sock.close()


def _lease_at(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LeaderLease:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))  # fmt: skip
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig)
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = config_from_args(
        build_parser().parse_args(["run", "--broker", "mqtt://127.0.0.1:1", "--leader-election"])
    )
    return LeaderLease(config)


def test_a_try_against_an_api_server_that_never_answers_ends_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Lease's calls had no time limit: a try against an API server that took the
    connection and never answered waited for ever, the election thread with it (a
    standby never took over; a leader never noticed it could not renew)."""
    hole = Blackhole()
    try:
        lease = _lease_at(f"http://127.0.0.1:{hole.port}", tmp_path, monkeypatch)
        monkeypatch.setattr("tideflow_operator.cli.LEASE_CALL_SECONDS", (0.5, 0.5))  # (quick)
        answers: list[bool] = []
        began = time.monotonic()
        trying = threading.Thread(
            target=lambda: answers.append(lease._election.try_acquire_or_renew()), daemon=True
        )
        trying.start()
        trying.join(timeout=25)
        # (Each call within its time limit; the client retries a read that timed out
        # three times: 4 x 5 s with the real limit.  A leader does not wait for it: its
        # watchdog ends it at the renew deadline, tests/integration/test_hostile_round19_cloud.)
        assert answers == [False], "the try still waits after 25 s"
        assert time.monotonic() - began < 5
    finally:
        hole.close()


def test_a_release_against_an_api_server_that_never_answers_ends_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Giving the Lease back at a stop (SIGTERM) had no time limit either: an API server
    that never answered kept the stopping operator alive until the kubelet killed it."""
    hole = Blackhole()
    try:
        lease = _lease_at(f"http://127.0.0.1:{hole.port}", tmp_path, monkeypatch)
        monkeypatch.setattr("tideflow_operator.cli.LEASE_CALL_SECONDS", (0.5, 0.5))  # (quick)
        lease._acquired.set()  # as if it had led until now
        done = threading.Event()
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="tideflow_operator.cli"):
            threading.Thread(target=lambda: (lease.release(), done.set()), daemon=True).start()
            assert done.wait(25), "the release still waits after 25 s"
        assert time.monotonic() - began < 5
        assert "could not release the leader lease" in caplog.text
    finally:
        hole.close()
