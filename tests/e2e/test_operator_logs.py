"""The operator's JSON log lines carry the trace ids of the run they are about.

README, Observability: "Both sides log with ``logging``; ``--log-json`` gives
JSON lines.  Every line written inside a traced context carries ``trace_id``
and ``span_id``."  The operator mints each run's trace (``status.traceId``);
its lines about that run (admission, assignment, phase changes) are written
while handling it and must carry that trace id.
"""

from __future__ import annotations

import json

import pytest
from services.agent import wait_for
from services.world import World, sample_tasks, site_name, spec_for

pytestmark = pytest.mark.envtest


def test_operator_json_log_lines_about_a_run_carry_its_trace_id(world: World) -> None:
    site = site_name()
    op = world.operator("--log-json")
    wait_for(lambda: not op.alive or "kopf" in op.log_text(), 30, "the operator to start")
    assert op.alive, op.log_text()[-2000:]
    world.agent(site)
    world.apply("logged", spec_for(site, sample_tasks(0.05, 1)))
    status = world.wait_phase("logged", "Succeeded", timeout=60)
    lines = [json.loads(line) for line in op.log_text().splitlines() if line.startswith("{")]
    assert lines, "no JSON log lines"
    about_run = [line for line in lines if "logged" in line.get("message", "")]
    assert about_run, "no log line mentions the run"
    assert all(line.get("trace_id") == status["traceId"] for line in about_run), about_run
