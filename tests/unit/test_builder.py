"""The Python builder produces the same validated spec as YAML, and ``tideflow render`` prints it.

Proves: ``examples/nightly_etl.py`` builds exactly the spec (and the same
manifest data) as the hand-written ``examples/nightly-etl.yaml``, and
``tideflow render`` on it (a real subprocess) prints YAML equal to it;
``examples/fan-out-fan-in.yaml`` is what its Python source renders to; every
``examples/*.yaml`` validates; the builder writes only what was set, in
camelCase, and its YAML parses back to the same spec; every kind of mistake
raises :class:`SpecError` naming the field (cycles, templates naming a
non-ancestor, unknown names, bad numbers, builder misuse caught eagerly);
the CLI finds workflows by ``build()``, ``workflows``, ``workflow`` or
module-level variables, exits 2 naming the field on an invalid spec, 1 on an
exception, and ``tideflow`` imports neither ``edge_agent`` nor the operator.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tideflow import builder, cli
from tideflow import spec as spec_module
from tideflow.builder import WORKFLOW_NAME, Backoff, Retry, Workflow
from tideflow.spec import SpecError, parse_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> Any:
    return yaml.safe_load((EXAMPLES / name).read_text())


def python_example(name: str) -> Workflow:
    wf = runpy.run_path(str(EXAMPLES / name), run_name="example")["workflow"]
    assert isinstance(wf, Workflow)
    return wf


def dumped(workflow: spec_module.Workflow) -> dict[str, Any]:
    return workflow.model_dump(by_alias=True, mode="json")


# ------------------------------------------------------------------ round trip
def test_python_etl_builds_the_same_spec_as_its_yaml() -> None:
    built = python_example("nightly_etl.py").build()
    from_yaml = parse_workflow(load_example("nightly-etl.yaml"))
    assert dumped(built) == dumped(from_yaml)
    assert built.spec == from_yaml.spec
    # Stronger: the same fields were written, not just the same after defaults.
    assert python_example("nightly_etl.py").to_manifest() == load_example("nightly-etl.yaml")


def test_python_etl_has_the_shape_the_yaml_documents() -> None:
    spec = python_example("nightly_etl.py").build().spec
    assert [t.name for t in spec.tasks][:3] == ["prepare", "extract-sales", "extract-inventory"]
    assert spec.task("transform").depends_on == ["extract-sales", "extract-inventory"]
    assert [t.name for t in spec.on_failure] == ["rollback", "notify"]
    assert spec.placement is not None and spec.placement.site == "store-42"


def test_render_cli_prints_yaml_equal_to_the_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tideflow.cli", "render", str(EXAMPLES / "nightly_etl.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert len(documents) == 1
    assert documents[0] == load_example("nightly-etl.yaml")
    assert dumped(parse_workflow(documents[0])) == dumped(
        parse_workflow(load_example("nightly-etl.yaml"))
    )


def test_fan_out_yaml_is_its_python_source_rendered() -> None:
    text = cli.render_files([EXAMPLES / "fan_out_fan_in.py"])
    (document,) = [d for d in yaml.safe_load_all(text) if d is not None]
    assert document == load_example("fan-out-fan-in.yaml"), (
        "regenerate: tideflow render examples/fan_out_fan_in.py > examples/fan-out-fan-in.yaml"
    )
    spec = parse_workflow(document).spec
    assert len(spec.tasks) == 50
    assert len(spec.task("merge").depends_on) == 48


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_manifest_validates(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents
    for document in documents:
        parse_workflow(document)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_python_example_renders(path: Path) -> None:
    text = cli.render_files([path])
    for document in yaml.safe_load_all(text):
        if document is not None:
            parse_workflow(document)


# ------------------------------------------------------------------ the output
def test_manifest_holds_only_what_was_set_in_camel_case() -> None:
    wf = Workflow("tiny")
    wf.task("a", ["true"], working_dir="/srv", timeout_seconds=5)
    assert wf.to_manifest() == {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "tiny"},
        "spec": {
            "tasks": [{"name": "a", "command": ["true"], "workingDir": "/srv", "timeoutSeconds": 5}]
        },
    }
    assert wf.namespace == "default"
    assert wf.build().metadata.namespace == "default"


def test_yaml_reads_like_a_hand_written_manifest() -> None:
    wf = Workflow("nightly", "plant-7", site="line-2", params={"batch": "2026-11-26"})
    extract = wf.task("extract", command=["python3", "extract.py", wf.param("batch")])
    wf.task(
        "load",
        script='load --rows "$ROWS"\necho done\n',
        env={"ROWS": extract.output("rows")},
        depends_on=[extract],
        retry=Retry(limit=5, backoff=Backoff(seconds=2, max_seconds=120)),
    )
    wf.on_failure("rollback", command=["rollback.sh", wf.param("batch")])
    assert wf.to_yaml() == textwrap.dedent(
        """\
        apiVersion: tideflow.io/v1alpha1
        kind: Workflow
        metadata: {name: nightly, namespace: plant-7}
        spec:
          placement: {site: line-2}
          params: {batch: '2026-11-26'}
          tasks:
            - name: extract
              command: [python3, extract.py, '{{params.batch}}']
            - name: load
              dependsOn: [extract]
              script: |
                load --rows "$ROWS"
                echo done
              env: {ROWS: '{{tasks.extract.outputs.rows}}'}
              retry: {limit: 5, backoff: {seconds: 2, maxSeconds: 120}}
          onFailure:
            - name: rollback
              command: [rollback.sh, '{{params.batch}}']
        """
    )
    assert parse_workflow(yaml.safe_load(wf.to_yaml())) == wf.build()


def test_yaml_round_trips_awkward_strings() -> None:
    awkward = ["yes", "no", "1.0", "null", "~", "- x", "a: b", "#c", "'q'", '"d"', "", " pad "]
    wf = Workflow("odd", params={f"p{i}": s for i, s in enumerate(awkward)})
    wf.task("a", ["echo", *awkward], env={"X": "line1\nline2", "Y": "{{workflow.uid}}"})
    wf.task("b", script="trailing spaces   \n  indented first\n", shell="/bin/bash")
    wf.task("c", script="no newline at end")
    assert yaml.safe_load(wf.to_yaml()) == wf.to_manifest()


def test_retry_given_three_ways_writes_the_same_manifest() -> None:
    policies: list[builder.RetryLike] = [
        Retry(limit=3, backoff=Backoff(seconds=0.5, max_seconds=10), jitter=0),
        {"limit": 3, "backoff": {"seconds": 0.5, "maxSeconds": 10}, "jitter": 0},
        spec_module.Retry.model_validate(
            {"limit": 3, "backoff": {"seconds": 0.5, "maxSeconds": 10}, "jitter": 0}
        ),
    ]
    manifests = []
    for policy in policies:
        wf = Workflow("r", default_retry=policy)
        wf.task("a", ["true"], retry=policy)
        manifests.append(wf.to_manifest())
    assert manifests[0] == manifests[1] == manifests[2]
    assert manifests[0]["spec"]["defaults"]["retry"]["backoff"] == {
        "seconds": 0.5,
        "maxSeconds": 10,
    }


def test_placement_by_selector_and_workflow_level_fields() -> None:
    wf = Workflow(
        "w",
        "ns",
        site_selector={"region": "north"},
        default_timeout_seconds=30,
        deadline_seconds=600,
        suspend=True,
        ttl_seconds_after_finished=3600,
        labels={"team": "ops"},
    )
    wf.task("a", ["echo", WORKFLOW_NAME])
    manifest = wf.to_manifest()
    assert manifest["metadata"] == {"name": "w", "namespace": "ns", "labels": {"team": "ops"}}
    assert manifest["spec"]["placement"] == {"siteSelector": {"matchLabels": {"region": "north"}}}
    built = wf.build().spec
    assert (built.defaults.timeout_seconds, built.deadline_seconds, built.suspend) == (
        30,
        600,
        True,
    )
    assert manifest["spec"]["ttlSecondsAfterFinished"] == built.ttl_seconds_after_finished == 3600


def test_interruption_policy_per_task_and_in_defaults() -> None:
    wf = Workflow("w", default_max_interruptions=5, default_on_interruption="Fail")
    a = wf.task("a", ["true"], max_interruptions=2, on_interruption="Rerun")
    wf.task("b", ["true"], depends_on=[a])
    wf.on_failure("undo", ["true"], on_interruption="Fail", max_interruptions=1)
    manifest = wf.to_manifest()["spec"]
    assert manifest["defaults"] == {"maxInterruptions": 5, "onInterruption": "Fail"}
    assert manifest["tasks"][0] == {
        "name": "a",
        "command": ["true"],
        "maxInterruptions": 2,
        "onInterruption": "Rerun",
    }
    assert "maxInterruptions" not in manifest["tasks"][1]
    assert manifest["onFailure"][0]["maxInterruptions"] == 1
    built = wf.build().spec
    b = built.task("b")
    assert (built.max_interruptions_for(b), built.on_interruption_for(b)) == (5, "Fail")
    assert built.max_interruptions_for(built.task("a")) == 2
    with pytest.raises(SpecError) as info:
        Workflow("w2").task("a", ["true"], on_interruption="Never").workflow.build()
    assert info.value.field == "spec.tasks[0].onInterruption"
    assert "(in task 'a')" in str(info.value)


def test_param_with_default_declares_it() -> None:
    wf = Workflow("w")
    assert wf.param("batch", "2026-01-01") == "{{params.batch}}"
    wf.task("a", ["echo", wf.param("batch")])
    assert wf.build().spec.params == {"batch": "2026-01-01"}


def test_depends_on_takes_refs_names_and_a_single_ref() -> None:
    wf = Workflow("w")
    a = wf.task("a", ["true"])
    b = wf.task("b", ["true"], depends_on=a)
    wf.task("c", ["true"], depends_on=[b, "a"])
    assert wf.build().spec.task("c").depends_on == ["b", "a"]
    assert wf.ref("b") is b and str(b) == "b"
    assert wf.task_names == ["a", "b", "c"]


# ------------------------------------------------------------------ the errors
def build_error(wf: Workflow) -> SpecError:
    with pytest.raises(SpecError) as info:
        wf.build()
    return info.value


def test_a_cycle_names_the_dependsOn_field() -> None:
    wf = Workflow("w")
    wf.task("a", ["true"], depends_on=["c"])
    wf.task("b", ["true"], depends_on=["a"])
    wf.task("c", ["true"], depends_on=["b"])
    err = build_error(wf)
    assert err.field == "spec.tasks[0].dependsOn"
    assert "cycle through tasks a, b, c" in str(err)
    assert "(in task 'a')" in str(err)


def test_a_template_naming_a_non_ancestor_names_the_field() -> None:
    wf = Workflow("w")
    extract = wf.task("extract", ["true"])
    wf.task("load", ["true"], env={"ROWS": extract.output("rows")})  # no depends_on
    err = build_error(wf)
    assert err.field == "spec.tasks[1].env.ROWS"
    assert "not an ancestor" in str(err) and "(in task 'load')" in str(err)


def test_an_unknown_dependency_names_the_field() -> None:
    wf = Workflow("w")
    wf.task("extract", ["true"])
    wf.task("load", ["true"], depends_on=["extrct"])
    err = build_error(wf)
    assert err.field == "spec.tasks[1].dependsOn[0]"
    assert "unknown task 'extrct'" in str(err)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda wf: (wf.task("a", ["true"]), wf.task("a", ["true"])), "spec.tasks[1].name"),
        (lambda wf: wf.task("Bad Name", ["true"]), "spec.tasks[0].name"),
        (lambda wf: wf.task("a"), "spec.tasks[0].command"),
        (lambda wf: wf.task("a", ["x"], script="y"), "spec.tasks[0].command"),
        (lambda wf: wf.task("a", ["x"], shell="bash"), "spec.tasks[0].shell"),
        (lambda wf: wf.task("a", ["x"], timeout_seconds=0), "spec.tasks[0].timeoutSeconds"),
        (lambda wf: wf.task("a", ["x"], retry=Retry(limit=101)), "spec.tasks[0].retry.limit"),
        (
            lambda wf: wf.task("a", ["x"], retry=Retry(backoff=Backoff(seconds=5, max_seconds=1))),
            "spec.tasks[0].retry.backoff.maxSeconds",
        ),
        (lambda wf: wf.task("a", ["x"], env={"1BAD": "v"}), "spec.tasks[0].env"),
        (lambda wf: wf.task("a", ["x"], retry={"limt": 1}), "spec.tasks[0].retry.limt"),
        (lambda wf: wf.task("a", ["{{params.nope}}"]), "spec.tasks[0].command[0]"),
        (lambda wf: None, "spec.tasks"),
        (
            lambda wf: (wf.task("a", ["true"]), wf.on_failure("a", ["true"])),
            "spec.onFailure[0].name",
        ),
    ],
)
def test_spec_errors_name_the_field(make: Any, field: str) -> None:
    wf = Workflow("w")
    make(wf)
    assert build_error(wf).field == field


def test_workflow_level_errors_name_the_field() -> None:
    both = Workflow("w", site="a", site_selector={"x": "y"})
    both.task("a", ["true"])
    assert build_error(both).field == "spec.placement.site"
    deadline = Workflow("w", deadline_seconds=-1, default_timeout_seconds=0)
    deadline.task("a", ["true"])
    fields = {f for f, _ in build_error(deadline).problems}
    assert fields == {"spec.deadlineSeconds", "spec.defaults.timeoutSeconds"}
    nameless = Workflow("")
    nameless.task("a", ["true"])
    assert build_error(nameless).field == "metadata.name"


def test_to_manifest_and_to_yaml_refuse_an_invalid_workflow() -> None:
    wf = Workflow("w")
    wf.task("a", ["true"], depends_on=["a"])
    with pytest.raises(SpecError, match=r"spec\.tasks\[0\]\.dependsOn\[0\]"):
        wf.to_manifest()
    with pytest.raises(SpecError):
        wf.to_yaml()


def test_builder_misuse_fails_at_once_naming_the_field() -> None:
    wf, other = Workflow("w"), Workflow("other")
    theirs = other.task("x", ["true"])
    with pytest.raises(SpecError, match=r"spec\.tasks\[0\]\.dependsOn\[0\].*workflow 'other'"):
        wf.task("a", ["true"], depends_on=[theirs])
    with pytest.raises(SpecError, match=r"spec\.tasks\[0\]\.command: must be a list"):
        wf.task("a", "echo hi")  # a str is a Sequence[str]: mypy cannot catch it
    undo = wf.on_failure("undo", ["true"])
    with pytest.raises(SpecError, match=r"spec\.tasks\[0\]\.dependsOn\[0\].*onFailure task"):
        wf.task("a", ["true"], depends_on=[undo])
    main = wf.task("a", ["true"])
    with pytest.raises(SpecError, match=r"spec\.onFailure\[1\]\.dependsOn\[0\].*main task"):
        wf.on_failure("b", ["true"], depends_on=[main])
    with pytest.raises(SpecError, match=r"spec\.params\.batch: unknown parameter"):
        wf.param("batch")
    with pytest.raises(SpecError, match="invalid output key"):
        main.output("not a key")
    with pytest.raises(SpecError, match="expected a TaskRef"):
        wf.task("c", ["true"], depends_on=[3])  # type: ignore[list-item]


def test_compensation_may_read_main_outputs() -> None:
    wf = Workflow("w")
    load = wf.task("load", ["true"])
    undo = wf.on_failure("undo", ["echo", load.output("rows")])
    wf.on_failure("tell", ["echo", undo.output("done")], depends_on=[undo])
    assert [t.name for t in wf.build().spec.on_failure] == ["undo", "tell"]


# ------------------------------------------------------------------ the CLI
def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


FLOW = """\
from tideflow.builder import Workflow

def flow(name):
    wf = Workflow(name, "ns")
    wf.task("a", ["true"])
    return wf
"""


def render(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def names(text: str) -> list[str]:
    return [d["metadata"]["name"] for d in yaml.safe_load_all(text) if d is not None]


def test_cli_finds_a_build_function_first(tmp_path: Path, capsys: Any) -> None:
    path = write(
        tmp_path,
        "f.py",
        FLOW + "stray = flow('stray')\ndef build():\n    return [flow('x'), flow('y')]\n",
    )
    code, out, _ = render(capsys, str(path))
    assert code == 0 and names(out) == ["x", "y"]


def test_cli_finds_workflows_then_workflow(tmp_path: Path, capsys: Any) -> None:
    many = write(
        tmp_path, "many.py", FLOW + "workflows = [flow('p'), flow('q')]\nworkflow = flow('r')\n"
    )
    one = write(tmp_path, "one.py", FLOW + "workflow = flow('r')\nother = flow('s')\n")
    code, out, _ = render(capsys, str(many), str(one))
    assert code == 0 and names(out) == ["p", "q", "r"]


def test_cli_scans_module_level_workflows(tmp_path: Path, capsys: Any) -> None:
    path = write(
        tmp_path,
        "scan.py",
        FLOW
        + "first = flow('one')\n_private = flow('hidden')\nalias = first\nsecond = flow('two')\n"
        + "if __name__ == '__main__':\n    raise SystemExit('must not run')\n",
    )
    code, out, _ = render(capsys, str(path))
    assert code == 0 and names(out) == ["one", "two"]
    assert out.count("---\n") == 2


def test_cli_accepts_built_spec_models(tmp_path: Path, capsys: Any) -> None:
    path = write(tmp_path, "built.py", FLOW + "workflow = flow('m').build()\n")
    code, out, _ = render(capsys, str(path))
    assert code == 0 and names(out) == ["m"]
    assert "suspend" not in out  # only what was set


def test_cli_imports_sibling_modules(tmp_path: Path, capsys: Any) -> None:
    write(tmp_path, "shared.py", FLOW)
    path = write(tmp_path, "uses.py", "from shared import flow\nworkflow = flow('sib')\n")
    code, out, _ = render(capsys, str(path))
    assert code == 0 and names(out) == ["sib"]
    assert str(tmp_path) not in sys.path


def test_cli_invalid_spec_exits_2_naming_the_field(tmp_path: Path, capsys: Any) -> None:
    path = write(
        tmp_path,
        "bad.py",
        """\
        from tideflow.builder import Workflow
        workflow = Workflow("bad", "ns")
        workflow.task("a", ["true"], depends_on=["b"])
        workflow.task("b", ["true"], depends_on=["a"])
        """,
    )
    out_file = tmp_path / "out.yaml"
    code, out, err = render(capsys, str(path), "-o", str(out_file))
    assert code == 2 and out == ""
    assert "workflow ns/bad: spec.tasks[0].dependsOn: cycle through tasks a, b" in err
    assert not out_file.exists()


def test_cli_eager_builder_error_exits_2(tmp_path: Path, capsys: Any) -> None:
    path = write(
        tmp_path,
        "eager.py",
        "from tideflow.builder import Workflow\nWorkflow('w').param('missing')\n",
    )
    code, _, err = render(capsys, str(path))
    assert code == 2 and "spec.params.missing: unknown parameter" in err


def test_cli_other_failures(tmp_path: Path, capsys: Any) -> None:
    empty = write(tmp_path, "empty.py", "x = 1\n")
    code, _, err = render(capsys, str(empty))
    assert code == 2 and "defines no workflow" in err
    code, _, err = render(capsys, str(tmp_path / "missing.py"))
    assert code == 2 and "no such file" in err
    wrong = write(tmp_path, "wrong.py", "workflows = [1]\n")
    code, _, err = render(capsys, str(wrong))
    assert code == 2 and "workflows[0] is a int" in err
    twice = write(tmp_path, "twice.py", FLOW + "workflows = [flow('d'), flow('d')]\n")
    code, _, err = render(capsys, str(twice))
    assert code == 2 and "ns/d is defined twice" in err
    boom = write(tmp_path, "boom.py", "raise RuntimeError('kaboom')\n")
    code, _, err = render(capsys, str(boom))
    assert code == 1 and "kaboom" in err


def test_cli_writes_output_file(tmp_path: Path, capsys: Any) -> None:
    out_file = tmp_path / "wf.yaml"
    code, out, _ = render(capsys, str(EXAMPLES / "nightly_etl.py"), "--output", str(out_file))
    assert code == 0 and out == ""
    (document,) = [d for d in yaml.safe_load_all(out_file.read_text()) if d is not None]
    assert document == load_example("nightly-etl.yaml")


def test_cli_needs_a_command(capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_tideflow_imports_neither_side(tmp_path: Path) -> None:
    code = (
        "import sys, tideflow.cli, tideflow.builder\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('edge_agent', 'tideflow_operator')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
