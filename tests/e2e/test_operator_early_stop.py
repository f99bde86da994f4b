"""A stop in the operator's first second ends it before the Lease, as PID 1 too.

The operator turned stop signals into its clean stop (the Lease given back,
exit 0) only from the middle of ``main``: after the imports of kopf and the
Kubernetes client (a second of CPU, six on a loaded node), the arguments, the
broker files' checks and the ports.  Before that a SIGTERM (a rolling upgrade
of a pod that just started) killed it, exit -15; and to the container's PID 1,
which the kernel gives no default action, it was thrown away: the operator
took the Lease and acted until the kubelet's SIGKILL, and the next one waited
out the Lease.  The image's entry point (``tideflow-operator``, now
:mod:`tideflow_operator.entry`) holds the stops from its first line;
``python -m tideflow_operator.cli`` from its ``main`` on.

Proves, with the real command against a real API server, each stop sent by
the process to itself at the moment under test (fail points ``=term``,
``=int``, ``=hup``):

* while the arguments are read (``operator-args-read``): SIGTERM and SIGHUP
  end it with 0, Ctrl-C with 130, the Lease never taken;
* the same as PID 1 of a PID namespace of its own (``unshare --pid``, as a
  container runtime starts it), and during the imports
  (``operator-importing``, the entry point): 0, the Lease never taken.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from services.world import OperatorProcess, World

pytestmark = pytest.mark.envtest

CODES = {"term": 0, "hup": 0, "int": 130}
NAMES = {"term": "SIGTERM", "hup": "SIGHUP", "int": "SIGINT"}
ENTRY = [sys.executable, "-m", "tideflow_operator.entry"]


def _as_pid1(command: list[str]) -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not found")
    probe = subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not allowed here: {probe.stderr.strip()}")
    return [unshare, "--pid", "--fork", "--kill-child", *command]


def _assert_stopped_before_the_lease(op: OperatorProcess, sig: str, code: int | None) -> None:
    log = op.log_text()
    assert code is not None, f"{NAMES[sig]} while starting: the operator ran on\n{log[-3000:]}"
    assert code == CODES[sig], (code, log[-3000:])
    if sig != "int":
        assert f"stopped by {NAMES[sig]} while starting" in log, log[-3000:]
    assert "leader lease acquired" not in log, log[-3000:]
    assert "this replica is active" not in log


@pytest.mark.parametrize("sig", ["term", "hup", "int"])
def test_a_stop_while_the_arguments_are_read_ends_it_before_the_lease(
    world: World, sig: str
) -> None:
    op = world.operator(
        "--leader-election", env={"TIDEFLOW_FAILPOINTS": f"operator-args-read={sig}"}
    )
    _assert_stopped_before_the_lease(op, sig, op.ended(30))


@pytest.mark.parametrize(
    ("point", "command"),
    [("operator-args-read", None), ("operator-importing", ENTRY)],
    ids=["args-read", "importing"],
)
def test_a_sigterm_to_pid_1_while_it_starts_ends_it_before_the_lease(
    world: World, point: str, command: list[str] | None
) -> None:
    launcher = _as_pid1(command or [sys.executable, "-m", "tideflow_operator.cli"])
    op = world.operator(
        "--leader-election", env={"TIDEFLOW_FAILPOINTS": f"{point}=term"}, command=launcher
    )
    _assert_stopped_before_the_lease(op, "term", op.ended(30))


def test_the_console_script_is_the_entry_point_that_holds_stops_first() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tideflow-operator"]
    assert script.value == "tideflow_operator.entry:main"
    probe = (
        "import sys, tideflow_operator.entry; "
        "print(sorted(m for m in ('kopf', 'kubernetes', 'tideflow_operator.cli') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
