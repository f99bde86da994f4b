"""Named fail points: places in the product where a test can kill the process.

Crash tests that kill at a random moment mostly hit the idle gaps between
interesting moments.  A fail point names one such moment (an attempt's process
exited but its outcome is not committed; a record was sent but not acked) so a
test can stop the process exactly there, as etcd's gofail and TiKV's fail-rs
do.  Armed only through ``TIDEFLOW_FAILPOINTS`` in the process's environment,
read once at import: ``name`` kills at the first hit, ``name@N`` at the N-th;
``name=raise`` (or ``name@N=raise``) raises :class:`FailpointError` there
instead, for what must survive a bug rather than a crash (a supervised worker);
``name=term`` sends the process SIGTERM there, for what a stop request at that
moment must do (a rolling upgrade while the operator starts); ``name=int``
sends SIGINT (Ctrl-C) the same way, ``name=hup`` SIGHUP (a terminal closed).
The signal is sent to the process itself, synchronously: its Python handler
has run before the fail point returns.  ``name=term-swallowed``
(``int-swallowed``) sends it from inside a finalizer (``__del__``): an
exception its handler raises there is printed
("Exception ignored in") and dropped, as Python does in an at-fork hook or a
weakref callback; for what a stop must still do when its exception is lost.
Off, a fail point is one falsy check.
"""

from __future__ import annotations

import os
import signal

ENV = "TIDEFLOW_FAILPOINTS"


class FailpointError(RuntimeError):
    """Raised by a fail point armed with ``=raise``."""


def _parse(text: str) -> dict[str, int]:
    return {name: count for name, (count, _) in _parse_actions(text).items()}


def _parse_actions(text: str) -> dict[str, tuple[int, str]]:
    armed: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, action = item.partition("=")
        name, _, count = point.partition("@")
        hits = int(count) if count.isdigit() and int(count) > 0 else 1
        known = action.removesuffix(SWALLOWED) in _SIGNALS or action == "raise"
        armed[name] = (hits, action if known else "kill")
    return armed


_SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT, "hup": signal.SIGHUP}
SWALLOWED = "-swallowed"


class _SignalFromFinalizer:
    """Sends its signal from ``__del__``, where an exception is printed and ignored."""

    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)  # (os.kill runs the handler before it returns)


_armed = _parse_actions(os.environ.get(ENV, ""))


def failpoint(name: str) -> None:
    """At an armed point whose count is reached: SIGKILL this process, raise, or signal it."""
    if not _armed or name not in _armed:
        return
    hits, action = _armed[name]
    _armed[name] = (hits - 1, action)
    if hits - 1 > 0:
        return
    if action == "raise":
        raise FailpointError(f"fail point {name} armed to raise")
    if action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
        return
    if action.removesuffix(SWALLOWED) in _SIGNALS:
        _SignalFromFinalizer(_SIGNALS[action.removesuffix(SWALLOWED)])  # dropped: __del__ now
        return
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "FailpointError", "failpoint"]
