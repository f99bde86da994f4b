"""Operator shards, the pure part: who owns a site, who places a selector Workflow, what moves.

The e2e proof (two shard processes, an API server, Mosquitto, simulated
sites, a scale from 2 to 3) is tests/e2e/test_shards_e2e.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from tideflow_operator.placement import SiteCandidate
from tideflow_operator.shards import (
    PLACED_REASON,
    SHARD_LABEL,
    Claim,
    ShardError,
    ShardMap,
    ShardRouter,
    ShardSpec,
    kopf_filter,
    moves,
    owner,
    rendezvous,
    shard_index,
)

SITES = [f"site-{i:04d}" for i in range(1000)]


def test_the_owner_of_a_site_is_stable_across_processes() -> None:
    """Every shard must compute the same owner: no per-process salt (Python's hash() has one)."""
    code = (
        "from tideflow_operator.shards import rendezvous;"
        "print(','.join(str(rendezvous(f'site-{i:04d}', 3)) for i in range(50)))"
    )
    env = {"PYTHONHASHSEED": "random"}
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        ).stdout
        for _ in range(2)
    }
    assert outs == {",".join(str(rendezvous(f"site-{i:04d}", 3)) for i in range(50)) + "\n"}


def test_sites_spread_evenly_over_the_shards() -> None:
    for count in (2, 3, 5):
        spread = Counter(owner(site, count) for site in SITES)
        assert set(spread) == set(range(count))
        expected = len(SITES) / count
        assert all(abs(n - expected) < 0.15 * expected for n in spread.values()), spread


def test_one_shard_owns_everything() -> None:
    assert {owner(site, 1) for site in SITES} == {0}
    assert ShardSpec().sharded is False
    assert ShardSpec().lease_name("tideflow-operator") == "tideflow-operator"
    assert ShardSpec().client_id("tideflow-operator") == "tideflow-operator"


def test_scaling_from_2_to_3_moves_only_the_sites_the_new_shard_wins() -> None:
    moved = moves(SITES, 2, 3)
    # Only to the new shard, never between the shards that were there.
    assert moved and all(new == 2 for _, new in moved.values())
    assert set(moved) == {s for s in SITES if owner(s, 3) == 2}
    assert 0.25 < len(moved) / len(SITES) < 0.42  # about a third
    # Scaling back moves exactly those back.
    assert moves(SITES, 3, 2) == {s: (new, old) for s, (old, new) in moved.items()}


def test_a_label_names_the_shard_and_overrides_the_hash() -> None:
    site = next(s for s in SITES if owner(s, 3) == 0)
    assert owner(site, 3, {SHARD_LABEL: "2"}) == 2
    # Not a shard of this count, or not a number: the hash decides.
    assert owner(site, 3, {SHARD_LABEL: "3"}) == 0
    assert owner(site, 3, {SHARD_LABEL: "two"}) == 0
    # A labelled site does not move when the count changes (while its label is a shard).
    assert moves([site], 3, 4, {site: {SHARD_LABEL: "2"}}) == {}
    assert moves([site], 3, 2, {site: {SHARD_LABEL: "2"}}) == {site: (2, owner(site, 2))}


def test_shard_settings_are_checked_with_the_flag_named() -> None:
    with pytest.raises(ShardError, match="--shard-index 2"):
        ShardSpec(2, 2)
    with pytest.raises(ShardError, match="--shard-count 0"):
        ShardSpec(0, 0)
    assert shard_index("ordinal", hostname="tideflow-operator-shard-7") == 7
    assert shard_index("3") == 3
    with pytest.raises(ShardError, match="does not end in"):
        shard_index("ordinal", hostname="laptop")
    with pytest.raises(ShardError, match="'ordinal'"):
        shard_index("first")
    assert ShardSpec(1, 3).lease_name("op") == "op-1"
    assert ShardSpec(1, 3).client_id("op") == "op-shard-1"


def test_a_label_change_that_moves_a_site_stops_the_shards_it_concerns() -> None:
    site = next(s for s in SITES if owner(s, 3) == 0)
    routers = [ShardRouter(ShardSpec(i, 3)) for i in range(3)]
    stopped: list[int] = []
    followed: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for i, router in enumerate(routers):
        router.on_moved = lambda s, old, new, i=i: stopped.append(i)
        router.on_new_site = followed[i].append
        router.site_seen(site, {}, starting=True)
    assert followed == {0: [site], 1: [], 2: []}
    for router in routers:
        router.site_seen(site, {SHARD_LABEL: "1"})
    assert sorted(stopped) == [0, 1]  # the shard it leaves and the one it joins; not 2
    # At start-up a labelled site is simply owned: nothing was held yet.
    fresh = ShardRouter(ShardSpec(1, 3))
    fresh.on_moved = lambda *a: stopped.append(99)
    fresh.site_seen(site, {SHARD_LABEL: "1"}, starting=True)
    assert 99 not in stopped and fresh.owns(site)


def _workflow(
    name: str, spec: dict[str, Any], status: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name, "uid": f"u-{name}", "generation": 1,
                     "resourceVersion": "7"},
        "spec": spec, "status": status or {},
    }  # fmt: skip


TASKS = [{"name": "a", "command": ["true"]}]


def test_a_workflow_on_a_site_is_its_owners_only() -> None:
    routers = [ShardRouter(ShardSpec(i, 2)) for i in range(2)]
    for site in SITES[:20]:
        body = _workflow("w", {"placement": {"site": site}, "tasks": TASKS})
        claims = [r.decide(body, lambda: [])[0].claim for r in routers]
        assert claims.count(Claim.MINE) == 1
        assert claims[owner(site, 2)] is Claim.MINE
        assert [r.workflow_mine(body) for r in routers] == [c is Claim.MINE for c in claims]


def test_a_selector_workflow_is_placed_once_and_handed_to_the_sites_owner() -> None:
    """Every shard sees the same EdgeSites; only the placer decides, only the owner admits."""
    routers = [ShardRouter(ShardSpec(i, 2)) for i in range(2)]
    line = [s for s in SITES[:40]]
    candidates = [SiteCandidate(s, {"line": "a"}, connected=True, load=0) for s in line]
    spec = {"placement": {"siteSelector": {"matchLabels": {"line": "a"}}}, "tasks": TASKS}
    handed = admitted_at_once = 0
    for n in range(40):
        body = _workflow(f"w{n}", spec)
        outcomes = [r.decide(body, lambda: list(candidates)) for r in routers]
        acting = [i for i, (d, placement) in enumerate(outcomes)
                  if d.claim is Claim.MINE or placement is not None]  # fmt: skip
        assert len(acting) == 1, outcomes  # exactly one shard does anything
        decision, placement = outcomes[acting[0]]
        if placement is None:
            admitted_at_once += 1
            assert decision.site is not None and routers[acting[0]].owns(decision.site)
            continue
        handed += 1
        assert placement["reason"] == PLACED_REASON and placement["phase"] == "Pending"
        site = placement["site"]
        assert not routers[acting[0]].owns(site)
        # The watch event showing the placement: the owner admits it there, the placer drops it.
        placed = _workflow(f"w{n}", spec, placement)
        claims = [r.decide(placed, lambda: [])[0] for r in routers]
        assert [c.claim for c in claims].count(Claim.MINE) == 1
        assert claims[owner(site, 2)].site == site
        assert [r.workflow_mine(placed) for r in routers] == [c.claim is Claim.MINE for c in claims]
    assert handed and admitted_at_once  # both paths taken over 40 Workflows


def test_an_assigned_workflow_belongs_to_its_sites_owner() -> None:
    site = SITES[3]
    body = _workflow("w", {"placement": {"siteSelector": {"matchLabels": {}}}, "tasks": TASKS},
                     {"assignedGeneration": 1, "site": site})  # fmt: skip
    mine = [ShardRouter(ShardSpec(i, 2)).decide(body, lambda: [])[0].claim for i in range(2)]
    assert mine[owner(site, 2)] is Claim.MINE and mine.count(Claim.MINE) == 1


def test_placement_sees_other_shards_sites_as_their_edgesites_say() -> None:
    router = ShardRouter(ShardSpec(0, 2))
    theirs = next(s for s in SITES if owner(s, 2) == 1)
    local = [SiteCandidate(theirs, {}, connected=False, load=0)]  # our presence: never heard
    known = {theirs: {"status": {"connected": True, "running": 4}}}
    [seen] = router.candidates(local, known)
    assert seen.connected and seen.load == 4


def test_the_topic_filter_and_kopf_filter() -> None:
    router = ShardRouter(ShardSpec(0, 2))
    mine = next(s for s in SITES if owner(s, 2) == 0)
    theirs = next(s for s in SITES if owner(s, 2) == 1)
    assert router.owns_topic(f"tideflow/v1/sites/{mine}/events")
    assert not router.owns_topic(f"tideflow/v1/sites/{theirs}/state")
    body = _workflow("w", {"placement": {"site": theirs}, "tasks": TASKS})

    class Runtime:
        shards = router

    assert kopf_filter(memo={"runtime": Runtime()}, body=body) is False
    assert kopf_filter(memo={"runtime": None}, body=body) is True  # not sharded: everything


def test_a_shard_map_follows_labels() -> None:
    shard_map = ShardMap(ShardSpec(1, 2))
    site = next(s for s in SITES if owner(s, 2) == 0)
    assert not shard_map.owns(site)
    assert shard_map.set_labels(site, {SHARD_LABEL: "1"}) == (0, 1)
    assert shard_map.owns(site)
    assert shard_map.set_labels(site, {}) == (1, 0)


def test_one_shard_makes_nothing_of_this_and_subscribes_as_before() -> None:
    from typing import cast

    from tideflow import wire
    from tideflow.mqtt import BrokerConnection
    from tideflow_operator.bridge import CloudBridge
    from tideflow_operator.kube import Kube
    from tideflow_operator.runtime import OperatorConfig, Runtime

    def runtime(count: int, index: int = 0) -> Runtime:
        config = OperatorConfig(
            BrokerConnection("mqtt://127.0.0.1:1"), shard_index=index, shard_count=count
        )
        return Runtime(config, kube=cast(Kube, None), bridge=CloudBridge(config.bridge_config()))

    single = runtime(1)
    assert single.shards is None and single.bridge.shard is None
    assert single.bridge._subscriptions() == [
        wire.subscription(wire.EVENTS), wire.subscription(wire.STATE)
    ]  # fmt: skip
    assert single.admission.candidates == single.sites.candidates
    sharded = runtime(2, 1)
    assert sharded.shards is not None and sharded.bridge.shard is sharded.shards
    theirs = next(s for s in SITES if owner(s, 2) == 0)
    mine = next(s for s in SITES if owner(s, 2) == 1)
    sharded.shards.site_seen(mine, {}, starting=True)
    sharded.shards.site_seen(theirs, {}, starting=True)
    assert sharded.bridge._subscriptions() == [
        wire.subscription(wire.STATE), wire.subscription(wire.EVENTS, mine)
    ]  # fmt: skip
