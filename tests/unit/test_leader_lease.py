"""The leader Lease given back on a clean stop: never a crash on the way out.

The hand-over itself is proved against a real API server
(``tests/e2e/test_operator.py::test_a_stopped_leader_hands_its_lease_over_at_once``);
here the API server is unreachable when the operator stops (a partitioned
node, an API server restarting): the release is logged and skipped, and the
process exits as it would have without it.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import yaml

from tideflow_operator.cli import LeaderLease, build_parser, config_from_args


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def an_unreachable_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig naming a closed port, the one the client reads from now on (the
    operator refuses to start without one it can read)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{closed_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))  # fmt: skip
    # (The client reads $KUBECONFIG once, at import.)
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig)
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_a_release_with_the_api_server_unreachable_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    an_unreachable_cluster(tmp_path, monkeypatch)
    config = config_from_args(
        build_parser().parse_args(["run", "--broker", "mqtt://127.0.0.1:1", "--leader-election"])
    )
    lease = LeaderLease(config)
    lease._acquired.set()  # as if it had led until now
    with caplog.at_level(logging.WARNING, logger="tideflow_operator.cli"):
        lease.release()
    assert "could not release the leader lease" in caplog.text


def test_main_leaves_the_callers_sigterm_handler_as_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main() takes SIGTERM for its start-up (to give the Lease back); run inside
    another program (a test, an embedding), it left its own handler behind."""
    import signal
    from collections.abc import Coroutine
    from typing import Any

    from tideflow_operator import cli

    def no_operator(coro: Coroutine[Any, Any, None]) -> None:
        coro.close()

    an_unreachable_cluster(tmp_path, monkeypatch)
    monkeypatch.setattr(cli.asyncio, "run", no_operator)
    monkeypatch.setattr(cli, "tune_gc", lambda: None)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["run", "--broker", "mqtt://127.0.0.1:1", "--no-leader-election"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
