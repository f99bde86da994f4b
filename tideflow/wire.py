"""The MQTT contract between the cloud and the sites: topics, envelope, records.

Both sides import this module and nothing else about each other.

Topics (QoS 1, persistent sessions) live under ``tideflow/v1/sites/{site}/``:

==========  ============  ====================================================
channel     direction     what
==========  ============  ====================================================
assign      cloud -> edge a workflow assignment (uid, generation, spec), or a
                          CronWorkflow schedule to keep (or withdraw)
control     cloud -> edge cancel / suspend / resume one run
events      edge -> cloud a batch of outbox records (``seq`` ascending), or a
                          receipt for an assignment the site already holds
acks        cloud -> edge "applied everything through seq N"
state       edge -> cloud retained presence; the MQTT last will says offline
==========  ============  ====================================================

Every message is one JSON :class:`Envelope`.  :func:`decode` is the only way
in (the cloud first tries an ``events`` batch in one pass,
:func:`tideflow.wire_events.decode_batch`, derived from these models, and
sends it here whenever that pass does not take it): anything that fails to
parse, is over the size limit, nests deeper than :data:`MAX_JSON_DEPTH`, or
whose ``site`` or ``kind`` does not match its topic raises :class:`WireError`,
which receivers log once (with its message) and
count by its :class:`DropReason` — a fixed set, so a metric label never
comes from what a sender wrote — and never crash on.

Records are what the agent's outbox holds and the cloud applies: each reports
the whole current state of one run, one task, one log tail or one span.  An
attempt's span rides on its outcome's task record (``TaskRecord.span``, added
after version 1); span records still come from older agents, and for the
spans of runs and of attempts an agent restart cut short.

Versioned fields: a field added after protocol version 1 is optional, decodes
as ``None`` from a sender that predates it, and is left out of a message when
it is ``None`` (the models forbid unknown fields, so an older receiver would
refuse it).  The first is ``epoch``: the identity of the agent's database,
which numbers the site's records (``events`` and ``state`` carry it; ``acks``
echo the epoch they acknowledge).  A new database under the same site name
counts from seq 1 again, and only the epoch tells its records from the old
ones.  Receivers that know the field must be deployed first: the operator
before the agents.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from tideflow.phases import RunPhase, TaskPhase
from tideflow.spec import (
    DNS1123_LABEL_PATTERN,
    DNS1123_SUBDOMAIN_PATTERN,
    MAX_TASK_NAME,
    SITE_NAME_PATTERN,
)

PROTOCOL_VERSION = 1
TOPIC_ROOT = "tideflow/v1/sites"
SITE_PATTERN = SITE_NAME_PATTERN  # one rule for topics, placements and EdgeSite names
EPOCH_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
# A record's body as sent is at most this many bytes: the agent cuts its longest
# strings to fit (edge_agent.state.fit_record).  One record alone must fit an
# events message under the link's limit, or it is refused on every resend and
# everything behind it in the outbox never syncs.
MAX_RECORD_BYTES = DEFAULT_MAX_MESSAGE_BYTES // 2
# Records in one events batch at most (agents send up to --sync-batch-count, 1,000 by
# default, and never more than this).  Each is checked on the cloud's event loop: a
# site's batches of 200,000 tiny malformed records (7 MB, under the message limit)
# held the loop for many seconds each.
MAX_BATCH_RECORDS = 10_000
# Deeper JSON is refused before any model sees it: ours nests under 10 levels,
# and deep nesting is how a small message exhausts a recursive parser.
MAX_JSON_DEPTH = 64

ASSIGN, CONTROL, EVENTS, ACKS, STATE = "assign", "control", "events", "acks", "state"
CHANNELS = (ASSIGN, CONTROL, EVENTS, ACKS, STATE)

RUN_RECORD = "run"
TASK_RECORD = "task"
LOG_RECORD = "log"
SPAN_RECORD = "span"
SCHEDULE_RECORD = "schedule"
RECORD_KINDS = (RUN_RECORD, TASK_RECORD, LOG_RECORD, SPAN_RECORD, SCHEDULE_RECORD)

# Envelope kinds, one or two per channel.
KIND_ASSIGN, KIND_CONTROL, KIND_EVENTS, KIND_RECEIPT, KIND_ACK, KIND_STATE = (
    "assign",
    "control",
    "events",
    "receipt",
    "ack",
    "state",
)
# A CronWorkflow for the site to keep and fire (added after version 1: an
# older agent drops it as wrong-kind, and the cloud keeps re-sending it).
KIND_SCHEDULE = "schedule"
KINDS_BY_CHANNEL = {
    ASSIGN: {KIND_ASSIGN, KIND_SCHEDULE},
    CONTROL: {KIND_CONTROL},
    EVENTS: {KIND_EVENTS, KIND_RECEIPT},
    ACKS: {KIND_ACK},
    STATE: {KIND_STATE},
}


class DropReason(StrEnum):
    """Why a receiver dropped a message: the only values its metric label takes."""

    TOO_LARGE = "too-large"
    BAD_TOPIC = "bad-topic"
    NOT_JSON = "not-json"
    TOO_DEEP = "too-deep"
    BAD_ENVELOPE = "bad-envelope"
    WRONG_SITE = "wrong-site"
    WRONG_KIND = "wrong-kind"
    BAD_PAYLOAD = "bad-payload"
    BAD_RECORD = "bad-record"
    INVALID_SPEC = "invalid-spec"
    ACK_BEYOND_SENT = "ack-beyond-sent"
    ERROR = "error"  # handling it raised: a bug, logged with its traceback


class WireError(ValueError):
    """A message that is dropped: the message says what was wrong, ``reason`` counts it."""

    def __init__(self, message: str, reason: DropReason = DropReason.BAD_PAYLOAD) -> None:
        super().__init__(message)
        self.reason = reason


#: Characters of a sender's string a log line shows at most (see :func:`shown`).
SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A value a sender wrote, for a log line: repr-escaped, at most ``limit`` of its
    characters, and its length when longer.  A site's strings reached the operator's
    log whole (a megabyte uid on every receipt) and with their own newlines (a forged
    log line)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def topic(site: str, channel: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{channel}"


def agent_client_id(site: str) -> str:
    """The MQTT client id of a site's agent: its persistent session is named after it.

    Brokers bind a site's user to this id (decision 0015): RabbitMQ names the
    session's queue after it, Mosquitto's dynamic-security plugin refuses the
    site's credentials under any other id, so another site cannot take it.
    """
    return f"tideflow-agent-{site}"


def subscription(channel: str, site: str = "+") -> str:
    return topic(site, channel)


def parse_topic(name: str) -> tuple[str, str]:
    parts = name.split("/")
    prefix = TOPIC_ROOT.split("/")
    if len(parts) != len(prefix) + 2 or parts[: len(prefix)] != prefix:
        raise WireError(f"topic {shown(name, 200)} is not a Tideflow topic", DropReason.BAD_TOPIC)
    site, channel = parts[-2], parts[-1]
    if channel not in CHANNELS:
        raise WireError(
            f"topic {shown(name, 200)}: unknown channel {shown(channel)}", DropReason.BAD_TOPIC
        )
    return site, channel


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # Fields added after version 1: left out of a message when None (see module doc).
    versioned: ClassVar[frozenset[str]] = frozenset()


def _epoch_field(description: str) -> Any:
    return Field(None, pattern=EPOCH_PATTERN, description=description)


class Envelope(_Wire):
    v: Literal[1] = 1
    kind: str
    site: str = Field(pattern=SITE_PATTERN)
    seq: int | None = Field(None, ge=0)
    # Finite: a heartbeat "sent" at Infinity made every later one of its site stale.
    sent_at: float = Field(default_factory=time.time, alias="sentAt", allow_inf_nan=False)
    traceparent: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)


# A site names a run's files and cgroup after its uid and generation (a
# Kubernetes uid is 36 characters): a longer uid made a file name the kernel
# refuses, and a run the site could never start.
UID_MAX = 64
# ... with other characters made "_" (tideflow.tracing.run_id_for): "a/b" and
# "a_b" were two assignments with one run id, and the second broke the executor.
# A Kubernetes uid is a UUID, well inside this.
UID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
GENERATION_MAX = 2**63 - 1  # SQLite's INTEGER
#: A control's reason: as long as a Kubernetes Event's message (the operator cuts there).
CONTROL_REASON_MAX = 1024


class AssignPayload(_Wire):
    uid: str = Field(min_length=1, max_length=UID_MAX, pattern=UID_PATTERN)
    generation: int = Field(ge=1, le=GENERATION_MAX)
    # Kubernetes names, as the spec checks a local manifest's metadata: the
    # site keys its database and files by them, so a forged '../x' is dropped.
    namespace: str = Field(min_length=1, max_length=63, pattern=DNS1123_LABEL_PATTERN)
    name: str = Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN_PATTERN)
    spec: dict[str, Any]


class ControlPayload(_Wire):
    action: Literal["cancel", "suspend", "resume"]
    # It names an assignment's uid, so it is bounded as there: unbounded, a forged
    # control carried a megabyte uid into the site's database look-ups and logs.
    uid: str = Field(min_length=1, max_length=UID_MAX, pattern=UID_PATTERN)
    generation: int | None = Field(
        None, ge=1, le=GENERATION_MAX, description="None: every generation of uid"
    )
    # The cloud writes one short sentence here ("Workflow deleted (...)", "deadline of
    # 60s exceeded"); the site makes it the run's message, stored and sent back into
    # the Workflow status.  Unbounded, a forged cancel carried megabytes that way.
    reason: str | None = Field(None, max_length=CONTROL_REASON_MAX)


SCHEDULE_UID_MAX = 128  # a CronWorkflow's uid (36 characters from Kubernetes)


class SchedulePayload(_Wire):
    """Keep (``put``) or drop (``withdraw``) one CronWorkflow at the site.

    ``put`` of a higher generation replaces the held one (the site keeps its
    record of which times already fired); a lower or equal one is confirmed
    again and changes nothing.  ``withdraw`` of a schedule not held is
    confirmed too, so the cloud can stop re-sending it.
    """

    action: Literal["put", "withdraw"]
    uid: str = Field(min_length=1, max_length=SCHEDULE_UID_MAX)
    # As an assignment's: the site stores it (one of 2**64 raised OverflowError there).
    generation: int = Field(ge=1, le=GENERATION_MAX)
    namespace: str = Field(min_length=1, max_length=63, pattern=DNS1123_LABEL_PATTERN)
    name: str = Field(min_length=1, max_length=52, pattern=DNS1123_SUBDOMAIN_PATTERN)
    spec: dict[str, Any] | None = Field(None, description="The CronWorkflow spec (put only).")


class EventRecord(_Wire):
    seq: int = Field(ge=1)
    kind: Literal["run", "task", "log", "span", "schedule"]
    body: dict[str, Any]


class EventsPayload(_Wire):
    versioned: ClassVar[frozenset[str]] = frozenset({"epoch"})
    records: list[EventRecord] = Field(min_length=1, max_length=MAX_BATCH_RECORDS)
    epoch: str | None = _epoch_field("The sending database's identity; None from older agents.")


#: A receipt's phase: a run phase or ``Rejected``, one word (a phase added later
#: still passes; a megabyte of text does not).
RECEIPT_PHASE_PATTERN = r"^[A-Za-z]{1,32}$"


class ReceiptPayload(_Wire):
    """The site already holds this assignment (sent instead of running it twice).

    Its uid and generation echo an assignment's, so they are bounded as there.
    """

    uid: str = Field(min_length=1, max_length=UID_MAX, pattern=UID_PATTERN)
    generation: int = Field(ge=1, le=GENERATION_MAX)
    phase: str = Field(pattern=RECEIPT_PHASE_PATTERN)


class AckPayload(_Wire):
    versioned: ClassVar[frozenset[str]] = frozenset({"epoch"})
    through: int = Field(ge=0, description="Every record with seq <= through is applied.")
    resend: bool = Field(False, description="A gap was seen: send again from through + 1.")
    epoch: str | None = _epoch_field("The database whose seqs this acks; None: unknown.")


#: Most schedule uids a state message lists (a site holding more lists the first).
MAX_STATE_SCHEDULES = 1000
#: Most labels a state message carries, and the longest agent version: both go into
#: the site's EdgeSite, which the API server refuses whole past its size limit.
MAX_STATE_LABELS = 256
AGENT_VERSION_MAX = 128
#: A Kubernetes label's longest value and name (after the ``/``), and longest prefix.
LABEL_VALUE_MAX = 63
LABEL_NAME_MAX = 63
LABEL_PREFIX_MAX = 253


def _label_too_long(key: object, value: object) -> bool:
    """Whether a label is longer than Kubernetes takes (its form is checked where it is used)."""
    if not isinstance(key, str) or not isinstance(value, str):
        return False  # (refused by the field's type)
    prefix, _, name = key.rpartition("/")
    return (
        len(value) > LABEL_VALUE_MAX or len(name) > LABEL_NAME_MAX or len(prefix) > LABEL_PREFIX_MAX
    )


class StatePayload(_Wire):
    versioned: ClassVar[frozenset[str]] = frozenset({"epoch", "schedules", "boot"})
    online: bool
    agent_version: str | None = Field(None, alias="agentVersion", max_length=AGENT_VERSION_MAX)
    # Counts, shown in the EdgeSite status (``minimum: 0``, int64): a value out of
    # range made the API server refuse the site's whole status write.
    running: int = Field(0, ge=0, le=GENERATION_MAX)
    outbox_depth: int = Field(0, alias="outboxDepth", ge=0, le=GENERATION_MAX)
    last_acked_seq: int = Field(0, alias="lastAckedSeq", ge=0, le=GENERATION_MAX)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_STATE_LABELS)
    epoch: str | None = _epoch_field("The agent database's identity (see EventsPayload).")
    # Each a uid of a schedule the cloud sent (SchedulePayload.uid): longer is none of ours.
    schedules: list[Annotated[str, Field(max_length=SCHEDULE_UID_MAX)]] | None = Field(
        None,
        max_length=MAX_STATE_SCHEDULES,
        description="Uids of the CronWorkflows the site holds: the cloud withdraws any it "
        "no longer places there (deleted while its operator was down, too).",
    )
    boot: str | None = Field(
        None,
        pattern=EPOCH_PATTERN,
        description="The agent process's identity, the same in its heartbeats and its last "
        "will: the cloud tells an old process's late will from the current one's by it, "
        "not by the site's clock (decision 0029).  None from older agents.",
    )
    # How many labels were left out as too long (see _long_labels_left_out); not sent.
    _labels_left_out: int = PrivateAttr(0)

    @property
    def labels_left_out(self) -> int:
        return self._labels_left_out

    @model_validator(mode="wrap")
    @classmethod
    def _long_labels_left_out(
        cls, data: Any, handler: ModelWrapValidatorHandler[StatePayload]
    ) -> StatePayload:
        """Labels longer than Kubernetes takes are left out; the heartbeat is taken.

        Only their count was bounded: a site's 256 labels of any length were held
        for it, and a label no EdgeSite can carry is no reason to lose the site's
        presence and counters.  (Past the count the message is refused as before.)
        """
        left_out = 0
        labels = data.get("labels") if isinstance(data, dict) else None
        if isinstance(labels, dict) and len(labels) <= MAX_STATE_LABELS:
            kept = {k: v for k, v in labels.items() if not _label_too_long(k, v)}
            left_out = len(labels) - len(kept)
            if left_out:
                data = {**data, "labels": kept}
        payload = handler(data)
        if left_out:
            payload._labels_left_out = left_out
        return payload


PAYLOADS: dict[str, type[_Wire]] = {
    KIND_ASSIGN: AssignPayload,
    KIND_CONTROL: ControlPayload,
    KIND_EVENTS: EventsPayload,
    KIND_RECEIPT: ReceiptPayload,
    KIND_ACK: AckPayload,
    KIND_STATE: StatePayload,
    KIND_SCHEDULE: SchedulePayload,
}


# Record bodies, as the cloud validates them before applying.
class CronRef(_Wire):
    """Which schedule fired a run, and for which time (on run records of fired runs)."""

    uid: str = Field(min_length=1, max_length=SCHEDULE_UID_MAX)  # a SchedulePayload's
    name: str
    generation: int = Field(ge=1, le=GENERATION_MAX)  # a SchedulePayload's
    scheduled_time: float = Field(alias="scheduledTime")


class RunRecord(_Wire):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    versioned: ClassVar[frozenset[str]] = frozenset({"cron"})
    # A run's uid is an assignment's (AssignPayload.uid) or a fired run's (36
    # characters): a longer one is none a site sends, and went whole into the
    # operator's look-ups, views and log lines.
    uid: str = Field(min_length=1, max_length=UID_MAX)
    generation: int = Field(ge=1, le=GENERATION_MAX)  # an assignment's or a schedule's
    namespace: str
    name: str
    phase: RunPhase
    reason: str | None = None
    message: str | None = None
    suspended: bool = False
    started_at: float | None = Field(None, alias="startedAt")
    finished_at: float | None = Field(None, alias="finishedAt")
    cron: CronRef | None = Field(None, description="Set on runs a CronWorkflow fired.")


class AttemptSpanRef(_Wire):
    """A task record's ``attemptSpan`` (decision 0036): its attempt span's ids, the
    agent's site, and what the record lacks for an outcome without ``finishedAt``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    trace_id: str = Field(alias="traceId", pattern=r"^[0-9a-f]{32}$")
    span_id: str = Field(alias="spanId", pattern=r"^[0-9a-f]{16}$")
    parent_span_id: str | None = Field(None, alias="parentSpanId", pattern=r"^[0-9a-f]{16}$")
    site: str | None = None
    ended_at: float | None = Field(None, alias="endedAt", allow_inf_nan=False)
    retry_delay_seconds: float | None = Field(None, alias="retryDelaySeconds", allow_inf_nan=False)


class TaskRecord(_Wire):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    versioned: ClassVar[frozenset[str]] = frozenset({"span", "attempt_span"})
    uid: str = Field(min_length=1, max_length=UID_MAX)  # as RunRecord's
    generation: int = Field(ge=1, le=GENERATION_MAX)  # an assignment's or a schedule's
    namespace: str
    name: str
    # A spec's task name (at most MAX_TASK_NAME): a longer one was kept whole in the
    # operator's view, up to the size of a record.
    task: str = Field(max_length=MAX_TASK_NAME)
    compensation: bool = False
    phase: TaskPhase
    # The Workflow status holds attempt >= 0 and an int64 exit code: a record with
    # other numbers made its status patch refused for ever (so it is malformed).
    attempt: int = Field(0, ge=0, le=GENERATION_MAX)
    started_at: float | None = Field(None, alias="startedAt")
    finished_at: float | None = Field(None, alias="finishedAt")
    exit_code: int | None = Field(None, alias="exitCode", ge=-GENERATION_MAX - 1, le=GENERATION_MAX)
    outputs: dict[str, str] = Field(default_factory=dict)
    message: str | None = None
    span: dict[str, Any] | None = Field(
        None,
        exclude_if=lambda value: value is None,
        description="The finished attempt's span, on an outcome's record (decision 0022): "
        "what a span record's body is, carried here instead of in a record of its own.",
    )
    attempt_span: AttemptSpanRef | None = Field(
        None,
        alias="attemptSpan",
        exclude_if=lambda value: value is None,
        description="What of the finished attempt's span the record does not hold "
        "(decision 0036): the span is derived from the record and this "
        "(tideflow.tracing.attempt_span_of); newer agents send it instead of ``span``.",
    )


class LogRecord(_Wire):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    uid: str = Field(min_length=1, max_length=UID_MAX)  # as RunRecord's
    generation: int = Field(ge=1, le=GENERATION_MAX)  # an assignment's or a schedule's
    namespace: str
    name: str
    task: str = Field(max_length=MAX_TASK_NAME)  # as TaskRecord's
    attempt: int
    stream: Literal["stdout", "stderr"]
    tail: str


class ScheduleRecord(_Wire):
    """What the site holds of one CronWorkflow: its confirmation, and how it fires."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    uid: str = Field(min_length=1, max_length=SCHEDULE_UID_MAX)  # a SchedulePayload's
    generation: int = Field(ge=1, le=GENERATION_MAX)  # an assignment's or a schedule's
    namespace: str
    name: str
    state: Literal["Held", "Withdrawn", "Rejected"]
    message: str | None = None
    last_scheduled_time: float | None = Field(None, alias="lastScheduledTime")
    missed_count: int = Field(0, alias="missedCount")
    last_missed_time: float | None = Field(None, alias="lastMissedTime")
    # The mark the site's clock stepping back moved it from (the record reports the
    # moved mark); None otherwise, and from older agents (decision 0049).
    clock_stepped_back_from: float | None = Field(None, alias="clockSteppedBackFrom")


RECORD_MODELS: dict[str, type[_Wire]] = {
    RUN_RECORD: RunRecord,
    TASK_RECORD: TaskRecord,
    LOG_RECORD: LogRecord,
    SCHEDULE_RECORD: ScheduleRecord,
}


def encode(
    kind: str,
    site: str,
    payload: BaseModel | dict[str, Any],
    *,
    seq: int | None = None,
    traceparent: str | None = None,
) -> bytes:
    if isinstance(payload, _Wire):
        body = payload.model_dump(by_alias=True, mode="json")
        for name in payload.versioned:
            if getattr(payload, name) is None:
                body.pop(name, None)
    elif isinstance(payload, BaseModel):
        body = payload.model_dump(by_alias=True, mode="json")
    else:
        body = payload
    envelope = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "site": site,
        "seq": seq,
        "sentAt": time.time(),
        "traceparent": traceparent,
        "payload": body,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def encode_events(
    site: str, records: list[tuple[int, str, str]], *, epoch: str | None = None
) -> bytes:
    """An events batch from outbox rows (seq, kind, body JSON), without re-parsing bodies.

    ``epoch`` is the sending database's identity (left out when None).
    """
    parts = ",".join(
        f'{{"seq":{seq},"kind":{json.dumps(kind)},"body":{body}}}' for seq, kind, body in records
    )
    first = records[0][0] if records else None
    tail = "" if epoch is None else f',"epoch":{json.dumps(epoch)}'
    return (
        f'{{"v":{PROTOCOL_VERSION},"kind":"events","site":{json.dumps(site)},'
        f'"seq":{json.dumps(first)},"sentAt":{time.time()},"traceparent":null,'
        f'"payload":{{"records":[{parts}]{tail}}}}}'
    ).encode()


def decode(
    topic_name: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[Envelope, BaseModel]:
    """Parse and check one message; raise :class:`WireError` saying why it is dropped."""
    if len(data) > max_bytes:
        raise WireError(
            f"{len(data)} bytes is over the {max_bytes}-byte limit", DropReason.TOO_LARGE
        )
    site, channel = parse_topic(topic_name)
    try:
        raw = json.loads(data)
    except ValueError as exc:  # not UTF-8, not JSON, an integer of over 4,300 digits
        raise WireError(f"not JSON: {str(exc)[:200]}", DropReason.NOT_JSON) from None
    except RecursionError:
        raise WireError("JSON nested too deeply to parse", DropReason.TOO_DEEP) from None
    payload_raw = raw.get("payload") if isinstance(raw, dict) else None
    records = payload_raw.get("records") if isinstance(payload_raw, dict) else None
    if channel == EVENTS and isinstance(records, list) and len(records) > MAX_BATCH_RECORDS:
        # Counted before anything else is checked: the model checks the list's length
        # only after every item, at ~10 us a record on the receiver's event loop.
        raise WireError(
            f"bad events payload: records: at most {MAX_BATCH_RECORDS} records "
            f"in a batch, not {len(records)}",
            DropReason.BAD_PAYLOAD,
        )
    if _text_deeper_than(data, MAX_JSON_DEPTH) and _deeper_than(raw, MAX_JSON_DEPTH):
        raise WireError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", DropReason.TOO_DEEP)
    if not isinstance(raw, dict):
        raise WireError("envelope is not a JSON object", DropReason.BAD_ENVELOPE)
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise WireError(f"bad envelope: {_first_error(exc)}", DropReason.BAD_ENVELOPE) from None
    if envelope.site != site:
        raise WireError(
            f"envelope site {envelope.site!r} does not match topic site {shown(site)}",
            DropReason.WRONG_SITE,
        )
    if envelope.kind not in KINDS_BY_CHANNEL[channel]:
        raise WireError(
            f"kind {envelope.kind[:40]!r} does not belong on {channel!r}", DropReason.WRONG_KIND
        )
    try:
        payload = PAYLOADS[envelope.kind].model_validate(envelope.payload)
    except ValidationError as exc:
        raise WireError(
            f"bad {envelope.kind} payload: {_first_error(exc)}", DropReason.BAD_PAYLOAD
        ) from None
    return envelope, payload


def nested_deeper_than(data: bytes | str, limit: int) -> bool:
    """Might ``data`` (JSON that parsed) nest more than ``limit`` containers?

    The cheap test :func:`decode` starts with, on the text alone; True can be
    a false alarm (a duplicate key's dropped value), which :func:`decode`
    settles on the parsed value.
    """
    return _text_deeper_than(data, limit)


_STRUCTURE_ONLY = bytes(b for b in range(256) if b not in b'[]{}"')


def _text_deeper_than(data: bytes | str, limit: int) -> bool:
    """Could ``data`` (JSON that parsed) nest more than ``limit`` containers?

    Counted on the text, at C speed but for one pass over the brackets: an
    events message of 1,000 records has a few thousand brackets, where walking
    the parsed value visits each of its ~20,000 values in Python.  Escapes go
    first (``\\\\`` pairs, then ``\\"``), so the quotes left pair up as string
    delimiters and the brackets between them are text, not nesting.  The
    text's nesting equals the value's, except where a duplicate key's dropped
    value was deeper, so True here is confirmed by :func:`_deeper_than`.
    """
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(data)
        encoding = json.detect_encoding(raw)
        if encoding != "utf-8":  # UTF-16/32: its bytes are not ASCII brackets
            raw = raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(plain.translate(None, _STRUCTURE_ONLY).split(b'"')[::2])
    depth = 0
    for byte in outside:
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _deeper_than(value: Any, limit: int) -> bool:
    """True if ``value`` nests more than ``limit`` containers (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def decode_record(record: EventRecord) -> BaseModel | dict[str, Any]:
    """Validate a record body; spans stay plain dicts (their schema is tracing's),
    a span record's body as a task record's ``span``."""
    model = RECORD_MODELS.get(record.kind)
    if model is None:
        return record.body
    try:
        return model.model_validate(record.body)
    except ValidationError as exc:
        raise WireError(
            f"bad {record.kind} record seq {record.seq}: {_first_error(exc)}", DropReason.BAD_RECORD
        ) from None


def _first_error(exc: ValidationError) -> str:
    """The first error, naming its field; a field name the sender chose (an extra key,
    a map's key) is shown bounded and escaped, as is the message."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(root)"
    if len(where) > SHOWN_CHARS or not where.isprintable():
        where = shown(where)
    message = str(err["msg"])
    if len(message) > 200 or not message.isprintable():
        message = shown(message, 200)
    return f"{where}: {message}"
