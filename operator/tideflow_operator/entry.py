"""``tideflow-operator``'s entry point: stop signals held from its first line.

The command itself is :func:`tideflow_operator.cli.main`.  This module imports
only :mod:`tideflow_operator.stops` (and :mod:`tideflow.failpoints`) before it
holds SIGTERM, SIGINT and SIGHUP: importing kopf and the Kubernetes client
takes a second of CPU, and a SIGTERM in that time killed the operator, or, as
the container's PID 1, was thrown away and the operator took the Lease anyway
(see :mod:`tideflow_operator.stops`).  What remains is the interpreter's own
start, before this module's first line.  ``python -m tideflow_operator.cli``
still works, holding stops from its ``main`` on.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tideflow.failpoints import failpoint
from tideflow_operator.stops import StartupStops


def main(argv: Sequence[str] | None = None) -> int:
    stops = StartupStops(raising=False)
    stops.install()
    try:
        failpoint("operator-importing")  # (kopf and the API client not imported yet)
        from tideflow_operator import cli

        return cli.main(argv, stops)
    finally:
        stops.restore()


if __name__ == "__main__":
    sys.exit(main())
