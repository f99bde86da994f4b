"""Shared fixtures.  Broker fixtures: a real Mosquitto per test (see services/broker.py).

Tests that take a broker are skipped, with one line saying how to install it,
where the ``mosquitto`` binary is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from services.broker import INSTALL_HINT, Mosquitto, find_mosquitto

# Property tests: a quick default, many more examples in CI (env CI set).
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

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
    """A broker with passwords and per-site ACLs; credentials in ``broker.users``."""
    _require_mosquitto()
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
# provide the binaries, where kube-apiserver/etcd are missing.  At the end pytest prints
# which tiers ran: unit, broker (tests taking a Mosquitto fixture) and envtest.

from services import kube  # noqa: E402

BROKER_FIXTURES = frozenset({"mosquitto", "secure_mosquitto", "mosquitto_factory"})


class _TierLog:
    """What each tier did this session, for the ``tiers:`` line at the end."""

    names = ("unit", "broker", "envtest")

    def __init__(self) -> None:
        self.of: dict[str, tuple[str, ...]] = {}  # nodeid -> tiers
        self.ran = dict.fromkeys(self.names, 0)
        self.skip_reason: dict[str, str] = {}
        self.envtest_version = "?"

    def selected(self, tier: str) -> bool:
        return any(tier in tiers for tiers in self.of.values())


_TIER_LOG = _TierLog()


@pytest.fixture(scope="session")
def envtest() -> Iterator[kube.EnvtestCluster]:
    """A real kube-apiserver + etcd (RBAC on), shared by the whole session; stopped at the end.

    ``envtest.kubeconfig`` (admin, client cert), ``envtest.server``,
    ``envtest.kubectl(*args, input=None, check=True)``, ``envtest.api_client()``.
    Tests share the cluster: use names of their own (e.g. a fresh namespace).
    """
    reason = kube.missing_reason()
    if reason:
        pytest.skip(reason)
    with kube.EnvtestCluster() as cluster:
        _TIER_LOG.envtest_version = cluster.version
        yield cluster


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "envtest" in names and not item.get_closest_marker("envtest"):
            item.add_marker(pytest.mark.envtest)
        if names & BROKER_FIXTURES and not item.get_closest_marker("broker"):
            item.add_marker(pytest.mark.broker)


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:  # what is left after deselection
        tiers = [t for t in ("broker", "envtest") if item.get_closest_marker(t)]
        if "tests/unit/" in item.path.as_posix():
            tiers.insert(0, "unit")
        _TIER_LOG.of[item.nodeid] = tuple(tiers)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for tier in _TIER_LOG.of.get(report.nodeid, ()):
        if report.when == "call" or (report.when == "setup" and report.failed):
            _TIER_LOG.ran[tier] += 1
        elif report.skipped and tier not in _TIER_LOG.skip_reason:
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            _TIER_LOG.skip_reason[tier] = reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    log = _TIER_LOG
    parts = []
    for tier in log.names:
        if log.ran[tier]:
            detail = {
                "broker": f" (mosquitto found: {find_mosquitto()})",
                "envtest": f" (kube-apiserver {log.envtest_version})",
            }.get(tier, "")
            parts.append(f"{tier} ran{detail}")
        elif tier in log.skip_reason:
            parts.append(f"{tier} SKIPPED: {log.skip_reason[tier]}")
        elif log.selected(tier):
            parts.append(f"{tier} did not run")
        else:
            parts.append(f"{tier} not selected")
    terminalreporter.write_line("tiers: " + "; ".join(parts))
