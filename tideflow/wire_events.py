"""An ``events`` batch parsed and checked in one pass: the cloud's fast path.

Why: an offline site drains its outbox as batches of up to 1,000 records, and
the cloud checked them in three steps: ``json.loads``, the envelope and
payload models, then one pydantic model per record body
(:func:`tideflow.wire.decode_record`).  Building ~3 pydantic objects per
record cost about 15 us of the ~26 us the cloud spent on each (bench
``link_backlog``).  Here the whole message goes through one pydantic-core
validator, straight from the bytes, producing plain dicts.

Nothing is checked differently.  The validator is *derived* from the models
in :mod:`tideflow.wire` (each model's own field schemas: the same types,
constraints, aliases and defaults), so there is no second copy of the
contract to drift.  It is stricter in two ways only, and anything it does
not take goes the old way (:func:`tideflow.wire.decode`, then
:func:`check_record` per record), which decides as before:

* every object forbids unknown fields (the record models ignore them), so a
  message that parses here nests only as deep as the schema does: the
  JSON depth limit can only be reached inside a span (a span record's body,
  or the ``span`` a task record carries), and a batch holding a span is
  measured as :func:`tideflow.wire.decode` measures it;
* one bad record fails the whole fast pass; the slow path then skips that
  record alone (a malformed record is consumed, never waited for).

A record comes out as a :class:`CheckedRecord`: its body a dict keyed by the
model's field names (``started_at``, not ``startedAt``), defaults filled in,
phases as their enums; a span's body is the JSON object as sent.
"""

from __future__ import annotations

from typing import Any, NamedTuple, NotRequired, TypedDict

from pydantic import BaseModel, ValidationError
from pydantic_core import CoreSchema, SchemaValidator
from pydantic_core import core_schema as cs

from tideflow import wire


class CheckedRecord(TypedDict):
    """One record whose body was checked against its kind's model.

    ``body`` is None when it did not validate; ``error`` then says why.  (A
    dict, not an object: the fast path hands over what the validator made.)
    """

    seq: int
    kind: str
    body: dict[str, Any] | None
    error: NotRequired[str]


class CheckedBatch(NamedTuple):
    """An ``events`` payload whose records are checked (see :func:`decode_batch`)."""

    site: str
    records: list[CheckedRecord]
    epoch: str | None


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    """The model's own field schemas (types, constraints, aliases, defaults)."""
    schema: Any = model.__pydantic_core_schema__
    # A model validator would wrap the model schema in a function schema; its
    # check would be lost on a dict, so such a model cannot be derived here.
    if schema["type"] != "model" or schema["schema"]["type"] != "model-fields":
        raise TypeError(f"{model.__name__}: only plain field models can be checked as dicts")
    return dict(schema["schema"]["fields"])


def _as_dict(model: type[BaseModel], **replace: CoreSchema) -> cs.TypedDictSchema:
    """A dict validator with ``model``'s fields (some schemas replaced), unknown keys refused.

    A replaced field is required: its schema replaces the default with it (an
    envelope without ``payload`` came out without one, and raised KeyError).
    """
    fields: dict[str, cs.TypedDictField] = {}
    for name, field in _fields(model).items():
        schema = replace.get(name, field["schema"])
        fields[name] = cs.typed_dict_field(
            schema,
            required=name in replace or field["schema"]["type"] != "default",
            validation_alias=field.get("validation_alias"),
        )
    return cs.typed_dict_schema(
        fields,
        extra_behavior="forbid",
        config=cs.CoreConfig(validate_by_name=True, validate_by_alias=True),
    )


def _record(kind: str, body: CoreSchema) -> cs.TypedDictSchema:
    return _as_dict(wire.EventRecord, kind=cs.literal_schema([kind]), body=body)


_BODIES: dict[str, CoreSchema] = {
    kind: _as_dict(model) for kind, model in wire.RECORD_MODELS.items()
} | {wire.SPAN_RECORD: _fields(wire.EventRecord)["body"]["schema"]}
if set(_BODIES) != set(wire.RECORD_KINDS):  # pragma: no cover - a kind added to one list only
    raise TypeError("every record kind needs a body schema")
_RECORDS_FIELD: Any = _fields(wire.EventsPayload)["records"]["schema"]  # its bounds
_RECORDS = cs.list_schema(
    cs.tagged_union_schema({kind: _record(kind, body) for kind, body in _BODIES.items()}, "kind"),
    min_length=_RECORDS_FIELD["min_length"],
    max_length=_RECORDS_FIELD["max_length"],
)
_BATCH = SchemaValidator(
    _as_dict(wire.Envelope, payload=_as_dict(wire.EventsPayload, records=_RECORDS))
)


def decode_batch(
    topic: str, data: bytes, *, max_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
) -> CheckedBatch | None:
    """The batch in ``data`` if it passes the fast check, else None: use :func:`wire.decode`.

    None says nothing about the message (it may be a receipt, another
    version's batch, or broken); :func:`tideflow.wire.decode` then decides
    and explains.
    """
    if len(data) > max_bytes:
        return None
    # Every record has a "seq" key (and the envelope one), and those bytes cannot
    # occur inside a JSON string (its quotes would be escaped), so no more of them
    # than that means no more records than the limit.  More (or string values "seq"):
    # the slow path counts exactly, before checking any record; the validator checks
    # a list's length only after every item.
    if data.count(b'"seq"') > wire.MAX_BATCH_RECORDS + 1:
        return None
    try:
        site, channel = wire.parse_topic(topic)
        if channel != wire.EVENTS:
            return None
        message = _BATCH.validate_json(data)
    except (wire.WireError, ValidationError):
        return None
    if message["kind"] != wire.KIND_EVENTS or message["site"] != site:
        return None
    payload = message["payload"]
    records: list[CheckedRecord] = payload["records"]
    has_span = any(
        record["kind"] == wire.SPAN_RECORD
        or (record["kind"] == wire.TASK_RECORD and record["body"].get("span") is not None)  # type: ignore[union-attr]
        for record in records
    )
    if has_span and wire.nested_deeper_than(data, wire.MAX_JSON_DEPTH):
        return None
    return CheckedBatch(site, records, payload.get("epoch"))


def check_record(record: wire.EventRecord) -> CheckedRecord:
    """The slow path's record: its body checked by its model (a malformed one named)."""
    try:
        body = wire.decode_record(record)
    except wire.WireError as exc:
        return {"seq": record.seq, "kind": record.kind, "body": None, "error": str(exc)}
    checked = dict(body) if isinstance(body, BaseModel) else body
    return {"seq": record.seq, "kind": record.kind, "body": checked}


def checked_batch(site: str, payload: wire.EventsPayload) -> CheckedBatch:
    """A batch the slow path decoded, its records checked one by one."""
    return CheckedBatch(site, [check_record(r) for r in payload.records], payload.epoch)
