"""``tideflow-agent trace``'s span tree (pure logic)."""

from __future__ import annotations

from typing import Any

from edge_agent.cli import span_tree_lines


def span(span_id: str, parent: str | None, start: int, name: str | None = None) -> dict[str, Any]:
    return {
        "spanId": span_id,
        "parentSpanId": parent,
        "name": name or span_id,
        "startTimeUnixNano": start,
        "endTimeUnixNano": start + 1_000_000_000,
        "attributes": {"tideflow.outcome": "Succeeded"},
    }


def test_parents_come_before_children_and_siblings_by_start_time() -> None:
    spans = [span("b", "run", 30), span("run", None, 0), span("a", "run", 10), span("a1", "a", 20)]
    names = [line.split()[0] for line in span_tree_lines(spans)]
    depths = [(len(line) - len(line.lstrip())) // 2 for line in span_tree_lines(spans)]
    assert list(zip(names, depths, strict=True)) == [("run", 0), ("a", 1), ("a1", 2), ("b", 1)]


def test_a_chain_deeper_than_the_recursion_limit_is_printed_whole() -> None:
    """A damaged database can chain parents this deep (a RecursionError before)."""
    chain = [span("s0", None, 0)] + [span(f"s{i}", f"s{i - 1}", i) for i in range(1, 5000)]
    lines = span_tree_lines(chain)
    assert len(lines) == 5000 and lines[-1].lstrip().startswith("s4999")


def test_an_open_run_is_shown_above_its_finished_spans() -> None:
    lines = span_tree_lines([span("t", "open-run", 5)], open_span="open-run")
    assert lines[0] == "open-run  (run still in progress)"
    assert lines[1].startswith("  t ")
