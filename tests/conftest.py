"""Shared fixtures: a clean CKPT_* environment for every test."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_ckpt_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CKPT_"):
            monkeypatch.delenv(key)
    yield
    if "tests.kube" in sys.modules:  # watch threads must not outlive their test (or the interpreter)
        sys.modules["tests.kube"].ObjectRecorder.stop_all()


HOST_TERMINATION_LOG = Path("/dev/termination-log")
# tests: a node NotReady this long is lost (production default 300 s); a 20 s partition (NotReady ~10 s) is not
NODE_LOST_SECONDS = 30
# the PV controller binds a claim whose PV it has not seen yet at its next resync (default every 15 s): tests wait less
TEST_CLUSTER_ARGS = {"kube-controller-manager": ["--pvclaimbinder-sync-period=1s"]}


def _file_state(path: Path) -> tuple[bool, bytes | None, float | None]:
    if not path.exists():
        return False, None, None
    return True, path.read_bytes(), path.stat().st_mtime


@pytest.fixture(scope="session", autouse=True)
def _host_termination_log_untouched() -> Iterator[None]:
    """The SDK writes /dev/termination-log only inside a pod: the whole suite must leave the host's alone."""
    before = _file_state(HOST_TERMINATION_LOG)
    yield
    assert _file_state(HOST_TERMINATION_LOG) == before, f"the test run changed the host's {HOST_TERMINATION_LOG}"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real control plane for the whole session (etcd, apiserver, scheduler, controller-manager, kubelet).

    Never skipped: if it cannot be built or started, every test that needs it fails with the reason.
    """
    from kubernetes import config

    from tests.cluster.launcher import Cluster, ClusterError

    workdir = tmp_path_factory.mktemp("cluster")
    try:
        c = Cluster(workdir).start(extra_args=TEST_CLUSTER_ARGS)
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


NOTICE_CHECKPOINT_SECONDS = 10  # after an interruption notice, the time a trainer gets to checkpoint before moving


class OperatorProcess:
    """`ckpt-operator` as a real subprocess against the test cluster (restartable)."""

    def __init__(self, cluster, workdir) -> None:  # type: ignore[no-untyped-def]
        self.cluster, self.workdir = cluster, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "operator.log"

    def start(self, *extra_args: str) -> None:
        """Start it (with `extra_args` on its command line, e.g. a smaller client budget)."""
        from tests.cluster.launcher import free_port
        from tests.kube import wait_for

        self.metrics_port, self.health_port = free_port(), free_port()
        env = self.cluster.env()
        env.update(CKPT_OPERATOR_BACKOFF_BASE_SECONDS="1", CKPT_OPERATOR_BACKOFF_CAP_SECONDS="4",
                   CKPT_OPERATOR_NODE_LOST_SECONDS=str(NODE_LOST_SECONDS),
                   CKPT_OPERATOR_NOTICE_CHECKPOINT_SECONDS=str(NOTICE_CHECKPOINT_SECONDS))
        exe = str(Path(sys.executable).with_name("ckpt-operator"))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([exe, "--metrics-port", str(self.metrics_port), "--health-port",
                                          str(self.health_port), "--kueue", *extra_args], env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1) as r:
                return bool(r.status == 200)

        wait_for("operator /readyz", healthy, 60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())


@pytest.fixture()
def operator(operator_process):  # type: ignore[no-untyped-def]
    """The session's operator, running when the test starts (a test may stop and restart it)."""
    if operator_process.proc is None or operator_process.proc.poll() is not None:
        operator_process.start()
    return operator_process


@pytest.fixture(scope="session")
def operator_process(cluster, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The CRD installed and `ckpt-operator` started once for the session, with its Kueue support on (Kueue's CRDs
    installed; jobs outside a queue must not notice, and the `kueue` fixture starts Kueue's manager)."""
    cluster.install_kueue_crds()
    cluster.install_crds()
    op = OperatorProcess(cluster, tmp_path_factory.mktemp("operator"))
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def kueue(cluster, operator_process):  # type: ignore[no-untyped-def]
    """Kueue's manager (v0.17, built by `make tools`) running against the session's control plane."""
    from tests.cluster.launcher import ClusterError

    try:
        cluster.start_kueue()
    except ClusterError as exc:
        pytest.fail(f"Kueue could not start: {exc}", pytrace=False)
    return cluster


@pytest.fixture()
def claim(core, namespace, tmp_path):  # type: ignore[no-untyped-def]
    """A PVC named `ckpt` bound to a hostPath PV in a temp directory; returns that directory."""
    from tests.kube import create_hostpath_claim, wait_for

    host = tmp_path / "pv"
    host.mkdir()
    create_hostpath_claim(core, namespace, host)
    wait_for("claim bound", lambda: core.read_namespaced_persistent_volume_claim("ckpt", namespace).status.phase
             == "Bound", 30)
    yield host
    core.delete_persistent_volume(f"pv-{namespace}")
