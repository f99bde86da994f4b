"""A CronWorkflow too large for the message that carries it to a site (round 19).

The operator sends a schedule as its validated spec's manifest form
(``CronWorkflowSpec.dump()``: every default written out), and a site drops a
message over 1 MiB on every re-send.  The size limit of a spec
(``MAX_SPEC_BYTES``) was checked only by ``parse_cron_spec``, on the spec as
written: the operator's own parse (``parse_cron_workflow``, for its handlers
and its admission) checked no size at all, and a spec under the limit as
written could double in its manifest form (20,000 small tasks: 0.7 MB written,
1.2 MB sent).  Either way the CronWorkflow was taken, sent every few seconds
and dropped by the site every time, and never fired, with no word of why.
"""

from __future__ import annotations

from typing import Any

import pytest

from tideflow import wire
from tideflow.spec import MAX_SPEC_BYTES, SpecError, parse_cron_spec, parse_cron_workflow


def manifest(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": "etl", "namespace": "plant-7", "uid": "u-1"},
        "spec": spec,
    }


def cron_spec(workflow: dict[str, Any]) -> dict[str, Any]:
    return {"schedule": "@every 1h", "placement": {"site": "line-2"}, "workflowSpec": workflow}


def test_the_operators_parse_refuses_a_spec_over_the_limit_as_written() -> None:
    huge = cron_spec(
        {"params": {"p": "x" * 1_100_000}, "tasks": [{"name": "a", "command": ["true"]}]}
    )
    with pytest.raises(SpecError, match=str(MAX_SPEC_BYTES)):
        parse_cron_workflow(manifest(huge))


def test_a_spec_whose_sent_form_is_over_the_limit_is_refused_by_both_parses() -> None:
    tasks = [{"name": f"t{i}", "command": ["true"]} for i in range(20_000)]
    spec = cron_spec({"tasks": tasks})
    with pytest.raises(SpecError, match=str(MAX_SPEC_BYTES)):
        parse_cron_spec(spec)
    with pytest.raises(SpecError, match=str(MAX_SPEC_BYTES)):
        parse_cron_workflow(manifest(spec))


def test_what_is_taken_fits_the_message_a_site_takes() -> None:
    tasks = [{"name": f"t{i}", "command": ["true"]} for i in range(5_000)]
    cron = parse_cron_workflow(manifest(cron_spec({"tasks": tasks})))
    put = wire.SchedulePayload(
        action="put", uid="u-1", generation=1, namespace="plant-7", name="etl",
        spec=cron.spec.dump(),
    )  # fmt: skip
    assert len(wire.encode(wire.KIND_SCHEDULE, "line-2", put)) <= wire.DEFAULT_MAX_MESSAGE_BYTES
    assert parse_cron_spec(cron.spec.dump()) == cron.spec
