"""Garbage collection for a long-running daemon: one setting, both daemons.

Both processes allocate many short-lived containers per unit of work while
holding a large live heap: the agent makes a few hundred objects a step
(records, jobs, futures, tasks) beside every task's state and spec; the
operator makes ~4,000 dicts checking one ``events`` batch beside every
Workflow's view.  With CPython's default thresholds those young objects set
off collections that promote them, and the older collections then walk the
whole live heap: 20-35% of an independent task's CPU (``bench.durable_steps``)
and ~1.5-2.5 us of the ~7-8 us the cloud spends per drained record
(``bench.link_backlog``; issue 15, decisions 0018 and 0024).

:func:`tune_gc`, called once by ``tideflow-agent`` (when it is about to run
steps) and ``tideflow-operator run`` (before it operates), moves what exists
at start-up (modules, classes) out of collection for good (``gc.freeze``)
and collects young objects every :data:`GC_YOUNG_THRESHOLD` allocations, so
a step's or a batch's objects are mostly freed by reference counting before
a collection looks at them.  Cycles are still collected; the older
generations keep their thresholds.
"""

from __future__ import annotations

import gc

# The young-generation threshold (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Freeze the start-up heap and raise only the young generation's threshold."""
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
