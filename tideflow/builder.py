"""Workflows as Python code: a small typed builder for the Workflow spec.

YAML is the reviewable form of a workflow; this module is the composable one.
Both end in the same place: :meth:`Workflow.build` produces the
:class:`tideflow.spec.Workflow` that :func:`tideflow.spec.parse_workflow`
accepts, validated by the same code, and :meth:`Workflow.to_yaml` renders the
manifest a human would have written (camelCase keys, only what was set)::

    from tideflow.builder import Backoff, Retry, Workflow

    wf = Workflow("nightly", "plant-7", site="line-2", params={"batch": "2026-11-26"})
    extract = wf.task("extract", command=["python3", "extract.py", wf.param("batch")])
    wf.task(
        "load",
        script='load --rows "$ROWS"',
        env={"ROWS": extract.output("rows")},
        depends_on=[extract],
        retry=Retry(limit=5, backoff=Backoff(seconds=2, max_seconds=120)),
    )
    wf.on_failure("rollback", command=["rollback.sh", wf.param("batch")])
    print(wf.to_yaml())

Dependencies are explicit: ``extract.output("rows")`` only writes the
template ``{{tasks.extract.outputs.rows}}``; the reading task must still list
``extract`` in ``depends_on`` (validation refuses a template that names a task
which is not an ancestor, naming the field).  ``depends_on`` takes the
:class:`TaskRef` a ``task()`` call returned, or a task name.

Mistakes only the builder can make (a ``TaskRef`` from another workflow, a
main task depending on a compensation task, ``command`` given as one string)
raise :class:`~tideflow.spec.SpecError` at once; everything else is checked by
the spec at :meth:`Workflow.build` time, and the error names the field by its
manifest path and the task by its name.  ``tideflow render my_flow.py`` (see
:mod:`tideflow.cli`) prints the manifests a Python file defines.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import yaml

from tideflow import spec
from tideflow.spec import OUTPUT_KEY_PATTERN, SpecError

__all__ = [
    "WORKFLOW_NAME",
    "WORKFLOW_NAMESPACE",
    "WORKFLOW_UID",
    "Backoff",
    "CronWorkflow",
    "Retry",
    "SpecError",
    "TaskRef",
    "Workflow",
    "manifest_yaml",
]

#: Templates the agent fills in from the run itself.
WORKFLOW_NAME = "{{workflow.name}}"
WORKFLOW_NAMESPACE = "{{workflow.namespace}}"
WORKFLOW_UID = "{{workflow.uid}}"


@dataclass(frozen=True)
class Backoff:
    """Delay between attempts, ``seconds * factor**(n-1)`` capped at ``max_seconds``.

    A field left ``None`` is not written to the manifest; the spec's default
    (1, 2, 300) applies.
    """

    seconds: float | None = None
    factor: float | None = None
    max_seconds: float | None = None

    def to_manifest(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.factor is not None:
            out["factor"] = self.factor
        if self.max_seconds is not None:
            out["maxSeconds"] = self.max_seconds
        return out


@dataclass(frozen=True)
class Retry:
    """A retry policy: ``limit`` retries after the first attempt.

    A field left ``None`` is not written to the manifest; the spec's default
    applies (``limit`` 0, ``jitter`` 0.2, the :class:`Backoff` defaults).
    """

    limit: int | None = None
    backoff: Backoff | Mapping[str, Any] | None = None
    jitter: float | None = None

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.limit is not None:
            out["limit"] = self.limit
        if self.backoff is not None:
            out["backoff"] = (
                self.backoff.to_manifest()
                if isinstance(self.backoff, Backoff)
                else dict(self.backoff)
            )
        if self.jitter is not None:
            out["jitter"] = self.jitter
        return out


#: What ``retry=`` accepts: a builder :class:`Retry`, the spec's model, or the
#: manifest mapping itself (camelCase keys, as in YAML).
RetryLike: TypeAlias = Retry | spec.Retry | Mapping[str, Any]
#: What ``depends_on=`` lists (or is): the :class:`TaskRef` of a task, or a task's name.
TaskLike: TypeAlias = "TaskRef | str"


def _retry_manifest(retry: RetryLike) -> Any:
    if isinstance(retry, Retry):
        return retry.to_manifest()
    if isinstance(retry, spec.Retry):
        return retry.model_dump(by_alias=True, exclude_unset=True, mode="json")
    if isinstance(retry, Mapping):
        return copy.deepcopy(dict(retry))
    return retry  # the spec names the field and says what it expected


@dataclass(frozen=True, eq=False)
class TaskRef:
    """A task added to a :class:`Workflow`: pass it to ``depends_on``, read its outputs."""

    workflow: Workflow
    name: str
    compensation: bool = False

    def output(self, key: str) -> str:
        """The template ``{{tasks.NAME.outputs.KEY}}`` for one of this task's outputs.

        The task reading it must depend on this one (directly or not).
        """
        if not re.fullmatch(OUTPUT_KEY_PATTERN, key):
            raise SpecError(
                [(f"tasks.{self.name}.outputs", f"invalid output key {key!r} (want {_KEY_HINT})")]
            )
        return f"{{{{tasks.{self.name}.outputs.{key}}}}}"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        kind = "onFailure task" if self.compensation else "task"
        return f"<TaskRef {kind} {self.name!r} of workflow {self.workflow.name!r}>"


_KEY_HINT = "a letter or _, then letters, digits, _ . -"


class Workflow:
    """A Workflow being composed in Python; :meth:`build` validates it.

    ``name`` and ``namespace`` become ``metadata``; ``site`` or
    ``site_selector`` (labels an EdgeSite must carry) the ``placement``;
    ``default_timeout_seconds``, ``default_retry``, ``default_max_interruptions``
    and ``default_on_interruption`` the ``defaults`` tasks inherit;
    ``ttl_seconds_after_finished`` how long the finished Workflow is kept.  Only
    what is given here appears in the manifest.
    """

    def __init__(
        self,
        name: str,
        namespace: str | None = None,
        *,
        site: str | None = None,
        site_selector: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        default_timeout_seconds: int | None = None,
        default_retry: RetryLike | None = None,
        default_max_interruptions: int | None = None,
        default_on_interruption: str | None = None,
        deadline_seconds: int | None = None,
        suspend: bool = False,
        ttl_seconds_after_finished: int | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._namespace = namespace
        self.site = site
        self.site_selector = dict(site_selector) if site_selector is not None else None
        self.params: dict[str, str] = dict(params or {})
        self.default_timeout_seconds = default_timeout_seconds
        self.default_retry = default_retry
        self.default_max_interruptions = default_max_interruptions
        self.default_on_interruption = default_on_interruption
        self.deadline_seconds = deadline_seconds
        self.suspend = suspend
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self.labels = dict(labels) if labels is not None else None
        self.annotations = dict(annotations) if annotations is not None else None
        self._tasks: list[dict[str, Any]] = []
        self._on_failure: list[dict[str, Any]] = []
        self._refs: dict[str, TaskRef] = {}

    # ----------------------------------------------------------- metadata
    @property
    def namespace(self) -> str:
        """The namespace the workflow lives in (``default`` when none was given)."""
        return self._namespace if self._namespace is not None else "default"

    def __repr__(self) -> str:
        return (
            f"<tideflow.builder.Workflow {self.namespace}/{self.name}: "
            f"{len(self._tasks)} tasks, {len(self._on_failure)} onFailure>"
        )

    # ----------------------------------------------------------- templates
    def param(self, name: str, default: str | None = None) -> str:
        """The template ``{{params.NAME}}``; with ``default``, declares the parameter too.

        Naming a parameter the workflow does not declare raises :class:`SpecError`.
        """
        if default is not None:
            self.params.setdefault(name, default)
        elif name not in self.params:
            known = ", ".join(sorted(self.params)) or "none"
            raise SpecError(
                [(f"spec.params.{name}", f"unknown parameter {name!r} (declared: {known})")]
            )
        return f"{{{{params.{name}}}}}"

    # --------------------------------------------------------------- tasks
    def task(
        self,
        name: str,
        command: Sequence[str] | None = None,
        *,
        script: str | None = None,
        shell: str | None = None,
        env: Mapping[str, str] | None = None,
        depends_on: TaskLike | Iterable[TaskLike] = (),
        timeout_seconds: int | None = None,
        retry: RetryLike | None = None,
        working_dir: str | None = None,
        max_interruptions: int | None = None,
        on_interruption: str | None = None,
    ) -> TaskRef:
        """Add a task to the DAG: exactly one of ``command`` (argv) or ``script``."""
        return self._add(
            self._tasks,
            "tasks",
            name,
            command=command,
            script=script,
            shell=shell,
            env=env,
            depends_on=depends_on,
            timeout_seconds=timeout_seconds,
            retry=retry,
            working_dir=working_dir,
            max_interruptions=max_interruptions,
            on_interruption=on_interruption,
        )

    def on_failure(
        self,
        name: str,
        command: Sequence[str] | None = None,
        *,
        script: str | None = None,
        shell: str | None = None,
        env: Mapping[str, str] | None = None,
        depends_on: TaskLike | Iterable[TaskLike] = (),
        timeout_seconds: int | None = None,
        retry: RetryLike | None = None,
        working_dir: str | None = None,
        max_interruptions: int | None = None,
        on_interruption: str | None = None,
    ) -> TaskRef:
        """Add a compensation task: it runs only if the DAG failed.

        Compensation tasks may read any main task's outputs (those that exist)
        and depend on each other, but not on main tasks.
        """
        return self._add(
            self._on_failure,
            "onFailure",
            name,
            command=command,
            script=script,
            shell=shell,
            env=env,
            depends_on=depends_on,
            timeout_seconds=timeout_seconds,
            retry=retry,
            working_dir=working_dir,
            max_interruptions=max_interruptions,
            on_interruption=on_interruption,
        )

    def _add(
        self,
        into: list[dict[str, Any]],
        where: str,
        name: str,
        *,
        command: Sequence[str] | None,
        script: str | None,
        shell: str | None,
        env: Mapping[str, str] | None,
        depends_on: TaskLike | Iterable[TaskLike],
        timeout_seconds: int | None,
        retry: RetryLike | None,
        working_dir: str | None,
        max_interruptions: int | None,
        on_interruption: str | None,
    ) -> TaskRef:
        path = f"spec.{where}[{len(into)}]"
        compensation = where == "onFailure"
        entry: dict[str, Any] = {"name": name}
        deps = [
            self._dep_name(dep, f"{path}.dependsOn[{i}]", compensation)
            for i, dep in enumerate(
                [depends_on] if isinstance(depends_on, str | TaskRef) else depends_on
            )
        ]
        if deps:
            entry["dependsOn"] = deps
        if command is not None:
            if isinstance(command, str | bytes):
                hint = "must be a list of arguments (use script= for shell text)"
                raise SpecError([(f"{path}.command", hint)])
            entry["command"] = list(command)
        if shell is not None:
            entry["shell"] = shell
        if script is not None:
            entry["script"] = script
        if env:
            entry["env"] = dict(env)
        if working_dir is not None:
            entry["workingDir"] = working_dir
        if timeout_seconds is not None:
            entry["timeoutSeconds"] = timeout_seconds
        if retry is not None:
            entry["retry"] = _retry_manifest(retry)
        if max_interruptions is not None:
            entry["maxInterruptions"] = max_interruptions
        if on_interruption is not None:
            entry["onInterruption"] = on_interruption
        into.append(entry)
        ref = TaskRef(self, name, compensation)
        self._refs.setdefault(name, ref)
        return ref

    def _dep_name(self, dep: TaskLike, field: str, compensation: bool) -> str:
        if isinstance(dep, str):
            return dep
        if not isinstance(dep, TaskRef):
            raise SpecError([(field, f"expected a TaskRef or a task name, got {dep!r}")])
        if dep.workflow is not self:
            raise SpecError(
                [(field, f"task {dep.name!r} belongs to workflow {dep.workflow.name!r}")]
            )
        if dep.compensation and not compensation:
            raise SpecError(
                [(field, f"{dep.name!r} is an onFailure task; a main task cannot depend on it")]
            )
        if compensation and not dep.compensation:
            raise SpecError(
                [
                    (
                        field,
                        f"{dep.name!r} is a main task; onFailure tasks run after the DAG "
                        "failed and depend only on other onFailure tasks (they may still "
                        "read its outputs)",
                    )
                ]
            )
        return dep.name

    def ref(self, name: str) -> TaskRef:
        """The :class:`TaskRef` of a task added earlier, by name."""
        return self._refs[name]

    @property
    def task_names(self) -> list[str]:
        """Names of the main tasks, in the order they were added."""
        return [t["name"] for t in self._tasks]

    # -------------------------------------------------------------- output
    def _manifest(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name}
        if self._namespace is not None:
            metadata["namespace"] = self._namespace
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        body: dict[str, Any] = {}
        placement: dict[str, Any] = {}
        if self.site is not None:
            placement["site"] = self.site
        if self.site_selector is not None:
            placement["siteSelector"] = {"matchLabels": dict(self.site_selector)}
        if placement:
            body["placement"] = placement
        if self.params:
            body["params"] = dict(self.params)
        defaults: dict[str, Any] = {}
        if self.default_timeout_seconds is not None:
            defaults["timeoutSeconds"] = self.default_timeout_seconds
        if self.default_retry is not None:
            defaults["retry"] = _retry_manifest(self.default_retry)
        if self.default_max_interruptions is not None:
            defaults["maxInterruptions"] = self.default_max_interruptions
        if self.default_on_interruption is not None:
            defaults["onInterruption"] = self.default_on_interruption
        if defaults:
            body["defaults"] = defaults
        if self.deadline_seconds is not None:
            body["deadlineSeconds"] = self.deadline_seconds
        if self.suspend:
            body["suspend"] = True
        if self.ttl_seconds_after_finished is not None:
            body["ttlSecondsAfterFinished"] = self.ttl_seconds_after_finished
        body["tasks"] = copy.deepcopy(self._tasks)
        if self._on_failure:
            body["onFailure"] = copy.deepcopy(self._on_failure)
        return {
            "apiVersion": spec.API_VERSION,
            "kind": "Workflow",
            "metadata": metadata,
            "spec": body,
        }

    def build(self) -> spec.Workflow:
        """Validate and return the spec model; :class:`SpecError` names each bad field."""
        try:
            return spec.parse_workflow(self._manifest())
        except SpecError as exc:
            problems = [(field, self._explain(field, msg)) for field, msg in exc.problems]
            raise SpecError(problems) from None

    def _explain(self, field: str, msg: str) -> str:
        """Add the task's name to a problem located in ``spec.tasks[i]``/``onFailure[i]``."""
        match = re.match(r"spec\.(tasks|onFailure)\[(\d+)\]", field)
        if match is None:
            return msg
        tasks = self._tasks if match.group(1) == "tasks" else self._on_failure
        index = int(match.group(2))
        if index < len(tasks):
            return f"{msg} (in task {tasks[index]['name']!r})"
        return msg

    def to_manifest(self) -> dict[str, Any]:
        """The validated manifest as plain data: camelCase keys, only what was set."""
        self.build()
        return self._manifest()

    def to_yaml(self) -> str:
        """The validated manifest as a YAML document a human could have written."""
        return manifest_yaml(self.to_manifest())


class CronWorkflow:
    """A CronWorkflow being composed: a schedule around a :class:`Workflow` (its template).

    The template gives the tasks, params, defaults and deadline; its name,
    namespace and placement are not used (give ``site`` or ``site_selector``
    here: every matching site fires the schedule on its own)::

        etl = Workflow("etl")
        etl.task("extract", command=["python3", "extract.py"])
        nightly = CronWorkflow("nightly-etl", "plant-7", schedule="0 2 * * *",
                               timezone="Europe/Berlin", site_selector={"region": "north"},
                               workflow=etl, concurrency_policy="Forbid")
    """

    def __init__(
        self,
        name: str,
        namespace: str | None = None,
        *,
        schedule: str,
        workflow: Workflow,
        timezone: str | None = None,
        site: str | None = None,
        site_selector: Mapping[str, str] | None = None,
        concurrency_policy: str | None = None,
        starting_deadline_seconds: int | None = None,
        suspend: bool = False,
        successful_jobs_history_limit: int | None = None,
        failed_jobs_history_limit: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(workflow, Workflow):
            raise SpecError([("spec.workflowSpec", "workflow must be a tideflow.builder.Workflow")])
        self.name = name
        self._namespace = namespace
        self.schedule = schedule
        self.workflow = workflow
        self.timezone = timezone
        self.site = site
        self.site_selector = dict(site_selector) if site_selector is not None else None
        self.concurrency_policy = concurrency_policy
        self.starting_deadline_seconds = starting_deadline_seconds
        self.suspend = suspend
        self.successful_jobs_history_limit = successful_jobs_history_limit
        self.failed_jobs_history_limit = failed_jobs_history_limit
        self.labels = dict(labels) if labels is not None else None

    @property
    def namespace(self) -> str:
        return self._namespace if self._namespace is not None else "default"

    def __repr__(self) -> str:
        return f"<tideflow.builder.CronWorkflow {self.namespace}/{self.name}: {self.schedule!r}>"

    def _manifest(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name}
        if self._namespace is not None:
            metadata["namespace"] = self._namespace
        if self.labels:
            metadata["labels"] = dict(self.labels)
        placement: dict[str, Any] = {}
        if self.site is not None:
            placement["site"] = self.site
        if self.site_selector is not None:
            placement["siteSelector"] = {"matchLabels": dict(self.site_selector)}
        body: dict[str, Any] = {"schedule": self.schedule}
        if self.timezone is not None:
            body["timezone"] = self.timezone
        body["placement"] = placement
        optional = {
            "concurrencyPolicy": self.concurrency_policy,
            "startingDeadlineSeconds": self.starting_deadline_seconds,
            "successfulJobsHistoryLimit": self.successful_jobs_history_limit,
            "failedJobsHistoryLimit": self.failed_jobs_history_limit,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if self.suspend:
            body["suspend"] = True
        template = self.workflow._manifest()["spec"]
        template.pop("placement", None)
        body["workflowSpec"] = template
        return {
            "apiVersion": spec.API_VERSION,
            "kind": "CronWorkflow",
            "metadata": metadata,
            "spec": body,
        }

    def build(self) -> spec.CronWorkflow:
        """Validate and return the model; :class:`SpecError` names each bad field."""
        return spec.parse_cron_workflow(self._manifest())

    def to_manifest(self) -> dict[str, Any]:
        self.build()
        return self._manifest()

    def to_yaml(self) -> str:
        return manifest_yaml(self.to_manifest())


# ---------------------------------------------------------------- YAML output
_LINE_WIDTH = 100


class _Dumper(yaml.SafeDumper):
    """Block style for the structure, flow style for short leaves, ``|`` for scripts."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Indent list items under their key, as the README and most people do.
        super().increase_indent(flow, False)


class _FlowList(list[Any]):
    pass


class _FlowMap(dict[str, Any]):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


def _represent_flow_list(dumper: yaml.SafeDumper, value: _FlowList) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


def _represent_flow_map(dumper: yaml.SafeDumper, value: _FlowMap) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=True)


def _represent_map(dumper: yaml.SafeDumper, value: dict[str, Any]) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=False)


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=False)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_FlowList, _represent_flow_list)
_Dumper.add_representer(_FlowMap, _represent_flow_map)
_Dumper.add_representer(dict, _represent_map)
_Dumper.add_representer(list, _represent_list)


_STRUCTURAL = frozenset({"spec", "tasks", "onFailure"})


def _has_newline(value: Any) -> bool:
    if isinstance(value, str):
        return "\n" in value
    if isinstance(value, dict):
        return any(_has_newline(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_newline(v) for v in value)
    return False


def _flow_text(value: Any) -> str | None:
    """``value`` in flow style on one line, or None if it cannot be one line."""
    if _has_newline(value):
        return None
    text: str = yaml.dump(
        value, Dumper=_Dumper, default_flow_style=True, sort_keys=False, width=1 << 16
    )
    text = text.removesuffix("\n...\n").rstrip("\n")
    return None if "\n" in text else text


def _styled(value: Any, indent: int, key_width: int, *, structural: bool) -> Any:
    """Mark containers that fit on their key's line as flow style, recursively."""
    if not isinstance(value, dict | list):
        return value
    if not structural:
        flat = _flow_text(_plain(value))
        if flat is not None and indent + key_width + len(flat) <= _LINE_WIDTH:
            return _FlowMap(value) if isinstance(value, dict) else _FlowList(value)
    if isinstance(value, dict):
        return {
            k: _styled(v, indent + 2, len(str(k)) + 2, structural=k in _STRUCTURAL)
            for k, v in value.items()
        }
    # Items of a list of mappings (the tasks) stay block: one key per line.
    return [_styled(item, indent + 2, 2, structural=isinstance(item, dict)) for item in value]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return _FlowMap({k: _plain(v) for k, v in value.items()})
    if isinstance(value, list):
        return _FlowList(_plain(v) for v in value)
    return value


def manifest_yaml(manifest: Mapping[str, Any]) -> str:
    """Render one manifest as YAML: keys in the order given, short leaves on one line."""
    styled = _styled(dict(manifest), 0, 0, structural=True)
    text: str = yaml.dump(
        styled, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 16
    )
    return text
