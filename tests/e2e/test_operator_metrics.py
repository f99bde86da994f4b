"""The operator's Prometheus endpoint, scraped over HTTP after a real run."""

from __future__ import annotations

import time

import pytest
from services.agent import wait_for
from services.metrics import free_port, scrape
from services.world import World, sample_tasks, site_name, spec_for

pytestmark = pytest.mark.envtest


def test_operator_metrics_count_phases_records_patches_and_sites(world: World) -> None:
    port = free_port()
    site = site_name()
    world.operator("--metrics-port", str(port))
    succeeded = "tideflow_operator_workflows{phase=Succeeded}"
    # The API server is shared by the session: the operator also restores
    # Workflows that earlier tests finished.  Count from what it shows now.
    wait_for(lambda: _ready(port), 30, "the metrics endpoint")
    time.sleep(1.0)
    before = scrape(port).get(succeeded, 0)
    world.agent(site)
    world.apply("metered", spec_for(site, sample_tasks(0.05, 2)))
    world.wait_phase("metered", "Succeeded")
    wait_for(lambda: scrape(port).get(succeeded) == before + 1, 20, "the phase gauge")
    values = scrape(port)
    assert values["tideflow_operator_records_applied_total"] > 0
    assert values["tideflow_operator_status_patches_total"] >= 2
    assert values["tideflow_operator_status_patch_seconds_count"] >= 2
    assert values["tideflow_operator_sites_connected"] == 1
    assert values["tideflow_operator_duplicates_ignored_total"] >= 0
    assert "tideflow_operator_gaps_total" in values


def _ready(port: int) -> bool:
    try:
        return "tideflow_operator_sites_connected" in scrape(port)
    except OSError:
        return False
