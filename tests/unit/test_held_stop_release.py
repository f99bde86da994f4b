"""A stop signal held from the agent's first line is not lost as its hold ends.

``tideflow-agent`` holds stop signals from its first line
(:func:`edge_agent.stops.hold_early_stops`); a reader (``status``, ``logs``,
...) ends the hold at once and replays a held one, to end as it always did.
Its handler (``_hold``) never raises, so no stop can be swallowed the way an
exception raised in an at-fork hook or a finalizer is; but the release
cleared the hold before it put the default handlers back, and a signal whose
handler ran in between (one landing as the handlers are changed) found no
hold and was dropped: the reader ran on to exit 0.

Proves: a SIGINT that lands while the release puts the handlers back is
replayed (the reader ends with KeyboardInterrupt), and a hold released with
no signal ends quietly.  A child process, since the test changes the
process's signal handlers; the signal is sent from inside ``signal.signal``,
just before each handler is put back.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from edge_agent import stops

    real_signal = signal.signal
    sent = []

    def lands_as_the_handler_is_put_back(sig, handler):
        if SEND and not sent and handler is not stops._hold:
            sent.append(sig)
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs before kill returns
        return real_signal(sig, handler)

    SEND = sys.argv[1] == "send"
    stops.hold_early_stops()
    signal.signal = lands_as_the_handler_is_put_back
    try:
        stops.release_early_stops(replay=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    else:
        print("ran on", flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=30
    )


def test_a_stop_landing_as_the_hold_ends_is_replayed_not_dropped() -> None:
    result = _run("send")
    assert result.stdout.strip() == "interrupted", result


def test_a_hold_released_with_no_stop_ends_quietly() -> None:
    result = _run("quiet")
    assert result.stdout.strip() == "ran on", result
