"""End-to-end fixtures: a World per test on the shared API server and its own broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from services.broker import Mosquitto
from services.world import World, install_crds


@pytest.fixture
def world(envtest: Any, mosquitto: Mosquitto, tmp_path: Path) -> Iterator[World]:
    install_crds(envtest)
    w = World(envtest, mosquitto, tmp_path)
    yield w
    w.close()
