"""Stop signals (SIGINT, SIGTERM, SIGHUP): the loop's callback, and the executor told at once.

``loop.add_signal_handler`` hands a signal to its callback only at the loop's
next ``select``.  While the loop is busy (a step's outcome committing on it,
decision 0027), the step's asyncio task goes on: a chain's next step started
its process after the stop was asked for, to be killed at once and recorded
Interrupted (decision 0044).

So each stop signal also gets a Python-level handler that only calls
:meth:`Executor.note_stop_signal` (one attribute set).  Python runs it in the
main thread at the next bytecode boundary, busy loop or not.  asyncio still
gets the signal: CPython's C handler writes the signal's number to the wakeup
fd (``signal.set_wakeup_fd``, which ``add_signal_handler`` set) whatever
Python-level handler it trips; asyncio's own handler is a no-op installed for
that purpose alone (``_sighandler_noop`` in ``asyncio/unix_events.py``), and
the loop looks up its callback by signal number.  A second signal reaches the
callback as before; closing the loop puts the default handlers back.

Before that, from the first line of ``tideflow-agent`` (before it imports
the rest of itself, opens, migrates and checks its database, and resumes its
runs), a stop signal is held (:func:`hold_early_stops`): SIGTERM's default
action killed the agent there (exit 143, as if it crashed), where a stop
is documented as clean (the daemon 0, ``run-local`` 130).  The start-up asks
:func:`early_stop_requested` before it resumes anything, and
:func:`on_stop_signals` hands a signal held until then to its callback.  A
second one ends the process at once (exit 130).  This module imports
nothing heavy: it is loaded before the rest of the agent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from edge_agent.executor import Executor

# SIGHUP: the terminal that ran the agent went away (an ssh session dropped), or a
# stop that signals every process (systemd's SendSIGHUP); its default action ended
# the agent (exit 129) with its attempts running on, unwatched.  (The executor
# already counts a task killed by it as a stop's.)  One ignored from the start
# stays ignored: ``nohup tideflow-agent ...`` is started to survive a hangup.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: What a command stopped before its start finished says.
STOPPED_EARLY = "stopped before its start finished"
STOPPED_AT_ONCE = "stopped at once, before its start finished"
EXIT_STOPPED_AT_ONCE = 130

# The stop signals held since hold_early_stops (None: not holding), and the
# handlers it replaced.
_held: list[int] | None = None
_replaced: dict[int, Any] = {}


def hold_early_stops() -> None:
    """Hold stop signals until :func:`on_stop_signals` (or a release) takes over."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        return  # (signals are the main thread's: a test calling main from a thread)
    _held = []
    for sig in STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not signal.SIG_IGN:  # (a shell's background job ignores SIGINT)
            _replaced[sig] = handler
            signal.signal(sig, _hold)


def _hold(signum: int, _frame: FrameType | None) -> None:
    if _held is None:  # (released between the signal and this handler's turn)
        return
    if _held:
        # A second one: stop at once, as a second signal does later (what runs is
        # found Running by the next start, as after a crash; SQLite's writes are
        # safe to cut).  Not an exception: raised in the middle of a migration's
        # rollback or of an import, it ended in a traceback.
        with contextlib.suppress(OSError):
            os.write(2, f"tideflow-agent: second stop signal: {STOPPED_AT_ONCE}\n".encode())
        os._exit(EXIT_STOPPED_AT_ONCE)
    _held.append(signum)


def early_stop_requested() -> bool:
    """A stop signal arrived before the handlers of :func:`on_stop_signals`."""
    return bool(_held)


def release_early_stops(*, replay: bool) -> None:
    """Back to the default handlers (a command that has nothing to stop cleanly).

    ``replay``: a signal held meanwhile is sent again, to act as it would have
    (SIGTERM ends the process, SIGINT raises KeyboardInterrupt).
    """
    global _held
    if _held is None:
        return
    # The handlers first, the hold after: a signal whose handler runs meanwhile (one
    # that lands as they are changed) is still held, not dropped by _hold.
    for sig, handler in _replaced.items():
        if signal.getsignal(sig) is _hold:  # (not the loop's, if it took over)
            signal.signal(sig, handler)
    _replaced.clear()
    held, _held = _held, None
    if replay and held:
        os.kill(os.getpid(), held[0])


def on_stop_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None], executor: Executor
) -> None:
    """Call ``callback`` from ``loop`` on each stop signal; tell ``executor`` at once.

    A stop signal held since :func:`hold_early_stops` is handed over the same
    way (the executor told now, the callback at the loop's next turn).

    Raises as ``add_signal_handler`` does (NotImplementedError, RuntimeError off
    the main thread); then nothing of that signal is changed.
    """

    def noted(_signum: int, _frame: FrameType | None) -> None:
        executor.note_stop_signal()  # (nothing else: see the module's docstring)

    for sig in STOP_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
            continue  # (nohup)
        loop.add_signal_handler(sig, callback)
        signal.signal(sig, noted)
        signal.siginterrupt(sig, False)  # as asyncio set it (signal.signal clears SA_RESTART)
    global _held
    held, _held = _held, None
    _replaced.clear()
    if held:
        executor.note_stop_signal()
        loop.call_soon(callback)
