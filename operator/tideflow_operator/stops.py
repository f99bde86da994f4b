"""The operator's stop signals during start-up, from the entry point's first line.

Why a module of its own: it imports nothing but :mod:`signal`, so the entry
point (:mod:`tideflow_operator.entry`) can put these handlers in place before
it imports kopf and the Kubernetes client, which take a second of CPU (six on
a loaded node).  In that time a SIGTERM (a rolling upgrade of a pod that just
started) killed the operator, or, to the container's PID 1, which the kernel
gives no default action, was thrown away: the operator went on to take the
Lease and act until the kubelet's SIGKILL, and the next one waited out the
Lease.  Until :meth:`StartupStops.arm` a stop is only noted; from there
:mod:`tideflow_operator.cli` unwinds start-up with it to the Lease's release.
"""

from __future__ import annotations

import signal
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP before the event loop has the signals: unwinds start-up like Ctrl+C."""

    def __init__(self, sig: signal.Signals = signal.SIGTERM) -> None:
        super().__init__(sig.name)
        self.sig = sig


class StartupStops:
    """The stop signals (SIGTERM, SIGINT, SIGHUP) until the event loop takes them: each one
    noted, then raised (:class:`Terminated`, KeyboardInterrupt) to unwind start-up
    to the Lease's release.

    Noted first: where the handler runs inside an at-fork hook, a ``__del__`` or a
    weakref callback, Python prints the exception ("Exception ignored in") and
    drops it.  The stop was then lost for good (the handler had set SIGTERM to be
    ignored): the operator took the Lease and acted, deaf to the kubelet's
    SIGTERM, until its SIGKILL.  Now :meth:`check` raises it again wherever
    start-up passes or waits: while a standby waits for the Lease, once it is
    taken, and once the event loop has the signals (``operate``).  A second
    signal is only noted: raised in the middle of the release, it cut it short.
    One ignored from the start (a shell's background job, ``nohup``) stays so.

    SIGHUP is a stop as SIGTERM is (the agent's too, :mod:`edge_agent.stops`):
    its default action killed the operator, exit -1, with the Lease held, and a
    standby waited it out.  kopf takes SIGTERM and SIGINT on its loop, never
    SIGHUP: the loop's handler that ``operate`` adds for it stays.
    """

    def __init__(self, *, raising: bool = True) -> None:
        # Not raising (the entry point, before the heavy imports): a stop is only
        # noted, to be raised by :meth:`arm` where start-up can unwind it.
        self.raising = raising
        self.installed = False
        self.noted: signal.Signals | None = None
        self.signals: list[signal.Signals] = []  # ours to handle (not ignored)
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        self.installed = True
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            handler = signal.getsignal(sig)
            if sig != signal.SIGTERM and handler is signal.SIG_IGN:
                continue
            self._previous[sig] = handler
            self.signals.append(sig)
            signal.signal(sig, self._handle)

    def ignore(self) -> None:
        """While the Lease is given back: a second stop must not cut the release.  (Once
        kopf ran, closing its event loop had put the default handlers back: SIGTERM
        killed the process there with the Lease held, SIGINT cut the release.)"""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """The handlers found at :meth:`install` (main may run inside another program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.noted is not None:
            return  # (the first is being raised, or will be at the next check)
        self.noted = signal.Signals(signum)
        if self.raising:
            self.check()

    def arm(self) -> None:
        """From here a stop is raised: the one noted meanwhile at once."""
        self.raising = True
        self.check()

    def check(self) -> None:
        """Raise the stop noted (it may have been dropped where it was first raised)."""
        if self.noted in (signal.SIGTERM, signal.SIGHUP):
            raise Terminated(self.noted)
        if self.noted is not None:
            raise KeyboardInterrupt


__all__ = ["StartupStops", "Terminated"]
