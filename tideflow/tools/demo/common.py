"""What the parts of ``tideflow demo`` share: its names, limits, commands and manifests.

Kept apart from the story so that the live table, the witness and the verdict
can be read (and tested) without the process supervision around them.  The
manifests are package data (``importlib.resources``), so the demo finds them
in an installed wheel, from any directory, not only next to a source tree.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from tideflow.spec import API_GROUP
from tideflow.spec import VERSION as SPEC_VERSION
from tideflow.tools import DEMO_EXTRA_HINT

NAMESPACE = "tideflow-demo"
GROUP, VERSION = API_GROUP, SPEC_VERSION
SITES = ("site-a", "site-b")
CUT_SITE = "site-b"
KILL_TASK = "aggregate"  # site B's task that is running when its agent is killed
KILL_AFTER_SECONDS = 1.0  # ... this long into it (the task sleeps 9 s before its journal line)
CI_BUDGET_SECONDS = 165.0
POLL_SECONDS = 0.25
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130

AGENT = [sys.executable, "-m", "edge_agent.cli"]
OPERATOR = [sys.executable, "-m", "tideflow_operator.cli"]
MANIFESTS = "manifests"  # a folder of this package; examples/demo-site-*.yaml link here


class DemoError(Exception):
    """A step of the story did not happen; the message says which (and shows log tails)."""


def manifest_name(site: str) -> str:
    return f"demo-{site}.yaml"


@contextlib.contextmanager
def manifest_file(site: str) -> Iterator[Path]:
    """A real file holding the demo's Workflow for ``site`` (from the installed package)."""
    resource = resources.files(__package__ or "tideflow.tools.demo") / MANIFESTS
    resource = resource / manifest_name(site)
    if not resource.is_file():
        raise DemoError(
            f"the demo's manifest {MANIFESTS}/{manifest_name(site)} is missing from the "
            f"installed package tideflow.tools.demo (reinstall: {DEMO_EXTRA_HINT})"
        )
    with resources.as_file(resource) as path:
        yield path
