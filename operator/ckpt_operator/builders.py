"""Pure functions that build the manifests the operator creates (unit-tested without a cluster)."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass
from typing import Any

from ckpt_sdk import contract as C

from . import reasons as R
from .models import CheckpointSpec, TrainingJobSpec

CKPT_VOLUME = "ckpt-storage"
PODINFO_VOLUME = "ckpt-podinfo"  # downward API: the pod's annotations (checkpoint requests) as a file
PODINFO_MOUNT = C.PODINFO_MOUNT
RESUME_VOLUME = "ckpt-resume-from"
RESUME_MOUNT = "/ckpt-resume-from"


@dataclass(frozen=True)
class JobRef:
    name: str
    namespace: str
    uid: str
    created: str = ""  # metadata.creationTimestamp: orders incarnations of a job name for the SDK's fencing


@dataclass(frozen=True)
class ResumeSource:
    """Another job's checkpoint storage, mounted read-only for a warm start."""

    job: str
    checkpoint: CheckpointSpec
    step: int | None


MASTER_PORT = 29500  # torch.distributed's default rendezvous port (as Kubeflow's PyTorchJob)


def pod_name(job: str, attempt: int, rank: int | None = None) -> str:
    """`<job>-<attempt>`, and `<job>-<attempt>-<rank>` for the pods of a multi-node attempt."""
    return f"{job}-{attempt}" if rank is None else f"{job}-{attempt}-{rank}"


def member_names(job: str, attempt: int, size: int, ranked: bool | None = None) -> list[str]:
    """The pod names of one attempt of `size` ranks, by rank (one unranked name for a lone pod that is not part of
    an elastic gang)."""
    if not (size > 1 if ranked is None else ranked):
        return [pod_name(job, attempt)]
    return [pod_name(job, attempt, rank) for rank in range(size)]


def worker_hostname(job: str, rank: int) -> str:
    """A gang pod's stable hostname, the same in every attempt; `<hostname>.<job>` resolves through the Service."""
    return f"{job}-{rank}"


def rank_env(job: str, rank: int, workers: int, master_port: int) -> dict[str, str]:
    """The distributed-training environment of Kubeflow's PyTorchJob and of torchrun (Kubeflow Trainer)."""
    master = f"{worker_hostname(job, 0)}.{job}"
    return {C.ENV_MASTER_ADDR: master, C.ENV_MASTER_PORT: str(master_port), C.ENV_WORLD_SIZE: str(workers),
            C.ENV_RANK: str(rank), C.ENV_PET_NNODES: str(workers), C.ENV_PET_NODE_RANK: str(rank),
            C.ENV_PET_MASTER_ADDR: master, C.ENV_PET_MASTER_PORT: str(master_port)}


def build_service(job: JobRef) -> dict[str, Any]:
    """The headless Service that gives a gang's pods DNS names (`<job>-<rank>.<job>`), also before they are Ready."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": job.name, "namespace": job.namespace,
                     "labels": {R.LABEL_JOB: job.name[:63], R.LABEL_JOB_UID: job.uid, R.LABEL_MANAGED_BY: R.MANAGER},
                     "ownerReferences": [_owner(job)]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {R.LABEL_JOB_UID: job.uid, R.LABEL_MANAGED_BY: R.MANAGER}},
    }


def _owner(job: JobRef) -> dict[str, Any]:
    return {"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def storage_subpath(job: JobRef | str, namespace: str | None, checkpoint: CheckpointSpec) -> str:
    """Each job's own directory on the volume: `<job>` on a claim, `<namespace>/<job>` on NFS."""
    name = job.name if isinstance(job, JobRef) else job
    ns = job.namespace if isinstance(job, JobRef) else namespace
    return f"{ns}/{name}" if checkpoint.nfs is not None else name


def build_volume(name: str, checkpoint: CheckpointSpec, read_only: bool = False) -> dict[str, Any]:
    if checkpoint.persistent_volume_claim is not None:
        source = {"claimName": checkpoint.persistent_volume_claim.claim_name}
        if read_only:
            source["readOnly"] = True  # type: ignore[assignment]
        return {"name": name, "persistentVolumeClaim": source}
    assert checkpoint.nfs is not None
    return {"name": name, "nfs": {"server": checkpoint.nfs.server, "path": checkpoint.nfs.path,
                                  **({"readOnly": True} if read_only else {})}}


def build_env(job: JobRef, spec: TrainingJobSpec, attempt: int, restart_reason: str,
              resume: ResumeSource | None, mtbp_seconds: float | None, created: dt.datetime | None = None
              ) -> list[dict[str, str]]:
    """The CKPT_* environment of the contract. With `activeDeadlineSeconds` (a time-limited slot), CKPT_DEADLINE is
    counted from `created`: the kubelet counts from the pod's start, which is later, so the SDK is never late."""
    env = {
        C.ENV_DIR: spec.checkpoint.mount_path,
        C.ENV_JOB_NAME: job.name,
        C.ENV_NAMESPACE: job.namespace,
        C.ENV_JOB_UID: job.uid,
        C.ENV_ATTEMPT: str(attempt),
        C.ENV_RESTART_REASON: restart_reason,
        C.ENV_GRACE_PERIOD_SECONDS: str(spec.preemption.grace_period_seconds),
        C.ENV_KEEP: str(spec.checkpoint.keep),
        C.ENV_ANNOTATIONS_FILE: C.ANNOTATIONS_FILE,
    }
    if job.created:
        env[C.ENV_JOB_CREATED] = job.created
    if spec.checkpoint.interval_seconds is not None:
        env[C.ENV_INTERVAL_SECONDS] = str(spec.checkpoint.interval_seconds)
    if resume is not None:
        env[C.ENV_RESUME_FROM] = RESUME_MOUNT + (f"/step-{resume.step:012d}" if resume.step is not None else "")
    if mtbp_seconds is not None:
        env[C.ENV_MTBP_SECONDS] = f"{mtbp_seconds:.0f}"
    deadline = spec.template["spec"].get("activeDeadlineSeconds")
    if isinstance(deadline, int) and not isinstance(deadline, bool) and deadline > 0 and created is not None:
        env[C.ENV_DEADLINE] = C.format_time((created + dt.timedelta(seconds=deadline)).timestamp())
    return [{"name": k, "value": v} for k, v in env.items()]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def build_pods(job: JobRef, spec: TrainingJobSpec, attempt: int, restart_reason: str,
               resume: ResumeSource | None = None, mtbp_seconds: float | None = None,
               created: dt.datetime | None = None, template_patch: dict[str, Any] | None = None,
               size: int | None = None) -> list[dict[str, Any]]:
    """Every pod of one attempt of `size` ranks (default: the spec's most), by rank; `template_patch` (capacity
    fallback) is merged into the template."""
    if template_patch:
        spec = spec.model_copy(update={"template": merge_patch(spec.template, template_patch)})
    size = size or spec.worker_range()[1]
    if not (spec.ranked or size > 1):
        return [build_pod(job, spec, attempt, restart_reason, resume, mtbp_seconds, created)]
    return [build_pod(job, spec, attempt, restart_reason, resume, mtbp_seconds, created, (rank, size))
            for rank in range(size)]


def build_pod(job: JobRef, spec: TrainingJobSpec, attempt: int, restart_reason: str,
              resume: ResumeSource | None = None, mtbp_seconds: float | None = None,
              created: dt.datetime | None = None, ranked: tuple[int, int] | None = None) -> dict[str, Any]:
    """The pod of one attempt (of one rank of it, `ranked` = (rank, world size)): the user's template plus storage,
    grace period, CKPT_* env, labels and owner; a rank also gets a stable hostname in the job's Service and the
    torch.distributed env."""
    rank = ranked[0] if ranked is not None else None
    template = copy.deepcopy(spec.template)
    meta = template.get("metadata") or {}
    pod_spec = template["spec"]
    pod_spec["restartPolicy"] = "Never"
    pod_spec["terminationGracePeriodSeconds"] = spec.preemption.grace_period_seconds
    managed = (CKPT_VOLUME, RESUME_VOLUME, PODINFO_VOLUME)
    volumes = [v for v in pod_spec.get("volumes") or [] if v.get("name") not in managed]
    volumes.append(build_volume(CKPT_VOLUME, spec.checkpoint))
    volumes.append({"name": PODINFO_VOLUME, "downwardAPI": {"items": [
        {"path": C.ANNOTATIONS_FILE.rsplit("/", 1)[1], "fieldRef": {"fieldPath": "metadata.annotations"}}]}})
    trainer = pod_spec["containers"][spec.trainer_index()]
    mounts = [m for m in trainer.get("volumeMounts") or [] if m.get("name") not in managed]
    mounts.append({"name": CKPT_VOLUME, "mountPath": spec.checkpoint.mount_path,
                   "subPath": storage_subpath(job, None, spec.checkpoint)})
    mounts.append({"name": PODINFO_VOLUME, "mountPath": PODINFO_MOUNT, "readOnly": True})
    if resume is not None:
        volumes.append(build_volume(RESUME_VOLUME, resume.checkpoint, read_only=True))
        mounts.append({"name": RESUME_VOLUME, "mountPath": RESUME_MOUNT, "readOnly": True,
                       "subPath": storage_subpath(resume.job, job.namespace, resume.checkpoint)})
    pod_spec["volumes"] = volumes
    trainer["volumeMounts"] = mounts
    trainer.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")  # crash output reaches status
    ours = build_env(job, spec, attempt, restart_reason, resume, mtbp_seconds, created)
    labels = {**(meta.get("labels") or {}), R.LABEL_JOB: job.name[:63], R.LABEL_JOB_UID: job.uid,
              R.LABEL_ATTEMPT: str(attempt), R.LABEL_MANAGED_BY: R.MANAGER}
    if ranked is not None and rank is not None:
        user_env = {e.get("name"): e.get("value") for e in trainer.get("env") or []}
        port = str(user_env.get(C.ENV_MASTER_PORT) or MASTER_PORT)  # a port the user chose wins
        ours += [{"name": k, "value": v}
                 for k, v in rank_env(job.name, rank, ranked[1], int(port) if port.isdigit() else MASTER_PORT
                                      ).items()]
        pod_spec["hostname"] = worker_hostname(job.name, rank)
        pod_spec["subdomain"] = job.name
        labels[R.LABEL_RANK] = str(rank)
    names = {e["name"] for e in ours}
    trainer["env"] = [e for e in trainer.get("env") or [] if e.get("name") not in names] + ours
    annotations = {**(meta.get("annotations") or {}), R.ANNOTATION_RESTART_REASON: restart_reason}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job.name, attempt, rank), "namespace": job.namespace, "labels": labels,
            "annotations": annotations,
            "finalizers": [R.POD_FINALIZER],
            "ownerReferences": [_owner(job)],
        },
        "spec": pod_spec,
    }


def failure_backoff(failures: int, base: float, cap: float) -> float:
    """Exponential back-off before resubmitting after the n-th application failure."""
    return float(min(cap, base * 2 ** max(0, failures - 1)))


def mean_time_between_preemptions(running_seconds: float, preemptions: int) -> float | None:
    """The job's own observed MTBP, handed to the SDK's automatic interval; None until one was seen."""
    if preemptions <= 0 or running_seconds <= 0:
        return None
    return max(60.0, running_seconds / preemptions)
