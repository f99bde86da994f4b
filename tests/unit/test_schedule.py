"""Schedules: parsing, next fire times across DST, catch-up, run identity.

Pure functions with the clock passed in: nothing here sleeps or reads a clock.
Europe/Berlin's 2026 changes: 29 March 02:00 -> 03:00 (the 02:xx wall-clock
hour does not exist), 25 October 03:00 -> 02:00 (02:xx happens twice).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tideflow.schedule import (
    CatchUp,
    ScheduleError,
    due,
    parse_schedule,
    run_name,
    run_uid,
)
from tideflow.spec import SpecError, parse_cron_spec, parse_cron_workflow

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def walk(text: str, tz: str, start: datetime, n: int) -> list[datetime]:
    schedule = parse_schedule(text, tz)
    out, t = [], start
    for _ in range(n):
        t = schedule.next_after(t)
        out.append(t)
    return out


def berlin(t: datetime) -> str:
    return t.astimezone(BERLIN).strftime("%m-%d %H:%M%z")


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "first_after_2026"),
    [
        ("0 2 * * *", utc(2026, 1, 1, 2)),
        ("@hourly", utc(2026, 1, 1, 1)),
        ("@daily", utc(2026, 1, 2)),
        ("@weekly", utc(2026, 1, 4)),  # 4 January 2026 is a Sunday
        ("@monthly", utc(2026, 2, 1)),
        ("@yearly", utc(2027, 1, 1)),
        ("@every 90s", utc(2026, 1, 1, 0, 1, 30)),
        ("@every 1h30m", utc(2026, 1, 1, 1, 30)),
        ("@every 1s", utc(2026, 1, 1, 0, 0, 1)),
        ("*/15  9-17 * * 1-5", utc(2026, 1, 1, 9)),  # extra spaces are fine
    ],
)
def test_accepted_forms_and_their_first_time(text: str, first_after_2026: datetime) -> None:
    assert parse_schedule(text).next_after(utc(2026, 1, 1)) == first_after_2026


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0 2 * *", "5 fields"),
        ("0 2 * * * *", "5 fields"),
        ("61 2 * * *", "not a valid cron expression"),
        ("@every 0s", "at least 1 second"),
        ("@every", "not an interval"),
        ("@every 5 minutes", "not an interval"),
        ("@fortnightly", "not a schedule"),
        ("", "5 fields"),
    ],
)
def test_bad_schedules_say_why(text: str, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        parse_schedule(text)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "../../etc/passwd", "", "/etc/localtime"])
def test_bad_timezones_are_refused(tz: str) -> None:
    with pytest.raises(ScheduleError, match="IANA"):
        parse_schedule("@daily", tz)


# ------------------------------------------------------------------ DST


def test_spring_forward_skips_a_fixed_time_in_the_gap_as_cronjob() -> None:
    times = walk("30 2 * * *", "Europe/Berlin", utc(2026, 3, 27, 12), 3)
    assert [berlin(t) for t in times] == [
        "03-28 02:30+0100",
        # 29 March 02:30 does not exist in Berlin: no run that day
        "03-30 02:30+0200",
        "03-31 02:30+0200",
    ]


def test_fall_back_fires_a_repeated_fixed_time_once() -> None:
    times = walk("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), 2)
    assert [berlin(t) for t in times] == ["10-25 02:30+0200", "10-26 02:30+0100"]
    # Asked from inside the repeated hour's second pass, it does not fire again.
    second_pass = utc(2026, 10, 25, 1, 10)  # 02:10 CET
    assert parse_schedule("30 2 * * *", "Europe/Berlin").next_after(second_pass) == utc(
        2026, 10, 26, 1, 30
    )


def test_an_interval_style_expression_fires_in_both_passes_and_has_no_gap() -> None:
    back = walk("*/30 * * * *", "Europe/Berlin", utc(2026, 10, 25, 0), 4)
    assert [berlin(t) for t in back] == [
        "10-25 02:30+0200",
        "10-25 02:00+0100",
        "10-25 02:30+0100",
        "10-25 03:00+0100",
    ]
    forward = walk("*/30 * * * *", "Europe/Berlin", utc(2026, 3, 29, 0, 15), 3)
    assert [berlin(t) for t in forward] == [
        "03-29 01:30+0100",
        "03-29 03:00+0200",
        "03-29 03:30+0200",
    ]
    # Real time between runs stays 30 minutes across both changes.
    assert {b - a for a, b in itertools.pairwise(back)} == {timedelta(minutes=30)}


def test_timezone_moves_the_instant() -> None:
    assert parse_schedule("0 2 * * *", "Europe/Berlin").next_after(utc(2026, 1, 1)) == utc(
        2026, 1, 1, 1
    )


def test_last_at_or_before_includes_the_instant_itself() -> None:
    s = parse_schedule("0 * * * *")
    assert s.last_at_or_before(utc(2026, 1, 1, 5)) == utc(2026, 1, 1, 5)
    assert s.last_at_or_before(utc(2026, 1, 1, 5, 59, 59, 999999)) == utc(2026, 1, 1, 5)
    e = parse_schedule("@every 7s")
    assert e.last_at_or_before(utc(2026, 1, 1, 0, 0, 6)) == datetime.fromtimestamp(
        (int(utc(2026, 1, 1, 0, 0, 6).timestamp()) // 7) * 7, UTC
    )


def test_every_is_aligned_to_the_epoch_so_a_restart_cannot_shift_it() -> None:
    s = parse_schedule("@every 90s")
    a = s.next_after(utc(2026, 1, 1, 0, 0, 1))
    b = s.next_after(utc(2026, 1, 1, 0, 0, 1, 500000))
    assert a == b and int(a.timestamp()) % 90 == 0


# ------------------------------------------------------------------ catch-up


def test_nothing_due_before_the_first_time() -> None:
    s = parse_schedule("0 2 * * *")
    result = due(s, since=utc(2026, 1, 1, 3), now=utc(2026, 1, 2, 1, 59))
    assert result == CatchUp(None, (), 0, False, None, utc(2026, 1, 2, 2))


def test_on_time_fires_exactly_the_scheduled_time() -> None:
    s = parse_schedule("0 2 * * *")
    result = due(s, since=utc(2026, 1, 1, 3), now=utc(2026, 1, 2, 2, 0, 0, 1000))
    assert result.fire == utc(2026, 1, 2, 2)
    assert result.missed == () and result.last == utc(2026, 1, 2, 2)
    # The high-water mark moved: asking again at the same or a later instant fires nothing.
    again = due(s, since=result.last, now=utc(2026, 1, 2, 2, 0, 1))
    assert again.fire is None and again.missed_count == 0


def test_after_downtime_only_the_latest_missed_time_fires_within_the_deadline() -> None:
    s = parse_schedule("0 * * * *")
    result = due(
        s, since=utc(2026, 1, 1, 0), now=utc(2026, 1, 1, 5, 20), starting_deadline_seconds=3600
    )
    assert result.fire == utc(2026, 1, 1, 5)
    assert result.missed == tuple(utc(2026, 1, 1, h) for h in (1, 2, 3, 4))
    assert result.missed_count == 4
    assert result.next_time == utc(2026, 1, 1, 6)


def test_past_the_deadline_nothing_fires_and_every_time_is_missed() -> None:
    s = parse_schedule("0 * * * *")
    result = due(
        s, since=utc(2026, 1, 1, 0), now=utc(2026, 1, 1, 5, 20), starting_deadline_seconds=600
    )
    assert result.fire is None
    assert result.missed == tuple(utc(2026, 1, 1, h) for h in (1, 2, 3, 4, 5))
    assert result.last == utc(2026, 1, 1, 5)


def test_without_a_deadline_the_latest_fires_however_late() -> None:
    s = parse_schedule("@daily")
    result = due(s, since=utc(2026, 1, 1), now=utc(2026, 3, 1, 23))
    assert result.fire == utc(2026, 3, 1)
    assert result.missed_count == 58


def test_a_long_outage_of_a_fast_schedule_is_counted_not_listed() -> None:
    s = parse_schedule("@every 1s")
    result = due(s, since=utc(2026, 1, 1), now=utc(2026, 1, 8), limit=5)
    assert result.fire == utc(2026, 1, 8)
    assert result.missed_count == 7 * 86400 - 1
    assert len(result.missed) == 5 and result.missed[0] == utc(2026, 1, 1, 0, 0, 1)


def test_deadline_zero_means_only_on_time() -> None:
    s = parse_schedule("@every 10s")
    assert due(
        s, since=utc(2026, 1, 1), now=utc(2026, 1, 1, 0, 0, 10), starting_deadline_seconds=0
    ).fire == utc(2026, 1, 1, 0, 0, 10)
    late = due(s, since=utc(2026, 1, 1), now=utc(2026, 1, 1, 0, 0, 11), starting_deadline_seconds=0)
    assert late.fire is None and late.missed == (utc(2026, 1, 1, 0, 0, 10),)


def test_a_clock_set_back_fires_nothing_twice() -> None:
    s = parse_schedule("@every 10s")
    first = due(s, since=utc(2026, 1, 1), now=utc(2026, 1, 1, 0, 1))
    assert first.fire == utc(2026, 1, 1, 0, 1)
    back = due(s, since=first.last or utc(2026, 1, 1), now=utc(2026, 1, 1, 0, 0, 30))
    assert back.fire is None and back.missed_count == 0


# ------------------------------------------------------------------ identity


def test_run_identity_is_a_function_of_schedule_generation_and_time() -> None:
    t = utc(2026, 1, 1, 2)
    assert run_uid("u-1", 1, t) == run_uid("u-1", 1, t.astimezone(BERLIN))
    assert run_uid("u-1", 1, t) == run_uid("u-1", 1, t + timedelta(microseconds=10))
    distinct = {
        run_uid("u-1", 1, t),
        run_uid("u-2", 1, t),
        run_uid("u-1", 2, t),
        run_uid("u-1", 1, t + timedelta(seconds=1)),
    }
    assert len(distinct) == 4
    assert run_name("nightly-etl", "line-2", t) == f"nightly-etl-line-2-{int(t.timestamp())}"


# ------------------------------------------------------------------ the model

TEMPLATE = {"tasks": [{"name": "a", "command": ["true"]}]}


def cron(**spec: object) -> dict[str, object]:
    base: dict[str, object] = {
        "schedule": "0 2 * * *",
        "placement": {"site": "line-2"},
        "workflowSpec": TEMPLATE,
    }
    base.update(spec)
    return base


def test_defaults_match_argo_and_cronjob() -> None:
    spec = parse_cron_spec(cron())
    assert spec.timezone == "UTC"
    assert spec.concurrency_policy == "Allow"
    assert spec.starting_deadline_seconds is None
    assert spec.suspend is False
    assert (spec.successful_jobs_history_limit, spec.failed_jobs_history_limit) == (3, 1)
    assert spec.parsed_schedule().next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 2)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"schedule": "0 2 * *"}, "spec.schedule", "5 fields"),
        ({"schedule": "@every 0s"}, "spec.schedule", "at least 1 second"),
        ({"timezone": "Europe/Atlantis"}, "spec.timezone", "IANA"),
        ({"concurrencyPolicy": "Sometimes"}, "spec.concurrencyPolicy", "Allow"),
        ({"startingDeadlineSeconds": -1}, "spec.startingDeadlineSeconds", "greater than or equal"),
        ({"placement": {}}, "spec.placement.site", "exactly one"),
        ({"placement": {"site": "Line_2"}}, "spec.placement.site", "site name"),
        ({"failedJobsHistoryLimit": -1}, "spec.failedJobsHistoryLimit", "greater than or equal"),
        ({"scheduel": "x"}, "spec.scheduel", "unknown field"),
        (
            {"workflowSpec": {**TEMPLATE, "placement": {"site": "a"}}},
            "spec.workflowSpec.placement",
            "use spec.placement",
        ),
        (
            {"workflowSpec": {"tasks": [{"name": "a", "command": ["x"], "dependsOn": ["b"]}]}},
            "spec.workflowSpec.tasks[0].dependsOn[0]",
            "unknown task",
        ),
    ],
)
def test_bad_fields_are_named(change: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_cron_spec(cron(**change))
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(SpecError) as info:
        parse_cron_spec({"schedule": "@daily"})
    fields = {f for f, _ in info.value.problems}
    assert fields == {"spec.placement", "spec.workflowSpec"}


def test_whole_manifest_and_name_limit() -> None:
    doc = {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": "nightly-etl", "namespace": "plant-7"},
        "spec": cron(timezone="Europe/Berlin"),
    }
    assert parse_cron_workflow(doc).spec.timezone == "Europe/Berlin"
    long = {**doc, "metadata": {"name": "n" * 53}}
    with pytest.raises(SpecError) as info:
        parse_cron_workflow(long)
    assert info.value.field == "metadata.name" and "52" in str(info.value)
