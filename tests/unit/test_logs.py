"""Trace ids on log lines: from the current span, or from ``trace_extra`` for code that
knows a run's trace but has no span of it current (the operator)."""

from __future__ import annotations

import json
import logging

from opentelemetry import context, trace

from tideflow import tracing
from tideflow.logs import JsonFormatter, TraceContextFilter, trace_extra


def _line(**extra: str) -> dict[str, str]:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "about %s", ("run",), None)
    record.__dict__.update(extra)
    assert TraceContextFilter().filter(record)
    out: dict[str, str] = json.loads(JsonFormatter().format(record))
    return out


def test_a_line_given_a_runs_trace_carries_it_and_one_without_carries_none() -> None:
    trace_id, span_id = tracing.new_trace_id(), tracing.new_span_id()
    line = _line(**trace_extra(trace_id, span_id))
    assert (line["trace_id"], line["span_id"], line["message"]) == (trace_id, span_id, "about run")
    assert "trace_id" not in _line()


def test_the_current_span_gives_the_ids_and_an_explicit_runs_trace_wins() -> None:
    current, current_span = tracing.new_trace_id(), tracing.new_span_id()
    given, given_span = tracing.new_trace_id(), tracing.new_span_id()
    token = context.attach(tracing.remote_parent(current, current_span))
    try:
        assert trace.get_current_span().get_span_context().is_valid
        assert _line()["trace_id"] == current
        assert _line(**trace_extra(given, given_span))["trace_id"] == given
    finally:
        context.detach(token)


def test_an_attempts_log_ids_win_over_the_context_until_reset_and_stay_in_their_task() -> None:
    """What the executor sets while an attempt runs (no OpenTelemetry span is made)."""
    import asyncio

    from tideflow.logs import log_ids, reset_log_ids

    outer, outer_span = tracing.new_trace_id(), tracing.new_span_id()
    attempt, attempt_span = tracing.new_trace_id(), tracing.new_span_id()
    token = context.attach(tracing.remote_parent(outer, outer_span))
    try:

        async def one_attempt() -> tuple[str, str]:
            ids = log_ids(attempt, attempt_span)
            try:
                await asyncio.sleep(0)
                line = _line()
                return line["trace_id"], line["span_id"]
            finally:
                reset_log_ids(ids)

        async def both() -> tuple[tuple[str, str], str]:
            seen = await asyncio.create_task(one_attempt())
            return seen, _line()["span_id"]  # another task's lines are not the attempt's

        seen, beside = asyncio.run(both())
        assert seen == (attempt, attempt_span)
        assert beside == outer_span
        ids = log_ids(attempt, attempt_span)
        assert _line()["span_id"] == attempt_span
        reset_log_ids(ids)
        assert _line()["span_id"] == outer_span  # reset: the context's span again
    finally:
        context.detach(token)
