"""The fleet views' pure rules: DAG order, dark sites first, what may be shown.

``tests/e2e/test_fleet_cli.py`` and ``test_console_browser.py`` show the same
rules on a real fleet; these pin the edge cases without one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tideflow.tools.fleet import views
from tideflow.tools.fleet.console import ConsoleError, check_trace_url, trace_link


def _wf(tasks: list[dict[str, Any]], status: dict[str, Any] | None = None,
        on_failure: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": "wf", "namespace": "ns", "uid": "u",
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "SECRET"},
                     "managedFields": [{"x": 1}]},
        "spec": {"tasks": tasks, "onFailure": on_failure or [], "params": {"p": "SECRET"}},
        "status": status or {},
    }  # fmt: skip


def test_dag_order_puts_each_task_after_its_dependencies_with_its_depth() -> None:
    tasks = [
        {"name": "load", "dependsOn": ["transform", "extract"]},
        {"name": "transform", "dependsOn": ["extract"]},
        {"name": "extract"},
        {"name": "audit"},
        {"name": "ghost", "dependsOn": ["missing"]},
    ]
    assert views.dag_order(tasks) == [
        ("extract", 0, []),
        ("audit", 0, []),
        ("ghost", 0, []),
        ("transform", 1, ["extract"]),
        ("load", 2, ["transform", "extract"]),
    ]
    cycle = [{"name": "a", "dependsOn": ["b"]}, {"name": "b", "dependsOn": ["a"]}]
    assert [n for n, _, _ in views.dag_order(cycle)] == ["a", "b"]


def test_detail_keeps_compensation_apart_and_marks_unlisted_tasks_unknown() -> None:
    status = {
        "phase": "Failed", "startedAt": "2024-05-01T12:00:00.000Z",
        "finishedAt": "2024-05-01T12:00:10.500Z", "tasksTruncated": True,
        "tasks": [
            {"name": "a", "phase": "Failed", "attempt": 3, "exitCode": 2, "message": "boom",
             "startedAt": "2024-05-01T12:00:00.000Z", "finishedAt": "2024-05-01T12:00:04.000Z"},
            {"name": "undo", "phase": "Succeeded", "attempt": 1, "compensation": True},
        ],
    }  # fmt: skip
    detail = views.workflow_detail(
        _wf([{"name": "a"}, {"name": "b", "dependsOn": ["a"]}], status, [{"name": "undo"}])
    )
    assert [(t["name"], t["phase"], t["attempt"]) for t in detail["tasks"]] == [
        ("a", "Failed", 3), ("b", "Unknown", 0),
    ]  # fmt: skip
    assert detail["tasks"][0]["durationSeconds"] == 4.0
    assert [(t["name"], t["phase"]) for t in detail["onFailure"]] == [("undo", "Succeeded")]
    assert detail["durationSeconds"] == 10.5 and detail["tasksTruncated"] is True


def test_safe_workflow_drops_env_params_commands_and_annotations() -> None:
    obj = _wf([{"name": "a", "script": "echo SECRET", "env": {"TOKEN": "SECRET"}}])
    obj["spec"]["tasks"][0]["command"] = ["SECRET"]
    assert "SECRET" not in repr(views.safe_workflow(obj))
    assert "SECRET" not in repr(views.workflow_detail(obj))


def test_dark_sites_come_first_longest_offline_first() -> None:
    now = 1_000_000.0

    def site(name: str, connected: bool, offline_since: float | None) -> dict[str, Any]:
        status: dict[str, Any] = {"connected": connected}
        if offline_since is not None:
            status["offlineSince"] = views_time(offline_since)
        return {"metadata": {"name": name}, "status": status}

    rows = [views.site_summary(s, now) for s in (
        site("a-up", True, None), site("b-dark-short", False, now - 60),
        site("c-dark-long", False, now - 3600), site("d-never-seen", False, None),
    )]  # fmt: skip
    assert [r["name"] for r in views.sort_sites(rows)] == [
        "d-never-seen", "c-dark-long", "b-dark-short", "a-up",
    ]  # fmt: skip
    assert rows[2]["offlineForSeconds"] == 3600


def views_time(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_label_selectors_and_durations() -> None:
    labels = {"region": "eu", "tier": "prod"}
    assert views.label_selector_matches(labels, "region=eu,tier!=lab")
    assert views.label_selector_matches(labels, "region, !gpu")
    assert not views.label_selector_matches(labels, "region=us")
    assert not views.label_selector_matches(labels, "gpu")
    assert [views.short_duration(s) for s in (None, 0.44, 42, 192, 7500, 270000)] == [
        "-", "0.4s", "42s", "3m12s", "2h05m", "3d03h",
    ]  # fmt: skip


def test_trace_links_only_from_http_templates_and_quoted() -> None:
    assert trace_link("https://t/{traceId}", "ab/c") == "https://t/ab%2Fc"
    assert trace_link("", "abc") is None
    for bad in ("javascript:alert(1)//{traceId}", "https://t/no-placeholder"):
        try:
            check_trace_url(bad)
        except ConsoleError as exc:
            assert "--trace-url" in str(exc)
        else:
            raise AssertionError(bad)


def test_get_renders_the_same_tree_as_a_rich_table_and_as_plain_text() -> None:
    import io

    from tideflow.tools.fleet.commands import Out, show_detail

    status = {"phase": "Running", "site": "s1", "progress": "1/3", "traceId": "t" * 32,
              "tasks": [{"name": "a", "phase": "Succeeded", "attempt": 1, "exitCode": 0},
                        {"name": "b", "phase": "Retrying", "attempt": 2}]}  # fmt: skip
    detail = views.workflow_detail(
        _wf(
            [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}, {"name": "c", "dependsOn": ["b"]}],
            status,
            [{"name": "undo"}],
        ),
        {"metadata": {"name": "s1"}, "status": {"connected": True}},
    )
    for rich in (True, False):
        buffer = io.StringIO()
        show_detail(detail, Out(buffer, rich=rich))
        text = buffer.getvalue()
        assert "s1  connected" in text and "t" * 32 in text, text
        rows = [line.split() for line in text.splitlines() if "✔ a" in line or "b " in line]
        assert any(r[:3] == ["✔", "a", "Succeeded"] for r in rows), text
        assert any(r[:5] == ["└", "↻", "b", "Retrying", "2"] for r in rows), text
        assert "onFailure:" in text and "◷ undo" in text


def _dag_order_by_passes(tasks: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, list[str]]]:
    """The order as it was first written: passes over the list until nothing moves
    (quadratic: a chain listed backwards places one task per pass)."""
    names = [str(t.get("name")) for t in tasks]
    known = set(names)
    deps = {
        str(t.get("name")): [str(d) for d in t.get("dependsOn") or [] if str(d) in known]
        for t in tasks
    }
    placed: dict[str, int] = {}
    order: list[tuple[str, int, list[str]]] = []
    progress = True
    while progress and len(placed) < len(names):
        progress = False
        for name in names:
            if name in placed or any(d not in placed for d in deps[name]):
                continue
            depth = 1 + max((placed[d] for d in deps[name]), default=-1)
            placed[name] = depth
            order.append((name, depth, deps[name]))
            progress = True
    order.extend((n, 0, deps[n]) for n in names if n not in placed)
    return order


_NAMES = st.sampled_from("abcdefgh")
_TASKS = st.lists(
    st.fixed_dictionaries({"name": _NAMES, "dependsOn": st.lists(_NAMES | st.just("zz"))}),
    max_size=9,
)


@settings(max_examples=500, deadline=None)
@given(_TASKS)
def test_dag_order_is_the_order_of_the_passes_it_replaced(tasks: list[dict[str, Any]]) -> None:
    """Cycles, unknown and repeated dependencies, repeated names: the same order."""
    assert views.dag_order(tasks) == _dag_order_by_passes(tasks)
