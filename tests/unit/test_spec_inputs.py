"""Hostile and unusual input to the spec: names, shell scripts, YAML, size, scale.

Proves: site names (``placement.site`` and :func:`validate_site_name`) are
DNS-1123 labels, so no MQTT wildcard or level separator reaches a topic;
``metadata.name``/``namespace`` are Kubernetes names, checked at the site;
task names follow Argo's rule (``A``..``D`` of its dag-diamond) but stay
safe for file names and templates; a template in the script argument of
``sh -c`` (any common shell, any path, combined flags, behind ``env``) is
refused pointing at ``env``; manifests read from YAML refuse duplicate keys,
bytes that are not UTF-8 and sizes over :data:`MAX_MANIFEST_BYTES`, each
with a :class:`SpecError` naming the place; and validation memory grows
linearly with the number of tasks (a chain and a fan-out whose tasks read
far-away ancestors' outputs).
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tideflow import wire
from tideflow.manifest import MAX_MANIFEST_BYTES, load_manifest, read_manifest
from tideflow.spec import (
    SHOWN_PROBLEMS,
    SpecError,
    parse_spec,
    parse_workflow,
    validate_site_name,
)


def task(name: str = "a", **fields: Any) -> dict[str, Any]:
    if "script" not in fields and "command" not in fields:
        fields["command"] = ["true"]
    return {"name": name, **fields}


def spec_with(*tasks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"tasks": list(tasks) or [task()], **extra}


def manifest(name: str = "wf", namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": metadata,
        "spec": spec or spec_with(),
    }


def problems_at(exc: SpecError, path: str) -> list[str]:
    found = [msg for field, msg in exc.problems if field == path]
    assert found, f"no problem at {path!r}: {exc.problems}"
    assert f"{path}: " in str(exc)
    return found


# ------------------------------------------------------------------ site names
BAD_SITES = ["+", "#", "x/y", "line-2/+", "Line-2", "-a", "a-", "a_b", "a.b", "a b", "a" * 64, ""]


@pytest.mark.parametrize("site", BAD_SITES)
def test_placement_site_must_be_a_dns_label(site: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(placement={"site": site}))
    (msg,) = problems_at(info.value, "spec.placement.site")
    assert "site name" in msg or "at least 1" in msg


@pytest.mark.parametrize("site", BAD_SITES)
def test_validate_site_name_refuses_what_breaks_a_topic(site: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_site_name(site, field="--site")
    assert info.value.field == "--site"
    assert repr(site) in str(info.value)


@pytest.mark.parametrize("site", ["a", "9", "line-2", "plant-7-line-12", "a" * 63])
def test_valid_site_names(site: str) -> None:
    assert validate_site_name(site) == site
    spec = parse_spec(spec_with(placement={"site": site}))
    assert spec.placement is not None and spec.placement.site == site


# ------------------------------------------------------------------ metadata
@pytest.mark.parametrize(
    ("metadata", "path"),
    [
        ({"name": "../../x y"}, "metadata.name"),
        ({"name": "Nightly"}, "metadata.name"),
        ({"name": "a..b"}, "metadata.name"),
        ({"name": "-a"}, "metadata.name"),
        ({"name": "a" * 254}, "metadata.name"),
        ({"name": "ok", "namespace": "../etc"}, "metadata.namespace"),
        ({"name": "ok", "namespace": "plant.7"}, "metadata.namespace"),
        ({"name": "ok", "namespace": "a" * 64}, "metadata.namespace"),
        ({"name": "ok", "namespace": ""}, "metadata.namespace"),
    ],
)
def test_metadata_names_are_kubernetes_names(metadata: dict[str, str], path: str) -> None:
    data = {**manifest(), "metadata": metadata}
    with pytest.raises(SpecError) as info:
        parse_workflow(data)
    (msg,) = problems_at(info.value, path)
    assert "DNS-1123" in msg


@pytest.mark.parametrize(
    ("name", "namespace"), [("nightly.v2", "plant-7"), ("a" * 253, "a" * 63), ("0", "0")]
)
def test_valid_metadata_names(name: str, namespace: str) -> None:
    wf = parse_workflow(manifest(name, namespace))
    assert (wf.metadata.name, wf.metadata.namespace) == (name, namespace)


@pytest.mark.parametrize(
    ("namespace", "name"), [("default", "../../x y"), ("../etc", "wf"), ("default", "Wf")]
)
def test_an_assignment_with_a_name_that_is_no_kubernetes_name_is_dropped(
    namespace: str, name: str
) -> None:
    # What a forged broker message could carry to the site instead of a manifest.
    payload = {"uid": "u", "generation": 1, "namespace": namespace, "name": name}
    data = wire.encode(wire.KIND_ASSIGN, "line-2", {**payload, "spec": spec_with()})
    with pytest.raises(wire.WireError, match="bad assign payload"):
        wire.decode(wire.topic("line-2", wire.ASSIGN), data)
    good = {**payload, "namespace": "default", "name": "nightly.v2"}
    data = wire.encode(wire.KIND_ASSIGN, "line-2", {**good, "spec": spec_with()})
    assert wire.decode(wire.topic("line-2", wire.ASSIGN), data)[1].name == "nightly.v2"


# ------------------------------------------------------------------ task names
@pytest.mark.parametrize(
    "name", ["A", "B", "Extract", "a-", "a_", "My-name1-2", "123-NAME", "x" * 128, "a-b_c9"]
)
def test_task_names_argo_accepts_are_accepted(name: str) -> None:
    spec = parse_spec(
        spec_with(
            task(name),
            task("reader", dependsOn=[name], env={"V": f"{{{{tasks.{name}.outputs.v}}}}"}),
        )
    )
    assert spec.tasks[0].name == name


@pytest.mark.parametrize("name", ["-a", "_a", "a b", "a.b", "a/b", "..", "", "x" * 129, "ä", "a$"])
def test_task_names_unsafe_for_files_or_templates_are_refused(name: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task("ok"), task(name)))
    (msg,) = problems_at(info.value, "spec.tasks[1].name")
    assert "pattern" in msg or "at least 1" in msg


def test_task_names_differing_only_in_case_collide() -> None:
    # A task's outputs file is named after the task: on a case-insensitive
    # file system "A" and "a" would share it.
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task("a"), task("A")))
    (msg,) = problems_at(info.value, "spec.tasks[1].name")
    assert "differ only in case" in msg
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task("Undo"), onFailure=[task("undo")]))
    problems_at(info.value, "spec.onFailure[0].name")


# ------------------------------------------------------------------ shell -c
INJECTABLE = [
    ["sh", "-c", "echo {{params.p}}"],
    ["/bin/sh", "-c", "echo {{params.p}}"],
    ["bash", "-ec", "echo {{params.p}}"],
    ["/usr/bin/bash", "-xc", "echo {{params.p}}"],
    ["bash", "-o", "pipefail", "-c", "echo {{params.p}}"],
    ["bash", "--norc", "-e", "-c", "echo {{params.p}}"],
    ["dash", "-c", "echo {{params.p}}"],
    ["zsh", "-c", "echo {{params.p}}"],
    ["ksh", "-c", "echo {{params.p}}"],
    ["ash", "-c", "echo {{params.p}}"],
    ["busybox", "sh", "-c", "echo {{params.p}}"],
    ["/bin/busybox", "ash", "-euc", "echo {{params.p}}"],
    ["env", "-i", "A=1", "sh", "-c", "echo {{params.p}}"],
    ["/usr/bin/env", "bash", "-c", "echo {{params.p}}"],
    ["timeout", "5", "sh", "-c", "echo {{params.p}}"],
    ["sh", "-c", "--", "echo {{params.p}}"],
    ["sh", "-c{{params.p}}"],
]


@pytest.mark.parametrize("argv", INJECTABLE, ids=lambda argv: " ".join(argv))
def test_templates_in_a_shell_script_argument_are_refused(argv: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task(command=argv), params={"p": "x"}))
    index = next(i for i, arg in enumerate(argv) if "{{" in arg)
    (msg,) = problems_at(info.value, f"spec.tasks[0].command[{index}]")
    assert "shell" in msg and "env" in msg


def test_shell_check_covers_on_failure_tasks() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(
            spec_with(task(), onFailure=[task("undo", command=["sh", "-c", "rm {{params.p}}"])]),
        )
    problems_at(info.value, "spec.onFailure[0].command[2]")


SAFE = [
    # the value reaches the script as data: env, or a positional parameter
    ["sh", "-c", 'echo "$1"', "sh", "{{params.p}}"],
    ["bash", "-ec", 'echo "$V"'],
    # no -c: the argument is a script file, not script text
    ["sh", "{{params.p}}"],
    ["bash", "-e", "run.sh", "{{params.p}}"],
    # not a shell
    ["echo", "{{params.p}}"],
    ["grep", "-c", "bash", "{{params.p}}"],
    ["python3", "tool.py", "--shell", "{{params.p}}"],
]


@pytest.mark.parametrize("argv", SAFE, ids=lambda argv: " ".join(argv))
def test_templates_outside_a_shell_script_are_accepted(argv: list[str]) -> None:
    spec = parse_spec(spec_with(task(command=argv, env={"V": "{{params.p}}"}), params={"p": "x"}))
    assert spec.tasks[0].command == argv


# ------------------------------------------------------------------ YAML input
GOOD_YAML = """\
apiVersion: tideflow.io/v1alpha1
kind: Workflow
metadata: {name: wf}
spec:
  tasks:
    - name: a
      command: [echo, ok]
"""


def test_load_manifest_reads_yaml() -> None:
    assert parse_workflow(load_manifest(GOOD_YAML.encode())).spec.tasks[0].name == "a"
    assert load_manifest(GOOD_YAML) == load_manifest(GOOD_YAML.encode())


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOOD_YAML + "      command: [rm, -rf, /]\n", "command"),
        (GOOD_YAML.replace("kind: Workflow\n", "kind: Workflow\nkind: Workflow\n"), "kind"),
        ("a: 1\nb: {x: 1, x: 2}\n", "x"),
        ("a: 1\n'a': 2\n", "a"),
    ],
)
def test_duplicate_keys_are_refused_naming_the_key(text: str, key: str) -> None:
    with pytest.raises(SpecError) as info:
        load_manifest(text.encode(), source="wf.yaml")
    assert info.value.field == "wf.yaml"
    assert f"duplicate key {key!r}" in str(info.value)
    assert "line " in str(info.value)


def test_merge_keys_still_work() -> None:
    data = load_manifest(b"base: &b {x: 1}\nderived:\n  <<: *b\n  y: 2\n")
    assert data["derived"] == {"x": 1, "y": 2}


@pytest.mark.parametrize(
    "data", [b"\xff\xfe\x00k", "kind: Workflow # caf\xe9\n".encode("latin-1"), b"a: \x80"]
)
def test_bytes_that_are_not_utf8_are_refused(data: bytes) -> None:
    with pytest.raises(SpecError) as info:
        load_manifest(data, source="wf.yaml")
    assert info.value.field == "wf.yaml"
    assert "not UTF-8" in str(info.value)


def test_oversized_manifest_is_refused_without_parsing_it(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as out:
        out.write(GOOD_YAML.encode())
        out.write(b"#" * MAX_MANIFEST_BYTES)
    with pytest.raises(SpecError) as info:
        read_manifest(big)
    assert info.value.field == str(big)
    assert f"over the {MAX_MANIFEST_BYTES}-byte limit" in str(info.value)
    with pytest.raises(SpecError, match="over the 100-byte limit"):
        load_manifest(GOOD_YAML, max_bytes=100)


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        read_manifest(tmp_path / "missing.yaml")
    assert info.value.field == str(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="not a regular file"):
        read_manifest(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        read_manifest(bad)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # no writer: a plain open() would block for ever
    with pytest.raises(SpecError, match="not a regular file"):
        read_manifest(fifo)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD_YAML.encode())
    assert parse_workflow(read_manifest(bom)).metadata.name == "wf"


def test_a_manifest_at_the_crd_task_limit_fits_the_byte_limit() -> None:
    from tideflow.crd import MAX_TASKS

    # 5,000 ordinary tasks (the CRD's maxItems): a 30-character name, a
    # command reading the parent's output, an env value, a dependency.
    names = [f"stage-{i:05d}-transform-batch" for i in range(MAX_TASKS)]
    lines = [GOOD_YAML.split("  tasks:")[0] + "  tasks:"]
    for i, name in enumerate(names):
        lines.append(f"    - name: {name}")
        if i:
            parent = names[i - 1]
            lines.append(f"      command: [transform, '{{{{tasks.{parent}.outputs.rows}}}}']")
            lines.append("      env: {BATCH: '{{workflow.uid}}'}")
            lines.append(f"      dependsOn: [{parent}]")
        else:
            lines.append("      command: [extract]")
    text = "\n".join(lines)
    assert len(text.encode()) < MAX_MANIFEST_BYTES
    assert len(parse_workflow(load_manifest(text)).spec.tasks) == MAX_TASKS


# ------------------------------------------------------------------ scale
def _chain(n: int) -> dict[str, Any]:
    # every task reads the root's output: n ancestors deep at the end
    tasks = [task("t0")]
    for i in range(1, n):
        tasks.append(task(f"t{i}", dependsOn=[f"t{i - 1}"], env={"R": "{{tasks.t0.outputs.r}}"}))
    return spec_with(*tasks)


def _fan_out(n: int) -> dict[str, Any]:
    tasks = [task("root")]
    tasks += [
        task(f"leaf{i}", dependsOn=["root"], env={"R": "{{tasks.root.outputs.r}}"})
        for i in range(n - 2)
    ]
    tasks.append(
        task(
            "merge",
            dependsOn=[f"leaf{i}" for i in range(n - 2)],
            env={"R": "{{tasks.root.outputs.r}}"},
        )
    )
    return spec_with(*tasks)


def _peak_bytes(data: dict[str, Any]) -> int:
    tracemalloc.start()
    try:
        parse_spec(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [_chain, _fan_out], ids=["chain", "fan-out"])
def test_validation_memory_grows_linearly(shape: Any) -> None:
    small, large = shape(400), shape(3200)
    ratio = _peak_bytes(large) / _peak_bytes(small)
    # 8x the tasks: linear is ~8x; holding every task's ancestor set is ~64x.
    assert ratio < 12, f"peak memory grew {ratio:.1f}x for 8x the tasks"


@st.composite
def dags_with_references(draw: st.DrawFn) -> tuple[dict[str, Any], set[tuple[int, int]]]:
    """A random DAG (edges only to earlier tasks) whose tasks read random tasks' outputs."""
    n = draw(st.integers(1, 14))
    deps = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else [] for i in range(n)]
    reads = [draw(st.sets(st.integers(0, n - 1), max_size=3)) for _ in range(n)]
    order = draw(st.permutations(range(n)))  # the manifest lists tasks in any order
    tasks = [
        task(
            f"t{i}",
            dependsOn=[f"t{d}" for d in deps[i]],
            env={f"R{j}": f"{{{{tasks.t{j}.outputs.k}}}}" for j in sorted(reads[i])},
        )
        for i in order
    ]
    ancestors: list[set[int]] = []
    for i in range(n):
        ancestors.append(set().union(*({d} | ancestors[d] for d in deps[i])) if deps[i] else set())
    bad = {(i, j) for i in range(n) for j in reads[i] if j not in ancestors[i]}
    return spec_with(*tasks), bad


@settings(max_examples=300, deadline=None)
@given(dags_with_references())
def test_ancestor_check_agrees_with_full_ancestor_sets(
    case: tuple[dict[str, Any], set[tuple[int, int]]],
) -> None:
    data, bad = case
    position = {t["name"]: k for k, t in enumerate(data["tasks"])}
    expected = {(f"spec.tasks[{position[f't{i}']}].env.R{j}", f"t{j}") for i, j in bad}
    try:
        parse_spec(data)
        found: set[tuple[str, str]] = set()
    except SpecError as exc:
        found = {(field, msg.split("names task '")[1].split("'")[0]) for field, msg in exc.problems}
        assert all("not an ancestor" in msg for _, msg in exc.problems), exc.problems
    assert found == expected


# ------------------------------------------------------------------ the error's text
FORGED = "\n2026-12-01 05:00:00,000 ERROR edge_agent.daemon: forged"


@pytest.mark.parametrize(
    "data",
    [
        # Thousands of unknown fields named with newlines and a forged log line.
        spec_with(**{f"k{i}{FORGED}{'z' * 100}": 1 for i in range(3000)}),
        # One field name of half a megabyte.
        spec_with(**{"k" * 500_000 + FORGED: 1}),
        # A task name (shown in the pattern's message) of half a megabyte.
        spec_with(task("a" * 500_000 + FORGED)),
        # An env name (shown by its own check) of half a megabyte.
        spec_with(task(env={"E" * 500_000 + FORGED: "v"})),
    ],
    ids=["many-fields", "long-field", "long-task-name", "long-env-name"],
)
def test_the_error_text_is_bounded_and_shows_sender_text_escaped(data: dict[str, Any]) -> None:
    """A SpecError's text listed every problem, each field name and input as sent: a
    spec with thousands of unknown fields named with newlines made a half-megabyte
    message, which the agent logged (a schedule's refusal, whole) with the sender's
    own lines in it, stored as the schedule's message and sent to the cloud.  Now
    the text is bounded, names the first field (escaped), and says how many more."""
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    text = str(info.value)
    assert len(text) <= 4000, (len(text), text[:200])
    assert FORGED not in text and "\n" not in text, text[:300]
    first = info.value.problems[0][0]
    assert first.startswith("spec"), first[:100]
    assert repr(first[:40])[1:-1] in text or first[:40] in text, text[:300]
    if len(info.value.problems) > SHOWN_PROBLEMS:
        assert text.endswith(f"; and {len(info.value.problems) - SHOWN_PROBLEMS} more problems")


def test_an_ordinary_error_text_is_unchanged() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(task("a", bogus=1), task("b", command=[], script="x")))
    assert str(info.value) == "; ".join(f"{f}: {m}" for f, m in info.value.problems)


# ------------------------------------------------------------------ lone surrogates
@pytest.mark.parametrize(
    ("data", "path"),
    [
        (spec_with(task(command=["echo", "\ud800"])), "spec.tasks[0].command"),
        (spec_with(task(env={"X": "\udfff"})), "spec.tasks[0].env"),
        (spec_with(task(workingDir="/tmp/\udc80")), "spec.tasks[0].workingDir"),
        (spec_with(task(script="true", shell="/bin/\ud800sh")), "spec.tasks[0].shell"),
        (spec_with(params={"p": "\ud800"}), "spec.params"),
        (spec_with(params={"p\ud800": "v"}), "spec.params"),
    ],
)
def test_text_that_is_not_unicode_is_refused_naming_the_field(
    data: dict[str, Any], path: str
) -> None:
    """A string holding a lone surrogate (JSON's ``"\\ud800"``: an assignment can carry
    one, no YAML or Kubernetes object can) was taken in a command, env, params or
    workingDir, and the task then failed to start with "contains a NUL byte", which it
    did not.  Now the spec is refused naming the field, as for a NUL byte."""
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert any("unicode" in msg.lower() for msg in problems_at(info.value, path)), info.value
