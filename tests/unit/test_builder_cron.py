"""A CronWorkflow built in Python renders the manifest the YAML form would be."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tideflow import cli
from tideflow.builder import CronWorkflow, Workflow
from tideflow.spec import SpecError, parse_cron_workflow


def template() -> Workflow:
    etl = Workflow("etl", params={"batch": "b1"}, deadline_seconds=600)
    extract = etl.task("extract", command=["python3", "extract.py", etl.param("batch")])
    etl.task("load", command=["load.sh"], depends_on=[extract])
    return etl


def test_a_cron_workflow_builds_validates_and_renders() -> None:
    nightly = CronWorkflow(
        "nightly-etl",
        "plant-7",
        schedule="0 2 * * *",
        timezone="Europe/Berlin",
        site_selector={"region": "north"},
        concurrency_policy="Forbid",
        starting_deadline_seconds=3600,
        workflow=template(),
    )
    manifest = yaml.safe_load(nightly.to_yaml())
    assert manifest["kind"] == "CronWorkflow"
    assert manifest["spec"]["placement"] == {"siteSelector": {"matchLabels": {"region": "north"}}}
    assert [t["name"] for t in manifest["spec"]["workflowSpec"]["tasks"]] == ["extract", "load"]
    assert "placement" not in manifest["spec"]["workflowSpec"]
    model = parse_cron_workflow(manifest)
    assert model.spec.concurrency_policy == "Forbid"
    assert model.spec.workflow_spec.deadline_seconds == 600


def test_a_bad_schedule_is_named() -> None:
    bad = CronWorkflow("n", schedule="0 2 * *", site="line-2", workflow=template())
    with pytest.raises(SpecError) as info:
        bad.build()
    assert info.value.field == "spec.schedule"


def test_tideflow_render_prints_it(tmp_path: Path) -> None:
    flow = tmp_path / "nightly.py"
    flow.write_text(
        "from tideflow.builder import CronWorkflow, Workflow\n"
        "_etl = Workflow('etl')\n"
        "_etl.task('a', command=['true'])\n"
        "nightly = CronWorkflow('nightly', 'plant-7', schedule='@every 90s', site='line-2',\n"
        "                       workflow=_etl)\n"
    )
    docs = [d for d in yaml.safe_load_all(cli.render_files([flow])) if d]
    assert [d["kind"] for d in docs] == ["CronWorkflow"]
    assert docs[0]["spec"]["schedule"] == "@every 90s"
