"""An attempt's span rides on its outcome's record, end to end (decision 0022).

With real processes: a real agent daemon, a real Mosquitto and the operator's
bridge and applier, and the ``tideflow-agent`` console script:

* the cloud collects, for re-export, exactly the spans the site stored: each
  attempt's (carried inside its outcome's task record) and the run's (a span
  record of its own, the older form), once each, with their bodies unchanged;
* ``tideflow-agent trace`` beside a running agent shows a finished attempt
  whose span is still carried only in its outcome's record (not yet filed
  into the ``spans`` table).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from services.agent import AgentProcess, read_only, stored_span_bodies, wait_for
from services.broker import Mosquitto
from services.cloud import SITE, converged, running_cloud, until

from tideflow import tracing

AGENT = str(Path(sys.executable).with_name("tideflow-agent"))


def stored_spans(db: Path) -> dict[str, dict[str, Any]]:
    with read_only(db) as conn:
        bodies = stored_span_bodies(conn)
    return {body["spanId"]: body for body in bodies}


async def test_the_cloud_collects_exactly_the_spans_the_site_stored(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    trace_id, root = tracing.new_trace_id(), tracing.new_span_id()
    spec = {
        "tasks": [
            {"name": "a", "command": ["true"]},
            {"name": "b", "command": ["true"], "dependsOn": ["a"]},
            {"name": "c", "command": ["false"], "dependsOn": ["a"]},
        ]
    }
    async with running_cloud(mosquitto.url) as cloud:
        with AgentProcess(SITE, mosquitto.url, tmp_path / "a.db") as agent:
            cloud.assign(spec, name="spans", traceparent=tracing.format_traceparent(trace_id, root))
            await until(lambda: cloud.view_phase("spans") == "Failed", 60, "the run to end")
            await converged(cloud, agent)
            collected = cloud.bridge.applier.drain_spans()
            stored = stored_spans(agent.db)

    assert {span.site for span in collected} == {SITE}
    bodies = [span.body for span in collected]
    assert len({body["spanId"] for body in bodies}) == len(bodies), "a span collected twice"
    assert {body["spanId"]: body for body in bodies} == stored
    names = sorted(body["name"] for body in bodies)
    assert names == ["task a", "task b", "task c", "workflow default/spans"]
    assert all(body["traceId"] == trace_id for body in bodies)


def test_trace_beside_a_running_agent_shows_an_attempt_not_yet_filed(tmp_path: Path) -> None:
    journal, db = tmp_path / "journal", tmp_path / "site.db"
    script = 'echo "$0" >> "$1"; sleep "$2"'
    manifest = tmp_path / "wf.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "tideflow.io/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": "wf", "namespace": "default"},
                "spec": {
                    "tasks": [
                        {
                            "name": "quick",
                            "command": ["sh", "-c", script, "quick", str(journal), "0"],
                        },
                        {
                            "name": "slow",
                            "dependsOn": ["quick"],
                            "command": ["sh", "-c", script, "slow", str(journal), "600"],
                        },
                    ]
                },
            }
        )
    )
    agent = subprocess.Popen(
        [AGENT, "run-local", str(manifest), "--db", str(db), "--quiet"],
        cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: journal.exists() and "slow" in journal.read_text().split(),
            60,
            "the second task to start (the first one's outcome committed)",
        )
        with read_only(db) as conn:
            filed = [row[0] for row in conn.execute("SELECT name FROM spans")]
        assert "task quick" not in filed  # still only inside its outcome's record
        result = subprocess.run(
            [AGENT, "trace", "wf", "--db", str(db)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (line,) = [line for line in result.stdout.splitlines() if "task quick" in line]
        assert line.rstrip().endswith("Succeeded"), result.stdout
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        agent.communicate(timeout=10)
