"""The repository root is safe on ``sys.path`` (decision 0010).

``operator/`` is a plain folder holding the package ``tideflow_operator``; with
an ``__init__.py`` at ``operator/`` every ``python -m ...`` run from the root
shadowed the standard library's ``operator`` module.  These run Python from the
root exactly as a newcomer would, without ``PYTHONSAFEPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _from_root(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def test_no_top_level_folder_is_a_package_named_like_a_stdlib_module() -> None:
    shadowing = sorted(
        path.name
        for path in ROOT.iterdir()
        if (path / "__init__.py").exists() and path.name in sys.stdlib_module_names
    )
    assert shadowing == [], f"top-level packages named like stdlib modules: {shadowing}"


def test_python_dash_m_from_the_root_gets_the_stdlib_operator_and_the_operator_package() -> None:
    probe = (
        "import sys, operator, tideflow_operator.cli; "
        f"assert sys.path[0] in ('', {str(ROOT)!r}), sys.path[0]; "
        "print(operator.eq(1, 1), operator.__file__, tideflow_operator.cli.__file__)"
    )
    result = _from_root("-c", probe)
    assert result.returncode == 0, result.stderr
    ok, stdlib_file, package_file = result.stdout.split()
    assert ok == "True"
    assert not stdlib_file.startswith(str(ROOT)), stdlib_file
    assert package_file == str(ROOT / "operator" / "tideflow_operator" / "cli.py")


def test_a_module_run_with_dash_m_from_the_root_imports(tmp_path: Path) -> None:
    # `python -m` prepends the current directory: the case that used to break.
    result = _from_root("-m", "tideflow_operator.cli", "--help")
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout


def test_test_modules_have_unique_names_across_the_tiers() -> None:
    # The test folders are not packages: pytest imports each file by its base
    # name, and a second tests/*/test_x.py stops the whole run's collection.
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
