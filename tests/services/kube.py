"""A real Kubernetes API server for tests, the envtest way: kube-apiserver + etcd, no nodes.

The launcher lives in the distribution's tooling layer (:mod:`tideflow.tools.launchers.cluster`,
the ``demo`` extra), since ``tideflow demo`` needs it too; this module keeps the
names the tests import.
"""

from __future__ import annotations

from tideflow.tools.launchers.cluster import (
    DEFAULT_ASSETS,
    HOST,
    INSTALL_HINT,
    EnvtestCluster,
    EnvtestError,
    assets_dir,
    find_etcd,
    find_kube_apiserver,
    find_kubectl,
    free_port,
    missing_reason,
)

__all__ = [
    "DEFAULT_ASSETS",
    "HOST",
    "INSTALL_HINT",
    "EnvtestCluster",
    "EnvtestError",
    "assets_dir",
    "find_etcd",
    "find_kube_apiserver",
    "find_kubectl",
    "free_port",
    "missing_reason",
]
