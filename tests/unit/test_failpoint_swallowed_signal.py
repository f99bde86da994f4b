"""The fail point action that sends a stop signal whose exception Python swallows.

Proves: ``name=term-swallowed`` (``int-swallowed``) runs the process's own
handler for SIGTERM (SIGINT) inside a finalizer, where the exception it raises
is printed ("Exception ignored in") and dropped, and the code after the fail
point runs on, as after a signal that landed in an at-fork hook; plain
``name=term`` still raises out of the fail point.  Tests of a lost stop (the
operator's start-up) rely on exactly this.  A child process, since the
failpoints are read from the environment at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import signal
    from tideflow.failpoints import failpoint

    class Stopped(KeyboardInterrupt):
        pass

    def handler(signum, frame):
        print("handler", signal.Signals(signum).name, flush=True)
        raise Stopped

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        failpoint("here")
        print("ran on", flush=True)
    except Stopped:
        print("raised", flush=True)
    """
)


def _run(action: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIDEFLOW_FAILPOINTS": f"here={action}"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(("action", "name"), [("term", "SIGTERM"), ("int", "SIGINT")])
def test_a_swallowed_signal_runs_the_handler_and_the_code_runs_on(action: str, name: str) -> None:
    result = _run(f"{action}-swallowed")
    assert result.stdout.splitlines() == [f"handler {name}", "ran on"], result
    assert "Exception ignored in" in result.stderr, result.stderr


def test_a_plain_signal_still_raises_out_of_the_fail_point() -> None:
    result = _run("term")
    assert result.stdout.splitlines() == ["handler SIGTERM", "raised"], result
