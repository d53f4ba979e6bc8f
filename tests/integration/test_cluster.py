"""The local control plane is real: pods run as processes, eviction, scheduler preemption, node shutdown, GC."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.kube import PodRecorder, create_hostpath_claim, ensure_priority_classes, evict, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cluster

SIGTERM_SCRIPT = textwrap.dedent("""
    import signal, sys, time, json, os
    out = sys.argv[1]
    def on_term(*_):
        t0 = time.monotonic()
        open(out, "a").write("SIGTERM\\n")
        time.sleep(1.5)  # uses part of the grace period
        open(out, "a").write("done\\n" if time.monotonic() - t0 >= 1.5 else "too early\\n")
        open("/dev/termination-log", "w").write(json.dumps({"step": 42}))
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    open(out, "a").write("ready\\n")
    time.sleep(300)
""")


def _pod(name: str, command: list[str], **spec: object) -> dict:
    container = {"name": "main", "image": "python:3.11-slim", "command": command}
    container.update(spec.pop("container", {}))  # type: ignore[arg-type]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, "-c", script, *args]


def _wait_running(core: client.CoreV1Api, ns: str, name: str, marker: Path | None = None) -> None:
    wait_for(f"{name} running", lambda: core.read_namespaced_pod(name, ns).status.phase == "Running")
    if marker is not None:
        wait_for(f"{name} ready marker", lambda: marker.exists() and "ready" in marker.read_text())


def _start_sigterm_pod(core: client.CoreV1Api, ns: str, name: str, marker: Path, grace: int, **spec: object
                       ) -> PodRecorder:
    """Record the namespace, run SIGTERM_SCRIPT as `name` and wait until its handler is installed."""
    rec = PodRecorder(core, ns)
    core.create_namespaced_pod(ns, _pod(name, _python(SIGTERM_SCRIPT, str(marker)),
                                        terminationGracePeriodSeconds=grace, **spec))
    _wait_running(core, ns, name, marker)
    return rec


def _gone(core: client.CoreV1Api, ns: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, ns)
    except client.ApiException as exc:
        return exc.status == 404
    return False


def test_pod_runs_as_a_process_and_succeeds_with_its_termination_message(core, namespace):
    script = "import os,json; open('/dev/termination-log','w').write(json.dumps({'step': 7, 'pod': os.environ['P']}))"
    core.create_namespaced_pod(namespace, _pod("ok", _python(script), container={
        "env": [{"name": "P", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}))
    pod = wait_for("success", lambda: (p := core.read_namespaced_pod("ok", namespace)).status.phase == "Succeeded"
                   and p)
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 0 and term.reason == "Completed"
    assert json.loads(term.message) == {"step": 7, "pod": "ok"}


def test_failed_command_reports_exit_code_and_log_fallback(core, namespace):
    core.create_namespaced_pod(namespace, _pod("bad", _python("import sys; print('boom'); sys.exit(3)"), container={
        "terminationMessagePolicy": "FallbackToLogsOnError"}))
    pod = wait_for("failure", lambda: (p := core.read_namespaced_pod("bad", namespace)).status.phase == "Failed" and p)
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 3 and "boom" in term.message


def test_eviction_sets_disruption_target_and_delivers_sigterm_with_grace(core, namespace, tmp_path):
    marker = tmp_path / "signals"
    rec = _start_sigterm_pod(core, namespace, "victim", marker, 20)
    evict(core, namespace, "victim")
    wait_for("victim deleted", lambda: rec.deleted("victim"), 30)
    rec.stop()
    assert rec.disruption("victim")["reason"] == "EvictionByEvictionAPI"
    term = rec.terminated("victim")
    assert term["exitCode"] == 143 and json.loads(term["message"]) == {"step": 42}
    assert marker.read_text().splitlines() == ["ready", "SIGTERM", "done"]


def test_scheduler_preemption_marks_the_victim(core, namespace, tmp_path):
    ensure_priority_classes(**{"test-low": 10, "test-high": 1000})
    marker = tmp_path / "signals"
    big = {"resources": {"requests": {"cpu": "6"}}}
    rec = _start_sigterm_pod(core, namespace, "low", marker, 10, priorityClassName="test-low", container=big)
    node = core.read_namespaced_pod("low", namespace).spec.node_name  # "high" fits only there
    core.create_namespaced_pod(namespace, _pod("high", _python("import time; time.sleep(300)"),
                                               priorityClassName="test-high", container=big,
                                               nodeSelector={"kubernetes.io/hostname": node}))
    wait_for("high running", lambda: core.read_namespaced_pod("high", namespace).status.phase == "Running", 60)
    wait_for("low deleted", lambda: rec.deleted("low"), 30)
    rec.stop()
    assert rec.disruption("low")["reason"] in ("PreemptionByScheduler", "PreemptionByKubeScheduler")
    assert rec.terminated("low")["exitCode"] == 143
    assert "SIGTERM" in marker.read_text()


def test_node_shutdown_terminates_pods_gracefully(core, namespace, tmp_path):
    marker = tmp_path / "signals"
    rec = _start_sigterm_pod(core, namespace, "shut", marker, 10)
    node = core.read_namespaced_pod("shut", namespace).spec.node_name
    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": "shutdown"}}})
    pod = wait_for("pod failed", lambda: (p := core.read_namespaced_pod("shut", namespace)).status.phase == "Failed"
                   and p, 30)
    rec.stop()
    assert rec.disruption("shut")["reason"] == "TerminationByKubelet"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 143
    wait_for("node mode cleared", lambda: "kubelet.ckpt.dev/mode" not in (core.read_node(node).metadata.annotations
                                                                        or {}))


def test_garbage_collector_deletes_owned_pods(core, namespace):
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="own")))
    pod = _pod("child", _python("import time; time.sleep(300)"), terminationGracePeriodSeconds=2)
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "own",
                                           "uid": owner.metadata.uid}]
    core.create_namespaced_pod(namespace, pod)
    _wait_running(core, namespace, "child")
    core.delete_namespaced_config_map("own", namespace, propagation_policy="Background")
    wait_for("child collected", lambda: _gone(core, namespace, "child"), 60)


def test_pods_mounting_one_claim_share_files_and_readonly_is_enforced(core, namespace, tmp_path):
    (tmp_path / "pv").mkdir()
    create_hostpath_claim(core, namespace, tmp_path / "pv", name="shared")
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}]
    writer = "open('/data/x/hello', 'w').write('from writer')"
    core.create_namespaced_pod(namespace, _pod("writer", _python(writer), volumes=volumes, container={
        "volumeMounts": [{"name": "data", "mountPath": "/data/x", "subPath": "jobs"}]}))
    wait_for("writer done", lambda: core.read_namespaced_pod("writer", namespace).status.phase == "Succeeded", 60)
    reader = textwrap.dedent("""
        import json
        text = open('/ro/hello').read()
        try:
            open('/ro/other', 'w')
            ro = False
        except OSError:
            ro = True
        open('/dev/termination-log', 'w').write(json.dumps({'text': text, 'readonly': ro}))
    """)
    core.create_namespaced_pod(namespace, _pod("reader", _python(reader), volumes=volumes, container={
        "volumeMounts": [{"name": "data", "mountPath": "/ro", "subPath": "jobs", "readOnly": True}]}))
    pod = wait_for("reader done", lambda: (p := core.read_namespaced_pod("reader", namespace)).status.phase
                   == "Succeeded" and p, 60)
    assert json.loads(pod.status.container_statuses[0].state.terminated.message) == {"text": "from writer",
                                                                                     "readonly": True}
    assert (tmp_path / "pv" / "jobs" / "hello").read_text() == "from writer"
    core.delete_persistent_volume(f"pv-{namespace}")


@pytest.mark.parametrize("launcher", [[], ["ckpt-run", "--"]], ids=["bare-shell", "ckpt-run"])
def test_shell_as_pid1_swallows_sigterm_unless_ckpt_run_forwards_it(core, namespace, tmp_path, launcher):
    marker = tmp_path / "signals"
    script = tmp_path / "child.py"
    script.write_text(SIGTERM_SCRIPT)
    ckpt_run = [str(Path(sys.executable).with_name("ckpt-run")), "--"] if launcher else []
    cmd = [*ckpt_run, "bash", "-c", f"{sys.executable} {script} {marker}; echo exited $?"]
    rec = PodRecorder(core, namespace)
    core.create_namespaced_pod(namespace, _pod("shell", cmd, terminationGracePeriodSeconds=4))
    _wait_running(core, namespace, "shell", marker)
    core.delete_namespaced_pod("shell", namespace)
    wait_for("deleted", lambda: rec.deleted("shell"), 30)
    rec.stop()
    if launcher:
        assert marker.read_text().splitlines() == ["ready", "SIGTERM", "done"]
        assert rec.terminated("shell")["exitCode"] == 143  # bash died of SIGTERM; the trainer exited 143 after it
    else:
        assert "SIGTERM" not in marker.read_text()  # bash as PID 1 ignored it; SIGKILL after the grace period
        assert rec.terminated("shell")["exitCode"] == 137


def test_kubectl_is_the_built_one(cluster):
    out = subprocess.run([cluster.kubectl, "version", "-o", "json"], env=cluster.env(), capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout)["serverVersion"]["gitVersion"].startswith("v1.35")


STUBBORN = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[1], "a").write("SIGTERM\\n"))  # and keeps running
    open(sys.argv[1], "a").write("ready\\n")
    while True:  # a heartbeat file, replaced atomically so a reader never sees it empty
        open(sys.argv[1] + ".tmp", "w").write(str(time.time()))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1] + ".beat")
        time.sleep(0.1)
""")


def _beat(marker: Path) -> float | None:
    """The last heartbeat time STUBBORN wrote (None before the first one)."""
    try:
        return float(Path(str(marker) + ".beat").read_text())
    except (OSError, ValueError):
        return None


def test_two_test_nodes_are_ready(core):
    nodes = sorted(n.metadata.name for n in core.list_node().items)
    assert nodes == ["local-node-1", "local-node-2"]


def test_the_node_shutdown_grace_period_caps_every_pods(core, namespace, tmp_path):
    marker = tmp_path / "signals"
    core.create_namespaced_pod(namespace, _pod("capped", _python(STUBBORN, str(marker)),
                                               terminationGracePeriodSeconds=60))
    _wait_running(core, namespace, "capped", marker)
    node = core.read_namespaced_pod("capped", namespace).spec.node_name
    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/shutdown-grace-seconds": "2"}}})
    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": "shutdown"}}})
    try:
        pod = wait_for("killed at the node's cap, not the pod's 60 s", lambda: (p := core.read_namespaced_pod(
            "capped", namespace)).status.phase == "Failed" and p, 20)
        assert pod.status.container_statuses[0].state.terminated.exit_code == 137
        assert "SIGTERM" in marker.read_text()
    finally:
        core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/shutdown-grace-seconds": None}}})
        wait_for("node mode cleared", lambda: "kubelet.ckpt.dev/mode" not in (
            core.read_node(node).metadata.annotations or {}), 60)


def test_a_second_delete_with_a_shorter_grace_period_shortens_it(core, namespace, tmp_path):
    marker = tmp_path / "signals"
    core.create_namespaced_pod(namespace, _pod("slow", _python(STUBBORN, str(marker)),
                                               terminationGracePeriodSeconds=120))
    _wait_running(core, namespace, "slow", marker)
    core.delete_namespaced_pod("slow", namespace, grace_period_seconds=120)
    wait_for("SIGTERM delivered", lambda: "SIGTERM" in marker.read_text(), 20)
    core.delete_namespaced_pod("slow", namespace, grace_period_seconds=1)
    wait_for("killed after the shorter grace period", lambda: _gone(core, namespace, "slow"), 20)


def test_partition_keeps_the_pod_running_and_heals(core, namespace, tmp_path):
    marker = tmp_path / "signals"
    core.create_namespaced_pod(namespace, _pod("island", _python(STUBBORN, str(marker))))
    _wait_running(core, namespace, "island", marker)
    node = core.read_namespaced_pod("island", namespace).spec.node_name

    def ready() -> str:
        conds = core.read_node(node).status.conditions or []
        return next((c.status for c in conds if c.type == "Ready"), "")

    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": "partition"}}})
    try:
        wait_for("node NotReady (no heartbeats)", lambda: ready() != "True", 60)
        before = wait_for("a heartbeat", lambda: _beat(marker), 10)
        wait_for("the process keeps running during the partition", lambda: (_beat(marker) or 0) > before + 1, 10)
        assert core.read_namespaced_pod("island", namespace).status.phase == "Running"
    finally:
        core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": None}}})
    wait_for("node Ready again", lambda: ready() == "True", 60)
    core.delete_namespaced_pod("island", namespace, grace_period_seconds=1)
    wait_for("deleted after healing", lambda: _gone(core, namespace, "island"), 30)


def test_reject_mode_fails_admission(core, namespace):
    node = core.list_node().items[0].metadata.name
    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": "reject"}}})
    try:
        core.create_namespaced_pod(namespace, _pod("refused", _python("print(1)"),
                                                   nodeSelector={"kubernetes.io/hostname": node}))
        pod = wait_for("rejected", lambda: (p := core.read_namespaced_pod("refused", namespace))
                       .status.phase == "Failed" and p, 30)
        assert pod.status.reason == "UnexpectedAdmissionError" and not pod.status.container_statuses
    finally:
        core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": None}}})


def test_a_force_deleted_pod_has_its_processes_killed(core, namespace, tmp_path):
    marker = tmp_path / "signals"
    core.create_namespaced_pod(namespace, _pod("forced", _python(STUBBORN, str(marker))))
    _wait_running(core, namespace, "forced", marker)
    core.delete_namespaced_pod("forced", namespace, grace_period_seconds=0)
    wait_for("the process stopped", lambda: time.time() - (_beat(marker) or time.time()) > 2, 30)


def test_a_status_update_of_a_pod_never_lands_on_a_new_pod_of_the_same_name(core, namespace):
    """The test kubelet patches status with the pod's uid as a precondition, as the kubelet's status manager does:
    a pod deleted and created again under its name (a gang's undone create, a job re-created) is another pod."""
    body = {"metadata": {"name": "same"}, "spec": {"nodeName": "no-such-node",
                                                   "containers": [{"name": "c", "image": "x", "command": ["true"]}]}}
    old = core.create_namespaced_pod(namespace, body).metadata.uid
    core.delete_namespaced_pod("same", namespace, grace_period_seconds=0)
    wait_for("the pod gone", lambda: not [p for p in core.list_namespaced_pod(namespace).items], 30)
    new = core.create_namespaced_pod(namespace, body).metadata.uid
    with pytest.raises(client.ApiException) as refused:
        core.patch_namespaced_pod_status("same", namespace, {"metadata": {"uid": old},
                                                             "status": {"phase": "Failed"}})
    assert refused.value.status == 422 and "metadata.uid" in refused.value.body  # refused: another pod
    core.patch_namespaced_pod_status("same", namespace, {"metadata": {"uid": new}, "status": {"phase": "Failed"}})
    assert core.read_namespaced_pod("same", namespace).status.phase == "Failed"
