"""The operator's control path, pure parts: ledger commits, diff base, CLI defaults, errors.

The behaviour end to end (a real API server, broker and agents) is in
tests/e2e/test_operator_control.py; these pin the pieces it rests on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kopf
import pytest
from kubernetes import client

from tideflow.mqtt import BrokerConnection
from tideflow_operator import cli, handlers
from tideflow_operator.admission import Outcome
from tideflow_operator.bridge import CloudBridge
from tideflow_operator.kube import GROUP, VERSION, WORKFLOWS, Conflict, Kube
from tideflow_operator.ledger import BUCKETS, Entry, Ledger, configmap_name, spec_digest
from tideflow_operator.runtime import OperatorConfig, Runtime
from tideflow_operator.sites import label_ok
from tideflow_operator.watch import NoDiffBase


class CountingStore:
    def __init__(self, fail: int = 0) -> None:
        self.patches: list[dict[str, str | None]] = []
        self.stored: dict[str, dict[str, str]] = {}
        self.fail = fail

    async def patch_ledger(self, namespace: str, name: str, data: dict[str, str | None]) -> None:
        await asyncio.sleep(0.01)  # a round trip
        if self.fail:
            self.fail -= 1
            raise RuntimeError("API server away")
        self.patches.append(dict(data))
        stored = self.stored.setdefault(name, {})
        for key, value in data.items():
            if value is None:
                stored.pop(key, None)
            else:
                stored[key] = value

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        return {site: dict(data) for site, data in self.stored.items()}


NORTH = configmap_name("north")


def entry(i: int, site: str = "north") -> Entry:
    return Entry(site=site, uid=f"uid-{i}", namespace="ns", name=f"wf-{i}", generation=1,
                 spec_digest=spec_digest({"tasks": [{"name": f"t{i}"}]}))  # fmt: skip


async def test_a_burst_of_ledger_entries_is_a_few_group_commits() -> None:
    store = CountingStore()
    ledger = Ledger(store, "tideflow")
    await asyncio.gather(*(ledger.record(entry(i)) for i in range(200)))
    assert len(store.stored[NORTH]) == 200  # every caller returned after its entry was stored
    assert len(store.patches) <= 3, len(store.patches)
    reloaded = Ledger(store, "tideflow")
    await reloaded.load()
    assert reloaded.get("north", "uid-7") == entry(7)


async def test_a_failed_ledger_write_is_raised_and_kept_for_the_next() -> None:
    store = CountingStore(fail=1)
    ledger = Ledger(store, "tideflow")
    with pytest.raises(RuntimeError):
        await ledger.record(entry(1))
    ledger.discard("north", "uid-0")  # nothing to discard: no change
    await ledger.record(entry(2))
    assert set(store.stored[NORTH]) == {"uid-1", "uid-2"}
    ledger.discard("north", "uid-1")
    await ledger.flush()
    assert set(store.stored[NORTH]) == {"uid-2"}


async def test_a_kept_assignment_survives_a_reload_and_leaves_with_its_entry() -> None:
    store = CountingStore()
    ledger = Ledger(store, "tideflow")
    await ledger.record(entry(1))
    sent = {"uid": "uid-1", "generation": 1, "namespace": "ns", "name": "wf-1",
            "spec": {"tasks": [{"name": "t1"}]}}  # fmt: skip
    await ledger.keep_assigned("north", "uid-1", sent)
    reloaded = Ledger(store, "tideflow")
    await reloaded.load()
    assert reloaded.kept_assigned("north", "uid-1") == sent
    assert [e.uid for e in reloaded.all()] == ["uid-1"]  # the kept copy is not an entry
    reloaded.discard("north", "uid-1")
    await reloaded.flush()
    assert store.stored[NORTH] == {}


async def test_a_burst_over_many_sites_shares_a_few_configmaps() -> None:
    # One ConfigMap per site made a burst spread over a fleet cost a write per
    # Workflow (1.8 at 200 sites, with the removals): now the sites share BUCKETS.
    store = CountingStore()
    ledger = Ledger(store, "tideflow", spacing=0.2)
    entries = [entry(i, site=f"site-{i % 200}") for i in range(1000)]
    await asyncio.gather(*(ledger.record(e) for e in entries))
    assert sum(len(data) for data in store.stored.values()) == 1000
    assert len(store.stored) <= BUCKETS
    assert len(store.patches) <= 2 * BUCKETS, len(store.patches)
    # Removals wait (housekeeping writes them at most every few seconds) ...
    writes = len(store.patches)
    for e in entries[:500]:
        ledger.discard(e.site, e.uid)
    await ledger.flush(removals_every=60)
    assert len(store.patches) == writes
    # ... or ride along with the next entry of their ConfigMap.
    await ledger.record(entry(1000, site="site-0"))
    assert len(store.patches) == writes + 1
    home = store.stored[configmap_name("site-0")]
    assert "uid-1000" in home and "uid-0" not in home
    await ledger.flush()
    assert sum(len(data) for data in store.stored.values()) == 501
    reloaded = Ledger(store, "tideflow")
    await reloaded.load()
    assert reloaded.get("site-107", "uid-507") == entry(507, site="site-107")


async def test_an_older_operators_per_site_ledger_is_read_and_emptied() -> None:
    store = CountingStore()
    old = Entry("north", "old-1", "ns", "w", 1, "d")
    store.stored = {"tideflow-ledger-north": {"old-1": old.encode(), "old-1.assigned": "x"}}
    ledger = Ledger(store, "tideflow")
    await ledger.load()
    assert ledger.all() == [old]
    ledger.discard("north", "old-1")
    await ledger.flush()
    assert store.stored["tideflow-ledger-north"] == {}


def test_spec_digest_ignores_suspend_only() -> None:
    spec = {"tasks": [{"name": "a", "command": ["true"]}], "params": {"x": "1"}}
    assert spec_digest(spec) == spec_digest({**spec, "suspend": True})
    assert spec_digest(spec) != spec_digest({**spec, "params": {"x": "2"}})


def test_kopf_keeps_no_diff_base_and_has_no_changing_handler_for_workflows() -> None:
    # Was: the diff base is a digest (a 5,000-task spec overflowed the 256 KiB
    # annotation limit with kopf's copy).  Now kopf stores nothing on a Workflow at
    # all (decision 0019): no changing handler, so no finalizer, no annotation.
    tasks = [{"name": f"task-{i:04d}", "command": ["sh", "-c", "true"]} for i in range(5000)]
    body = kopf.Body({"metadata": {"name": "big", "namespace": "ns"},
                      "spec": {"tasks": tasks, "suspend": True}})  # fmt: skip
    storage = NoDiffBase()
    assert storage.build(body=body) is None and storage.fetch(body=body) is None
    registry = kopf.get_default_registry()
    workflows = kopf.Resource(GROUP, VERSION, WORKFLOWS)
    assert not registry._changing.has_handlers(resource=workflows)
    assert registry._watching.has_handlers(resource=workflows)
    assert handlers.workflow_event is not None


def test_leader_election_is_on_by_default_and_client_ids_are_unique(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("TIDEFLOW_LEADER_ELECTION", raising=False)
    args = cli.build_parser().parse_args(["run", "--broker", "mqtt://127.0.0.1:1883"])
    assert args.leader_election is True
    off = cli.build_parser().parse_args(["run", "--broker", "x", "--no-leader-election"])
    assert off.leader_election is False
    first = cli.unique_client_id("tideflow-operator")
    assert first.startswith("tideflow-operator-") and first != "tideflow-operator"
    assert len(cli.unique_client_id("x" * 200)) <= 128


# -- one line per refused call --------------------------------------------------------
class Forbidden(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.dumps({
            "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": 'events is forbidden: User "op" cannot create resource "events"',
        }).encode()  # fmt: skip
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Audit-Id", "5a0c6e0a-0000-4000-8000-000000000000")
        self.send_header("X-Kubernetes-Pf-Flowschema-Uid", "f0f0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def forbidding_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_a_refused_event_is_logged_in_one_line_without_headers(
    forbidding_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    configuration = client.Configuration()
    configuration.host = forbidding_server
    kube = Kube(client.ApiClient(configuration))
    caplog.set_level(logging.WARNING, logger="tideflow_operator.kube")
    obj: dict[str, Any] = {"metadata": {"name": "wf", "namespace": "ns", "uid": "u"}}
    await kube.event(obj, "Workflow", "Assigned", "assigned to site north")
    (record,) = [r for r in caplog.records if "could not post event" in r.getMessage()]
    line = record.getMessage()
    assert "\n" not in line
    assert "403" in line and "cannot create resource" in line
    assert "Audit-Id" not in line and "HTTP response headers" not in line


# -- optimistic concurrency: a second writer never makes this one act twice or regress ----
class RacingKube:
    """A fake API server whose object changed under us: the next conditional patch conflicts."""

    def __init__(self, stored: dict[str, Any]) -> None:
        self.stored = stored
        self.version = 10
        self.patches: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.conflict_next = True

    async def patch_workflow_status(
        self, namespace: str, name: str, status: dict[str, Any], **kw: Any
    ) -> str:
        if self.conflict_next and kw.get("resource_version") is not None:
            self.conflict_next = False
            raise Conflict(409, "the object has been modified")
        self.patches.append(status)
        self.version += 1
        return str(self.version)

    async def get_workflow(self, namespace: str, name: str) -> dict[str, Any]:
        return {
            "metadata": {"namespace": namespace, "name": name, "uid": "uid-wf",
                         "generation": 1, "resourceVersion": str(self.version)},
            "spec": {"placement": {"site": "north"}, "tasks": [{"name": "t", "command": ["true"]}]},
            "status": self.stored,
        }  # fmt: skip

    async def event(self, obj: dict[str, Any], kind: str, reason: str, *_: Any, **__: Any) -> None:
        self.events.append(reason)

    async def patch_ledger(self, *args: Any) -> None:
        return None

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        return {}

    async def list_workflow_uids(self, namespaces: Any = None) -> dict[str, bool]:
        return dict(self.listed)

    async def list_workflows(self, namespaces: Any = None) -> list[dict[str, Any]]:
        return []

    listed: dict[str, bool] = {}


def racing_runtime(
    monkeypatch: pytest.MonkeyPatch, stored: dict[str, Any], namespaces: list[str] | None = None
) -> tuple[Runtime, list[str]]:
    config = OperatorConfig(
        broker=BrokerConnection("mqtt://127.0.0.1:1"), namespaces=list(namespaces or [])
    )
    rt = Runtime(
        config,
        kube=RacingKube(stored),  # type: ignore[arg-type]
        bridge=CloudBridge(config.bridge_config()),
    )
    sent: list[str] = []
    monkeypatch.setattr(rt.bridge, "assign", lambda site, p, tp=None: sent.append("assign"))
    monkeypatch.setattr(rt.bridge, "control", lambda site, p: sent.append(p.action))
    return rt, sent


BODY = {
    "metadata": {"namespace": "ns", "name": "wf", "uid": "uid-wf", "generation": 1,
                 "resourceVersion": "9"},
    "spec": {"placement": {"site": "north"}, "tasks": [{"name": "t", "command": ["true"]}]},
}  # fmt: skip


async def test_a_workflow_another_operator_assigned_first_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    theirs = {"phase": "Assigned", "site": "north", "assignedGeneration": 1,
              "traceId": "a" * 32, "rootSpanId": "b" * 16, "syncedSeq": 0}  # fmt: skip
    rt, sent = racing_runtime(monkeypatch, theirs)
    assert await rt.admit(kopf.Body(BODY)) is Outcome.LOST
    assert sent == []
    assert rt.records[("ns", "wf")].trace_id == "a" * 32  # theirs, adopted
    # ... as an observer: its status is the other writer's to write.
    kube: RacingKube = rt.kube  # type: ignore[assignment]
    before = len(kube.patches)
    assert await rt.write_status(("ns", "wf"))
    assert len(kube.patches) == before


async def test_a_stale_view_never_turns_a_newer_finished_status_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, _ = racing_runtime(monkeypatch, {})
    assert await rt.admit(kopf.Body(BODY)) is Outcome.ASSIGNED
    await rt.errands.wait()  # the Assigned Event
    kube: RacingKube = rt.kube  # type: ignore[assignment]
    # Someone with more records behind it wrote Succeeded; this view is still Running.
    kube.stored = {"phase": "Succeeded", "progress": "1/1", "syncedSeq": 7}
    kube.conflict_next = True
    view = rt.applier.view("ns", "wf")
    assert view is not None
    view.phase, view.synced_seq = "Running", 3
    before = len(kube.patches)
    assert await rt.write_status(("ns", "wf"))
    assert len(kube.patches) == before  # not overwritten
    # A hand edit (no newer records behind it) is written over.
    kube.stored = {"phase": "Succeeded", "progress": "1/1", "syncedSeq": 3}
    kube.conflict_next = True
    assert await rt.write_status(("ns", "wf"))
    assert kube.patches[-1]["phase"] == "Running"


async def test_the_periodic_reconcile_cancels_what_vanished_unseen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, sent = racing_runtime(monkeypatch, {})
    assert await rt.admit(kopf.Body(BODY)) is Outcome.ASSIGNED
    await rt.errands.wait()
    # A run only the ledger knows of (its Workflow went while no operator ran) ...
    await rt.ledger.record(entry(5, site="north"))
    kube: RacingKube = rt.kube  # type: ignore[assignment]
    kube.listed = {"uid-wf": False}
    assert await rt.reconcile() == 1
    assert sent.count("cancel") == 1
    # ... and a held run whose Workflow vanished without a DELETED event.
    kube.listed = {}
    assert await rt.reconcile() >= 1
    assert ("ns", "wf") not in rt.records
    assert sent.count("cancel") >= 2


async def test_an_operator_of_some_namespaces_cancels_only_its_own_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, sent = racing_runtime(monkeypatch, {}, namespaces=["team-a"])
    mine = Entry(site="north", uid="mine", namespace="team-a", name="w", generation=1,
                 spec_digest="d")  # fmt: skip
    theirs = Entry(site="north", uid="theirs", namespace="team-b", name="w", generation=1,
                   spec_digest="d")  # fmt: skip
    await rt.ledger.record(mine)
    await rt.ledger.record(theirs)
    rt.kube.listed = {}  # type: ignore[attr-defined]  # (team-b is not listed: not watched)
    assert await rt.reconcile() == 1
    assert sent == ["cancel"]
    assert rt.ledger.get("north", "theirs") == theirs


async def test_at_start_up_only_the_watched_namespaces_runs_are_judged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, sent = racing_runtime(monkeypatch, {}, namespaces=["team-a"])
    store = CountingStore()
    store.stored = {"tideflow-ledger-north": {  # an older operator's per-site ConfigMap
        "mine": Entry("north", "mine", "team-a", "w", 1, "d").encode(),
        "theirs": Entry("north", "theirs", "team-b", "w", 1, "d").encode(),
    }}  # fmt: skip
    rt.ledger.store = store

    async def no_link() -> None:
        return None

    monkeypatch.setattr(rt.bridge, "start", no_link)
    monkeypatch.setattr(rt.bridge, "stop", no_link)
    await rt.start()
    try:
        assert sent == ["cancel"]  # team-a's vanished run only
    finally:
        await rt.stop()


def test_only_labels_kubernetes_accepts_are_carried_to_the_edgesite() -> None:
    ok = {"region": "north", "tideflow.io/tier": "edge", "empty": "", "a.b_c-d": "X_1.2"}
    bad = {"bad key": "x", "v": "has space", "x" * 64: "y", "k": "-leading", "UP/x": "y"}
    assert all(label_ok(k, v) for k, v in ok.items())
    assert not any(label_ok(k, v) for k, v in bad.items())


async def test_a_selector_that_picks_a_name_no_topic_can_carry_is_refused_with_a_condition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, sent = racing_runtime(monkeypatch, {})
    # A valid Kubernetes name, but not a site name (dots would be topic trouble elsewhere).
    rt.sites.seen("north.1", {"metadata": {"labels": {"region": "north"}}, "status": {}})
    body = {
        "metadata": {**BODY["metadata"]},
        "spec": {"placement": {"siteSelector": {"matchLabels": {"region": "north"}}},
                 "tasks": [{"name": "t", "command": ["true"]}]},
    }  # fmt: skip
    assert await rt.admit(kopf.Body(body)) is Outcome.REFUSED
    kube: RacingKube = rt.kube  # type: ignore[assignment]
    (status,) = kube.patches
    assert status["phase"] == "Failed" and status["reason"] == "InvalidPlacement"
    (accepted,) = status["conditions"]
    assert accepted["status"] == "False" and "spec.placement.site" in accepted["message"]
    assert sent == []
    assert kube.events == ["InvalidPlacement"]


async def test_a_write_retried_after_a_conflict_carries_the_view_as_it_is_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two writes of one Workflow in flight (a batch's and housekeeping's): the later
    # one (Succeeded) landed first, the earlier one (rendered while the view was
    # Running) conflicted, and its retry wrote that old rendering over Succeeded.
    # bench/fleet.py at 10,000 Workflows: one ended Running with every record applied.
    rt, _ = racing_runtime(monkeypatch, {})
    assert await rt.admit(kopf.Body(BODY)) is Outcome.ASSIGNED
    await rt.errands.wait()
    kube: RacingKube = rt.kube  # type: ignore[assignment]
    view = rt.applier.view("ns", "wf")
    assert view is not None
    view.phase, view.synced_seq = "Running", 3
    read = kube.get_workflow

    async def meanwhile(namespace: str, name: str) -> dict[str, Any]:
        # The other write landed: the run finished, from the same records this view has now.
        view.phase, view.synced_seq = "Succeeded", 7
        kube.stored = {"phase": "Succeeded", "progress": "1/1", "syncedSeq": 7}
        return await read(namespace, name)

    kube.get_workflow = meanwhile  # type: ignore[method-assign]
    kube.conflict_next = True
    assert await rt.write_status(("ns", "wf"))
    assert kube.patches[-1]["phase"] == "Succeeded"
