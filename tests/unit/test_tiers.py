"""The ``tiers:`` line tells the truth, and ``CI`` turns a skip in a runnable tier into a failure.

Each case runs pytest in a subprocess on a small suite laid out like ours
(``unit/``, ``integration/``) with this repository's ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from services.broker import find_mosquitto

TESTS = Path(__file__).resolve().parents[1]

UNIT_OK = "def test_ok():\n    assert 1 + 1 == 2\n"
MISSING_LIBRARY = (
    "import pytest\n"
    "lib = pytest.importorskip('tideflow_no_such_library', reason='no such library: pip install')\n"
    "def test_uses_it():\n    assert lib\n"
)
MACHINE_SKIP = (
    "from services.tiers import machine_lacks\n"
    "def test_needs_mount():\n    machine_lacks('mount permission')\n"
)
XFAIL = (
    "import pytest\n"
    "@pytest.mark.xfail(strict=True, reason='known defect')\n"
    "def test_known():\n    assert False\n"
)


def _suite(pytester: pytest.Pytester, **files: str) -> None:
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    for name, text in files.items():
        directory, _, module = name.partition("__")
        (pytester.path / directory).mkdir(exist_ok=True)
        (pytester.path / directory / f"{module}.py").write_text(text)


@pytest.fixture(params=["serial", "xdist"])
def workers(request: pytest.FixtureRequest) -> list[str]:
    """The suite runs under pytest-xdist in .ci/test: the line and the verdict must hold there."""
    return [] if request.param == "serial" else ["-n", "2"]


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: bool, workers: list[str]
) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *workers)


def _tiers_line(result: pytest.RunResult) -> str:
    lines = [line for line in result.outlines if line.startswith("tiers: ")]
    assert lines, result.stdout.str()
    return "\n".join(result.outlines[result.outlines.index(lines[0]) :])


def test_a_module_skipped_at_import_is_named_in_its_tier(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    _suite(pytester, unit__test_a=UNIT_OK, integration__test_charts=MISSING_LIBRARY)
    result = _run(pytester, monkeypatch, ci=False, workers=workers)
    assert result.ret == 0
    text = _tiers_line(result)
    assert "unit ran 1" in text
    assert "processes SKIPPED (1)" in text
    assert "no such library: pip install" in text
    assert "integration/test_charts.py" in text


def test_under_ci_a_skip_in_a_tier_the_machine_can_run_fails_the_session(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    _suite(pytester, unit__test_a=UNIT_OK, integration__test_charts=MISSING_LIBRARY)
    result = _run(pytester, monkeypatch, ci=True, workers=workers)
    text = _tiers_line(result)
    if find_mosquitto() is None:  # the tier cannot run here at all: its skip is honest
        assert result.ret == 0, text
        assert "mosquitto binary not found" in text
    else:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, text
        assert "FAILED the run" in text


def test_under_ci_a_skip_for_what_the_machine_lacks_is_allowed_and_xfail_is_not_a_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    _suite(pytester, unit__test_a=UNIT_OK, unit__test_x=XFAIL, integration__test_m=MACHINE_SKIP)
    result = _run(pytester, monkeypatch, ci=True, workers=workers)
    text = _tiers_line(result)
    assert result.ret == 0, text
    assert "unit ran 2" in text
    assert "this machine lacks mount permission" in text
    assert "FAILED" not in text


BROWSER_TEST = (
    "import pytest\n"
    "pytestmark = [pytest.mark.envtest, pytest.mark.browser]\n"
    "def test_page():\n    assert True\n"
)


def test_a_browser_test_counts_in_the_browser_tier(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    """The console's tests (marked ``browser``) have a tier of their own, serial or xdist."""
    _suite(pytester, unit__test_a=UNIT_OK, e2e__test_console=BROWSER_TEST)
    (pytester.path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    envtest: x\n    browser: x\n    broker: x\n"
    )
    result = _run(pytester, monkeypatch, ci=False, workers=workers)
    assert result.ret == 0, result.stdout.str()
    text = _tiers_line(result)
    assert "browser ran 1" in text and "envtest not selected" in text, text


CLUSTER_SKIP = (
    "import pytest\n"
    "@pytest.mark.rabbitmq\n"
    "def test_on_the_cluster():\n    pytest.skip('rabbitmq-server not found; install it')\n"
)


def test_a_rabbitmq_test_is_in_the_cluster_tier_and_ci_judges_it_by_rabbitmq(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    from services.rabbitmq import find_rabbitmq

    _suite(pytester, unit__test_a=UNIT_OK, integration__test_c=CLUSTER_SKIP)
    (pytester.path / "pytest.ini").write_text("[pytest]\nmarkers =\n    rabbitmq: x\n")
    result = _run(pytester, monkeypatch, ci=True, workers=workers)
    text = _tiers_line(result)
    assert "processes not selected" in text
    if find_rabbitmq() is None:  # the tier cannot run here: its skip is honest
        assert result.ret == 0, text
        assert "cluster SKIPPED (1): rabbitmq-server not found" in text
    else:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, text
        assert "cluster SKIPPED (1)" in text and "FAILED the run" in text
