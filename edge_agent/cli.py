"""``tideflow-agent``'s entry point: stop signals held from its first line.

The commands themselves are in :mod:`edge_agent.commands` (exit codes there).
This module imports nothing heavy before :func:`edge_agent.stops.hold_early_stops`
has run: the agent's imports alone take half a second (more under load), and a
SIGTERM in that time (a rolling upgrade of a pod that just started) killed it
with exit 143 instead of the documented clean stop.  What remains is the
interpreter's own start, before this module's first line.

The commands' names (``build_parser``, ``config_from_args``, ...) are still
reachable here, as before the split.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from edge_agent import stops


def main(argv: Sequence[str] | None = None) -> int:
    stops.hold_early_stops()
    try:
        from edge_agent import commands

        return commands.main(argv)
    finally:
        # Whatever the command did not hand over to its loop: nothing more to stop.
        stops.release_early_stops(replay=False)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # (the import system asks for __path__ at every from-import)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from edge_agent import commands

    return getattr(commands, name)


if __name__ == "__main__":
    sys.exit(main())
