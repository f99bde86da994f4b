"""When a CronWorkflow fires: pure functions of a schedule and a clock reading.

Why a module of its own: the agent fires schedules from the site's clock while
offline, the operator shows the next fire time, and the spec validates the
expression; all three must agree on the same arithmetic, and none of it may
read a clock itself (tests pass the time in; nothing here sleeps).

Cron expressions are parsed and iterated by ``cronsim`` (never by hand); time
zones come from the IANA database (``zoneinfo``, with the ``tzdata`` package
where the system has none).  Rules, chosen to match Kubernetes' CronJob:

* A 5-field expression, one of ``@hourly @daily @weekly @monthly @yearly``
  (``@annually``, ``@midnight`` too), or ``@every 90s`` / ``@every 1h30m``
  (at least one second, at most :data:`MAX_EVERY_HOURS`: a longer one
  fires past the calendar's end, and computing that fire raised
  OverflowError at the agent).  ``@every N`` fires at the multiples of N seconds
  since the Unix epoch, so every agent computes the same instants and a
  restart cannot shift them.
* Daylight saving, for an expression at fixed times (neither its minute nor
  its hour field starts with ``*``, e.g. ``0 2 * * *``): a wall-clock time
  the spring-forward gap skips does not fire that day (CronJob's library,
  robfig/cron, documents the same); a wall-clock time the fall-back repeats
  fires once, at its first occurrence.  An expression with a ``*`` minute or
  hour (``*/15 * * * *``, ``5 * * * *``) is a stream of instants: it fires
  in both passes of a repeated hour and simply has no instants in a gap.
* Catch-up (:func:`due`): after the agent was down, of the times missed since
  the last scheduled one, only the most recent may fire — and only if it is
  no older than ``startingDeadlineSeconds`` (when set); every other missed
  time is reported as missed.  At most one late run per missed window, as
  CronJob.
* A fired run's identity (:func:`run_uid`) is derived from (schedule uid,
  generation, scheduled time), so firing the same time twice finds the run
  already there.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

__all__ = [
    "ALIASES",
    "MAX_COUNTED_MISSES",
    "CatchUp",
    "Schedule",
    "ScheduleError",
    "due",
    "parse_schedule",
    "parse_timezone",
    "run_name",
    "run_uid",
]

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: Longest ``@every`` interval (ten years): fires stay within the calendar (year 9999).
MAX_EVERY_HOURS = 10 * 366 * 24
_EVERY = re.compile(r"^@every\s+(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
#: Missed times counted one by one at most (a cron schedule offline for years
#: would otherwise cost a walk over every minute); beyond it the count says "at least".
MAX_COUNTED_MISSES = 10_000
#: How far back a stream expression's latest time is looked for, widening (a
#: ``* * 29 2 *`` fires every minute of a Feb 29: up to 8 years apart).
_LOOK_BACK = tuple(timedelta(hours=h) for h in (2, 3 * 24, 100 * 24, 10 * 366 * 24))
_TICK = timedelta(microseconds=1)
#: Namespace of the run uids: uuid5(namespace, "schedule-uid/generation/unix-seconds").
RUN_UID_NAMESPACE = uuid.UUID("5d3c4a52-7f2e-4b8e-9a51-2b0c7f0e6c11")
#: Longest CronWorkflow name (CronJob's limit): "<name>-<site>-<unix seconds>" stays a name.
MAX_CRON_NAME = 52


#: Files in the zone directory that are the host's own choice, not IANA zones: the
#: site would fire in its host's zone while the cloud judged its times in its own.
_HOST_ZONE_FILES = frozenset({"localtime", "posixrules"})


class ScheduleError(ValueError):
    """A schedule or time zone that cannot be used; the message says why."""


def parse_timezone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or :class:`ScheduleError`."""
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(("/", "."))
        or ".." in name
        or name in _HOST_ZONE_FILES
    ):
        raise ScheduleError(f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(
            f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin)"
        ) from None


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return t.astimezone(UTC)


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: either ``every`` seconds, or a cron expression in ``tz``."""

    text: str
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    every: int | None = None
    cron: str | None = None

    @property
    def fixed_time(self) -> bool:
        """True for expressions at fixed wall-clock times (see the module docstring)."""
        if self.cron is None:
            return False
        minute, hour = self.cron.split()[:2]
        return not minute.startswith("*") and not hour.startswith("*")

    def _instant(self, wall: datetime) -> datetime | None:
        """A naive wall-clock time in ``tz`` as a UTC instant; None inside a gap."""
        aware = wall.replace(tzinfo=self.tz, fold=0)
        back = aware.astimezone(UTC).astimezone(self.tz).replace(tzinfo=None)
        if back != wall:
            return None
        return aware.astimezone(UTC)

    def _forward(self, after: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``after``, ascending, as UTC instants."""
        after = _utc(after)
        if self.every is not None:
            k = int(after.timestamp()) // self.every + 1
            while True:
                yield datetime.fromtimestamp(k * self.every, UTC)
                k += 1
        assert self.cron is not None
        if not self.fixed_time:
            for t in CronSim(self.cron, after.astimezone(self.tz)):
                yield t.astimezone(UTC)
            return
        # Walk wall-clock times; one instant each (gap: none; repeated: the first).
        wall = after.astimezone(self.tz).replace(tzinfo=None) - timedelta(hours=3)
        for candidate in CronSim(self.cron, wall):
            instant = self._instant(candidate)
            if instant is not None and instant > after:
                yield instant

    def _backward(self, at: datetime) -> Iterator[datetime]:
        """Fire times at or before ``at``, descending, as UTC instants."""
        at = _utc(at)
        if self.every is not None:
            k = int(at.timestamp()) // self.every
            while k >= 0:
                yield datetime.fromtimestamp(k * self.every, UTC)
                k -= 1
            return
        assert self.cron is not None
        if not self.fixed_time:
            while (last := self._last_by_walking_forward(at)) is not None:
                yield last
                at = last - _TICK
            return
        wall = at.astimezone(self.tz).replace(tzinfo=None) + timedelta(hours=3, microseconds=1)
        for candidate in CronSim(self.cron, wall, reverse=True):
            instant = self._instant(candidate)
            if instant is not None and instant <= at:
                yield instant

    def _last_by_walking_forward(self, at: datetime) -> datetime | None:
        """The latest time <= ``at`` of a stream expression, walking forward to it.

        Not cronsim's reverse walk: it drops a repeated hour's fold, so from
        inside the fall-back's second pass it answered the first pass's time
        (an hour early) and that whole hour fired nothing at the site.  Its
        answer is still where the walk starts: one step, but in that hour.
        """
        assert self.cron is not None
        hint = next(CronSim(self.cron, (at + _TICK).astimezone(self.tz), reverse=True), None)
        starts = [hint.astimezone(UTC) - _TICK] if hint is not None else []
        for start in [*(s for s in starts if s < at), *(at - back for back in _LOOK_BACK)]:
            last = None
            for t in self._forward(start):
                if t > at:
                    break
                last = t
            if last is not None:
                return last
        return None

    def next_after(self, t: datetime) -> datetime:
        """The first fire time strictly after ``t`` (UTC)."""
        return next(self._forward(t))

    def last_at_or_before(self, t: datetime) -> datetime | None:
        """The latest fire time at or before ``t`` (UTC), None if there is none."""
        return next(self._backward(t), None)

    def times(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Fire times in (after, until], ascending."""
        until = _utc(until)
        for t in self._forward(after):
            if t > until:
                return
            yield t


def parse_schedule(text: str, timezone: str = "UTC") -> Schedule:
    """Parse a schedule; :class:`ScheduleError` with a message that says what is wrong."""
    tz = parse_timezone(timezone)
    if not isinstance(text, str):
        raise ScheduleError("must be a string")
    stripped = " ".join(text.split())
    if stripped.startswith("@every"):
        match = _EVERY.match(stripped)
        if match is None or not any(match.groups()):
            raise ScheduleError(
                f"{text!r} is not an interval: write '@every 90s', '@every 5m' or '@every 1h30m'"
            )
        hours, minutes, seconds = (int(g or 0) for g in match.groups())
        every = hours * 3600 + minutes * 60 + seconds
        if every < 1:
            raise ScheduleError(f"{text!r}: the interval must be at least 1 second")
        if every > MAX_EVERY_HOURS * 3600:
            raise ScheduleError(
                f"{stripped[:60]!r}: the interval must be at most {MAX_EVERY_HOURS}h (ten years)"
            )
        return Schedule(text=text, tz=tz, every=every)
    if stripped.startswith("@"):
        if stripped not in ALIASES:
            raise ScheduleError(
                f"{text!r} is not a schedule: use 5 cron fields, one of "
                f"{', '.join(sorted(ALIASES))}, or '@every 90s'"
            )
        cron = ALIASES[stripped]
    else:
        cron = stripped
        if len(cron.split()) != 5:
            raise ScheduleError(
                f"{text!r} is not a schedule: a cron expression has 5 fields "
                "(minute hour day-of-month month day-of-week)"
            )
    try:
        CronSim(cron, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ScheduleError(f"{text!r} is not a valid cron expression: {exc}") from None
    return Schedule(text=text, tz=tz, cron=cron)


@dataclass(frozen=True)
class CatchUp:
    """What is due at one clock reading.

    ``fire`` is the one scheduled time to run now (or None); ``missed`` lists
    the earliest missed times (at most ``limit`` of them), ``missed_count``
    counts all of them (at least, when ``missed_count_capped``); ``last`` is
    the latest scheduled time considered, fired or missed (the new
    high-water mark), and ``next_time`` the first time still in the future.
    """

    fire: datetime | None
    missed: tuple[datetime, ...]
    missed_count: int
    missed_count_capped: bool
    last: datetime | None
    next_time: datetime


def due(
    schedule: Schedule,
    *,
    since: datetime,
    now: datetime,
    starting_deadline_seconds: int | None = None,
    limit: int = 100,
) -> CatchUp:
    """Decide what fires at ``now``, given that every time up to ``since`` is handled.

    ``since`` is the last scheduled time already fired or recorded missed (or,
    for a schedule that never fired, when the site received it).  Of the times
    in (since, now], the latest fires if it is within the starting deadline
    (always, when there is none); all the others are missed.
    """
    since, now = _utc(since), _utc(now)
    next_time = schedule.next_after(now)
    latest = schedule.last_at_or_before(now)
    if latest is None or latest <= since:
        return CatchUp(None, (), 0, False, None, next_time)
    late = (now - latest).total_seconds()
    fire: datetime | None = latest
    if starting_deadline_seconds is not None and late > starting_deadline_seconds:
        fire = None
    missed: list[datetime] = []
    count = 0
    capped = False
    if schedule.every is not None:
        first = schedule.next_after(since)
        count = int((latest - first).total_seconds()) // schedule.every  # before `latest`
        step = timedelta(seconds=schedule.every)
        missed = [first + i * step for i in range(min(count, limit))]
    else:
        for t in schedule.times(since, latest):
            if t == latest:
                break
            if count < limit:
                missed.append(t)
            count += 1
            if count >= MAX_COUNTED_MISSES:
                capped = True
                break
    if fire is None:
        if count < limit:
            missed.append(latest)
        count += 1
    return CatchUp(fire, tuple(missed), count, capped, latest, next_time)


def run_uid(schedule_uid: str, generation: int, scheduled: datetime) -> str:
    """The uid of the run a schedule fires at ``scheduled``: the same inputs, the same uid."""
    seconds = int(_utc(scheduled).timestamp())
    return str(uuid.uuid5(RUN_UID_NAMESPACE, f"{schedule_uid}/{generation}/{seconds}"))


def run_name(cron_name: str, site: str, scheduled: datetime) -> str:
    """The Workflow name of a fired run: ``<cron name>-<site>-<unix seconds>``.

    A valid Kubernetes name for any CronWorkflow name (<= 52) and site (<= 63).
    """
    return f"{cron_name}-{site}-{int(_utc(scheduled).timestamp())}"
