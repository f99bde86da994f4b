"""The MQTT contract between the cloud and the sites: topics, envelope, records.

Both sides import this module and nothing else about each other.  Records are
what the agent's outbox holds and the cloud applies: each reports the whole
current state of one run, one task attempt, one log tail or one span.
"""

from __future__ import annotations

RUN_RECORD = "run"
TASK_RECORD = "task"
LOG_RECORD = "log"
SPAN_RECORD = "span"
RECORD_KINDS = (RUN_RECORD, TASK_RECORD, LOG_RECORD, SPAN_RECORD)
