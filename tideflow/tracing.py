"""W3C trace context shared by both sides: ids, ``traceparent`` in and out.

The operator mints a workflow run's trace id and root span id when it assigns
the run and sends them as a ``traceparent``; the agent parents its spans on
it.  Because the root span is written only when the run ends (possibly after
an operator restart), its ids are minted here rather than by a live span.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tideflow.phases import TaskPhase

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_trace_id() -> str:
    while True:
        value = secrets.token_hex(16)
        if value != "0" * 32:
            return value


def new_span_id() -> str:
    while True:
        value = secrets.token_hex(8)
        if value != "0" * 16:
            return value


def format_traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def checked_traceparent(value: str | None) -> str | None:
    """``value`` if it is a valid traceparent (as :func:`parse_traceparent` reads it), else None.

    W3C trace context: an invalid one is ignored.  The agent hands a run's
    traceparent to its tasks' environment; one as sent (a NUL byte, 300 KB)
    made every task of the run fail to start.
    """
    parsed = parse_traceparent(value)
    return None if parsed is None or value is None else value.strip().lower()


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace_id, span_id) of a valid traceparent, else None."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return match.group(1), match.group(2)


# --------------------------------------------------------------------------
# Spans as records: what the agent's exporter stores and the operator re-exports.

SCOPE = InstrumentationScope("tideflow", "1")


def _plain(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return str(value)


def span_to_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished SDK span as a JSON-safe dict with its original ids and times."""
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    return {
        "traceId": format(context.trace_id, "032x"),
        "spanId": format(context.span_id, "016x"),
        "parentSpanId": format(parent.span_id, "016x") if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "startTimeUnixNano": span.start_time,
        "endTimeUnixNano": span.end_time,
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        "events": [
            {
                "name": event.name,
                "timeUnixNano": event.timestamp,
                "attributes": {k: _plain(v) for k, v in (event.attributes or {}).items()},
            }
            for event in span.events
        ],
        "status": {"code": span.status.status_code.name, "message": span.status.description},
    }


def record_to_span(
    record: Mapping[str, Any], resource: Mapping[str, Any] | None = None
) -> ReadableSpan:
    """Rebuild a ReadableSpan (same ids and times) from :func:`span_to_record` output.

    Records do not repeat their producer's resource (it is the same for every
    span of an agent): the receiver supplies it.
    """
    flags = TraceFlags(TraceFlags.SAMPLED)
    trace_id = _bounded(int(record["traceId"], 16), 128, "traceId")
    span_id = _bounded(int(record["spanId"], 16), 64, "spanId")
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags)
    parent_id = record.get("parentSpanId")
    parent = (
        SpanContext(
            trace_id,
            _bounded(int(parent_id, 16), 64, "parentSpanId"),
            is_remote=True,
            trace_flags=flags,
        )
        if parent_id
        else None
    )
    status = record.get("status") or {}
    if not isinstance(status, Mapping):
        raise TypeError(f"status is a {type(status).__name__}, not an object")
    description = status.get("message")
    if description is not None:
        description = _text(description, "status.message")
    events = []
    for i, e in enumerate(record.get("events") or []):
        events.append(
            Event(
                _text(e["name"], f"events[{i}].name"),
                _attributes(e.get("attributes"), f"events[{i}].attributes"),
                timestamp=_bounded(int(e["timeUnixNano"]), 64, "timeUnixNano"),
            )
        )
    return ReadableSpan(
        name=_text(record["name"], "name"),
        context=context,
        parent=parent,
        resource=Resource.create(dict(resource or record.get("resource") or {})),
        attributes=_attributes(record.get("attributes"), "attributes"),
        events=events,
        kind=SpanKind[str(record.get("kind") or "INTERNAL")],
        status=Status(StatusCode[str(status.get("code") or "UNSET")], description),
        start_time=_bounded(int(record["startTimeUnixNano"]), 64, "startTimeUnixNano"),
        end_time=_bounded(int(record["endTimeUnixNano"]), 64, "endTimeUnixNano"),
        instrumentation_scope=SCOPE,
    )


def _text(value: Any, name: str) -> str:
    """``value`` as text OTLP can carry: UTF-8, so no lone surrogate (JSON's ``"\\ud800"``,
    which Python's parser takes): the encoder raised on one, failing the whole export."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not Unicode text (a lone surrogate)") from None
    return text


_INT64 = 1 << 63


def _attributes(value: Any, name: str) -> dict[str, Any]:
    """Attributes OTLP can carry (text, booleans, int64, floats, lists and maps of them).

    The encoder drops another one with a logged traceback, once per export;
    such a span is refused instead, naming the attribute.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} is a {type(value).__name__}, not an object")
    return {_text(k, f"{name} key"): _attribute(v, f"{name}.{k!r}"[:200]) for k, v in value.items()}


def _attribute(value: Any, name: str) -> Any:
    if isinstance(value, str):
        return _text(value, name)
    if isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"{name} does not fit in 64 bits")
        return value
    if isinstance(value, list):
        return [_attribute(v, name) for v in value]
    if isinstance(value, Mapping):
        return _attributes(value, name)
    raise TypeError(f"{name} is a {type(value).__name__}, which OTLP cannot carry")


def _bounded(value: int, bits: int, name: str) -> int:
    """``value`` if OTLP can carry it in ``bits`` unsigned bits (else the whole export fails)."""
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} does not fit in {bits} bits")
    return value


def remote_parent(trace_id: str, span_id: str) -> Context:
    """An OpenTelemetry context whose current span is the given (remote) span."""
    span_context = SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )  # fmt: skip
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


class PresetIdGenerator(RandomIdGenerator):
    """Random ids, except that the next span id can be preset.

    A span that outlives a process (a workflow run, an attempt cut by a
    crash) is re-created after a restart with the span id it had, so the
    spans parented on it before the crash still hang from it.
    """

    def __init__(self) -> None:
        self._next_span_id: int | None = None
        self._next_trace_id: int | None = None

    def preset(self, span_id: str, trace_id: str | None = None) -> None:
        self._next_span_id = int(span_id, 16)
        self._next_trace_id = int(trace_id, 16) if trace_id else None

    def generate_span_id(self) -> int:
        if self._next_span_id is not None:
            value, self._next_span_id = self._next_span_id, None
            return value
        return super().generate_span_id()

    def generate_trace_id(self) -> int:
        if self._next_trace_id is not None:
            value, self._next_trace_id = self._next_trace_id, None
            return value
        return super().generate_trace_id()


# --------------------------------------------------------------------------
# An attempt's span, derived from its outcome's task record (decision 0036).

#: Outcomes whose attempt span has an ERROR status.
_ERROR_OUTCOMES = frozenset(
    {TaskPhase.FAILED, TaskPhase.RETRYING, TaskPhase.CANCELLED, TaskPhase.INTERRUPTED}
)
_INTERRUPTED_REASON = "the agent stopped while the attempt ran"


def unix_ns(seconds: float | None) -> int | None:
    """A record's time (float seconds) as a span's (integer nanoseconds), to the
    microsecond: a float holds no more (and ``seconds * 1e9`` would add noise)."""
    return None if seconds is None else round(seconds * 1e6) * 1000


def attempt_span_of(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The span record of the attempt a task record reports, or None if it has none.

    A task record from an agent with decision 0036 carries ``attemptSpan``: only
    what the record does not already hold (the ids, the agent's site, and for
    an outcome without ``finishedAt`` its end and retry delay).  Everything
    else — name, times, attributes, events, status — is the record's own
    fields, put as the agent put them when it built the span whole.  An
    older agent's record carries the whole span as ``span``: returned as is.
    Pure and total over valid task records: the agent's store (``trace``, the
    ``spans`` it filed) and the operator (OTLP re-export) call it alike.  A
    record cut to fit the size limit may hold an emptied ``attemptSpan`` or
    ``span`` (``edge_agent.state.fit_record``): no ids, no span.
    """
    ref = record.get("attemptSpan")
    if not ref or "traceId" not in ref or "spanId" not in ref:
        span = record.get("span")
        return dict(span) if span and "spanId" in span else None
    phase = str(record["phase"])
    message = record.get("message") or ""
    end = unix_ns(ref.get("endedAt", record.get("finishedAt")))
    attributes: dict[str, Any] = {
        "tideflow.workflow": record["name"],
        "tideflow.namespace": record["namespace"],
        "tideflow.run_id": run_id_for(record["uid"], record["generation"]),
        "tideflow.task": record["task"],
        "tideflow.attempt": record.get("attempt", 0),
        "tideflow.compensation": bool(record.get("compensation", False)),
    }
    if ref.get("site"):
        attributes["tideflow.site"] = ref["site"]
    attributes["tideflow.outcome"] = phase
    if record.get("exitCode") is not None:
        attributes["tideflow.exit_code"] = record["exitCode"]
    events: list[dict[str, Any]] = []
    if "timed out" in message:
        events.append(_event("timeout", end, {"message": message}))
    if phase == TaskPhase.CANCELLED:
        events.append(_event("cancelled", end, {"message": message}))
    if phase == TaskPhase.INTERRUPTED:
        attributes["tideflow.interrupted"] = True
        events.append(_event("interrupted", end, {"reason": _INTERRUPTED_REASON}))
    delay = ref.get("retryDelaySeconds")
    if phase == TaskPhase.RETRYING and delay is not None:
        attributes["tideflow.retry_delay_seconds"] = delay
        events.append(_event("retry", end, {"delay_seconds": delay, "message": message}))
    error = phase in _ERROR_OUTCOMES
    return {
        "traceId": ref["traceId"],
        "spanId": ref["spanId"],
        "parentSpanId": ref.get("parentSpanId"),
        "name": f"task {record['task']}",
        "kind": "INTERNAL",
        "startTimeUnixNano": unix_ns(record.get("startedAt")),
        "endTimeUnixNano": end,
        "attributes": attributes,
        "events": events,
        "status": {"code": "ERROR" if error else "OK", "message": message[:256] if error else None},
    }


def stored_span(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The span a site's stored body stands for: a span record's body is the span;
    an outcome's task record (in the outbox, or filed into ``spans`` as is since
    decision 0036) carries or derives its attempt's span (None if it has none)."""
    if "attemptSpan" in body or "task" in body:
        return attempt_span_of(body)
    return dict(body)


def _event(name: str, at: int | None, attributes: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "timeUnixNano": at, "attributes": attributes}


def attempt_span_ref(
    trace_id: str,
    span_id: str,
    parent_span_id: str | None,
    site: str | None,
    *,
    ended_at: float | None = None,
    retry_delay: float | None = None,
) -> dict[str, Any]:
    """A task record's ``attemptSpan``: what :func:`attempt_span_of` cannot take from the
    record itself.  ``ended_at`` only for an outcome without ``finishedAt`` (a retry,
    an interruption); ``retry_delay`` only for a retry."""
    ref: dict[str, Any] = {"traceId": trace_id, "spanId": span_id, "parentSpanId": parent_span_id}
    if site:
        ref["site"] = site
    if ended_at is not None:
        ref["endedAt"] = ended_at
    if retry_delay is not None:
        ref["retryDelaySeconds"] = round(retry_delay, 3)
    return ref


def run_id_for(uid: str, generation: int) -> str:
    """The site's name for one run of a Workflow (its database key, its spans' ``run_id``)."""
    return f"{_RUN_ID_UNSAFE.sub('_', uid)}.{generation}"


_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
