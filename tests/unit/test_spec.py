"""The Workflow spec refuses every bad manifest with an error naming the field, and templates.

Proves: each kind of invalid spec (unknown fields, graph errors, bad
templates, bad numbers, bad names, bad placement, wrong apiVersion/kind,
non-mappings) raises :class:`SpecError` whose message names the offending
field by its path; the README's example parses and ``dump()`` round-trips;
compensation tasks may read main-task outputs; ``render``/``template_values``
substitute argv and env (and refuse a missing reference by name); ``script``
text is never templated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tideflow.spec import (
    SpecError,
    WorkflowSpec,
    parse_spec,
    parse_workflow,
    render,
    template_values,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def task(name: str = "a", **fields: Any) -> dict[str, Any]:
    if "script" not in fields and "command" not in fields:
        fields["command"] = ["true"]
    return {"name": name, **fields}


def spec_with(*tasks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"tasks": list(tasks) or [task()], **extra}


def readme_manifest() -> dict[str, Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    manifest = next(yaml.safe_load(b) for b in blocks if "kind: Workflow" in b)
    assert isinstance(manifest, dict)
    return manifest


def assert_refused(exc: SpecError, path: str, fragment: str) -> None:
    """The error names ``path`` (in .problems and in the message) with ``fragment``."""
    matching = [msg for field, msg in exc.problems if field == path]
    assert matching, f"no problem at {path!r}: {exc.problems}"
    assert any(fragment in msg for msg in matching), f"{fragment!r} not in {matching}"
    assert f"{path}: " in str(exc)


# (id, spec, field path named by the error, fragment of its message)
SPEC_REJECTIONS: list[tuple[str, dict[str, Any], str, str]] = [
    # unknown fields, at every level
    ("unknown-top-level", spec_with(bogus=1), "spec.bogus", "unknown field"),
    ("unknown-task-field", spec_with(task(image="x")), "spec.tasks[0].image", "unknown field"),
    (
        "unknown-retry-field",
        spec_with(task(retry={"limt": 3})),
        "spec.tasks[0].retry.limt",
        "unknown field",
    ),
    (
        "unknown-backoff-field",
        spec_with(task(retry={"backoff": {"sec": 1}})),
        "spec.tasks[0].retry.backoff.sec",
        "unknown field",
    ),
    (
        "unknown-defaults-field",
        spec_with(defaults={"timeout": 5}),
        "spec.defaults.timeout",
        "unknown field",
    ),
    (
        "unknown-placement-field",
        spec_with(placement={"site": "s", "zone": "z"}),
        "spec.placement.zone",
        "unknown field",
    ),
    (
        # The manifest is camelCase; the Python attribute names are not aliases.
        "snake-case-is-unknown",
        spec_with(task("a"), task("b", depends_on=["a"])),
        "spec.tasks[1].depends_on",
        "unknown field",
    ),
    # the dependsOn graph
    ("duplicate-name", spec_with(task("a"), task("a")), "spec.tasks[1].name", "duplicate"),
    (
        "duplicate-name-across-onFailure",
        spec_with(task("a"), onFailure=[task("a")]),
        "spec.onFailure[0].name",
        "duplicate task name 'a'",
    ),
    (
        "unknown-dependency",
        spec_with(task("a"), task("b", dependsOn=["a", "extrct"])),
        "spec.tasks[1].dependsOn[1]",
        "unknown task 'extrct'",
    ),
    (
        "self-dependency",
        spec_with(task("a"), task("b", dependsOn=["b"])),
        "spec.tasks[1].dependsOn[0]",
        "cannot depend on itself",
    ),
    (
        "cycle-2",
        spec_with(task("x"), task("a", dependsOn=["b"]), task("b", dependsOn=["a"])),
        "spec.tasks[1].dependsOn",
        "cycle through tasks a, b",
    ),
    (
        "cycle-3",
        spec_with(
            task("a", dependsOn=["c"]), task("b", dependsOn=["a"]), task("c", dependsOn=["b"])
        ),
        "spec.tasks[0].dependsOn",
        "cycle through tasks a, b, c",
    ),
    (
        # A task that merely depends on a cycle is not blamed for it.
        "cycle-downstream-task-not-blamed",
        spec_with(
            task("a0", dependsOn=["c"]), task("c", dependsOn=["d"]), task("d", dependsOn=["c"])
        ),
        "spec.tasks[1].dependsOn",
        "cycle through tasks c, d",
    ),
    (
        "onFailure-cannot-depend-on-main-task",
        spec_with(task("a"), onFailure=[task("undo", dependsOn=["a"])]),
        "spec.onFailure[0].dependsOn[0]",
        "unknown task 'a'",
    ),
    # templates
    (
        "output-of-non-ancestor-in-command",
        spec_with(task("a"), task("b", command=["echo", "{{tasks.a.outputs.rows}}"])),
        "spec.tasks[1].command[1]",
        "not an ancestor",
    ),
    (
        "output-of-non-ancestor-in-env",
        spec_with(
            task("a"), task("b"), task("c", dependsOn=["b"], env={"R": "{{tasks.a.outputs.r}}"})
        ),
        "spec.tasks[2].env.R",
        "names task 'a', which is not an ancestor",
    ),
    (
        "output-of-dependant",
        spec_with(task("a", command=["x", "{{tasks.b.outputs.k}}"]), task("b", dependsOn=["a"])),
        "spec.tasks[0].command[1]",
        "not an ancestor",
    ),
    (
        "output-of-unknown-task",
        spec_with(task("a", env={"X": "{{tasks.nope.outputs.k}}"})),
        "spec.tasks[0].env.X",
        "'nope'",
    ),
    (
        "onFailure-output-of-non-ancestor-compensation",
        spec_with(
            task("a"),
            onFailure=[task("u1"), task("u2", command=["x", "{{tasks.u1.outputs.k}}"])],
        ),
        "spec.onFailure[1].command[1]",
        "not an ancestor",
    ),
    (
        "unknown-param",
        spec_with(task(command=["run", "--batch={{params.batch}}"]), params={"btch": "1"}),
        "spec.tasks[0].command[1]",
        "unknown parameter 'batch'",
    ),
    (
        "unknown-template-form",
        spec_with(task(command=["echo", "{{ workflow.labels }}"])),
        "spec.tasks[0].command[1]",
        "unknown template {{workflow.labels}}",
    ),
    (
        "unknown-template-form-env",
        spec_with(task(env={"X": "{{env.HOME}}"})),
        "spec.tasks[0].env.X",
        "unknown template {{env.HOME}}",
    ),
    (
        "empty-template",
        spec_with(task(command=["echo", "{{}}"])),
        "spec.tasks[0].command[1]",
        "unknown template",
    ),
    (
        "outputs-ref-without-key",
        spec_with(task("a"), task("b", dependsOn=["a"], command=["x", "{{tasks.a.outputs}}"])),
        "spec.tasks[1].command[1]",
        "unknown template",
    ),
    # run: command xor script; shell only with script
    (
        "command-and-script",
        spec_with({"name": "a", "command": ["x"], "script": "y"}),
        "spec.tasks[0].command",
        "exactly one of command or script",
    ),
    (
        "neither-command-nor-script",
        spec_with({"name": "a"}),
        "spec.tasks[0].command",
        "exactly one of command or script",
    ),
    ("empty-command", spec_with(task(command=[])), "spec.tasks[0].command", "at least 1"),
    (
        "shell-without-script",
        spec_with(task(shell="/bin/bash")),
        "spec.tasks[0].shell",
        "only valid with script",
    ),
    # timeouts
    (
        "task-timeout-zero",
        spec_with(task(timeoutSeconds=0)),
        "spec.tasks[0].timeoutSeconds",
        "greater than 0",
    ),
    (
        "task-timeout-negative",
        spec_with(task("a"), task("b", timeoutSeconds=-5)),
        "spec.tasks[1].timeoutSeconds",
        "greater than 0",
    ),
    (
        "defaults-timeout",
        spec_with(defaults={"timeoutSeconds": 0}),
        "spec.defaults.timeoutSeconds",
        "greater than 0",
    ),
    ("deadline-zero", spec_with(deadlineSeconds=0), "spec.deadlineSeconds", "greater than 0"),
    ("deadline-negative", spec_with(deadlineSeconds=-1), "spec.deadlineSeconds", "greater than 0"),
    # retry numbers
    (
        "retry-limit-negative",
        spec_with(task(retry={"limit": -1})),
        "spec.tasks[0].retry.limit",
        "greater than or equal to 0",
    ),
    (
        "retry-limit-over-100",
        spec_with(task(retry={"limit": 101})),
        "spec.tasks[0].retry.limit",
        "less than or equal to 100",
    ),
    (
        "retry-factor-below-1",
        spec_with(task(retry={"backoff": {"factor": 0.5}})),
        "spec.tasks[0].retry.backoff.factor",
        "greater than or equal to 1",
    ),
    (
        "retry-seconds-zero",
        spec_with(task(retry={"backoff": {"seconds": 0}})),
        "spec.tasks[0].retry.backoff.seconds",
        "greater than 0",
    ),
    (
        "retry-seconds-negative",
        spec_with(task(retry={"backoff": {"seconds": -1, "maxSeconds": 5}})),
        "spec.tasks[0].retry.backoff.seconds",
        "greater than 0",
    ),
    (
        "retry-max-below-seconds",
        spec_with(task(retry={"backoff": {"seconds": 10, "maxSeconds": 5}})),
        "spec.tasks[0].retry.backoff.maxSeconds",
        "must be >= seconds",
    ),
    (
        "retry-jitter-over-1",
        spec_with(task(retry={"jitter": 1.5})),
        "spec.tasks[0].retry.jitter",
        "less than or equal to 1",
    ),
    (
        "retry-jitter-negative",
        spec_with(task(retry={"jitter": -0.1})),
        "spec.tasks[0].retry.jitter",
        "greater than or equal to 0",
    ),
    (
        "defaults-retry",
        spec_with(defaults={"retry": {"limit": 1000}}),
        "spec.defaults.retry.limit",
        "less than or equal to 100",
    ),
    # placement
    (
        "placement-both",
        spec_with(placement={"site": "s", "siteSelector": {"matchLabels": {"a": "b"}}}),
        "spec.placement.site",
        "exactly one of site or siteSelector",
    ),
    (
        "placement-neither",
        spec_with(placement={}),
        "spec.placement.site",
        "exactly one of site or siteSelector",
    ),
    # interruptions
    (
        "max-interruptions-zero",
        spec_with(task(maxInterruptions=0)),
        "spec.tasks[0].maxInterruptions",
        "greater than or equal to 1",
    ),
    (
        "max-interruptions-over-100",
        spec_with(defaults={"maxInterruptions": 101}),
        "spec.defaults.maxInterruptions",
        "less than or equal to 100",
    ),
    (
        "on-interruption-unknown",
        spec_with(task(onInterruption="Retry")),
        "spec.tasks[0].onInterruption",
        "'Rerun' or 'Fail'",
    ),
    (
        "on-interruption-defaults-unknown",
        spec_with(defaults={"onInterruption": "rerun"}),
        "spec.defaults.onInterruption",
        "'Rerun' or 'Fail'",
    ),
    ("no-tasks", {"tasks": []}, "spec.tasks", "at least 1"),
    ("tasks-missing", {"params": {}}, "spec.tasks", "required"),
]


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [case[1:] for case in SPEC_REJECTIONS],
    ids=[case[0] for case in SPEC_REJECTIONS],
)
def test_invalid_spec_names_the_field(data: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert_refused(info.value, path, fragment)


@pytest.mark.parametrize(
    "name",
    # Uppercase and a trailing '-'/'_' are Argo's rule (see test_spec_inputs.py).
    ["-a", "_a", "a b", "a.b", "a/b", "", "x" * 129, "ä"],
)
def test_invalid_task_name(name: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task("ok"), task(name)))
    assert_refused(info.value, "spec.tasks[1].name", "pattern")


@pytest.mark.parametrize("name", ["a", "9", "a-b_c9", "x" * 128, "0extract-1", "A", "Extract"])
def test_valid_task_name(name: str) -> None:
    assert parse_spec(spec_with(task(name))).tasks[0].name == name


@pytest.mark.parametrize("key", ["1X", "A-B", "A B", "", "ÄB", "A=B"])
def test_invalid_env_var_name(key: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task(env={"GOOD": "1", key: "v"})))
    assert_refused(info.value, "spec.tasks[0].env", f"invalid environment variable name {key!r}")


@pytest.mark.parametrize(
    ("manifest_change", "path", "fragment"),
    [
        ({"apiVersion": "tideflow.io/v1"}, "apiVersion", "tideflow.io/v1alpha1"),
        ({"apiVersion": "argoproj.io/v1alpha1"}, "apiVersion", "tideflow.io/v1alpha1"),
        ({"kind": "CronWorkflow"}, "kind", "'Workflow'"),
        ({"metadata": {"name": ""}}, "metadata.name", "at least 1"),
        ({"extra": True}, "extra", "unknown field"),
        ({"spec": {"tasks": [task(retry={"limit": -1})]}}, "spec.tasks[0].retry.limit", ">= 0"),
    ],
    ids=["apiVersion", "apiVersion-other-group", "kind", "metadata-name", "unknown", "spec"],
)
def test_invalid_manifest_names_the_field(
    manifest_change: dict[str, Any], path: str, fragment: str
) -> None:
    manifest = {**readme_manifest(), **manifest_change}
    with pytest.raises(SpecError) as info:
        parse_workflow(manifest)
    fragment = fragment.replace(">= 0", "greater than or equal to 0")
    assert_refused(info.value, path, fragment)


@pytest.mark.parametrize("data", [None, "tasks: []", 42, ["tasks"], b"spec"])
def test_non_mapping_spec_is_refused(data: Any) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert info.value.problems == [("spec", "must be a mapping")]


@pytest.mark.parametrize("data", [None, "apiVersion: x", 42, [readme_manifest()]])
def test_non_mapping_manifest_is_refused(data: Any) -> None:
    with pytest.raises(SpecError) as info:
        parse_workflow(data)
    assert info.value.field == "(manifest)"
    assert "must be a mapping" in str(info.value)


def test_every_problem_is_named_in_one_error() -> None:
    data = spec_with(task("a", timeoutSeconds=0), task("b", retry={"jitter": 2}), bogus=1)
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    fields = {field for field, _ in info.value.problems}
    assert fields == {"spec.tasks[0].timeoutSeconds", "spec.tasks[1].retry.jitter", "spec.bogus"}
    for field in fields:
        assert f"{field}: " in str(info.value)


def test_custom_prefix_is_used_in_paths() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task(timeoutSeconds=0)), prefix="assignment.spec")
    assert info.value.field == "assignment.spec.tasks[0].timeoutSeconds"


# ------------------------------------------------------------------ valid specs
def test_readme_example_parses() -> None:
    wf = parse_workflow(readme_manifest())
    assert (wf.metadata.name, wf.metadata.namespace) == ("nightly", "plant-7")
    spec = wf.spec
    assert spec.placement is not None and spec.placement.site == "line-2"
    assert spec.params == {"batch": "2026-11-26"}
    assert spec.deadline_seconds == 86400
    extract, load = spec.tasks
    assert load.depends_on == ["extract"]
    assert load.env == {"ROWS": "{{tasks.extract.outputs.rows}}"}
    assert [t.name for t in spec.on_failure] == ["rollback"]
    # defaults apply only where a task sets nothing
    assert spec.timeout_for(extract) == 300 and spec.timeout_for(load) == 60
    assert spec.retry_for(extract).limit == 2
    assert spec.retry_for(extract).backoff.max_seconds == 60
    assert spec.retry_for(load).limit == 5
    assert spec.retry_for(load).backoff.seconds == 2
    assert spec.task("rollback") is spec.on_failure[0]
    with pytest.raises(KeyError):
        spec.task("nope")


def test_unset_retry_and_timeout_fall_back_to_builtin_defaults() -> None:
    spec = parse_spec(spec_with(task()))
    retry = spec.retry_for(spec.tasks[0])
    assert (retry.limit, retry.jitter) == (0, 0.2)
    assert (retry.backoff.seconds, retry.backoff.factor, retry.backoff.max_seconds) == (1, 2, 300)
    assert spec.timeout_for(spec.tasks[0]) is None
    assert spec.suspend is False and spec.placement is None


def test_interruption_policy_falls_back_to_defaults_then_builtins() -> None:
    builtin = parse_spec(spec_with(task()))
    assert builtin.max_interruptions_for(builtin.tasks[0]) == 3
    assert builtin.on_interruption_for(builtin.tasks[0]) == "Rerun"
    spec = parse_spec(
        spec_with(
            task("a"),
            task("b", maxInterruptions=1, onInterruption="Rerun"),
            defaults={"maxInterruptions": 7, "onInterruption": "Fail"},
            onFailure=[task("undo")],
        )
    )
    a, b = spec.tasks
    assert (spec.max_interruptions_for(a), spec.on_interruption_for(a)) == (7, "Fail")
    assert (spec.max_interruptions_for(b), spec.on_interruption_for(b)) == (1, "Rerun")
    undo = spec.on_failure[0]
    assert (spec.max_interruptions_for(undo), spec.on_interruption_for(undo)) == (7, "Fail")
    # Unset stays unset in the manifest form: no default is written back.
    assert "maxInterruptions" not in builtin.dump()["tasks"][0]
    assert spec.dump()["defaults"] == {"maxInterruptions": 7, "onInterruption": "Fail"}


FULL_SPEC = spec_with(
    task("a", command=["gen", "{{params.p}}", "{{workflow.name}}"], workingDir="/srv"),
    task(
        "b",
        dependsOn=["a"],
        script='echo "$X"',
        shell="/bin/bash",
        env={"X": "{{ tasks.a.outputs.k }}", "NS": "{{workflow.namespace}}"},
        timeoutSeconds=7,
        retry={"limit": 3, "backoff": {"seconds": 0.5, "factor": 3, "maxSeconds": 4}, "jitter": 0},
    ),
    task("c", dependsOn=["b"], command=["x", "{{tasks.a.outputs.k}}-{{workflow.uid}}"]),
    placement={"siteSelector": {"matchLabels": {"region": "north"}}},
    params={"p": "v"},
    defaults={"timeoutSeconds": 30, "retry": {"limit": 1}},
    deadlineSeconds=600,
    suspend=True,
    onFailure=[task("undo", command=["undo", "{{tasks.c.outputs.id}}"])],
)


@pytest.mark.parametrize(
    "data", [FULL_SPEC, spec_with(task()), readme_manifest()["spec"]], ids=["full", "min", "readme"]
)
def test_dump_round_trips(data: dict[str, Any]) -> None:
    spec = parse_spec(data)
    dumped = spec.dump()
    again = parse_spec(dumped)
    assert again == spec
    assert again.dump() == dumped


def test_dump_is_camel_case_without_unset_optionals() -> None:
    dumped = parse_spec(FULL_SPEC).dump()
    assert dumped["deadlineSeconds"] == 600
    assert dumped["placement"] == {"siteSelector": {"matchLabels": {"region": "north"}}}
    b = dumped["tasks"][1]
    assert b["dependsOn"] == ["a"] and b["timeoutSeconds"] == 7
    assert b["retry"]["backoff"]["maxSeconds"] == 4
    assert "command" not in b and "workingDir" not in b
    assert dumped["tasks"][0]["workingDir"] == "/srv"
    assert "onFailure" in dumped and "on_failure" not in dumped


def test_transitive_ancestor_outputs_are_allowed() -> None:
    spec = parse_spec(FULL_SPEC)
    assert spec.tasks[2].command == ["x", "{{tasks.a.outputs.k}}-{{workflow.uid}}"]


def test_on_failure_tasks_may_read_main_task_outputs() -> None:
    spec = parse_spec(
        spec_with(
            task("a"),
            task("b", dependsOn=["a"]),
            onFailure=[
                task(
                    "undo",
                    command=["undo", "{{tasks.b.outputs.id}}"],
                    env={"A": "{{tasks.a.outputs.x}}"},
                ),
                task("notify", dependsOn=["undo"], env={"U": "{{tasks.undo.outputs.done}}"}),
            ],
        )
    )
    assert [t.name for t in spec.on_failure] == ["undo", "notify"]


# ------------------------------------------------------------------ templating
def test_script_text_is_never_templated() -> None:
    script = 'echo "{{params.nope}}" {{tasks.ghost.outputs.x}} {{whatever}}'
    spec = parse_spec(spec_with(task(script=script)))  # not validated as templates
    assert spec.tasks[0].argv_templates() == ["/bin/sh", "-c", script]
    bash = parse_spec(spec_with(task(script=script, shell="/bin/bash"))).tasks[0]
    assert bash.argv_templates() == ["/bin/bash", "-c", script]


def test_command_argv_templates_is_a_copy() -> None:
    t = parse_spec(spec_with(task(command=["a", "{{params.p}}"]), params={"p": "1"})).tasks[0]
    argv = t.argv_templates()
    assert argv == ["a", "{{params.p}}"]
    argv.append("x")
    assert t.argv_templates() == ["a", "{{params.p}}"]


def test_template_values_and_render_substitute_argv_and_env() -> None:
    spec = parse_spec(FULL_SPEC)
    values = template_values(
        spec,
        name="wf",
        namespace="ns",
        uid="u-1",
        outputs={"a": {"k": "42", "other": "o"}, "b": {}},
    )
    assert values == {
        "workflow.name": "wf",
        "workflow.namespace": "ns",
        "workflow.uid": "u-1",
        "params.p": "v",
        "tasks.a.outputs.k": "42",
        "tasks.a.outputs.other": "o",
    }
    a, b, c = spec.tasks
    assert [render(arg, values) for arg in a.argv_templates()] == ["gen", "v", "wf"]
    assert {k: render(v, values) for k, v in b.env.items()} == {"X": "42", "NS": "ns"}
    assert [render(arg, values) for arg in c.argv_templates()] == ["x", "42-u-1"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("", ""),
        ("{{params.a}}", "A"),
        ("{{  params.a  }}", "A"),
        ("x{{params.a}}y{{params.b}}z", "xAyBz"),
        ("{{params.a}}{{params.a}}", "AA"),
        ("{ {params.a} }", "{ {params.a} }"),
        ("{{params.inject}}", "{{params.a}}"),  # substituted values are not re-expanded
        ("$(rm -rf /){{params.a}}", "$(rm -rf /)A"),
    ],
)
def test_render(text: str, expected: str) -> None:
    values = {"params.a": "A", "params.b": "B", "params.inject": "{{params.a}}"}
    assert render(text, values) == expected


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("{{tasks.extract.outputs.rows}}", "tasks.extract.outputs.rows"),
        ("ok {{params.a}} then {{ params.gone }}", "params.gone"),
    ],
)
def test_render_missing_reference_raises_key_error_naming_it(text: str, missing: str) -> None:
    with pytest.raises(KeyError) as info:
        render(text, {"params.a": "A"})
    assert info.value.args == (missing,)


def test_readme_example_renders_end_to_end() -> None:
    wf = parse_workflow(readme_manifest())
    values = template_values(
        wf.spec, name="nightly", namespace="plant-7", uid="u", outputs={"extract": {"rows": "9"}}
    )
    extract, load = wf.spec.tasks
    assert [render(a, values) for a in extract.argv_templates()] == [
        "python3",
        "extract.py",
        "--batch",
        "2026-11-26",
    ]
    assert render(load.env["ROWS"], values) == "9"
    assert load.argv_templates() == ["/bin/sh", "-c", 'load --rows "$ROWS"']
    # before extract produced its outputs, load cannot be rendered
    early = template_values(wf.spec, name="nightly", namespace="plant-7", uid="u", outputs={})
    with pytest.raises(KeyError, match=r"tasks\.extract\.outputs\.rows"):
        render(load.env["ROWS"], early)


def test_models_are_frozen() -> None:
    spec = parse_spec(spec_with(task()))
    assert isinstance(spec, WorkflowSpec)
    with pytest.raises(ValueError, match="frozen"):
        spec.tasks[0].name = "b"  # type: ignore[misc]


def test_validation_leaves_the_garbage_collector_as_it_found_it() -> None:
    import gc

    from tideflow.spec import SpecError, parse_spec

    assert gc.isenabled()
    parse_spec({"tasks": [{"name": "a", "command": ["true"]}]})
    assert gc.isenabled()
    with pytest.raises(SpecError):
        parse_spec({"tasks": [{"name": "a"}]})
    assert gc.isenabled()
    gc.disable()
    try:
        parse_spec({"tasks": [{"name": "a", "command": ["true"]}]})
        assert not gc.isenabled(), "validation turned on a collector its caller had paused"
    finally:
        gc.enable()


def test_a_spec_too_large_for_the_assignment_message_is_refused_with_its_size() -> None:
    """A 1.2 MB spec (a huge param) passed: the operator assigned it, the site
    dropped the assignment as too large on every re-send, and the Workflow
    waited for ever with no word of why."""
    from tideflow import wire
    from tideflow.spec import MAX_SPEC_BYTES, parse_cron_spec

    huge = {"params": {"p": "x" * 1_200_000}, "tasks": [{"name": "a", "command": ["true"]}]}
    with pytest.raises(SpecError) as caught:
        parse_spec(huge)
    assert "spec" in str(caught.value) and str(MAX_SPEC_BYTES) in str(caught.value)
    # Escaped as the wire escapes it: 200,000 'é' are 1.2 MB in the message.
    with pytest.raises(SpecError):
        parse_spec({"params": {"p": "é" * 200_000}, "tasks": [{"name": "a", "command": ["true"]}]})
    with pytest.raises(SpecError) as caught:
        parse_cron_spec({"schedule": "0 2 * * *", "placement": {"site": "s"}, "workflowSpec": huge})
    assert "spec" in str(caught.value)
    # What is accepted fits a message the site takes, with room for the envelope.
    assert MAX_SPEC_BYTES + 64 * 1024 <= wire.DEFAULT_MAX_MESSAGE_BYTES
    parse_spec({"params": {"p": "x" * 500_000}, "tasks": [{"name": "a", "command": ["true"]}]})
