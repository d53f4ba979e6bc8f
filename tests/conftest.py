"""Shared fixtures: a clean CKPT_* environment for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_ckpt_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CKPT_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real control plane for the whole session (etcd, apiserver, scheduler, controller-manager, kubelet).

    Never skipped: if it cannot be built or started, every test that needs it fails with the reason.
    """
    from kubernetes import config

    from tests.cluster.launcher import Cluster, ClusterError

    workdir = tmp_path_factory.mktemp("cluster")
    try:
        c = Cluster(workdir).start()
    except ClusterError as exc:
        pytest.fail(f"the local control plane could not start: {exc}", pytrace=False)
    os.environ["KUBECONFIG"] = str(c.kubeconfig)
    config.load_kube_config(str(c.kubeconfig))
    yield c
    c.stop()


@pytest.fixture()
def core(cluster):  # type: ignore[no-untyped-def]
    from kubernetes import client

    return client.CoreV1Api()


@pytest.fixture()
def namespace(cluster, core, request):  # type: ignore[no-untyped-def]
    """A fresh namespace per test, deleted afterwards."""
    import re
    import uuid

    from kubernetes import client

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:5]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    from tests.kube import wait_for

    wait_for("default service account", lambda: core.read_namespaced_service_account("default", name), 30)
    yield name
    core.delete_namespace(name, grace_period_seconds=0)
