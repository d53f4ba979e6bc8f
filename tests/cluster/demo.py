"""`make demo`: a local control plane, the operator, examples/trainingjob.yaml, one eviction and the resume, then an
interruption notice on the trainer's node: a checkpoint while it runs, and a move to the other node before the end.

Prints a timeline while it runs; exits 0 when the job succeeded with weights identical to an uninterrupted run,
and leaves nothing running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.launcher import ROOT, Cluster, ClusterError, free_port

STEPS, PREEMPT_AT, NOTICE_AT = 600, 120, 330
NOTICE_TAINT = "aws-node-termination-handler/spot-itn"
NOTICE_CHECKPOINT_SECONDS = 5  # the operator's wait between the checkpoint request and the move (default 30)
T0 = time.monotonic()
HOST_TERMINATION_LOG = Path("/dev/termination-log")


def host_termination_log() -> bytes | None:
    """The host's own /dev/termination-log (the SDK must never write it outside a pod)."""
    return HOST_TERMINATION_LOG.read_bytes() if HOST_TERMINATION_LOG.exists() else None


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def kubectl(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([cluster.kubectl, *args], env=cluster.env(), input=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def example_manifests(pv_dir: Path) -> str:
    """examples/trainingjob.yaml with the startup script pointed at this checkout, plus a hostPath PV for the claim."""
    docs = list(yaml.safe_load_all((ROOT / "examples" / "trainingjob.yaml").read_text()))
    for doc in docs:
        if doc["kind"] == "TrainingJob":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["command"] = [c.replace("/workspace/", f"{ROOT}/examples/") for c in container["command"]]
            container["env"] = [e for e in container.get("env", []) if e["name"] != "TRAIN_STEPS"] + [
                {"name": "TRAIN_STEPS", "value": str(STEPS)}]
        if doc["kind"] == "PersistentVolumeClaim":
            doc["spec"]["storageClassName"] = ""
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "ckpt-shared-demo"},
          "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                   "hostPath": {"path": str(pv_dir)},
                   "claimRef": {"namespace": "default", "name": "ckpt-shared"}}}
    return yaml.safe_dump_all([pv, *docs])


def status(cluster: Cluster) -> dict[str, Any]:
    return dict(json.loads(kubectl(cluster, "get", "tj", "demo", "-o", "json")).get("status") or {})


def progress(pv_dir: Path) -> list[str]:
    path = pv_dir / "demo" / "progress.log"
    return path.read_text().splitlines() if path.exists() else []


def attempts(lines: list[str]) -> list[tuple[int, int, str, int]]:
    """(attempt, step it started from, restart reason, last step it logged) for each attempt in a progress log."""
    found: list[tuple[int, int, str, int]] = []
    for line in lines:
        words = line.split()
        if words[0] == "attempt":
            found.append((int(words[1]), int(words[3]), words[5], int(words[3])))
        elif words[0] == "step" and found:
            attempt, start, reason, _ = found[-1]
            found[-1] = (attempt, start, reason, int(words[1]))
    return found


def reference_run(tmp: Path) -> subprocess.Popen[bytes]:
    """The same training without interruption, in a plain subprocess, for the bitwise comparison."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env.update(CKPT_DIR=str(tmp / "reference"), TRAIN_STEPS=str(STEPS), CKPT_INTERVAL_SECONDS="2")
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "train.py")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    workdir = Path(os.environ.get("CKPT_CLUSTER_DIR", ROOT / ".cluster")) / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    pv_dir = workdir / "pv"
    pv_dir.mkdir(parents=True)
    say("starting the local control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager, "
        "local test kubelet)")
    cluster = Cluster(workdir)
    operator: subprocess.Popen[bytes] | None = None
    host_log = host_termination_log()
    reference = reference_run(tmp)
    try:
        cluster.start(progress=True)
        kubectl(cluster, "apply", "-f", str(ROOT / "crds"))
        kubectl(cluster, "wait", "--for=condition=Established", "crd/trainingjobs.ckpt.dev")
        say("CRD installed; starting the operator (ckpt-operator)")
        env = {**cluster.env(), "CKPT_OPERATOR_NOTICE_CHECKPOINT_SECONDS": str(NOTICE_CHECKPOINT_SECONDS)}
        operator = subprocess.Popen([str(Path(sys.executable).with_name("ckpt-operator")), "--metrics-port",
                                     str(free_port()), "--health-port", str(free_port())], env=env,
                                    stdout=open(workdir / "operator.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        kubectl(cluster, "apply", "-f", "-", stdin=example_manifests(pv_dir))
        say(f"applied examples/trainingjob.yaml ({STEPS} steps), checkpoint every 2 s, grace period 30 s")
        code = run_story(cluster, pv_dir, reference, tmp)
        if host_termination_log() != host_log:
            say(f"FAILED: the host's {HOST_TERMINATION_LOG} was changed")
            return 1
        return code
    except ClusterError as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(15)
        if reference.poll() is None:
            reference.kill()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        say("stopped the operator and the control plane; nothing is left running")


def pod_node(cluster: Cluster, pod: str) -> str:
    return kubectl(cluster, "get", "pod", pod, "-o", "jsonpath={.spec.nodeName}").strip()


def run_story(cluster: Cluster, pv_dir: Path, reference: subprocess.Popen[bytes], tmp: Path) -> int:
    seen_phase, seen_ckpt, seen_preemptions, shown_step, preempted = "", None, 0, 0, False
    noticed, seen_notice = "", False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st = status(cluster)
        phase, ckpt = st.get("phase", ""), (st.get("lastCheckpoint") or {}).get("step")
        steps = [int(line.split()[1]) for line in progress(pv_dir) if line.startswith("step ")]
        if phase != seen_phase:
            say(f"phase {phase or '-'} (attempt {st.get('attempt', 0)}, preemptions {st.get('preemptions', 0)}, "
                f"failures {st.get('failures', 0)})")
            seen_phase = phase
        if st.get("preemptions", 0) != seen_preemptions:
            seen_preemptions = st["preemptions"]
            last = st.get("lastOutcome") or {}
            say(f"operator: attempt {last.get('attempt')} was preempted ({last.get('reason')}, exit code "
                f"{last.get('exitCode')}); the SDK saved step {ckpt} on SIGTERM; resubmitting the same startup script")
            if last.get("reason") == "InterruptionNotice":
                say(f"the new pod runs on {pod_node(cluster, st['activePod'])}, away from {noticed}, before its "
                    "deadline: the SIGKILL never came")
        if ckpt != seen_ckpt and ckpt is not None:
            say(f"status.lastCheckpoint.step = {ckpt}")
            seen_ckpt = ckpt
        if not preempted and steps and steps[-1] >= PREEMPT_AT:
            say(f"training at step {steps[-1]}/{STEPS}: preempting pod demo-0 through the Eviction API "
                "(what a spot reclaim or a drain does)")
            body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                               "metadata": {"name": "demo-0", "namespace": "default"}})
            kubectl(cluster, "create", "--raw", "/api/v1/namespaces/default/pods/demo-0/eviction", "-f", "-",
                    stdin=body)
            preempted = True
        notice = st.get("interruption") or {}
        if notice and not seen_notice:
            seen_notice = True
            say(f"operator: node {notice['node']} has {notice['taint']} (deadline {notice['deadline']}): annotated "
                f"the pod ckpt.dev/checkpoint-requested; the SDK saves at its next step and trains on; the pod moves "
                f"at {notice['migrateTime']}")
        if preempted and not noticed and st.get("attempt") == 1 and steps and steps[-1] >= NOTICE_AT:
            noticed = pod_node(cluster, "demo-1")
            say(f"training at step {steps[-1]}/{STEPS}: the cloud announces the end of node {noticed} (taint "
                f"{NOTICE_TAINT}, as aws-node-termination-handler sets it: 2 minutes of notice)")
            kubectl(cluster, "taint", "nodes", noticed, f"{NOTICE_TAINT}=true:NoSchedule")
        if phase in ("Succeeded", "Failed"):
            break
        if steps and steps[-1] >= shown_step + 50:
            shown_step = steps[-1] - steps[-1] % 50
            say(f"training: step {steps[-1]}/{STEPS}")
        time.sleep(0.5)
    return report(cluster, pv_dir, reference, tmp)


def report(cluster: Cluster, pv_dir: Path, reference: subprocess.Popen[bytes], tmp: Path) -> int:
    st = status(cluster)
    deadline = time.monotonic() + 10  # Events are posted just after the status write: wait for the final one
    while True:
        events = json.loads(kubectl(cluster, "get", "events", "--field-selector", "involvedObject.name=demo",
                                    "-o", "json"))["items"]
        if any(e["reason"] in ("Completed", "BackoffLimitExceeded") for e in events) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print("\nTimeline")
    for e in sorted(events, key=lambda e: (e.get("lastTimestamp") or "", int(e["metadata"]["resourceVersion"]))):
        print(f"  {(e.get('lastTimestamp') or '')[11:19]}  {e['type']:<7}  {e['reason']:<22}  {e['message']}")
    print("\nAttempts (from the trainer's progress log on the shared volume)")
    lost_total, previous_reached = 0, 0
    for attempt, start, reason, reached in attempts(progress(pv_dir)):
        what = "started from scratch"
        if attempt > 0:
            lost = max(0, previous_reached - start)
            lost_total += lost
            what = (f"resumed from checkpoint step {start}; {lost} step(s) of work lost since attempt {attempt - 1} "
                    f"stopped at step {previous_reached}")
        print(f"  attempt {attempt} ({reason}): {what}; reached step {reached}")
        previous_reached = reached
    print(f"  lost work in all: {lost_total} step(s) (0 is what a graceful preemption should cost)")
    result = json.loads((pv_dir / "demo" / "result.json").read_text()) if (pv_dir / "demo" / "result.json").exists() \
        else {}
    reference.wait(120)
    ref = json.loads((tmp / "reference" / "result.json").read_text())
    identical = result.get("weights_sha256") == ref["weights_sha256"]
    print(f"\nResult: phase {st.get('phase')}, attempts {st.get('attempt', 0) + 1}, preemptions "
          f"{st.get('preemptions')}, failures {st.get('failures')}, last checkpoint step "
          f"{(st.get('lastCheckpoint') or {}).get('step')}")
    print(f"Final weights sha256 {result.get('weights_sha256', '?')[:16]}…; uninterrupted run "
          f"{ref['weights_sha256'][:16]}…: {'identical' if identical else 'DIFFERENT'}")
    ok = st.get("phase") == "Succeeded" and st.get("preemptions") == 2 and st.get("failures") == 0 and identical \
        and lost_total == 0
    print("DEMO OK" if ok else "DEMO FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
