"""Starts and stops the local control plane: certificates, etcd, apiserver, scheduler, controller-manager, kubelet."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "hack" / "build-tools.sh"
DEFAULT_TEST_NODES = 2


def test_node_names() -> tuple[str, ...]:
    """`local-node-1` ... `local-node-N`, N from CKPT_TEST_NODES (default 2)."""
    count = int(os.environ.get("CKPT_TEST_NODES") or DEFAULT_TEST_NODES)
    return tuple(f"local-node-{i}" for i in range(1, max(1, count) + 1))


class ClusterError(RuntimeError):
    """The control plane could not be built or started; the message says which component and why."""


KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"


def build_tools(components: tuple[str, ...] = ("etcd", "kube")) -> dict[str, Path]:
    """Build (or find cached) etcd and the Kubernetes binaries (or kwok); return their directories by component."""
    dirs = {}
    for component in components:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), component], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"building {component} failed:\n{proc.stderr[-4000:]}")
        dirs[component] = Path(proc.stdout.strip().splitlines()[-1])
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(pki: Path) -> None:
    """A CA, an apiserver serving cert for 127.0.0.1, an admin client cert and a service-account key."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=ckpt-test-ca", cwd=pki)
    (pki / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
                                 "DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1\n")
    for name, subj, ext in (("apiserver", "/CN=kube-apiserver", ["-extfile", "san.cnf"]),
                            ("admin", "/O=system:masters/CN=admin", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj, cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "3650", *ext, cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(pki / "admin.crt"),
                                             "client-key": str(pki / "admin.key")}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin", "namespace": "default"}}],
    }
    path.write_text(json.dumps(config, indent=1))


@dataclass
class Cluster:
    """A running control plane rooted at `workdir` (kubeconfig, pki, etcd data, logs, pids)."""

    workdir: Path
    kubeconfig: Path = field(init=False)
    server: str = ""
    bin_dirs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kubeconfig = self.workdir / "kubeconfig"

    @property
    def kubectl(self) -> str:
        return str(self.bin_dirs["kube"] / "kubectl")

    def env(self) -> dict[str, str]:
        """Environment for clients of this cluster: KUBECONFIG and kubectl on PATH."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        # the project's venv first: pods run `python ...` with the launcher's interpreter and packages
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, str(self.bin_dirs["kube"]), env.get("PATH", "")])
        return env

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, nodes: tuple[str, ...] | None = None, progress: bool = False,
              extra_args: dict[str, list[str]] | None = None) -> Cluster:
        """Start etcd, the API server (with an audit log of every non-watch request), the scheduler, the
        controller manager and a test kubelet per node (`nodes=()`: none, e.g. for kwok's fake nodes)."""
        nodes = test_node_names() if nodes is None else nodes
        extra = extra_args or {}
        say = (lambda m: print(f"[cluster] {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
        say("building or finding cached binaries (cold build ~10 min)")
        self.bin_dirs = build_tools()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        pki = self.workdir / "pki"
        if not (pki / "sa.key").exists():
            make_certs(pki)
        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        write_kubeconfig(self.kubeconfig, self.server, pki)
        try:
            say("starting etcd")
            self._spawn("etcd", [str(self.bin_dirs["etcd"] / "etcd"), "--data-dir", str(self.workdir / "etcd"),
                                 "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                                 "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                                 "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                                 "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
                                 "--unsafe-no-fsync", "--quota-backend-bytes", str(2 << 30)])
            self._wait(f"http://127.0.0.1:{etcd_port}/health", "etcd", timeout=30)
            say("starting kube-apiserver")
            kube = self.bin_dirs["kube"]
            self._spawn("kube-apiserver", [
                str(kube / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1", f"--secure-port={api_port}", "--advertise-address=127.0.0.1",
                f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}", f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc", "--authorization-mode=Node,RBAC",
                "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                "--enable-priority-and-fairness=false", "--profiling=false", "--cert-dir", str(pki),
                "--kubelet-preferred-address-types=InternalIP",  # test nodes' Hostname addresses do not resolve
                f"--audit-policy-file={self._audit_policy()}", f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=1000000", "--audit-log-format=json", *extra.get("kube-apiserver", []),
            ])
            self._wait_api(timeout=90)
            kubeconfig = f"--kubeconfig={self.kubeconfig}"
            say("starting kube-scheduler and kube-controller-manager")
            self._spawn("kube-scheduler", [str(kube / "kube-scheduler"), kubeconfig, "--leader-elect=false",
                                           "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
                                           f"--authentication-kubeconfig={self.kubeconfig}",
                                           f"--authorization-kubeconfig={self.kubeconfig}",
                                           *extra.get("kube-scheduler", [])])
            self._spawn("kube-controller-manager", [
                str(kube / "kube-controller-manager"), kubeconfig, "--leader-elect=false",
                "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
                f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
                f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false", "--node-monitor-grace-period=10s",
                "--node-monitor-period=2s", "--controllers=*,-nodeipam", "--concurrent-gc-syncs=5",
                *extra.get("kube-controller-manager", []),
            ])
            for node in nodes:
                say(f"starting the local test kubelet for node {node}")
                self.start_kubelet(node)
            self._wait_nodes_ready(nodes, timeout=60)
            self._wait_default_service_account(timeout=60)
        except BaseException:
            self.stop()
            raise
        say(f"ready: KUBECONFIG={self.kubeconfig}")
        return self

    @property
    def audit_log(self) -> Path:
        return self.workdir / "logs" / "audit.log"

    def _audit_policy(self) -> Path:
        """Every request but watches, at Metadata level (who, what, which object, the code)."""
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n"
                          "  - level: None\n    verbs: [watch]\n"
                          "  - level: Metadata\n")
        return policy

    def start_kwok(self) -> None:
        """Run kwok (built on first use) for the nodes annotated `kwok.x-k8s.io/node=fake` (see `kwok_node`):
        kwok's own node and pod-ready stages plus ours (tests/cluster/kwok-stages.yaml)."""
        kwok = build_tools(("kwok",))["kwok"]
        stages = [*sorted((kwok / "stages").glob("*.yaml")), ROOT / "tests" / "cluster" / "kwok-stages.yaml"]
        self._spawn("kwok", [str(kwok / "kwok"), f"--kubeconfig={self.kubeconfig}",
                             f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                             "--node-lease-duration-seconds=40", "--config", ",".join(map(str, stages))])

    # -- Kueue ---------------------------------------------------------------------------------------------------
    def install_crds(self, directory: Path = ROOT / "crds") -> None:
        """Apply the project's CRDs (or copies of them in `directory`) and wait until the TrainingJob CRD is
        Established (`kubectl wait` fails at once while a new CRD has no conditions yet)."""
        out = subprocess.run([self.kubectl, "apply", "-f", str(directory)], env=self.env(), capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise ClusterError(f"applying the CRDs in {directory} failed: {out.stderr}")
        self._poll("the TrainingJob CRD established", 60, self._trainingjobs_established)

    def _trainingjobs_established(self) -> bool:
        crd = self.kubectl_json("get", "crd", "trainingjobs.ckpt.dev")
        return any(c["type"] == "Established" and c["status"] == "True"
                   for c in (crd.get("status") or {}).get("conditions") or [])

    def install_kueue_crds(self) -> Path:
        """Kueue's CRDs (built with Kueue on first use): the operator can then watch Workloads whether or not the
        manager runs. Returns Kueue's directory."""
        kueue = build_tools(("kueue",))["kueue"]
        out = subprocess.run([self.kubectl, "apply", "--server-side", "-f", str(kueue / "crds")], env=self.env(),
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise ClusterError(f"applying Kueue's CRDs failed: {out.stderr}")
        self.bin_dirs["kueue"] = kueue
        self._poll("Kueue's API (workloads served)", 60, self._kueue_served)
        return kueue

    def _kueue_served(self) -> bool:
        out = subprocess.run([self.kubectl, "get", "--raw", "/apis/kueue.x-k8s.io/v1beta2"], env=self.env(),
                             capture_output=True, text=True)
        return out.returncode == 0 and "workloads" in {r["name"] for r in json.loads(out.stdout)["resources"]}

    def start_kueue(self, cpu: str = "4", memory: str = "8Gi", local_queue_namespace: str | None = None,
                    wait_for_pods_ready: dict[str, object] | None = None) -> None:
        """Run Kueue's manager (TrainingJob as an external framework) with its webhooks registered by URL, and a
        default ResourceFlavor and ClusterQueue (`tests.cluster.kueue.QUEUE`) with `cpu` and `memory` of quota
        (and a LocalQueue of that name in `local_queue_namespace`)."""
        from tests.cluster import kueue as K

        directory = self.bin_dirs.get("kueue") or self.install_kueue_crds()
        pki, work = self.workdir / "pki", self.workdir / "kueue"
        K.serving_cert(pki, work / "certs")
        ports = {"webhook": free_port(), "metrics": free_port(), "health": free_port()}
        config = K.configuration("kueue-system", ports["webhook"], ports["metrics"], ports["health"],
                                 work / "certs", wait_for_pods_ready)
        (work / "config.yaml").write_text(json.dumps(config))
        subprocess.run([self.kubectl, "create", "namespace", "kueue-system"], env=self.env(), capture_output=True)
        env = self.env()
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        self._spawn("kueue", [sys.executable, "-m", "tests.cluster.kueue", str(work / "certs"), "--",
                              str(directory / "kueue"), f"--config={work / 'config.yaml'}",
                              f"--kubeconfig={self.kubeconfig}", "--zap-log-level=2"], env=env)
        self._wait(f"http://127.0.0.1:{ports['health']}/readyz", "kueue", timeout=120)
        hooks = K.webhook_configurations(directory / "webhooks.yaml", ports["webhook"], (pki / "ca.crt").read_bytes())
        self._apply(hooks)
        self._apply(K.default_queue_objects(cpu, memory, local_queue_namespace))

    def create_local_queue(self, namespace: str) -> None:
        """A LocalQueue `tests.cluster.kueue.QUEUE` in `namespace`, to the default ClusterQueue."""
        from tests.cluster import kueue as K

        self._apply([K.local_queue(namespace)])

    def _apply(self, objects: list[dict[str, object]]) -> None:
        out = subprocess.run([self.kubectl, "apply", "--server-side", "-f", "-"], env=self.env(), capture_output=True,
                             text=True, input="\n---\n".join(json.dumps(o) for o in objects))
        if out.returncode != 0:
            raise ClusterError(f"kubectl apply failed: {out.stderr}")

    def start_kubelet(self, node: str) -> None:
        env = self.env()
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        self._spawn(f"kubelet-{node}", [sys.executable, "-m", "tests.cluster.kubelet", "--kubeconfig",
                                        str(self.kubeconfig), "--node-name", node,
                                        "--state-dir", str(self.workdir / "kubelet" / node)], env=env)

    def stop(self) -> None:
        """Stop every component (kubelets first, so pod processes are terminated), newest first."""
        for name in sorted(self.procs, key=lambda n: not n.startswith("kubelet")):
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        pidfile = self.workdir / "pids"
        if pidfile.exists():
            pidfile.unlink()

    # -- helpers -------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=env, cwd=self.workdir)
        log.close()
        with open(self.workdir / "pids", "a") as f:
            f.write(f"{self.procs[name].pid} {name}\n")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def _wait(self, url: str, what: str, timeout: float, context: ssl.SSLContext | None = None) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise ClusterError(f"{what} not ready after {timeout}s at {url}: {last}")

    def _wait_api(self, timeout: float) -> None:
        pki = self.workdir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._wait(f"{self.server}/readyz", "kube-apiserver", timeout, ctx)

    def kubectl_json(self, *args: str) -> dict:  # type: ignore[type-arg]
        out = subprocess.run([self.kubectl, *args, "-o", "json"], env=self.env(), capture_output=True, text=True)
        if out.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {out.stderr}")
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def _poll(self, what: str, timeout: float, check) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if check():
                    return
            except ClusterError as exc:
                last = exc
            time.sleep(0.5)
        raise ClusterError(f"{what} not ready after {timeout}s ({last})")

    def _wait_nodes_ready(self, nodes: tuple[str, ...], timeout: float) -> None:
        def ready() -> bool:
            items = self.kubectl_json("get", "nodes")["items"]
            ok = {n["metadata"]["name"] for n in items
                  if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                  and not any(t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints", []))}
            return set(nodes) <= ok

        self._poll("nodes", timeout, ready)

    def _wait_default_service_account(self, timeout: float) -> None:
        self._poll("default service account", timeout,
                   lambda: bool(self.kubectl_json("get", "serviceaccount", "default", "-n", "default")))


def kwok_node(name: str, taints: tuple[dict[str, str], ...] = ()) -> dict[str, object]:
    """A Node manifest that kwok manages (create it after `Cluster.start_kwok`)."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                         "labels": {"type": "kwok", "kubernetes.io/hostname": name}},
            "spec": {"taints": list(taints)}}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    workdir = Path(os.environ.get("CKPT_CLUSTER_DIR", ROOT / ".cluster"))
    if args[:1] == ["up"]:
        if (workdir / "pids").exists():
            print(f"a cluster is already running in {workdir} (make cluster-down first)", file=sys.stderr)
            return 1
        shutil.rmtree(workdir / "etcd", ignore_errors=True)
        try:
            cluster = Cluster(workdir).start(progress=True)
        except ClusterError as exc:
            print(f"cluster-up failed: {exc}", file=sys.stderr)
            return 1
        if os.environ.get("CKPT_TEST_KUEUE") == "1":  # Kueue's manager, a ClusterQueue for every test node
            nodes = len(test_node_names())
            try:
                cluster.start_kueue(cpu=str(8 * nodes), memory=f"{32 * nodes}Gi", local_queue_namespace="default")
            except ClusterError as exc:
                print(f"cluster-up: Kueue failed to start: {exc}", file=sys.stderr)
                cluster.stop()
                return 1
        for proc in cluster.procs.values():  # leave them running in the background
            proc.returncode = 0
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        return 0
    if args[:1] == ["down"]:
        pidfile = workdir / "pids"
        if not pidfile.exists():
            print("no cluster running")
            return 0
        entries = [line.split() for line in pidfile.read_text().splitlines() if line.strip()]
        entries.sort(key=lambda e: not e[1].startswith("kubelet"))
        for pid, _name in entries:
            try:
                os.killpg(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        for pid, _name in entries:
            while time.monotonic() < deadline and _alive(int(pid)):
                time.sleep(0.1)
            if _alive(int(pid)):
                os.killpg(int(pid), signal.SIGKILL)
        pidfile.unlink()
        print("cluster stopped")
        return 0
    print("usage: python -m tests.cluster up|down", file=sys.stderr)
    return 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
