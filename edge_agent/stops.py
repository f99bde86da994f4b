"""Stop signals (SIGINT, SIGTERM): the loop's callback, and the executor told at once.

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
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType

from edge_agent.executor import Executor

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None], executor: Executor
) -> None:
    """Call ``callback`` from ``loop`` on each stop signal; tell ``executor`` at once.

    Raises as ``add_signal_handler`` does (NotImplementedError, RuntimeError off
    the main thread); then nothing of that signal is changed.
    """

    def noted(_signum: int, _frame: FrameType | None) -> None:
        executor.note_stop_signal()  # (nothing else: see the module's docstring)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)
        signal.signal(sig, noted)
        signal.siginterrupt(sig, False)  # as asyncio set it (signal.signal clears SA_RESTART)
