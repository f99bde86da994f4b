"""The checked-in CRDs are what the generator writes, and they are valid structural schemas.

No API server is needed here: the structural rules kube-apiserver enforces on
a CRD are re-checked in Python (:func:`structural_problems`).  The operator's
envtest tests apply these files to a real server.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from tideflow import crd
from tideflow.spec import (
    DNS1123_SUBDOMAIN_PATTERN,
    MAX_TASK_NAME,
    SITE_NAME_PATTERN,
    TASK_NAME_PATTERN,
    WorkflowSpec,
    parse_spec,
)

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"

Schema = dict[str, Any]

TYPES = {"object", "array", "string", "integer", "number", "boolean"}
ALLOWED_KEYS = {
    "type",
    "description",
    "format",
    "default",
    "enum",
    "nullable",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
}


def load(name: str) -> list[Schema]:
    return [doc for doc in yaml.safe_load_all((CRDS / name).read_text()) if doc]


def only_version(doc: Schema) -> Schema:
    versions = doc["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


def root_schema(doc: Schema) -> Schema:
    return only_version(doc)["schema"]["openAPIV3Schema"]


def workflow() -> Schema:
    (doc,) = load("workflows.tideflow.io.yaml")
    return doc


def edgesite() -> Schema:
    (doc,) = load("edgesites.tideflow.io.yaml")
    return doc


def _type_ok(value: Any, type_: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[type_]


def structural_problems(node: Any, path: str = "") -> list[str]:
    """What kube-apiserver would refuse in a CRD's openAPIV3Schema (the parts we use)."""
    if not isinstance(node, dict):
        return [f"{path}: schema is not a mapping"]
    problems = [f"{path}: keyword {key!r} not allowed" for key in node if key not in ALLOWED_KEYS]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    type_ = node.get("type")
    if type_ is None and not (preserve or int_or_string):
        problems.append(f"{path}: no type")
    elif type_ is not None and type_ not in TYPES:
        problems.append(f"{path}: unknown type {type_!r}")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if (
        type_ == "object"
        and path != ".metadata"  # the root's metadata is typed by the API server itself
        and not (
            "properties" in node or isinstance(node.get("additionalProperties"), dict) or preserve
        )
    ):
        problems.append(f"{path}: object without properties")
    if type_ == "array" and not isinstance(node.get("items"), dict):
        problems.append(f"{path}: array without a single items schema")
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if flag in node and (not isinstance(node[flag], bool) or bound not in node):
            problems.append(f"{path}: {flag} must be a boolean beside {bound}")
    if "default" in node and type_ is not None and not _type_ok(node["default"], type_):
        problems.append(f"{path}: default {node['default']!r} is not a {type_}")
    for key in ("required", "x-kubernetes-list-map-keys"):
        for name in node.get(key, []):
            target = node if key == "required" else node.get("items", {})
            if name not in target.get("properties", {}):
                problems.append(f"{path}: {key} names unknown property {name!r}")
    if node.get("x-kubernetes-list-type") == "map":
        items = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            if key not in items.get("required", []) and "default" not in items.get(
                "properties", {}
            ).get(key, {}):
                problems.append(f"{path}: map key {key!r} must be required or defaulted")
    for rule in node.get("x-kubernetes-validations", []):
        if set(rule) - {"rule", "message", "fieldPath", "reason", "messageExpression"}:
            problems.append(f"{path}: unknown keys in validation rule {rule}")
        for name in re.findall(r"\bself\.(\w+)", rule.get("rule", "")):
            if name not in node.get("properties", {}):
                problems.append(f"{path}: rule {rule['rule']!r} names unknown field {name!r}")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*")
    elif "additionalProperties" in node:
        problems.append(f"{path}: additionalProperties must be a schema")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    return problems


def all_crds() -> list[Schema]:
    return [doc for name in crd.CRD_FILES for doc in load(name)]


# --------------------------------------------------------------------------
# The files


def test_crds_directory_equals_generator_output(tmp_path: Path) -> None:
    written = crd.write_crds(tmp_path)
    assert sorted(p.name for p in written) == sorted(crd.CRD_FILES)
    for path in written:
        checked_in = CRDS / path.name
        assert checked_in.is_file(), f"{checked_in} missing: run python -m tideflow.crd"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in} is stale: run python -m tideflow.crd"
        )
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == sorted(crd.CRD_FILES)


def test_output_is_deterministic_and_headed() -> None:
    first, second = crd.render_crds(), crd.render_crds()
    assert first == second
    for text in first.values():
        assert text.startswith(crd.HEADER)
        assert "do not edit" in text.splitlines()[0]


def test_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main(["--check", str(CRDS)]) == 0
    crd.write_crds(tmp_path)
    assert crd.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "edgesites.tideflow.io.yaml").write_text("stale\n")
    assert crd.main(["--check", str(tmp_path)]) == 1
    assert "edgesites.tideflow.io.yaml" in capsys.readouterr().err
    assert crd.main([str(tmp_path)]) == 0
    assert crd.main(["--check", str(tmp_path)]) == 0


# --------------------------------------------------------------------------
# Structural schemas


@pytest.mark.parametrize("doc", all_crds(), ids=lambda d: d["metadata"]["name"])
def test_schema_is_structural(doc: Schema) -> None:
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["kind"] == "CustomResourceDefinition"
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == f"{names['plural']}.{doc['spec']['group']}"
    root = root_schema(doc)
    assert root["type"] == "object"
    assert structural_problems(root) == []
    text = yaml.safe_dump(doc)
    for banned in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title:", "'null'"):
        assert banned not in text


def test_checker_catches_non_structural_input() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "b": {"$ref": "#/$defs/B"},
            "c": {"type": "object"},
            "d": {"type": "integer", "exclusiveMinimum": 0},
            "e": {"type": "object", "additionalProperties": False, "properties": {}},
        },
    }
    problems = structural_problems(bad)
    for field in (".a", ".b", ".c", ".d", ".e"):
        assert any(p.startswith(f"{field}:") for p in problems), (field, problems)


def test_generator_refuses_what_it_cannot_express() -> None:
    class Union(BaseModel):
        model_config = ConfigDict(extra="forbid")
        value: int | str

    with pytest.raises(crd.CRDGenerationError, match="Optional"):
        crd.structural_schema(Union)
    with pytest.raises(crd.CRDGenerationError, match=r"Task\.nmae"):
        crd.structural_schema(WorkflowSpec, {"Task.nmae": {"maxLength": 3}})


# --------------------------------------------------------------------------
# Workflow


def spec_schema() -> Schema:
    spec: Schema = root_schema(workflow())["properties"]["spec"]
    return spec


def task_schema(list_name: str = "tasks") -> Schema:
    items: Schema = spec_schema()["properties"][list_name]["items"]
    return items


def test_workflow_identity() -> None:
    doc = workflow()
    assert doc["metadata"]["name"] == "workflows.tideflow.io"
    spec = doc["spec"]
    assert spec["group"] == "tideflow.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "Workflow"
    assert spec["names"]["plural"] == "workflows"
    assert spec["names"]["singular"] == "workflow"
    assert spec["names"]["shortNames"] == ["twf"]
    version = only_version(doc)
    assert version["name"] == "v1alpha1"
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}
    root = root_schema(doc)
    assert root["required"] == ["spec"]
    # The status is the contract's WorkflowStatus (what the applier renders), typed,
    # and keeps fields a newer operator adds.
    from tideflow.crd import WorkflowStatus, WorkflowTaskStatus

    status = root["properties"]["status"]
    assert status["type"] == "object" and status["x-kubernetes-preserve-unknown-fields"] is True
    assert set(status["properties"]) == {
        f.alias or name for name, f in WorkflowStatus.model_fields.items()
    }
    tasks = status["properties"]["tasks"]["items"]
    assert set(tasks["properties"]) == {
        f.alias or name for name, f in WorkflowTaskStatus.model_fields.items()
    }
    assert tasks["required"] == ["name", "phase", "attempt"]
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["properties"]["taskCounts"]["additionalProperties"] == {"type": "integer"}


def test_workflow_spec_mirrors_the_model() -> None:
    spec = spec_schema()
    model_fields = {f.alias or name for name, f in WorkflowSpec.model_fields.items()}
    assert set(spec["properties"]) == model_fields
    assert spec["required"] == ["tasks"]
    task = task_schema()
    assert set(task["properties"]) == {
        "name",
        "command",
        "script",
        "shell",
        "env",
        "workingDir",
        "dependsOn",
        "timeoutSeconds",
        "retry",
        "maxInterruptions",
        "onInterruption",
    }
    assert task["required"] == ["name"]
    assert task == task_schema("onFailure")
    assert task["properties"]["env"]["additionalProperties"] == {"type": "string"}
    assert spec["properties"]["params"]["additionalProperties"] == {"type": "string"}
    assert task["properties"]["command"]["items"] == {"type": "string"}
    assert task["properties"]["command"]["minItems"] == 1
    assert task["properties"]["name"]["pattern"] == TASK_NAME_PATTERN
    assert task["properties"]["timeoutSeconds"] == {
        "type": "integer",
        "description": "Per-attempt timeout.",
        "minimum": 0,
        "exclusiveMinimum": True,
    }
    assert spec["properties"]["tasks"]["minItems"] == 1
    for where in (task, spec["properties"]["defaults"]):
        assert where["properties"]["maxInterruptions"]["minimum"] == 1
        assert where["properties"]["maxInterruptions"]["maximum"] == 100
        assert where["properties"]["onInterruption"]["enum"] == ["Rerun", "Fail"]
        assert "InterruptedTooOften" in where["properties"]["maxInterruptions"]["description"]
        assert "never run twice" in where["properties"]["onInterruption"]["description"]
    retry = task["properties"]["retry"]["properties"]
    assert retry["limit"]["minimum"] == 0 and retry["limit"]["maximum"] == 100
    assert retry["jitter"]["maximum"] == 1


def test_descriptions_for_kubectl_explain() -> None:
    spec = spec_schema()
    assert spec["description"]
    for name, prop in spec["properties"].items():
        assert prop.get("description"), f"spec.{name} has no description"
    for name, prop in task_schema()["properties"].items():
        assert prop.get("description"), f"spec.tasks.{name} has no description"
    for name, prop in task_schema()["properties"]["retry"]["properties"].items():
        assert prop.get("description"), f"spec.tasks.retry.{name} has no description"


def test_simple_defaults_match_pydantic() -> None:
    spec = spec_schema()
    assert spec["properties"]["suspend"]["default"] is False
    retry = task_schema()["properties"]["retry"]["properties"]
    assert retry["limit"]["default"] == 0
    assert retry["jitter"]["default"] == 0.2
    backoff = retry["backoff"]["properties"]
    assert {k: v["default"] for k, v in backoff.items()} == {
        "seconds": 1.0,
        "factor": 2.0,
        "maxSeconds": 300.0,
    }
    # No default for anything optional: an unset optional is simply absent.
    assert "default" not in spec["properties"]["placement"]
    assert "default" not in task_schema()["properties"]["timeoutSeconds"]


def _apply_defaults(obj: Any, schema: Schema) -> Any:
    """kube-apiserver's structural defaulting, for objects and arrays."""
    if isinstance(obj, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                _apply_defaults(obj[name], sub)
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            _apply_defaults(item, schema["items"])
    return obj


@pytest.mark.parametrize(
    "manifest",
    [
        {"tasks": [{"name": "a", "command": ["true"]}]},
        {
            "defaults": {"retry": {"limit": 2, "backoff": {"seconds": 0.5}}},
            "tasks": [
                {"name": "a", "script": "echo", "retry": {}},
                {"name": "b", "command": ["x"], "dependsOn": ["a"], "retry": {"backoff": {}}},
            ],
            "onFailure": [{"name": "undo", "command": ["y"], "retry": {"limit": 1}}],
        },
        yaml.safe_load((ROOT / "examples" / "demo-local.yaml").read_text())["spec"],
    ],
)
def test_api_server_defaulting_does_not_change_meaning(manifest: Schema) -> None:
    defaulted = _apply_defaults(copy.deepcopy(manifest), spec_schema())
    assert parse_spec(defaulted) == parse_spec(manifest)


def rules(node: Schema) -> dict[str, Schema]:
    return {r["rule"]: r for r in node.get("x-kubernetes-validations", [])}


def test_cel_rules() -> None:
    for list_name in ("tasks", "onFailure"):
        task = rules(task_schema(list_name))
        assert (
            task["has(self.command) != has(self.script)"]["message"]
            == "exactly one of command or script is required"
        )
        assert "!has(self.shell) || has(self.script)" in task
    props = spec_schema()["properties"]
    placement = rules(props["placement"])
    assert "has(self.site) != has(self.siteSelector)" in placement
    backoffs = [
        props["defaults"]["properties"]["retry"]["properties"]["backoff"],
        task_schema()["properties"]["retry"]["properties"]["backoff"],
    ]
    for backoff in backoffs:
        (rule,) = rules(backoff).values()
        assert "self.maxSeconds >= self.seconds" in rule["rule"]
    (cross,) = rules(spec_schema()).values()
    assert "self.onFailure.all(f, !self.tasks.exists(t, t.name == f.name))" in cross["rule"]


def test_task_names_unique_and_bounded_for_the_cel_cost_estimator() -> None:
    props = spec_schema()["properties"]
    for list_name, limit in (("tasks", crd.MAX_TASKS), ("onFailure", crd.MAX_ON_FAILURE_TASKS)):
        tasks = props[list_name]
        # Uniqueness by name: a map list, enforced by the API server without CEL cost.
        assert tasks["x-kubernetes-list-type"] == "map"
        assert tasks["x-kubernetes-list-map-keys"] == ["name"]
        assert tasks["maxItems"] == limit
    assert task_schema()["properties"]["name"]["maxLength"] == MAX_TASK_NAME == 128
    # The onFailure x tasks rule is quadratic; keep its worst case well inside
    # the per-rule budget (10M cost units at roughly 35 units per comparison,
    # plus a tenth of a unit per character of the compared names).
    per_comparison = 35 + MAX_TASK_NAME // 10
    assert crd.MAX_TASKS * crd.MAX_ON_FAILURE_TASKS * per_comparison < 10_000_000


@pytest.mark.parametrize(
    ("doc", "pattern", "max_length"),
    [(workflow(), DNS1123_SUBDOMAIN_PATTERN, 253), (edgesite(), SITE_NAME_PATTERN, 63)],
    ids=["Workflow", "EdgeSite"],
)
def test_object_names_are_restricted_as_the_site_restricts_them(
    doc: Schema, pattern: str, max_length: int
) -> None:
    # The API server checks a custom resource's name only as a path segment:
    # 'Line+2' would be stored, then break the site's topic or its manifest check.
    metadata = root_schema(doc)["properties"]["metadata"]
    assert set(metadata["properties"]) == {"name"}  # all a CRD may restrict there
    name = metadata["properties"]["name"]
    assert (name["pattern"], name["maxLength"]) == (pattern, max_length)
    for bad in ("+", "x/y", "#", "Line-2", "-a"):
        assert not re.fullmatch(name["pattern"], bad)
    assert re.fullmatch(name["pattern"], "line-2")


def test_placement_site_has_the_site_pattern() -> None:
    site = spec_schema()["properties"]["placement"]["properties"]["site"]
    assert site["pattern"] == SITE_NAME_PATTERN


def test_workflow_printer_columns() -> None:
    columns = only_version(workflow())["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"], c["type"]) for c in columns] == [
        ("Phase", ".status.phase", "string"),
        ("Site", ".status.site", "string"),
        ("Progress", ".status.progress", "string"),
        ("Connected", ".status.siteConnected", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]


# --------------------------------------------------------------------------
# EdgeSite


def test_edgesite() -> None:
    doc = edgesite()
    assert doc["metadata"]["name"] == "edgesites.tideflow.io"
    assert doc["spec"]["scope"] == "Cluster"
    assert doc["spec"]["names"]["kind"] == "EdgeSite"
    assert doc["spec"]["names"]["shortNames"] == ["site"]
    version = only_version(doc)
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    root = root_schema(doc)
    assert "required" not in root
    spec = root["properties"]["spec"]
    assert set(spec["properties"]) == {"description", "maxConcurrency"}
    assert spec["properties"]["maxConcurrency"]["type"] == "integer"
    status = root["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    types = {name: prop["type"] for name, prop in status["properties"].items()}
    assert types == {
        "connected": "boolean",
        "lastSeen": "string",
        "agentVersion": "string",
        "running": "integer",
        "outboxDepth": "integer",
        "lastAckedSeq": "integer",
        "databaseEpoch": "string",
        "conditions": "array",
    }
    assert status["properties"]["lastSeen"]["format"] == "date-time"
    columns = version["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"], c["type"]) for c in columns] == [
        ("Connected", ".status.connected", "boolean"),
        ("Running", ".status.running", "integer"),
        ("Last Seen", ".status.lastSeen", "date"),
        ("Version", ".status.agentVersion", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]


# --------------------------------------------------------------------------
# CronWorkflow


def test_cronworkflow() -> None:
    (doc,) = load("cronworkflows.tideflow.io.yaml")
    assert doc["spec"]["scope"] == "Namespaced"
    assert doc["spec"]["names"]["kind"] == "CronWorkflow"
    assert doc["spec"]["names"]["shortNames"] == ["tcwf"]
    version = only_version(doc)
    assert version["subresources"] == {"status": {}}
    root = root_schema(doc)
    assert root["required"] == ["spec"]
    assert root["properties"]["metadata"]["properties"]["name"]["maxLength"] == 52
    spec = root["properties"]["spec"]
    assert set(spec["properties"]) == {
        "schedule",
        "timezone",
        "placement",
        "concurrencyPolicy",
        "startingDeadlineSeconds",
        "suspend",
        "successfulJobsHistoryLimit",
        "failedJobsHistoryLimit",
        "workflowSpec",
    }
    assert sorted(spec["required"]) == ["placement", "schedule", "workflowSpec"]
    assert spec["properties"]["concurrencyPolicy"]["enum"] == ["Allow", "Forbid", "Replace"]
    assert spec["properties"]["timezone"]["default"] == "UTC"
    # The API server refuses a schedule of the wrong shape (the rest is parse_schedule's).
    shape = re.compile(spec["properties"]["schedule"]["pattern"])
    for good in ("0 2 * * *", "@daily", "@every 90s", "@every 1h30m", " */5 9-17 * * 1-5 "):
        assert shape.match(good), good
    for bad in ("0 2 * *", "0 2 * * * *", "@every 5 minutes", "@fortnightly", ""):
        assert not shape.match(bad), bad
    # Every field has kubectl explain text.
    for name, prop in spec["properties"].items():
        assert prop.get("description"), name
    # The template is a Workflow spec without placement (spec.placement says where) or a
    # TTL (the history limits keep fired runs), with the Workflow's list rules.
    template = spec["properties"]["workflowSpec"]
    (workflow,) = load("workflows.tideflow.io.yaml")
    workflow_spec = root_schema(workflow)["properties"]["spec"]
    assert set(template["properties"]) == set(workflow_spec["properties"]) - {
        "placement",
        "ttlSecondsAfterFinished",
    }
    assert template["properties"]["tasks"] == workflow_spec["properties"]["tasks"]
    assert template["x-kubernetes-validations"] == workflow_spec["x-kubernetes-validations"]
    placement = {**spec["properties"]["placement"], "description": ""}
    assert placement == {**workflow_spec["properties"]["placement"], "description": ""}
    columns = version["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"], c["type"]) for c in columns] == [
        ("Schedule", ".spec.schedule", "string"),
        ("Suspend", ".spec.suspend", "boolean"),
        ("Sites", ".status.siteCount", "integer"),
        ("Last Schedule", ".status.lastScheduleTime", "date"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]


# --------------------------------------------------------------------------
# kopf peering


def test_kopf_peering_crds() -> None:
    docs = {doc["metadata"]["name"]: doc for doc in load("kopf-peering.yaml")}
    assert set(docs) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for name, kind, scope in (
        ("clusterkopfpeerings.kopf.dev", "ClusterKopfPeering", "Cluster"),
        ("kopfpeerings.kopf.dev", "KopfPeering", "Namespaced"),
    ):
        spec = docs[name]["spec"]
        assert spec["group"] == "kopf.dev"
        assert spec["scope"] == scope
        assert spec["names"]["kind"] == kind
        version = only_version(docs[name])
        assert version["name"] == "v1"
        assert version["served"] is True and version["storage"] is True
        assert root_schema(docs[name])["properties"]["status"] == {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }
