"""Shared fixtures.  Broker fixtures: a real Mosquitto per test (see services/broker.py).

Tests that take a broker are skipped, with one line saying how to install it,
where the ``mosquitto`` binary is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from services.broker import INSTALL_HINT, Mosquitto, find_mosquitto

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
