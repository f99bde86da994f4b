"""Hostile inputs against the cloud side's pure parts (round 9).

* What a site writes (a task's or a run's message, its agent version) reaches a
  person's terminal through ``tideflow get / list / sites / watch``.  A site may
  lie, so none of it may drive the terminal: control characters (ESC sequences
  that clear the screen, retitle the window, write the clipboard with OSC 52; a
  carriage return that overwrites a row; C1 controls) are shown as escapes, and
  its brackets are text, not rich markup (``tideflow watch`` on a terminal).
* A run's reason is clipped in the status, as its message is: 300 KB of one left
  no room for a single task.
* A ledger ConfigMap key that is no run uid is ignored at start-up, not read as
  an entry whose cancel raised.
* A task record naming a task its run lacks is refused (consumed); a view that
  does not know its names takes no more than a spec can hold; a task name is at
  most the spec's 128 characters.
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


# ------------------------------------------- the ledger read back at start-up
class _Store:
    def __init__(self, data: dict[str, dict[str, str]]) -> None:
        self.data = data

    async def patch_ledger(self, namespace: str, name: str, data: dict[str, str | None]) -> None:
        return None

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        return self.data


async def test_a_ledger_entry_no_run_could_have_is_ignored_not_raised_on_at_start_up() -> None:
    """A ledger ConfigMap's keys are run uids; one edited to a key no run has (a valid
    ConfigMap key of 100 characters) was read as an entry, and the start-up's pass
    over the entries of deleted Workflows raised ValidationError building its
    cancel: the operator never started."""
    import json as _json

    from tideflow.mqtt import BrokerConnection
    from tideflow_operator.bridge import BridgeConfig, CloudBridge
    from tideflow_operator.housekeeping import cancel_at_site
    from tideflow_operator.ledger import Ledger

    entry = _json.dumps({"ns": "ns", "name": "wf", "gen": 1, "spec": "d", "site": "s1"})
    good, bad = "0b1e5c1e-8f0a-4a6e-9d3c-2f4b5a6c7d8e", "u" * 100
    ledger = Ledger(_Store({"tideflow-ledger-0": {good: entry, bad: entry}}), "tideflow")  # type: ignore[arg-type]
    await ledger.load()
    bridge = CloudBridge(BridgeConfig(BrokerConnection("mqtt://127.0.0.1:1")))
    uids = [e.uid for e in ledger.all()]
    assert uids == [good], uids
    for e in ledger.all():  # what Runtime.start does for the Workflows that are gone
        cancel_at_site(bridge, e.site, e.uid, "Workflow deleted (test)")


# ------------------------------------------- task records naming other tasks
def _task_records(start: int, names: list[str]) -> list[Any]:
    from tideflow.wire import EventRecord

    ident = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf"}
    return [
        EventRecord(
            seq=start + i, kind="task", body=ident | {"task": n, "phase": "Running", "attempt": 1}
        )
        for i, n in enumerate(names)
    ]


def test_task_records_naming_tasks_the_run_lacks_are_refused_and_consumed() -> None:
    """A site's records for its own run named any task it liked: each new name was kept
    in the operator's view for ever (200,000 of them: 90 MB, and 22 s of the event
    loop for every status write of that run)."""
    from tideflow_operator.applier import Applier, Discard

    applier = Applier()
    applier.expect("default", "wf", "u-1", 1, ["a", "b"], site="s1")
    made_up = [f"x{i:0100d}" for i in range(5_000)]
    result = applier.apply_batch("s1", _task_records(1, ["a", *made_up, "b"]))
    view = applier.view("default", "wf")
    assert view is not None and sorted(view.tasks) == ["a", "b"]
    assert result.unknown == 5_000 and applier.discarded[Discard.UNKNOWN] == 5_000
    assert applier.applied_through("s1") == 5_002  # consumed: the site's acks go on
    assert view.to_status()["progress"] == "0/2"


def test_a_run_whose_task_names_are_not_known_holds_no_more_than_a_spec_can() -> None:
    """A view rebuilt from a status (or a fired run's) does not know every task name:
    it takes new ones, but no more than a spec can hold."""
    from tideflow_operator.applier import MAX_RUN_TASKS, Applier

    applier = Applier()
    applier.expect("default", "wf", "u-1", 1, [], site="s1")  # names not told
    names = [f"t{i}" for i in range(MAX_RUN_TASKS + 50)]
    seq = 1
    for start in range(0, len(names), 10_000):
        chunk = names[start : start + 10_000]
        applier.apply_batch("s1", _task_records(seq, chunk))
        seq += len(chunk)
    view = applier.view("default", "wf")
    assert view is not None and len(view.tasks) == MAX_RUN_TASKS
    assert applier.applied_through("s1") == len(names)


@pytest.mark.parametrize("kind", ["task", "log"])
def test_a_record_naming_a_task_no_spec_can_have_is_malformed_naming_the_field(kind: str) -> None:
    """A task's name is at most 128 characters (the spec's pattern); a record's was any
    length, kept whole in the operator's view (up to the 512 KB a record may be)."""
    from tideflow import wire

    body = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf",
            "task": "t" * 129, "phase": "Running", "attempt": 1,
            "stream": "stdout", "tail": ""}  # fmt: skip
    with pytest.raises(wire.WireError, match=r"\btask\b"):
        wire.decode_record(wire.EventRecord(seq=1, kind=kind, body=body))  # type: ignore[arg-type]
    body["task"] = "t" * 128
    wire.decode_record(wire.EventRecord(seq=1, kind=kind, body=body))  # type: ignore[arg-type]


class _FinishedRun:
    """The fleet API as ``tideflow watch`` uses it, for a run already finished."""

    default_namespace = "ns"

    def __init__(self, message: str) -> None:
        task = {"name": "a", "phase": "Failed", "attempt": 1, "message": message}
        self.obj = _workflow({"phase": "Failed", "site": "s1", "message": message,
                              "tasks": [task]})  # fmt: skip

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.obj

    def site(self, name: str | None) -> None:
        return None


@pytest.mark.parametrize(
    "message", ["bad [/x] close", "see [link=https://evil.example]the docs[/link]"]
)
def test_watch_on_a_terminal_shows_a_sites_brackets_as_text(
    message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tideflow watch`` on a terminal drew each detail as rich markup: a task message
    holding '[/x]' ended the command with MarkupError, '[link=...]' made a link to
    wherever the site liked."""
    from tideflow.tools.fleet import commands

    screen = io.StringIO()
    monkeypatch.setattr(commands, "_is_tty", lambda stream: True)
    monkeypatch.setattr(commands.sys, "stdout", screen)
    code = commands._watch_until_done(_FinishedRun(message), "wf", "ns", 0)  # type: ignore[arg-type]
    assert code == commands.EXIT_NOT_SUCCEEDED
    text = screen.getvalue()
    assert "\x1b]8;" not in text, text  # no hyperlink
    assert message in text, text
