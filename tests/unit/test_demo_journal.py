"""The demo's journal reader takes any line a task wrote (pure logic, a real file)."""

from __future__ import annotations

from pathlib import Path

from tideflow.tools.demo.truth import read_journal


def test_a_journal_line_with_a_digit_int_refuses_or_bytes_not_utf8_counts_as_attempt_0(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal"
    journal.write_bytes("a 1\nb \u00b2\n".encode() + b"c \xff\n\nd 12\n")
    assert read_journal(journal) == [("a", 1), ("b", 0), ("c", 0), ("d", 12)]
