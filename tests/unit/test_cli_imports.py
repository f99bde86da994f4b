"""``tideflow render`` loads the contract only: the demo's tooling is imported when it runs.

Proves: in a fresh interpreter, importing ``tideflow.cli``, building its
parser (which lists ``demo`` and its options) and rendering a workflow file
imports no launcher (``tideflow.tools.launchers``), not the demo's story, not
``cryptography`` (the ``demo`` extra), nor the Kubernetes client, the operator
or the agent — and the render still prints the manifest.  ``tideflow demo
--help`` works the same way, without the story.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fan_out_fan_in.py"

FORBIDDEN = (
    "tideflow.tools.launchers",
    "tideflow.tools.demo.story",
    "cryptography",
    "kubernetes",
    "tideflow_operator",
    "edge_agent",
)

PROBE = """
import contextlib, io, json, sys
from tideflow import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "out": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def _probe(tmp_path: Path, *argv: str) -> dict[str, object]:
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return found


def _loaded(modules: object, prefix: str) -> list[str]:
    assert isinstance(modules, list)
    return [m for m in modules if m == prefix or m.startswith(prefix + ".")]


def test_render_imports_no_launcher_and_no_demo_dependency(tmp_path: Path) -> None:
    found = _probe(tmp_path, "render", str(EXAMPLE))
    assert found["code"] == 0
    assert "kind: Workflow" in str(found["out"])
    assert "tideflow.cli" in found["modules"]  # type: ignore[operator]
    for prefix in FORBIDDEN:
        assert _loaded(found["modules"], prefix) == [], prefix


def test_demo_help_lists_its_options_without_loading_the_story(tmp_path: Path) -> None:
    env = dict(os.environ)
    probe = (
        "import sys\nfrom tideflow import cli\n"
        "try:\n    cli.main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('tideflow.tools', 'cryptography'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--cluster {auto,current,envtest}" in result.stdout
    assert result.stdout.splitlines()[-1] == "['tideflow.tools', 'tideflow.tools.demo']"
