"""Keeps a site database from growing without bound over months.

Why: a site fires schedules for months, often offline; every run leaves task
rows, log tails and spans.  Once the cloud has acknowledged a finished run's
records (none of them is left in the outbox) the site no longer needs it
beyond a retention period (``--retention-seconds``, default 3 days, for
``tideflow-agent runs/logs/trace`` on site) and the schedule's history
limits (``successfulJobsHistoryLimit``/``failedJobsHistoryLimit``, per site).
:meth:`edge_agent.store.Store.prune` deletes exactly those and gives the
pages back (incremental vacuum).  Never pruned: an unfinished run, or one
with a record the cloud has not acknowledged — offline for a month, the
site keeps everything until the link returns and the acks arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from edge_agent.store import ScheduleRow, Store

log = logging.getLogger(__name__)

DEFAULT_RETENTION_SECONDS = 3 * 86400
DEFAULT_INTERVAL_SECONDS = 600.0


def history_limits(rows: list[ScheduleRow]) -> dict[str, tuple[int, int]]:
    """Schedule uid -> (successful, failed) runs to keep at the site."""
    limits: dict[str, tuple[int, int]] = {}
    for row in rows:
        try:
            spec = json.loads(row.spec_json)
            limits[row.uid] = (
                int(spec.get("successfulJobsHistoryLimit", 3)),
                int(spec.get("failedJobsHistoryLimit", 1)),
            )
        except (ValueError, TypeError, AttributeError):
            continue
    return limits


async def prune_once(store: Store, *, retention_seconds: float, now: float | None = None) -> int:
    at = time.time() if now is None else now
    limits = history_limits(await store.list_schedules())
    removed = await store.prune(finished_before=at - retention_seconds, history=limits)
    if removed:
        log.info("retention: pruned %d acknowledged finished run(s)", removed)
    return removed


async def retention_loop(
    store: Store,
    *,
    retention_seconds: float = DEFAULT_RETENTION_SECONDS,
    interval: float = DEFAULT_INTERVAL_SECONDS,
    clock: Callable[[], float] = time.time,
) -> None:
    while True:
        await prune_once(store, retention_seconds=retention_seconds, now=clock())
        await asyncio.sleep(interval)
