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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

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

API_GROUP = "tideflow.io"
API_VERSION = f"{API_GROUP}/v1alpha1"

TASK_NAME_PATTERN = r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$"
OUTPUT_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$"
TEMPLATE_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_TASK_OUTPUT_REF = re.compile(r"^tasks\.([a-z0-9_-]+)\.outputs\.([A-Za-z_][A-Za-z0-9_.-]*)$")
_PARAM_REF = re.compile(r"^params\.([A-Za-z_][A-Za-z0-9_.-]*)$")
WORKFLOW_REFS = ("workflow.name", "workflow.namespace", "workflow.uid")


class SpecError(ValueError):
    """A manifest that cannot be accepted; ``str()`` names every bad field."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in problems))

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

    site: str | None = Field(None, min_length=1, description="Name of the EdgeSite.")
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
        return env

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
    tasks: list[Task] = Field(min_length=1, description="The DAG's tasks.")
    on_failure: list[Task] = Field(
        default_factory=list, description="Compensation tasks, run only if the DAG failed."
    )

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
    name: str = Field(min_length=1, max_length=253)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None


class Workflow(BaseModel):
    """A whole Workflow manifest (apiVersion, kind, metadata, spec)."""

    model_config = ConfigDict(extra="forbid")
    api_version: Literal["tideflow.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Workflow"]
    metadata: ObjectMeta
    spec: WorkflowSpec
    status: dict[str, Any] | None = None


def template_refs(text: str) -> list[str]:
    return TEMPLATE_RE.findall(text)


def _task_problems(
    task: Task, where: str, ancestors: set[str], params: Mapping[str, str]
) -> Iterable[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    if task.command is not None:
        fields += [(f"{where}.command[{i}]", arg) for i, arg in enumerate(task.command)]
    fields += [(f"{where}.env.{key}", value) for key, value in task.env.items()]
    for field, text in fields:
        for ref in template_refs(text):
            if ref in WORKFLOW_REFS:
                continue
            param = _PARAM_REF.match(ref)
            if param:
                if param.group(1) not in params:
                    yield field, f"unknown parameter {param.group(1)!r} in {{{{{ref}}}}}"
                continue
            out = _TASK_OUTPUT_REF.match(ref)
            if out:
                if out.group(1) not in ancestors:
                    yield (
                        field,
                        (
                            f"{{{{{ref}}}}} names task {out.group(1)!r}, which is not an "
                            "ancestor of this task (add it to dependsOn)"
                        ),
                    )
                continue
            yield field, f"unknown template {{{{{ref}}}}}"


def _check_dag(
    tasks: list[Task], where: str, known_outside: set[str]
) -> tuple[list[tuple[str, str]], dict[str, set[str]]]:
    problems: list[tuple[str, str]] = []
    index: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if task.name in index or task.name in known_outside:
            problems.append((f"{where}[{i}].name", f"duplicate task name {task.name!r}"))
        index.setdefault(task.name, i)
    for i, task in enumerate(tasks):
        for j, dep in enumerate(task.depends_on):
            if dep not in index:
                problems.append((f"{where}[{i}].dependsOn[{j}]", f"unknown task {dep!r}"))
            elif dep == task.name:
                problems.append((f"{where}[{i}].dependsOn[{j}]", "a task cannot depend on itself"))
    if problems:
        return problems, {}
    # Kahn's algorithm; whatever is left over sits on or downstream of a cycle.
    indegree = {t.name: len(set(t.depends_on)) for t in tasks}
    children: dict[str, list[str]] = {t.name: [] for t in tasks}
    for t in tasks:
        for dep in set(t.depends_on):
            children[dep].append(t.name)
    order = [name for name, deg in indegree.items() if deg == 0]
    for name in order:
        for child in children[name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                order.append(child)
    if len(order) != len(tasks):
        # Every left-over task has a left-over dependency, so following those
        # from any of them must revisit a task: the walk's loop is a cycle.
        # (Naming all left-overs would also blame tasks that merely depend on one.)
        deps = {t.name: t.depends_on for t in tasks}
        walk = [next(t.name for t in tasks if indegree[t.name] > 0)]
        seen: set[str] = set()
        while walk[-1] not in seen:
            seen.add(walk[-1])
            walk.append(next(d for d in deps[walk[-1]] if indegree[d] > 0))
        cyclic = sorted(set(walk[walk.index(walk[-1]) : -1]))
        first = min(index[name] for name in cyclic)
        return [(f"{where}[{first}].dependsOn", f"cycle through tasks {', '.join(cyclic)}")], {}
    ancestors: dict[str, set[str]] = {}
    by_name = {t.name: t for t in tasks}
    for name in order:
        acc: set[str] = set()
        for dep in by_name[name].depends_on:
            acc |= {dep} | ancestors[dep]
        ancestors[name] = acc
    return [], ancestors


def check_graph(spec: WorkflowSpec) -> list[tuple[str, str]]:
    """Graph and template problems as (field path below spec, message)."""
    problems, ancestors = _check_dag(spec.tasks, "tasks", set())
    main_names = {t.name for t in spec.tasks}
    comp_problems, comp_ancestors = _check_dag(spec.on_failure, "onFailure", main_names)
    problems += comp_problems
    if problems:
        return problems
    for i, task in enumerate(spec.tasks):
        problems += _task_problems(task, f"tasks[{i}]", ancestors[task.name], spec.params)
    for i, task in enumerate(spec.on_failure):
        # Compensation may read any main task's outputs: those that exist.
        visible = comp_ancestors[task.name] | main_names
        problems += _task_problems(task, f"onFailure[{i}]", visible, spec.params)
    return problems


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
        else:
            problems.append((_loc_to_path(prefix, loc), err["msg"]))
    return problems


def _after_colon(msg: str) -> str:
    return msg.split(": ", 1)[1] if ": " in msg else msg


def parse_spec(data: Any, prefix: str = "spec") -> WorkflowSpec:
    """Validate a spec mapping; raise :class:`SpecError` naming each bad field."""
    if not isinstance(data, Mapping):
        raise SpecError([(prefix, "must be a mapping")])
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, prefix)) from None


def parse_workflow(data: Any) -> Workflow:
    """Validate a whole manifest; raise :class:`SpecError` naming each bad field."""
    if not isinstance(data, Mapping):
        raise SpecError([("(manifest)", "must be a mapping with apiVersion, kind, metadata, spec")])
    try:
        return Workflow.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, "")) from None


def render(text: str, values: Mapping[str, str]) -> str:
    """Substitute templates in one argv element or env value.

    ``values`` maps a reference (``params.batch``) to its value; a reference
    missing from it raises KeyError naming the reference.
    """

    def substitute(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref not in values:
            raise KeyError(ref)
        return values[ref]

    return TEMPLATE_RE.sub(substitute, text)


def template_values(
    spec: WorkflowSpec,
    *,
    name: str,
    namespace: str,
    uid: str,
    outputs: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    values = {"workflow.name": name, "workflow.namespace": namespace, "workflow.uid": uid}
    values.update({f"params.{k}": v for k, v in spec.params.items()})
    for task, outs in outputs.items():
        values.update({f"tasks.{task}.outputs.{k}": v for k, v in outs.items()})
    return values
