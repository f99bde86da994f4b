"""Hostile inputs against the cloud side's pure parts (round 9): the fleet CLI's output.

What a site writes (a task's or a run's message, its agent version) reaches a
person's terminal through ``tideflow get / list / sites / watch``.  A site may
lie, so none of it may drive the terminal: control characters (ESC sequences
that clear the screen, retitle the window, write the clipboard with OSC 52;
a carriage return that overwrites a row; C1 controls) are shown as escapes.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from tideflow.tools.fleet import views
from tideflow.tools.fleet.commands import Out, show_detail

# A clear screen, an OSC 52 clipboard write, a window title, a carriage return
# over the row, a C1 CSI (0x9b), a bell, a right-to-left override.
HOSTILE = "ok\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\x1b]0;pwned\x07\rFAKE\x9b31m\u202e"
CONTROLS = ("\x1b", "\x07", "\r", "\x9b", "\u202e")


def _workflow(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "wf", "namespace": "ns", "uid": "u"},
        "spec": {"tasks": [{"name": "a"}], "placement": {"site": "s1"}},
        "status": status,
    }


def _no_controls(text: str) -> None:
    for control in CONTROLS:
        assert control not in text, (control, text)


@pytest.mark.parametrize("rich", [True, False])
def test_a_sites_messages_reach_the_terminal_as_text_not_control_sequences(rich: bool) -> None:
    task = {"name": "a", "phase": "Failed", "attempt": 1, "message": HOSTILE}
    status = {"phase": "Failed", "reason": "TaskFailed", "message": HOSTILE, "site": "s1",
              "tasks": [task]}  # fmt: skip
    detail = views.workflow_detail(_workflow(status))
    buffer = io.StringIO()
    show_detail(detail, Out(buffer, rich=rich))
    text = buffer.getvalue()
    _no_controls(text)
    assert "\\x1b[2J" in text and "FAKE" in text, text  # shown, escaped


@pytest.mark.parametrize("rich", [True, False])
def test_a_sites_agent_version_in_a_table_is_text(rich: bool) -> None:
    buffer = io.StringIO()
    Out(buffer, rich=rich).table(["SITE", "VERSION"], [["s1", HOSTILE]])
    text = buffer.getvalue()
    _no_controls(text)
    assert "\\x1b]0;pwned" in text, text


# ---------------------------------------------------- a run record's reason
def _run_record(seq: int, **body: Any) -> Any:
    from tideflow.wire import EventRecord

    run = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf"} | body
    return EventRecord(seq=seq, kind="run", body=run)


def _task_record(seq: int, task: str) -> Any:
    from tideflow.wire import EventRecord

    body = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf", "task": task,
            "phase": "Succeeded", "attempt": 1, "exitCode": 0}  # fmt: skip
    return EventRecord(seq=seq, kind="task", body=body)


def test_a_huge_run_reason_is_clipped_and_leaves_the_tasks_in_the_status() -> None:
    """A run's reason is a word (TaskFailed, DeadlineExceeded); a site sending 300 KB
    of one made the status that size and left no room for a single task in it."""
    from tideflow_operator.applier import Applier

    applier = Applier()
    applier.expect("default", "wf", "u-1", 1, ["a", "b"], site="s1")
    huge = "R" * 300_000
    records = [_task_record(1, "a"), _task_record(2, "b"),
               _run_record(3, phase="Failed", reason=huge, message="m")]  # fmt: skip
    applier.apply_batch("s1", records)
    view = applier.view("default", "wf")
    assert view is not None
    status = view.to_status()
    assert [t["name"] for t in status["tasks"]] == ["a", "b"], status["tasksTruncated"]
    assert status["tasksTruncated"] is False
    assert len(status["reason"]) <= 256 and status["reason"].startswith("RRRR")
