"""The Workflow spec: one pydantic model shared by the cloud and the edge.

Everything that can be checked about a Workflow without running it is checked
here, once: field types, unknown fields, task names, the ``dependsOn`` graph
(unknown names, cycles), the templates (``{{params.X}}``,
``{{tasks.T.outputs.K}}`` where T is an ancestor, ``{{workflow.name}}``) and
the numbers of timeouts and retries.  The operator uses it to accept or refuse
a custom resource, the agent to accept an assignment or a local manifest, and
the CRD generator to derive the openAPIV3Schema.

Failures surface as :class:`SpecError`, whose single message names every bad
field by its path (``spec.tasks[1].dependsOn[0]: unknown task 'extrct'``).

Hostile input is bounded here too, since the operator validates whatever is
applied and the agent whatever a file or the broker brings:

* Cost.  The graph checks are linear in tasks + edges (Kahn's algorithm; a
  cycle is named by one walk).  A ``{{tasks.X.outputs.K}}`` reference is
  accepted at once when X is a direct dependency; the others are answered
  together by one pass in topological order that carries, per task, a bitset
  over only the *referenced* tasks, dropped once its last dependant is done:
  O((tasks + edges) * R/64) word operations and O(live tasks * R/8) bytes,
  where R is the number of distinct tasks referenced from farther than a
  direct dependency (usually a handful).  ``bench/validation_cost.py``
  measures it.
* Size.  :func:`tideflow.manifest.load_manifest`/``read_manifest`` refuse
  more than ``MAX_MANIFEST_BYTES``, bytes that are not UTF-8 and duplicate YAML
  keys (the last ``command:`` silently winning is how a reviewed manifest
  runs something else).  An assignment off the wire is bounded by the
  message limit in :mod:`tideflow.wire` before it gets here.
* Names.  Site names are DNS-1123 labels (they become MQTT topic levels:
  no ``+``, ``#`` or ``/``), ``metadata.name``/``namespace`` Kubernetes
  names, task names Argo's rule, which keeps them safe in file names and
  templates.
* Shell.  A template inside the script argument of ``sh -c`` (and the other
  common shells) is refused: a value substituted there would be parsed as
  shell code.  Values reach a script through ``env``.

Three modules, one concern: this one holds the models and the parse
functions (the public face: import from here), :mod:`tideflow.spec_graph`
the ``dependsOn`` graph and template checks the models run, and
:mod:`tideflow.manifest` the reading of a manifest file before the models see
it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from tideflow.schedule import MAX_CRON_NAME, Schedule, parse_schedule, parse_timezone

# The graph and template checks live in their own module; the agent reaches
# render/template_refs/template_values here, with the models they serve.
from tideflow.spec_graph import TEMPLATE_RE as TEMPLATE_RE
from tideflow.spec_graph import WORKFLOW_REFS as WORKFLOW_REFS
from tideflow.spec_graph import check_graph
from tideflow.spec_graph import render as render
from tideflow.spec_graph import template_refs as template_refs
from tideflow.spec_graph import template_values as template_values

# The API group and version of every Tideflow resource: defined here only.
API_GROUP = "tideflow.io"
VERSION = "v1alpha1"
API_VERSION = f"{API_GROUP}/{VERSION}"

#: Argo's rule for DAG task names (``[a-zA-Z0-9][-a-zA-Z0-9]*``, at most 128
#: characters, its ``isValidWorkflowFieldName``) plus ``_``, which Tideflow
#: always allowed.  No ``.`` or ``/``: a name is part of a file name (the
#: task's outputs file) and of ``{{tasks.NAME.outputs.KEY}}``; never a leading
#: ``-`` or ``_``.  Names that differ only in case are refused as duplicates.
MAX_TASK_NAME = 128
TASK_NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_TASK_NAME - 1}}}$"
#: A site name is an MQTT topic level and an EdgeSite name: a DNS-1123 label.
SITE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
#: Kubernetes object names (``metadata.name``): a DNS-1123 subdomain, <= 253.
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
#: Kubernetes namespaces: a DNS-1123 label, <= 63.
DNS1123_LABEL_PATTERN = SITE_NAME_PATTERN
OUTPUT_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$"


#: A SpecError's text lists at most this many problems (``problems`` holds them all),
#: each field name and message at most these many characters.
SHOWN_PROBLEMS = 20
SHOWN_FIELD_CHARS = 200
SHOWN_MESSAGE_CHARS = 500


def _shown(text: str, limit: int) -> str:
    """``text`` as written when it is printable and short; else escaped, cut, its length said."""
    if len(text) <= limit and text.isprintable():
        return text
    cut = repr(text[:limit])[1:-1]
    return cut if len(text) <= limit else f"{cut}... ({len(text)} characters)"


def _message(text: str) -> str:
    """A problem's message: ours, lines and all (a YAML error's), but cut."""
    if len(text) <= SHOWN_MESSAGE_CHARS:
        return text
    return f"{text[:SHOWN_MESSAGE_CHARS]}... ({len(text)} characters)"


class SpecError(ValueError):
    """A manifest that cannot be accepted; ``problems`` names every bad field.

    ``str()`` is bounded (agents log it, store it as a refused schedule's message
    and send it to the cloud): the first :data:`SHOWN_PROBLEMS` problems, each
    field name escaped and cut when it is not plain short text (a sender chooses
    it: a spec of thousands of unknown fields named with newlines made a
    half-megabyte text with the sender's own log lines in it), each message cut,
    then how many more there are.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        shown = [
            f"{_shown(field, SHOWN_FIELD_CHARS)}: {_message(msg)}"
            for field, msg in problems[:SHOWN_PROBLEMS]
        ]
        if len(problems) > SHOWN_PROBLEMS:
            shown.append(f"and {len(problems) - SHOWN_PROBLEMS} more problems")
        super().__init__("; ".join(shown))

    @property
    def field(self) -> str:
        return self.problems[0][0]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        frozen=True,
    )

    def dump(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Backoff(_Model):
    """Exponential backoff between attempts: seconds * factor**(n-1), capped."""

    seconds: float = Field(1.0, gt=0, description="Delay before the first retry, in seconds.")
    factor: float = Field(2.0, ge=1, description="Multiplier applied to the delay per attempt.")
    max_seconds: float = Field(300.0, gt=0, description="Upper bound of any single delay.")

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> Backoff:
        if self.max_seconds < self.seconds:
            raise PydanticCustomError(
                "field", "{field}: must be >= seconds", {"field": "maxSeconds"}
            )
        return self


class Retry(_Model):
    """How often a failed attempt is tried again."""

    limit: int = Field(0, ge=0, le=100, description="Retries after the first attempt.")
    backoff: Backoff = Field(default_factory=Backoff, description="Delay between attempts.")
    jitter: float = Field(
        0.2, ge=0, le=1, description="Fraction of each delay that is randomised (0 = none)."
    )


#: Consecutive interruptions of one task after which it fails (``InterruptedTooOften``).
DEFAULT_MAX_INTERRUPTIONS = 3
#: What an interrupted attempt does on restart when neither the task nor defaults say.
DEFAULT_ON_INTERRUPTION = "Rerun"

OnInterruption = Literal["Rerun", "Fail"]

_MAX_INTERRUPTIONS_DOC = (
    "Consecutive interruptions of one task (the agent stopped, crashed or rebooted "
    "mid-attempt) after which it fails with reason InterruptedTooOften; interruptions "
    "never consume retry.limit."
)
_ON_INTERRUPTION_DOC = (
    "What an attempt cut short by an agent stop does on restart: Rerun it (default; the "
    "task sees TIDEFLOW_ATTEMPT increase and the same TIDEFLOW_IDEMPOTENCY_KEY) or Fail "
    "the task, for tasks that must never run twice."
)


class Defaults(_Model):
    """Values a task inherits when it does not set its own."""

    timeout_seconds: int | None = Field(None, gt=0, description="Per-attempt timeout.")
    retry: Retry | None = Field(None, description="Retry policy.")
    max_interruptions: int | None = Field(
        None, ge=1, le=100, description=f"{_MAX_INTERRUPTIONS_DOC} Unset: 3."
    )
    on_interruption: OnInterruption | None = Field(
        None, description=f"{_ON_INTERRUPTION_DOC} Unset: Rerun."
    )


class LabelSelector(_Model):
    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels an EdgeSite must carry."
    )


class Placement(_Model):
    """Where the workflow runs: one named site, or a site chosen by labels."""

    site: str | None = Field(
        None,
        min_length=1,
        pattern=SITE_NAME_PATTERN,
        description="Name of the EdgeSite: lowercase letters, digits and '-' (a DNS-1123 label).",
    )
    site_selector: LabelSelector | None = Field(
        None, description="Choose a connected, least-loaded EdgeSite with these labels."
    )

    @model_validator(mode="after")
    def _one_of(self) -> Placement:
        if (self.site is None) == (self.site_selector is None):
            raise PydanticCustomError(
                "field", "{field}: exactly one of site or siteSelector", {"field": "site"}
            )
        return self


_T = TypeVar("_T")


def _no_nul(value: _T) -> _T:
    """``value`` unless a string in it (a map's keys too) holds a NUL byte or is not
    Unicode text.

    No program argument, environment value or path can hold a NUL byte (the
    kernel's strings end there), nor a lone surrogate (JSON's ``"\\ud800"``,
    which an assignment can carry and no YAML or Kubernetes object can): such a
    task could never start, and said "NUL byte" for both.
    """
    texts: Any = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    for text in [texts] if isinstance(texts, str) else texts or ():
        if not isinstance(text, str):
            continue
        if "\0" in text:
            raise ValueError(
                "contains a NUL byte, which no program argument, environment value or path can hold"
            )
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError(
                    "is not valid Unicode text (it holds a lone surrogate, such as JSON's "
                    '"\\ud800"), which no program argument, environment value or path can hold'
                ) from None
    return value


class Task(_Model):
    """One step of the DAG: a program run on the site."""

    name: str = Field(pattern=TASK_NAME_PATTERN, description="Unique name within the workflow.")
    command: list[str] | None = Field(
        None, min_length=1, description="Program and arguments, run without a shell."
    )
    script: str | None = Field(
        None,
        min_length=1,
        description="Script text run by `shell`; never templated (pass values via env).",
    )
    shell: str | None = Field(None, min_length=1, description="Interpreter for `script`.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables; values may use templates."
    )
    working_dir: str | None = Field(None, min_length=1, description="Working directory.")
    depends_on: list[str] = Field(
        default_factory=list, description="Tasks that must succeed before this one starts."
    )
    timeout_seconds: int | None = Field(None, gt=0, description="Per-attempt timeout.")
    retry: Retry | None = Field(None, description="Retry policy; overrides defaults.retry.")
    max_interruptions: int | None = Field(
        None,
        ge=1,
        le=100,
        description=f"{_MAX_INTERRUPTIONS_DOC} Unset: defaults.maxInterruptions.",
    )
    on_interruption: OnInterruption | None = Field(
        None, description=f"{_ON_INTERRUPTION_DOC} Unset: defaults.onInterruption."
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return _no_nul(env)

    @field_validator("command", "script", "shell", "working_dir")
    @classmethod
    def _no_nul_bytes(cls, value: Any) -> Any:
        return _no_nul(value)

    @model_validator(mode="after")
    def _command_xor_script(self) -> Task:
        if (self.command is None) == (self.script is None):
            raise PydanticCustomError(
                "field",
                "{field}: exactly one of command or script is required",
                {"field": "command"},
            )
        if self.shell is not None and self.script is None:
            raise PydanticCustomError(
                "field", "{field}: only valid with script", {"field": "shell"}
            )
        return self

    def argv_templates(self) -> list[str]:
        if self.command is not None:
            return list(self.command)
        return [self.shell or "/bin/sh", "-c", self.script or ""]


class WorkflowSpec(_Model):
    """A DAG of tasks run at one edge site, as one durable run."""

    placement: Placement | None = Field(None, description="Which site runs the workflow.")
    params: dict[str, str] = Field(
        default_factory=dict, description="Values available as {{params.NAME}}."
    )
    defaults: Defaults = Field(default_factory=Defaults, description="Task defaults.")
    deadline_seconds: int | None = Field(
        None, gt=0, description="The whole run fails with DeadlineExceeded after this long."
    )
    suspend: bool = Field(False, description="Pause the run: no new task starts while true.")
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=10 * 365 * 24 * 3600,
        description="The operator deletes the Workflow this long after it finished (Succeeded, "
        "Failed or Cancelled); unset: the operator's default (none unless configured).",
    )
    tasks: list[Task] = Field(min_length=1, description="The DAG's tasks.")
    on_failure: list[Task] = Field(
        default_factory=list, description="Compensation tasks, run only if the DAG failed."
    )

    @field_validator("params")
    @classmethod
    def _no_nul_in_params(cls, params: dict[str, str]) -> dict[str, str]:
        return _no_nul(params)  # they reach argv and env through templates

    @model_validator(mode="after")
    def _graph_and_templates(self) -> WorkflowSpec:
        problems = check_graph(self)
        if problems:
            text = "; ".join(f"{field}: {msg}" for field, msg in problems)
            raise PydanticCustomError("graph", "{text}", {"text": text, "problems": problems})
        return self

    def task(self, name: str) -> Task:
        for task in (*self.tasks, *self.on_failure):
            if task.name == name:
                return task
        raise KeyError(name)

    def timeout_for(self, task: Task) -> int | None:
        return task.timeout_seconds or self.defaults.timeout_seconds

    def retry_for(self, task: Task) -> Retry:
        return task.retry or self.defaults.retry or Retry()

    def max_interruptions_for(self, task: Task) -> int:
        """Consecutive interruptions after which ``task`` fails (InterruptedTooOften)."""
        if task.max_interruptions is not None:
            return task.max_interruptions
        if self.defaults.max_interruptions is not None:
            return self.defaults.max_interruptions
        return DEFAULT_MAX_INTERRUPTIONS

    def on_interruption_for(self, task: Task) -> str:
        """``Rerun`` or ``Fail``: what an interrupted attempt of ``task`` does on restart."""
        return task.on_interruption or self.defaults.on_interruption or DEFAULT_ON_INTERRUPTION


class ObjectMeta(BaseModel):
    """The Kubernetes metadata we read; everything else passes through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None

    @field_validator("name")
    @classmethod
    def _dns_subdomain(cls, name: str) -> str:
        if len(name) > 253 or not re.fullmatch(DNS1123_SUBDOMAIN_PATTERN, name):
            raise ValueError(
                f"{name!r} is not a Kubernetes object name: a DNS-1123 subdomain, lowercase "
                "letters, digits, '-' and '.', each '.'-separated part starting and ending "
                "with a letter or digit, at most 253 characters"
            )
        return name

    @field_validator("namespace")
    @classmethod
    def _dns_label(cls, namespace: str) -> str:
        if len(namespace) > 63 or not re.fullmatch(DNS1123_LABEL_PATTERN, namespace):
            raise ValueError(
                f"{namespace!r} is not a Kubernetes namespace: a DNS-1123 label, lowercase "
                "letters, digits and '-', starting and ending with a letter or digit, at "
                "most 63 characters"
            )
        return namespace


class Workflow(BaseModel):
    """A whole Workflow manifest (apiVersion, kind, metadata, spec)."""

    model_config = ConfigDict(extra="forbid")
    api_version: Literal["tideflow.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Workflow"]
    metadata: ObjectMeta
    spec: WorkflowSpec
    status: dict[str, Any] | None = None


# ---------------------------------------------------------------- CronWorkflow
ConcurrencyPolicy = Literal["Allow", "Forbid", "Replace"]
#: The shape of a schedule, for the CRD: an alias, an interval, or 5 fields.
SCHEDULE_SHAPE_PATTERN = (
    r"^\s*(@(yearly|annually|monthly|weekly|daily|midnight|hourly)"
    r"|@every\s+([0-9]+h)?([0-9]+m)?([0-9]+s)?"
    r"|\S+\s+\S+\s+\S+\s+\S+\s+\S+)\s*$"
)


class CronWorkflowTemplate(WorkflowSpec):
    """The Workflow each fired run is: a Workflow spec without placement."""

    @model_validator(mode="after")
    def _no_placement(self) -> CronWorkflowTemplate:
        if self.placement is not None:
            raise PydanticCustomError(
                "field",
                "{field}: not allowed in a CronWorkflow's workflowSpec; use spec.placement",
                {"field": "placement"},
            )
        if self.ttl_seconds_after_finished is not None:
            raise PydanticCustomError(
                "field",
                "{field}: not allowed in a CronWorkflow's workflowSpec; fired runs are kept by "
                "spec.successfulJobsHistoryLimit and spec.failedJobsHistoryLimit",
                {"field": "ttlSecondsAfterFinished"},
            )
        return self


class CronWorkflowSpec(_Model):
    """A Workflow run at each matching site on a schedule kept by the site's own clock."""

    schedule: str = Field(
        min_length=1,
        max_length=256,
        # The API server refuses the wrong shape at apply time; the full check
        # (field ranges, interval) is parse_schedule's, run by the operator and the agent.
        json_schema_extra={"pattern": SCHEDULE_SHAPE_PATTERN},
        description="When to run: 5 cron fields (minute hour day-of-month month day-of-week), "
        "@hourly, @daily, @weekly, @monthly, @yearly, or '@every 90s' (at least 1 s; "
        "instants at multiples of the interval since the Unix epoch).",
    )
    timezone: str = Field(
        "UTC",
        min_length=1,
        max_length=64,
        description="IANA time zone of the cron fields (e.g. Europe/Berlin). A time the "
        "spring-forward gap skips does not fire; a repeated time fires once.",
    )
    placement: Placement = Field(
        description="Where the schedule runs: one site, or every EdgeSite whose labels match "
        "siteSelector (each fires on its own)."
    )
    concurrency_policy: ConcurrencyPolicy = Field(
        "Allow",
        description="Per site: Allow runs to overlap, Forbid a new run while one is active "
        "(that time is skipped), or Replace (cancel the active run and start the new one).",
    )
    starting_deadline_seconds: int | None = Field(
        None,
        ge=0,
        description="A time missed while the agent was down still fires (once: the latest) if "
        "no older than this; older ones are recorded as missed. Unset: the latest missed "
        "time always fires.",
    )
    suspend: bool = Field(False, description="No new run fires while true; active runs go on.")
    successful_jobs_history_limit: int = Field(
        3, ge=0, le=1000, description="Succeeded runs kept per site, in the cloud and at the site."
    )
    failed_jobs_history_limit: int = Field(
        1, ge=0, le=1000, description="Failed runs kept per site, in the cloud and at the site."
    )
    workflow_spec: CronWorkflowTemplate = Field(
        description="The Workflow each run is: params, defaults, tasks, onFailure, "
        "deadlineSeconds (no placement)."
    )

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, text: str) -> str:
        parse_schedule(text)  # ScheduleError is a ValueError: named as spec.schedule
        return text

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        parse_timezone(name)
        return name

    def parsed_schedule(self) -> Schedule:
        return parse_schedule(self.schedule, self.timezone)


class CronWorkflowMeta(ObjectMeta):
    """CronWorkflow metadata: the name is at most 52 characters (as a CronJob's)."""

    @field_validator("name")
    @classmethod
    def _short(cls, name: str) -> str:
        if len(name) > MAX_CRON_NAME:
            raise ValueError(
                f"{name!r} is longer than {MAX_CRON_NAME} characters (each run is named "
                "<name>-<site>-<unix seconds>)"
            )
        return name


class CronWorkflow(BaseModel):
    """A whole CronWorkflow manifest."""

    model_config = ConfigDict(extra="forbid")
    api_version: Literal["tideflow.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["CronWorkflow"]
    metadata: CronWorkflowMeta
    spec: CronWorkflowSpec
    status: dict[str, Any] | None = None


def parse_cron_spec(data: Any, prefix: str = "spec") -> CronWorkflowSpec:
    """Validate a CronWorkflow spec mapping; :class:`SpecError` naming each bad field."""
    if not isinstance(data, Mapping):
        raise SpecError([(prefix, "must be a mapping")])
    _check_size(data, prefix)
    try:
        spec = CronWorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, prefix)) from None
    _check_size(spec.dump(), prefix)
    return spec


def parse_cron_workflow(data: Any) -> CronWorkflow:
    """Validate a whole CronWorkflow manifest; :class:`SpecError` naming each bad field."""
    if not isinstance(data, Mapping):
        raise SpecError([("(manifest)", "must be a mapping with apiVersion, kind, metadata, spec")])
    if isinstance(data.get("spec"), Mapping):
        _check_size(data["spec"], "spec")
    try:
        cron = CronWorkflow.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, "")) from None
    # A site is sent the manifest form (every default written out): it must fit too.
    _check_size(cron.spec.dump(), "spec")
    return cron


def _loc_to_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-", "model-")) or part in ("list[str]", "str", "int"):
            continue
        else:
            path += f".{part}" if path else part
    return path


def _problems_from(error: ValidationError, prefix: str) -> list[tuple[str, str]]:
    problems = []
    for err in error.errors():
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "graph":
            base = _loc_to_path(prefix, loc)
            for field, msg in ctx["problems"]:
                problems.append((f"{base}.{field}" if base else field, msg))
        elif err["type"] == "field":
            field = _loc_to_path(prefix, loc)
            sub = str(ctx.get("field", ""))
            problems.append((f"{field}.{sub}" if field else sub, _after_colon(err["msg"])))
        elif err["type"] == "extra_forbidden":
            problems.append((_loc_to_path(prefix, loc), "unknown field"))
        elif err["type"] == "string_pattern_mismatch" and ctx.get("pattern") in _PATTERN_HINTS:
            hint = _PATTERN_HINTS[ctx["pattern"]]
            message = f"{err['input']!r} is not {hint} (pattern {ctx['pattern']})"
            problems.append((_loc_to_path(prefix, loc), message))
        elif err["type"] == "value_error":
            problems.append((_loc_to_path(prefix, loc), str(ctx.get("error", err["msg"]))))
        else:
            problems.append((_loc_to_path(prefix, loc), err["msg"]))
    return problems


_SITE_HINT = (
    "a valid site name: lowercase letters, digits and '-', starting and ending with a "
    "letter or digit, at most 63 characters (a DNS-1123 label; no MQTT '+', '#' or '/')"
)
_PATTERN_HINTS = {
    SITE_NAME_PATTERN: _SITE_HINT,
    TASK_NAME_PATTERN: (
        "a valid task name: letters, digits, '-' and '_', starting with a letter or digit, "
        f"at most {MAX_TASK_NAME} characters"
    ),
}


def _after_colon(msg: str) -> str:
    return msg.split(": ", 1)[1] if ": " in msg else msg


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a spec is validated.

    Validation allocates a few objects per task and frees almost all of them
    by reference counting; with the collector on, the full collections that
    many allocations trigger rescan every live object of the process, which
    made a 10,000-task spec cost 15x a 1,000-task one instead of 10x
    (bench/validation_cost.py).  Nothing it allocates forms cycles that must
    be freed at once; the next collection after it takes what there is.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


#: Spec fields only the cloud acts on.  They are left out of the spec a site is
#: sent (an agent older than the field would refuse the whole assignment as an
#: unknown field) and out of the assigned spec's digest (changing one after
#: assignment changes nothing the site runs, so it is not refused as an edit).
CLOUD_ONLY_FIELDS = frozenset({"ttlSecondsAfterFinished"})


def site_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A Workflow spec (manifest form) as a site is sent it: cloud-only fields left out."""
    return {k: v for k, v in spec.items() if k not in CLOUD_ONLY_FIELDS}


# The most a spec may take as the wire writes it (compact, non-ASCII escaped): an
# assignment (or a CronWorkflow's put) carries it to a site, which refuses a message
# over 1 MiB (tideflow.wire.DEFAULT_MAX_MESSAGE_BYTES); the rest is the envelope's.
# A larger spec was assigned, dropped by the site on every re-send, and waited for ever.
MAX_SPEC_BYTES = 960 * 1024


def _check_size(data: Mapping[str, Any], prefix: str) -> None:
    size = len(json.dumps(data, separators=(",", ":"), default=str))
    if size > MAX_SPEC_BYTES:
        raise SpecError([(prefix, f"is {size} bytes as sent to a site, over the "
                                  f"{MAX_SPEC_BYTES}-byte limit of an assignment")])  # fmt: skip


def parse_spec(data: Any, prefix: str = "spec") -> WorkflowSpec:
    """Validate a spec mapping; raise :class:`SpecError` naming each bad field."""
    if not isinstance(data, Mapping):
        raise SpecError([(prefix, "must be a mapping")])
    _check_size(data, prefix)
    try:
        with _collector_paused():
            return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, prefix)) from None


def parse_workflow(data: Any) -> Workflow:
    """Validate a whole manifest; raise :class:`SpecError` naming each bad field."""
    if not isinstance(data, Mapping):
        raise SpecError([("(manifest)", "must be a mapping with apiVersion, kind, metadata, spec")])
    try:
        with _collector_paused():
            return Workflow.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, "")) from None


def validate_site_name(name: str, field: str = "site") -> str:
    """``name`` if it is a valid site name, else :class:`SpecError` naming ``field``.

    A site name is a topic level (``tideflow/v1/sites/NAME/...``) and an
    EdgeSite's name, so it is a DNS-1123 label: no ``+``, ``#`` or ``/``.
    """
    if not isinstance(name, str) or not re.fullmatch(SITE_NAME_PATTERN, name):
        raise SpecError([(field, f"{name!r} is not {_SITE_HINT}")])
    return name
