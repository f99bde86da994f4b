"""The demo's judging and its table, without a run: pure functions of what it observed.

Proves: ``status_mismatches`` is empty only when the cloud's phase and every
task's phase, attempt and outputs equal the site's database, and names what
differs otherwise (a missing task, another attempt); ``converged`` also wants
the outbox drained and ``lastAckedSeq`` at the site's last seq; the live
table shows cloud and site progress per workflow and marks the cut link; the
plain line (no terminal) carries the same facts on one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tideflow.tools.demo import board, verdict
from tideflow.tools.demo.board import Site, Snapshot
from tideflow.tools.demo.truth import SiteTruth, TaskTruth


def _truth(**tasks: tuple[str, int]) -> SiteTruth:
    truth = SiteTruth(run_phase="Succeeded", last_seq=9, outbox_depth=0)
    for name, (phase, attempt) in tasks.items():
        truth.tasks[name] = TaskTruth(phase, attempt, {"rows": "3"}, 1.0)
    return truth


def _status(**tasks: tuple[str, int]) -> dict[str, Any]:
    return {
        "phase": "Succeeded",
        "progress": f"{len(tasks)}/{len(tasks)}",
        "siteConnected": True,
        "tasks": [
            {"name": name, "phase": phase, "attempt": attempt, "outputs": {"rows": "3"}}
            for name, (phase, attempt) in tasks.items()
        ],
    }


def _site(name: str, tmp_path: Path) -> Site:
    return Site(
        name=name,
        workflow=f"etl-{name}",
        db=tmp_path / f"{name}.db",
        log=tmp_path / f"{name}.log",
        journal=tmp_path / f"{name}.journal",
        broker_url="mqtt://127.0.0.1:1883",
        agent="running, pid 42",
    )


def test_equal_status_has_no_mismatch() -> None:
    done = {"a": ("Succeeded", 1), "b": ("Succeeded", 2)}
    assert verdict.status_mismatches(_status(**done), _truth(**done)) == []


def test_mismatches_name_the_task_and_what_differs() -> None:
    site = _truth(a=("Succeeded", 1), b=("Succeeded", 2), c=("Succeeded", 1))
    cloud = _status(a=("Succeeded", 1), b=("Succeeded", 1))
    cloud["phase"] = "Running"
    problems = verdict.status_mismatches(cloud, site)
    assert problems == [
        "phase Running in the cloud, Succeeded at the site",
        "task b: Succeeded attempt 1 in the cloud, Succeeded attempt 2 at the site",
        "task c is missing in the cloud",
    ]


def test_converged_wants_every_record_acknowledged(tmp_path: Path) -> None:
    sites = {"site-a": _site("site-a", tmp_path)}
    done = {"a": ("Succeeded", 1)}
    snap = Snapshot(
        workflows={"etl-site-a": {"status": _status(**done)}},
        edgesites={"site-a": {"status": {"connected": True, "lastAckedSeq": 9}}},
        truth={"site-a": _truth(**done)},
    )
    assert verdict.converged(sites, snap)
    snap.edgesites["site-a"]["status"]["lastAckedSeq"] = 8
    assert not verdict.converged(sites, snap)
    snap.edgesites["site-a"]["status"]["lastAckedSeq"] = 9
    snap.truth["site-a"].outbox_depth = 1
    assert not verdict.converged(sites, snap)


def test_the_table_and_the_plain_line_show_cloud_site_and_link(tmp_path: Path) -> None:
    sites = [_site("site-a", tmp_path), _site("site-b", tmp_path)]
    running = _truth(a=("Succeeded", 1), b=("Running", 1))
    running.run_phase, running.outbox_depth = "Running", 4
    snap = Snapshot(
        workflows={"etl-site-a": {"status": _status(a=("Succeeded", 1))}},
        edgesites={"site-a": {"status": {"connected": True, "lastAckedSeq": 9}}},
        truth={"site-a": _truth(a=("Succeeded", 1)), "site-b": running},
    )
    lines = board.table(sites, snap, link_cut=True)
    row_a = next(line.split() for line in lines if line.split()[:2] == ["etl-site-a", "site-a"])
    row_b = next(line.split() for line in lines if line.split()[:2] == ["etl-site-b", "site-b"])
    assert row_a == ["etl-site-a", "site-a", "Succeeded", "1/1", "true", "Succeeded", "1/1"]
    assert row_b == ["etl-site-b", "site-b", "-", "-", "-", "Running", "1/2"]
    link_b = next(line.split() for line in lines if line.split()[:1] == ["site-b"])
    assert link_b[:6] == ["site-b", "running,", "pid", "42", "cut", "4"]
    assert board.table(sites, snap, link_cut=False) != lines
    plain = board.plain(sites, snap)
    assert "etl-site-a Succeeded 1/1 connected (site: Succeeded 1/1)" in plain
    assert "etl-site-b - - - (site: Running 1/2)" in plain
    assert plain.endswith("outbox site-a 0, site-b 4")


def test_waiting_for_fresh_crds_outlasts_a_status_without_conditions(tmp_path: Path) -> None:
    """A CRD just applied has no ``status.conditions`` yet: wait, do not fail.

    ``kubectl wait --for=condition=Established`` failed at once on such a CRD
    (``.status.conditions accessor error``) and took the whole demo down.
    This kubectl answers with no condition twice, then Established.
    """
    from tideflow.tools.demo.cloud import Cloud
    from tideflow.tools.demo.common import DemoError

    calls = tmp_path / "calls"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        f"n=$(wc -l < {calls})\n"
        'if [ "$n" -le 2 ]; then exit 0; fi\n'
        "printf True\n"
    )
    kubectl.chmod(0o755)
    Cloud(kubectl, tmp_path, tmp_path / "kubeconfig").wait_established("a.example.io")
    assert len(calls.read_text().splitlines()) == 3

    never = tmp_path / "never"
    never.write_text("#!/bin/sh\necho 'no such crd' >&2\nexit 1\n")
    never.chmod(0o755)
    with pytest.raises(DemoError, match=r"crd/b.example.io not Established within 1s: no such"):
        Cloud(never, tmp_path, tmp_path / "kubeconfig").wait_established("b.example.io", timeout=1)
