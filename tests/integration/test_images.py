"""The Dockerfiles build, and the images run as the README says: uid 10001, no pip, no compiler.

Built with whatever container builder the machine has running (``docker``,
else ``podman``); where there is none the tests skip saying so (the text of
the Dockerfiles is checked in ``test_charts.py`` regardless).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from services.tiers import machine_lacks

ROOT = Path(__file__).resolve().parents[2]


def _builder() -> str | None:
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if path and subprocess.run([path, "info"], capture_output=True, timeout=20,
                                   check=False).returncode == 0:  # fmt: skip
            return path
    return None


@pytest.fixture(scope="module")
def builder() -> str:
    found = _builder()
    if found is None:
        machine_lacks("a running container builder (docker or podman daemon)")
    return found


@pytest.fixture(params=["operator", "edge_agent"])
def image(request: pytest.FixtureRequest, builder: str) -> Iterator[tuple[str, str, str]]:
    directory = str(request.param)
    tag = f"tideflow-test-{directory.replace('_', '-')}:{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [builder, "build", "-f", str(ROOT / directory / "Dockerfile"), "-t", tag, str(ROOT)],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    yield builder, tag, directory
    subprocess.run([builder, "rmi", "-f", tag], capture_output=True, timeout=120, check=False)


def test_the_image_runs_as_uid_10001_without_pip_or_a_compiler(
    image: tuple[str, str, str],
) -> None:
    builder, tag, directory = image
    described = subprocess.run(
        [builder, "image", "inspect", tag], capture_output=True, text=True, timeout=60, check=True
    )
    inspected = json.loads(described.stdout)
    assert inspected[0]["Config"]["User"] in ("10001:10001", "10001")

    def inside(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([builder, "run", "--rm", "--network=none", "--entrypoint", argv[0],
                               tag, *argv[1:]], capture_output=True, text=True, timeout=120,
                              check=False)  # fmt: skip

    assert inside("id", "-u").stdout.strip() == "10001"
    found = inside("sh", "-c", "for c in pip pip3 gcc cc; do command -v $c; done; true")
    assert found.stdout.split() == [], f"found in the final image: {found.stdout}"
    assert inside("python3", "-m", "pip", "--version").returncode != 0, "pip is importable"
    cli = "tideflow-operator" if directory == "operator" else "tideflow-agent"
    assert inside(cli, "--help").returncode == 0
