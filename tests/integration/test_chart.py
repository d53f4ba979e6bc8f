"""The Helm chart, rendered and installed with real helm against the real API server; its RBAC is sufficient
(a full TrainingJob lifecycle as the chart's service account) and no broader than needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.kueue import QUEUE as LOCAL_QUEUE
from tests.cluster.launcher import ROOT, free_port
from tests.kube import Jobs, evict, trainingjob, wait_for

pytestmark = pytest.mark.cluster
CHART = ROOT / "charts" / "ckpt-operator"
SCENARIOS = [None, *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]
RELEASE_NS, SA = "ckpt-system", "ckpt-operator"


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh"), "helm"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return str(Path(out.stdout.strip().splitlines()[-1]) / "helm")


def render(helm: str, values: str | None, *extra: str) -> list[dict]:
    args = [helm, "template", "ckpt-operator", str(CHART), "-n", RELEASE_NS, "--kube-version", "1.35.4",
            "--include-crds", *extra]
    if values:
        args += ["-f", str(CHART / "ci" / values)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_helm_is_built_as_its_release_build(helm, tmp_path):
    """`helm version` and the default capabilities of a downloaded helm: `helm template` works without
    --kube-version (a source build without the release ldflags assumes Kubernetes v1.20)."""
    version = subprocess.run([helm, "version", "--template", "{{.Version}}"], capture_output=True, text=True)
    assert version.stdout == "v3.21.4", version
    probe = tmp_path / "probe"
    (probe / "templates").mkdir(parents=True)
    (probe / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (probe / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        "data: {kube: {{ .Capabilities.KubeVersion.Version | quote }}}\n")
    kube = yaml.safe_load(subprocess.run([helm, "template", "p", str(probe)], capture_output=True, text=True,
                                         check=True).stdout)["data"]["kube"]
    major, minor = (int(part) for part in kube.lstrip("v").split(".")[:2])
    assert (major, minor) >= (1, 35), kube  # the client-go helm was built with, as upstream's Makefile sets it
    plain = subprocess.run([helm, "template", "ckpt-operator", str(CHART)], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr  # the chart's kubeVersion (>= 1.28) is met by the defaults


@pytest.mark.parametrize("values", SCENARIOS)
def test_helm_lint_strict(helm, values):
    args = [helm, "lint", "--strict", str(CHART), "--kube-version", "1.35.4"]
    if values:
        args += ["-f", str(CHART / "ci" / values)]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", SCENARIOS)
def test_rendered_deployment_is_hardened(helm, values):
    docs = render(helm, values)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["requests"] and container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"  # safe: a new replica waits for the Lease
    assert "--leader-elect" in container["args"]
    crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition" and d["metadata"]["name"]
               == "trainingjobs.ckpt.dev")
    assert crd == yaml.safe_load((ROOT / "crds" / "trainingjobs.ckpt.dev.yaml").read_text())
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "secrets" not in rule["resources"]


@pytest.fixture(scope="module")
def kube_score() -> str:
    out = subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh"), "kube-score"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return str(Path(out.stdout.strip().splitlines()[-1]) / "kube-score")


def kube_score_exceptions() -> list[tuple[list[str], str]]:
    """The deliberate exceptions named in values.yaml: `# kube-score: <flags>  (<reason>...`."""
    found = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        if line.startswith("# kube-score: --"):
            flags, _, reason = line.removeprefix("# kube-score: ").partition("(")
            found.append((flags.split(), reason.strip()))
    return found


@pytest.mark.parametrize("values", SCENARIOS)
def test_kube_score_finds_nothing_critical_beyond_the_named_exceptions(helm, kube_score, values, tmp_path):
    exceptions = kube_score_exceptions()
    assert exceptions and all(reason for _, reason in exceptions)  # each one says why
    rendered = tmp_path / "chart.yaml"
    args = [helm, "template", "ckpt-operator", str(CHART), "-n", RELEASE_NS]
    args += ["-f", str(CHART / "ci" / values)] if values else []
    rendered.write_text(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    flags = [flag for found, _ in exceptions for flag in found]
    out = subprocess.run([kube_score, "score", str(rendered), "--output-format", "ci", *flags], capture_output=True,
                         text=True)
    critical = [line for line in out.stdout.splitlines() if line.startswith("[CRITICAL]")]
    assert out.returncode == 0 and not critical, out.stdout + out.stderr
    # without the exceptions kube-score does complain, about exactly those two: they are real, not decoration
    plain = subprocess.run([kube_score, "score", str(rendered), "--output-format", "ci"], capture_output=True,
                           text=True)
    assert sorted({line.split(": ", 1)[1] for line in plain.stdout.splitlines() if line.startswith("[CRITICAL]")}) \
        == ["(operator) CPU limit is not set", "(operator) ImagePullPolicy is not set to Always"]


def test_notice_taints_reach_the_operator_as_it_parses_them(helm):
    from ckpt_operator.context import parse_notice_taints
    from ckpt_operator.reasons import DEFAULT_NOTICE_TAINTS

    def env(*extra: str) -> dict[str, str]:
        dep = next(d for d in render(helm, None, *extra) if d["kind"] == "Deployment")
        return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert parse_notice_taints(env()["CKPT_OPERATOR_NOTICE_TAINTS"]) == DEFAULT_NOTICE_TAINTS  # one default list
    custom = env("--set", "interruptionNotices.taints.example\\.com/reclaim=45",
                 "--set", "interruptionNotices.taints.karpenter\\.sh/disrupted=null",
                 "--set", "interruptionNotices.checkpointSeconds=12")
    taints = parse_notice_taints(custom["CKPT_OPERATOR_NOTICE_TAINTS"])
    assert taints["example.com/reclaim"] == 45 and "karpenter.sh/disrupted" not in taints
    assert custom["CKPT_OPERATOR_NOTICE_CHECKPOINT_SECONDS"] == "12"
    assert parse_notice_taints(env("--set", "interruptionNotices.enabled=false")["CKPT_OPERATOR_NOTICE_TAINTS"]) == {}


def test_namespaced_scenario_creates_roles_per_namespace(helm):
    docs = render(helm, "namespaced-values.yaml")
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role" and "leader" not in d["metadata"]["name"]}
    assert roles == {"team-a", "team-b"}
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_kueue_support_adds_its_flag_and_rules_only_when_enabled(helm):
    def rendered(*extra: str) -> tuple[list[str], set[tuple[str, str]]]:
        docs = render(helm, None, *extra)
        args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        rules = {(group, resource) for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]
                 for group in rule["apiGroups"] for resource in rule["resources"]}
        return args, rules

    args, rules = rendered()
    assert "--kueue" not in args and not {r for r in rules if r[0] in ("kueue.x-k8s.io", "scheduling.k8s.io")}
    args, rules = rendered("--set", "kueue.enabled=true")
    assert "--kueue" in args
    assert {("kueue.x-k8s.io", "workloads"), ("kueue.x-k8s.io", "workloads/status"),
            ("kueue.x-k8s.io", "resourceflavors"), ("kueue.x-k8s.io", "workloadpriorityclasses"),
            ("scheduling.k8s.io", "priorityclasses")} <= rules


def test_more_replicas_without_leader_election_is_refused(helm):
    out = subprocess.run([helm, "template", "x", str(CHART), "--kube-version", "1.35.4", "--set", "replicaCount=2",
                          "--set", "leaderElection.enabled=false"], capture_output=True, text=True)
    assert out.returncode != 0 and "needs leaderElection.enabled=true" in out.stderr
    single = render(helm, None, "--set", "leaderElection.enabled=false")
    dep = next(d for d in single if d["kind"] == "Deployment")
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert not [d for d in single if d["kind"] == "Role" and "leader" in d["metadata"]["name"]]


def test_values_schema_rejects_typos(helm):
    out = subprocess.run([helm, "template", "x", str(CHART), "--kube-version", "1.35.4", "--set", "replicas=2"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "replicas" in out.stderr


NEEDED = [  # (verb, resource, namespaced)
    ("get", "trainingjobs.ckpt.dev", True), ("list", "trainingjobs.ckpt.dev", True),
    ("watch", "trainingjobs.ckpt.dev", True), ("patch", "trainingjobs.ckpt.dev/status", True),
    ("get", "pods", True), ("list", "pods", True), ("watch", "pods", True), ("create", "pods", True),
    ("delete", "pods", True), ("patch", "pods", True), ("get", "persistentvolumeclaims", True),
    ("update", "trainingjobs.ckpt.dev/finalizers", True),
    ("create", "events", True), ("patch", "events", True),
    ("get", "nodes", False), ("list", "nodes", False), ("watch", "nodes", False),
    ("create", "services", True), ("get", "services", True),
    # Kueue (installed with kueue.enabled=true)
    ("list", "workloads.kueue.x-k8s.io", True),
    ("watch", "workloads.kueue.x-k8s.io", True), ("create", "workloads.kueue.x-k8s.io", True),
    ("patch", "workloads.kueue.x-k8s.io", True), ("patch", "workloads.kueue.x-k8s.io/status", True),
    ("delete", "workloads.kueue.x-k8s.io", True),
    ("list", "resourceflavors.kueue.x-k8s.io", False), ("watch", "resourceflavors.kueue.x-k8s.io", False),
    ("get", "workloadpriorityclasses.kueue.x-k8s.io", False), ("get", "priorityclasses.scheduling.k8s.io", False),
]
FORBIDDEN = [
    ("get", "secrets", True), ("list", "secrets", True), ("create", "pods/exec", True),
    ("delete", "trainingjobs.ckpt.dev", True), ("update", "trainingjobs.ckpt.dev", True),
    ("create", "deployments.apps", True), ("patch", "nodes", False), ("delete", "nodes", False),
    ("create", "persistentvolumeclaims", True), ("delete", "persistentvolumeclaims", True),
    ("delete", "services", True), ("update", "services", True),
    ("*", "*", True), ("escalate", "clusterroles.rbac.authorization.k8s.io", False),
    ("update", "workloads.kueue.x-k8s.io", True), ("update", "workloads.kueue.x-k8s.io/status", True),
    ("get", "workloads.kueue.x-k8s.io", True),  # the watch has them: the finalizer release patches what it saw
    ("create", "clusterqueues.kueue.x-k8s.io", False), ("patch", "clusterqueues.kueue.x-k8s.io", False),
    ("patch", "localqueues.kueue.x-k8s.io", True), ("create", "priorityclasses.scheduling.k8s.io", False),
]


@pytest.fixture(scope="module")
def installed(helm, cluster):
    cluster.install_kueue_crds()  # what `kubectl auth can-i` resolves Kueue's resources through
    env = cluster.env()
    subprocess.run([cluster.kubectl, "create", "namespace", RELEASE_NS], env=env, capture_output=True)
    out = subprocess.run([helm, "install", "ckpt-operator", str(CHART), "-n", RELEASE_NS, "--set", "replicaCount=0",
                          "--set", "kueue.enabled=true", "--wait", "--timeout", "60s"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    yield out.stdout
    subprocess.run([helm, "uninstall", "ckpt-operator", "-n", RELEASE_NS], env=env, capture_output=True)


def test_helm_install_creates_crd_deployment_and_rbac(installed, cluster):
    assert "kubectl get tj" in installed or "kubectl get trainingjobs" in installed  # NOTES.txt
    for kind, name, ns in (("crd", "trainingjobs.ckpt.dev", None), ("deployment", "ckpt-operator", RELEASE_NS),
                           ("serviceaccount", SA, RELEASE_NS), ("clusterrole", "ckpt-operator-cluster", None),
                           ("clusterrolebinding", "ckpt-operator-cluster", None),
                           ("service", "ckpt-operator-metrics", RELEASE_NS),
                           ("networkpolicy", "ckpt-operator", RELEASE_NS)):
        obj = cluster.kubectl_json("get", kind, name, *(["-n", ns] if ns else []))
        assert obj["metadata"]["name"] == name


@pytest.mark.parametrize(("verb", "resource", "namespaced"), NEEDED)
def test_service_account_has_every_verb_it_needs(installed, cluster, verb, resource, namespaced):
    assert _can_i(cluster, verb, resource, namespaced) == "yes"


@pytest.mark.parametrize(("verb", "resource", "namespaced"), FORBIDDEN)
def test_service_account_has_nothing_broader(installed, cluster, verb, resource, namespaced):
    assert _can_i(cluster, verb, resource, namespaced) == "no"


def test_service_account_may_hold_only_its_own_lease(installed, cluster):
    lease = "leases.coordination.k8s.io"
    assert _can_i(cluster, "create", lease, True, RELEASE_NS) == "yes"
    for verb in ("get", "update"):
        assert _can_i(cluster, verb, f"{lease}/ckpt-operator", True, RELEASE_NS) == "yes"
        assert _can_i(cluster, verb, f"{lease}/someone-else", True, RELEASE_NS) == "no"
    assert _can_i(cluster, "update", f"{lease}/ckpt-operator", True, "default") == "no"


def _can_i(cluster, verb: str, resource: str, namespaced: bool, namespace: str = "default") -> str:
    resource, _, sub = resource.partition("/")
    if sub and resource.startswith("leases"):  # leases/NAME is a resource name, not a subresource
        resource, sub = f"{resource}/{sub}", ""
    args = [cluster.kubectl, "auth", "can-i", verb, resource, f"--as=system:serviceaccount:{RELEASE_NS}:{SA}"]
    args += [f"--subresource={sub}"] if sub else []
    args += ["-n", namespace] if namespaced else []
    return subprocess.run(args, env=cluster.env(), capture_output=True, text=True).stdout.strip()


def test_operator_as_the_service_account_runs_a_full_lifecycle(installed, cluster, kueue, operator, core, namespace,
                                                               claim, tmp_path):
    """Stop the admin operator and run one with the chart's service-account token (and its Kueue support, as
    kueue.enabled=true runs it) on a job queued through Kueue: the RBAC must be enough."""
    token = subprocess.run([cluster.kubectl, "create", "token", SA, "-n", RELEASE_NS, "--duration", "1h"],
                           env=cluster.env(), capture_output=True, text=True, check=True).stdout.strip()
    admin = json.loads(cluster.kubeconfig.read_text())
    kubeconfig = tmp_path / "sa-kubeconfig"
    kubeconfig.write_text(json.dumps({**admin, "users": [{"name": "admin", "user": {"token": token}}]}))
    env = {**cluster.env(), "KUBECONFIG": str(kubeconfig), "CKPT_OPERATOR_BACKOFF_BASE_SECONDS": "1"}
    log = tmp_path / "operator.log"
    operator.stop()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ckpt-operator")), "--metrics-port",
                             str(free_port()), "--health-port", str(free_port()), "--leader-elect",
                             "--leader-election-namespace", RELEASE_NS, "--kueue"], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        jobs = Jobs(namespace)
        trainer = [sys.executable, str(ROOT / "tests" / "integration" / "trainers" / "sdk_trainer.py"),
                   "--steps", "60", "--every-steps", "5", "--step-seconds", "0.05"]
        cluster.create_local_queue(namespace)
        queued = trainingjob("rbac", trainer)
        queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": LOCAL_QUEUE}
        queued["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "100m"}}
        jobs.create(queued)
        wait_for("trainer started", (claim / "rbac" / "progress.log").exists, 60)
        evict(core, namespace, "rbac-0")
        st = jobs.wait_phase("rbac", "Succeeded", 120)
        assert (st["preemptions"], st["failures"]) == (1, 0)
        jobs.wait_event("rbac", "Warning", "EvictionByEvictionAPI")  # creating events is allowed
        workload = cluster.kubectl_json("get", "workloads.kueue.x-k8s.io", st["kueue"]["workload"], "-n", namespace)
        assert {c["type"]: c["status"] for c in workload["status"]["conditions"]}["Finished"] == "True"
        jobs.api.delete_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", "rbac")
        wait_for("pods released and collected", lambda: not core.list_namespaced_pod(namespace).items, 60)
        wait_for("the Workload's finalizer removed and the Workload collected", lambda: subprocess.run(
            [cluster.kubectl, "get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "name"], env=cluster.env(),
            capture_output=True, text=True).stdout.strip() == "", 60)
    finally:
        proc.terminate()
        proc.wait(20)
        operator.start()
    text = log.read_text()
    # a denied request shows as "Forbidden" (kopf and the client) or "(403)"; bare "403" can be a log timestamp
    assert "Forbidden" not in text and "(403)" not in text and "status=403" not in text, text[-3000:]


FIXTURES = Path(__file__).parent / "fixtures"


def _patches(operator) -> float:  # type: ignore[no-untyped-def]
    line = next((line for line in operator.metrics().splitlines()
                 if line.startswith('ckpt_operator_api_requests_total{verb="PATCH"}')), "x 0")
    return float(line.split()[-1])


def _preemption_fields(cluster) -> set[str]:  # type: ignore[no-untyped-def]
    crd = cluster.kubectl_json("get", "crd", "trainingjobs.ckpt.dev")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return set(schema["properties"]["spec"]["properties"]["preemption"]["properties"])


def test_upgrade_from_the_previous_chart_keeps_a_live_job(helm, cluster, operator, namespace, claim, tmp_path):
    """0.1.0 installed (its CRD with it), a job running; `helm upgrade` alone leaves the old CRD (Helm never
    upgrades crds/); the documented server-side apply brings the new schema, and the job runs on untouched."""
    env = cluster.env()
    old = FIXTURES / "ckpt-operator-0.1.0.tgz"
    subprocess.run(["tar", "-xzf", str(old), "-C", str(tmp_path)], check=True)
    release, release_ns = "upgrade", "ckpt-upgrade"

    def kubectl(*args: str) -> None:
        out = subprocess.run([cluster.kubectl, *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

    def helm_run(*args: str) -> None:
        out = subprocess.run([helm, *args, "-n", release_ns, "--set", "replicaCount=0", "--wait", "--timeout",
                              "60s"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

    try:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(tmp_path / "ckpt-operator" / "crds"))
        assert "fallback" not in _preemption_fields(cluster)  # the 0.1.0 schema, as its chart installed it
        helm_run("install", release, str(old), "--create-namespace")
        jobs = Jobs(namespace)
        trainer = [sys.executable, str(ROOT / "tests" / "integration" / "trainers" / "sdk_trainer.py"),
                   "--steps", "1200", "--every-steps", "20", "--step-seconds", "0.05"]
        jobs.create(trainingjob("live", trainer))
        jobs.wait_phase("live", "Running", 60)
        # the operator is newer than this CRD: the API server drops the status fields it does not know; the
        # operator says so once and does not rewrite them in a loop
        wait_for("the operator's warning", lambda: "dropped status fields" in operator.log.read_text(), 30)
        assert not any("observedGeneration" in c for c in jobs.status("live")["conditions"])  # dropped
        wait_for("the trainer started", (claim / "live" / "progress.log").exists, 60)
        before = _patches(operator)
        wait_for("two checkpoints (2 s of training)", lambda: len(list(claim.glob("live/step-*"))) >= 2, 30)
        assert _patches(operator) - before < 10, "status rewritten in a loop against the old CRD"
        helm_run("upgrade", release, str(CHART))
        assert "fallback" not in _preemption_fields(cluster)  # helm upgrade never touches crds/
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))  # the documented path
        assert "fallback" in _preemption_fields(cluster)
        operator.stop()  # the upgrade rolls the operator's Deployment: the new version starts
        operator.start()
        # what the old schema dropped (each condition's observedGeneration) is written again
        st = jobs.wait("live", "the new status fields", lambda s: all(
            "observedGeneration" in c for c in s.get("conditions") or [{}]), 30)
        assert (st["phase"], st["attempt"], st["preemptions"], st["failures"]) == ("Running", 0, 0, 0)  # ran on
        st = jobs.wait_phase("live", "Succeeded", 120)
        assert st["attempt"] == 0
        fallback = {"afterPreemptions": 2, "templatePatch": {"spec": {"nodeSelector": {"x": "y"}}}}
        kept = jobs.create({**trainingjob("new", trainer), "spec": {
            **trainingjob("new", trainer)["spec"], "suspend": True, "preemption": {"fallback": fallback}}})
        assert kept["spec"]["preemption"]["fallback"]["afterPreemptions"] == 2  # the new schema keeps new fields
    finally:
        subprocess.run([helm, "uninstall", release, "-n", release_ns], env=env, capture_output=True)
        subprocess.run([cluster.kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds")],
                       env=env, capture_output=True)
