"""Named fail points: places in the product where a test can kill the process.

Crash tests that kill at a random moment mostly hit the idle gaps between
interesting moments.  A fail point names one such moment (an attempt's process
exited but its outcome is not committed; a record was sent but not acked) so a
test can stop the process exactly there, as etcd's gofail and TiKV's fail-rs
do.  Armed only through ``TIDEFLOW_FAILPOINTS`` in the process's environment,
read once at import: ``name`` kills at the first hit, ``name@N`` at the N-th.
Off, a fail point is one falsy check.
"""

from __future__ import annotations

import os
import signal

ENV = "TIDEFLOW_FAILPOINTS"


def _parse(text: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition("@")
        armed[name] = int(count) if count.isdigit() and int(count) > 0 else 1
    return armed


_armed = _parse(os.environ.get(ENV, ""))


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if ``name`` is armed and its count is reached."""
    if not _armed or name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "failpoint"]
