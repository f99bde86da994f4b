"""The ``envtest`` fixture gives a real, working API server: kubectl and the Python client
both reach it, CRDs become Established and serve custom objects, and RBAC is enforced.

The cluster is shared by the whole session, so each test uses names of its own.
"""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from services.kube import EnvtestCluster

pytestmark = pytest.mark.envtest

GROUP = "envtest.tideflow.test"
PLURAL = "widgets"
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_YAML = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {CRD_NAME}
spec:
  group: {GROUP}
  scope: Namespaced
  names:
    plural: {PLURAL}
    singular: widget
    kind: Widget
    listKind: WidgetList
  versions:
    - name: v1
      served: true
      storage: true
      subresources:
        status: {{}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size:
                  type: integer
                  minimum: 1
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_cluster_basics(envtest: EnvtestCluster) -> None:
    assert envtest.server.startswith("https://127.0.0.1:")
    assert envtest.kubeconfig.is_file()
    assert envtest.version.startswith("v1.")
    status, body = envtest.get("/readyz")
    assert (status, body) == (200, b"ok")


def test_namespace_via_kubectl(envtest: EnvtestCluster) -> None:
    name = unique("kubectl")
    envtest.kubectl("create", "namespace", name)
    out = envtest.kubectl("get", "namespace", name, "-o", "json").stdout
    assert json.loads(out)["metadata"]["name"] == name


def test_namespace_via_python_client(envtest: EnvtestCluster) -> None:
    name = unique("python")
    with envtest.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        names = {ns.metadata.name for ns in core.list_namespace().items}
    assert name in names
    assert envtest.kubectl("get", "namespace", name, "-o", "name").stdout.strip() == (
        f"namespace/{name}"
    )


def test_crd_established_and_custom_objects(envtest: EnvtestCluster) -> None:
    envtest.kubectl("apply", "-f", "-", input=CRD_YAML)
    envtest.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    namespace = unique("crd")
    envtest.kubectl("create", "namespace", namespace)

    with envtest.api_client() as api:
        custom = client.CustomObjectsApi(api)
        body = {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "spec": {"size": 3},
        }
        custom.create_namespaced_custom_object(GROUP, "v1", namespace, PLURAL, body)
        listed = custom.list_namespaced_custom_object(GROUP, "v1", namespace, PLURAL)
        assert [item["metadata"]["name"] for item in listed["items"]] == ["w1"]

        # The schema is enforced by the API server.
        bad = {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}}
        with pytest.raises(client.ApiException) as excinfo:
            custom.create_namespaced_custom_object(GROUP, "v1", namespace, PLURAL, bad)
        assert excinfo.value.status == 422

    out = envtest.kubectl("get", PLURAL, "-n", namespace, "-o", "json").stdout
    assert [item["spec"]["size"] for item in json.loads(out)["items"]] == [3]


def test_rbac_is_enforced(envtest: EnvtestCluster) -> None:
    nobody = envtest.kubectl(
        "auth", "can-i", "--as", "system:serviceaccount:default:nobody", "get", "pods",
        check=False,
    )  # fmt: skip
    assert nobody.stdout.strip() == "no"
    assert nobody.returncode == 1
    admin = envtest.kubectl("auth", "can-i", "get", "pods")
    assert admin.stdout.strip() == "yes"
