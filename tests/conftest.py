"""Shared fixtures.  Broker fixtures: a real Mosquitto per test (see services/broker.py).

Tests that take a broker are skipped, with one line saying how to install it,
where the ``mosquitto`` binary is missing.  At the end pytest prints the
``tiers:`` line (see :mod:`services.tiers`): which tiers ran, and every skip
inside each, with its reason.  With ``CI`` set, a skip inside a tier this
machine can run fails the session, unless the test said the *machine* cannot
do it (:func:`services.tiers.machine_lacks`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from services import cgroups
from services.broker import INSTALL_HINT, Mosquitto, find_dynsec_plugin, find_mosquitto

# Property tests: a quick default, many more examples in CI (env CI set).
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _no_stray_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests stop by themselves: a task an agent left running when the test killed
    it (tasks live in sessions of their own, outside the agent's process group)
    is killed when the test ends, with its process group, found by the test's own
    directory in its argv."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None:
        kill_processes_mentioning(str(tmp))


def kill_processes_mentioning(text: str) -> None:
    needle = text.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                argv = handle.read()
        except OSError:
            continue
        if needle in argv:
            pid = int(entry.name)
            with contextlib.suppress(OSError):
                group = os.getpgid(pid)
                if group != os.getpgrp():  # its whole group: `sh -c '...; sleep 600'`'s sleep
                    os.killpg(group, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)


# Credentials of ``secure_mosquitto``: the operator is admin, each site user is
# confined to its own site's topics.
SECURE_USERS = {"operator": "operator-pw", "site-a": "site-a-pw", "site-b": "site-b-pw"}
SECURE_ACL_SITES = {"site-a": "a", "site-b": "b"}
SECURE_ADMINS = ["operator"]


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip(f"mosquitto binary not found; {INSTALL_HINT}")


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """An anonymous, persistent broker on a free loopback port, stopped afterwards."""
    _require_mosquitto()
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def secure_mosquitto() -> Iterator[Mosquitto]:
    """A broker with passwords, per-site ACLs and client ids; credentials in ``broker.users``."""
    _require_mosquitto()
    if find_dynsec_plugin() is None:  # Debian's mosquitto ships it (decision 0015)
        pytest.skip(f"mosquitto_dynamic_security.so not found; {INSTALL_HINT}")
    with Mosquitto(
        users=SECURE_USERS, acl_sites=SECURE_ACL_SITES, admin_users=SECURE_ADMINS
    ) as broker:
        yield broker


@pytest.fixture
def mosquitto_factory() -> Iterator[Callable[..., Mosquitto]]:
    """``make(**Mosquitto_kwargs)`` -> a started broker; all are closed afterwards."""
    _require_mosquitto()
    made: list[Mosquitto] = []

    def make(**kwargs: Any) -> Mosquitto:
        broker = Mosquitto(**kwargs)
        made.append(broker)
        return broker.start()

    yield make
    for broker in made:
        broker.close()


# -- Kubernetes: one real API server for the whole session (see services/kube.py) --------
#
# Tests that take ``envtest`` are marked ``envtest`` and skip, with one line saying how to
# provide the binaries, where kube-apiserver/etcd are missing.

from services import kube, rabbitmq  # noqa: E402
from services.tiers import TierLog  # noqa: E402

pytest_plugins = ["pytester"]

BROKER_FIXTURES = frozenset({"mosquitto", "secure_mosquitto", "mosquitto_factory"})
RABBITMQ_FIXTURES = frozenset({"rabbitmq_cluster", "rabbit"})

_TIER_LOG = TierLog()


@pytest.fixture(scope="session")
def envtest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kube.EnvtestCluster]:
    """A real kube-apiserver + etcd (RBAC on), shared by the whole session; stopped at the end.

    ``envtest.audit_log``: the API server's audit log of every ServiceAccount's requests.
    ``envtest.kubeconfig`` (admin, client cert), ``envtest.server``,
    ``envtest.kubectl(*args, input=None, check=True)``, ``envtest.api_client()``.
    Tests share the cluster: use names of their own (e.g. a fresh namespace).
    """
    reason = kube.missing_reason()
    if reason:
        pytest.skip(reason)
    args, audit_log = kube.audit_args(tmp_path_factory.mktemp("envtest-audit"))
    with kube.EnvtestCluster(extra_apiserver_args=args) as cluster:
        cluster.audit_log = audit_log  # type: ignore[attr-defined]
        _TIER_LOG.envtest_version = cluster.version
        yield cluster


@pytest.fixture(scope="session")
def rabbitmq_cluster() -> Iterator[rabbitmq.RabbitCluster]:
    """A real 3-node RabbitMQ cluster with its MQTT plugin, shared by the session (slow to start).

    Tests take a virtual host each (``rabbitmq_cluster.vhost()``, or the ``rabbit``
    fixture) so that sessions and retained messages never leak between them; a
    test that kills a node starts it again before it ends.
    """
    reason = rabbitmq.missing_reason()
    if reason:
        pytest.skip(reason)
    for attempt in range(3):
        # A node's ports are chosen free, then bound at start_app: in between, another
        # process (a parallel test's connection) can take one.  New ports, new cluster.
        try:
            cluster = rabbitmq.RabbitCluster(3).start()
            break
        except rabbitmq.RabbitError as exc:
            if "eaddrinuse" not in str(exc) or attempt == 2:
                raise
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def rabbit(rabbitmq_cluster: rabbitmq.RabbitCluster) -> Iterator[rabbitmq.Vhost]:
    """This test's vhost on the shared cluster; afterwards every node is running again."""
    yield rabbitmq_cluster.vhost()
    rabbitmq_cluster.ensure_running()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "envtest" in names and not item.get_closest_marker("envtest"):
            item.add_marker(pytest.mark.envtest)
        if names & BROKER_FIXTURES and not item.get_closest_marker("broker"):
            item.add_marker(pytest.mark.broker)
        if names & RABBITMQ_FIXTURES and not item.get_closest_marker("rabbitmq"):
            item.add_marker(pytest.mark.rabbitmq)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _TIER_LOG.collected(report)


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:  # what is left after deselection
        _TIER_LOG.selected(item)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _TIER_LOG.reported(report)


_CGROUP_CLEANUP: list[cgroups.SessionCleanup] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    if getattr(session.config, "workerinput", None) is None:  # not a pytest-xdist worker
        _CGROUP_CLEANUP.append(cgroups.SessionCleanup())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller judges
        workeroutput["envtest_version"] = _TIER_LOG.envtest_version
        return
    # Every worker has ended: the empty cgroups the session's agents left go.
    for cleanup in _CGROUP_CLEANUP:
        cleanup.finish()
    _TIER_LOG.judge(session)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: a worker's API server version reaches the controller's tiers line."""
    version = getattr(node, "workeroutput", {}).get("envtest_version", "?")
    if version != "?":
        _TIER_LOG.envtest_version = version


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in _TIER_LOG.summary_lines():
        terminalreporter.write_line(line)
