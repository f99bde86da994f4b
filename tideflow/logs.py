"""Logging for both sides: plain or JSON lines, with trace ids on every line.

Every record emitted while an OpenTelemetry span is current carries its
``trace_id`` and ``span_id``, so a log line from a task attempt can be joined
with the attempt's span and, through the trace, with the cloud's view.  Code
that knows a run's trace but has no span of it current (the operator, whose
lines about a run come from kopf handlers, MQTT callbacks and background
loops alike) passes ``extra=trace_extra(...)`` instead.

A task attempt's ids are current through :func:`log_ids` rather than the
OpenTelemetry context: a span object and an attached context were made for
every traced step, and log lines are all that read them there.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable

from opentelemetry import trace

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s%(trace_suffix)s"


class LogBudget:
    """At most ``burst`` lines per key in each ``seconds``; the rest are counted.

    For what a sender can repeat at will (a dropped message): each one is
    still counted by the caller's metric, but a flood must not fill the disk
    with the same line.  :meth:`allow` says whether to log now and how many
    lines of the key were held back since the last one, for the line to say.
    At most ``max_keys`` keys are remembered (then all are forgotten at once).
    """

    def __init__(
        self, burst: int = 10, seconds: float = 10.0, *, max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.burst, self.seconds, self.max_keys, self.clock = burst, seconds, max_keys, clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # key: (start, logged, held)

    def allow(self, key: str) -> int | None:
        """None: hold this line back.  Otherwise log it, saying the number returned
        (lines held back since the key's last line) if it is not 0."""
        now = self.clock()
        start, logged, held = self._windows.get(key, (now, 0, 0))
        if now - start >= self.seconds:
            start, logged = now, 0
        if logged >= self.burst:
            self._windows[key] = (start, logged, held + 1)
            return None
        if key not in self._windows and len(self._windows) >= self.max_keys:
            self._windows.clear()
        self._windows[key] = (start, logged + 1, 0)
        return held


# The ids of what runs now (a task attempt), as hex: read by TraceContextFilter
# before the OpenTelemetry context.
_LOG_IDS: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "tideflow_log_ids", default=None
)


def log_ids(trace_id: str, span_id: str) -> contextvars.Token[tuple[str, str] | None]:
    """Make ``trace_id``/``span_id`` (hex) the ids of this context's log lines;
    hand the token to :func:`reset_log_ids` when that work ends."""
    return _LOG_IDS.set((trace_id, span_id))


def reset_log_ids(token: contextvars.Token[tuple[str, str] | None]) -> None:
    _LOG_IDS.reset(token)


def trace_extra(trace_id: str, span_id: str) -> dict[str, str]:
    """``extra=`` for a log call about a traced thing whose span is not current."""
    return {"trace_id": trace_id, "span_id": span_id}


class TraceContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        trace_id: str | None = record.__dict__.get("trace_id")  # from trace_extra()
        span_id: str | None = record.__dict__.get("span_id")
        if trace_id is None:
            ids = _LOG_IDS.get()
            if ids is not None:
                trace_id, span_id = ids
            else:
                context = trace.get_current_span().get_span_context()
                if context.is_valid:
                    trace_id = format(context.trace_id, "032x")
                    span_id = format(context.span_id, "016x")
        suffix = f" trace_id={trace_id} span_id={span_id}" if trace_id else ""
        record.__dict__.update(trace_id=trace_id, span_id=span_id, trace_suffix=suffix)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.__dict__.get("trace_id"):
            entry["trace_id"] = record.__dict__["trace_id"]
            entry["span_id"] = record.__dict__["span_id"]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
