"""A worker of the operator that dies stops the operator: it never limps on.

The operator's background workers (the bridge's inbox, housekeeping) are
supervised (``tideflow.aiotasks.Supervisor``).  A fail point armed to raise
inside one of them, outside its own error handling, stands for a bug: the
operator process must log the cause and exit non-zero promptly, so that its
Deployment restarts it, rather than keep running with the worker gone (a
silent operator: Workflows stay Assigned, acks stop, nothing says why).
"""

from __future__ import annotations

import pytest
from services.agent import wait_for
from services.world import World, sample_tasks, site_name, spec_for

pytestmark = pytest.mark.envtest


@pytest.mark.parametrize(
    ("point", "task"),
    [("housekeeping=raise", "housekeeping"), ("bridge-inbox=raise", "bridge-inbox")],
)
def test_a_dead_worker_stops_the_operator_with_its_cause(
    world: World, point: str, task: str
) -> None:
    site = site_name()
    op = world.operator(env={"TIDEFLOW_FAILPOINTS": point})
    world.agent(site)  # its heartbeats reach the bridge's inbox
    world.apply("wf", spec_for(site, sample_tasks(0.05, 1)))
    wait_for(lambda: not op.alive, 60, f"the operator to stop when {task} dies")
    assert op.proc is not None and op.proc.returncode == 1, op.log_text()[-3000:]
    log = op.log_text()
    assert f"background task {task} died" in log
    assert "fail point" in log
