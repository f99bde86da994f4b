"""A Ctrl-C that Python swallows still stops the demo.

Proves: a SIGINT whose KeyboardInterrupt is raised where Python only prints
"Exception ignored in" (an at-fork hook of the ``logging`` module while the
demo starts an agent, a ``__del__``) still ends the story at its next poll,
with exit 130 and the "interrupted" line, instead of the story running on to
exit 0.  A story that is never interrupted still ends with its own code.
Started with SIGHUP ignored (``nohup``), the demo keeps it ignored: a SIGHUP
(the terminal closed) leaves the story running to its own code, as the edge
demo, the agent and the operator do.  (The demo put its stop handler on
every stop signal, ignored or not: ``nohup tideflow demo`` ended, 130, when
its terminal went away.)
The demo runs in a child process, since it makes itself a subreaper.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import io, signal, sys, time
    from tideflow.tools.demo.story import Demo

    class SwallowsInterrupt:
        def __del__(self):
            if SWALLOW:
                signal.raise_signal(signal.SIGINT)  # raised here, printed and ignored

    def story(self):
        SwallowsInterrupt()  # dropped at once: its __del__ runs now
        if NOHUP:
            signal.raise_signal(signal.SIGHUP)  # the terminal went away: ignored (nohup)
        self.wait_until("the next step", lambda snap: True, timeout=5)
        self.board.say("the story went on")
        return 0

    SWALLOW = sys.argv[1] == "swallow"
    NOHUP = sys.argv[1] == "nohup"
    if NOHUP:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it for the program
    Demo._story = story
    demo = Demo(ci=True, cluster="auto", keep=False, out=sys.stdout)
    sys.exit(demo.run())
    """
)


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_swallowed_ctrl_c_ends_the_story_at_its_next_poll_with_exit_130() -> None:
    result = _run("swallow")
    assert "Exception ignored in" in result.stderr, result.stderr  # the swallow happened
    assert result.returncode == 130, result.stdout + result.stderr
    assert "interrupted: stopping everything the demo started" in result.stdout
    assert "the story went on" not in result.stdout


def test_a_story_not_interrupted_ends_with_its_own_code() -> None:
    result = _run("plain")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the story went on" in result.stdout
    assert "interrupted" not in result.stdout


def test_a_sighup_ignored_from_the_start_stays_ignored_nohup() -> None:
    result = _run("nohup")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the story went on" in result.stdout
    assert "interrupted" not in result.stdout
