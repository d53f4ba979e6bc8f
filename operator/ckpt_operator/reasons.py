"""Condition types, reasons and label keys: every string the operator writes into status lives here."""

from __future__ import annotations

from typing import Final

from ckpt_sdk import contract as C

GROUP: Final = "ckpt.dev"
VERSION: Final = "v1alpha1"
PLURAL: Final = "trainingjobs"
KIND: Final = "TrainingJob"

# labels and annotations on the pods the operator creates
LABEL_JOB: Final = "ckpt.dev/job"
LABEL_JOB_UID: Final = "ckpt.dev/job-uid"
LABEL_ATTEMPT: Final = "ckpt.dev/attempt"
LABEL_RANK: Final = "ckpt.dev/rank"  # the pod's index in a multi-node attempt (spec.workers > 1)
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGER: Final = "ckpt-operator"
ANNOTATION_RESTART_REASON: Final = "ckpt.dev/restart-reason"
# set on a TrainingJob by `kubectl ckpt resume` to resume a finished (Succeeded or Failed) job; a new value each time
ANNOTATION_RESUME_REQUEST: Final = "ckpt.dev/resume-request"
# set by `kubectl ckpt resume|restart -f/--set`: {"time", "command", "changes"} of the last override of the spec
ANNOTATION_OVERRIDE: Final = "ckpt.dev/override"
# set by the operator on a pod whose node got an interruption notice; the SDK reads it through a downward-API volume
ANNOTATION_CHECKPOINT_REQUESTED: Final = C.ANNOTATION_CHECKPOINT_REQUESTED
# keeps an ended pod (and its exit code, DisruptionTarget and termination message) until its outcome is recorded
POD_FINALIZER: Final = "ckpt.dev/attempt-tracking"
# the taint an admin puts on a node that is known to be down (non-graceful node shutdown)
TAINT_OUT_OF_SERVICE: Final = "node.kubernetes.io/out-of-service"

# condition types
# kstatus' standard conditions (what Flux, `kubectl wait` users and GitOps health checks read), for a job-like
# resource as kstatus reads a batch/v1 Job: in progress until it finished, Current when it succeeded
COND_READY: Final = "Ready"  # True only once the job succeeded; False with the phase as reason before
COND_RECONCILING: Final = "Reconciling"  # True while the job is on its way (Pending, Running, Preempted)
COND_STALLED: Final = "Stalled"  # True when the job failed for good (Failed): kstatus' Failed
COND_SPEC_RESOLVED: Final = "SpecResolved"  # the spec can be acted on (storage and resume source resolved)
COND_RUNNING: Final = "Running"
COND_PREEMPTED: Final = "Preempted"
COND_SUSPENDED: Final = "Suspended"
COND_COMPLETE: Final = "Complete"
COND_FAILED: Final = "Failed"
COND_BACKOFF: Final = "BackingOff"
COND_POLICY_APPLIED: Final = "PolicyApplied"  # the running attempt has the spec's checkpoint policy
COND_ADMITTED: Final = "Admitted"  # Kueue admitted the job's Workload (only for jobs in a Kueue queue)

# reasons
PODS_STARTING: Final = "PodStarting"
POD_RUNNING: Final = "PodRunning"
RESUBMITTED: Final = "Resubmitted"
SPEC_VALID: Final = "SpecValid"
CLAIM_NOT_FOUND: Final = "ClaimNotFound"
RESUME_SOURCE_NOT_FOUND: Final = "ResumeSourceNotFound"
INVALID_TEMPLATE: Final = "InvalidTemplate"
POD_DELETED: Final = "PodDeleted"  # someone else deleted the pod
NODE_LOST: Final = "NodeLost"
APPLICATION_FAILURE: Final = "ApplicationFailure"
BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
PREEMPTION_LIMIT_EXCEEDED: Final = "PreemptionLimitExceeded"
SUSPENDED_BY_USER: Final = "SuspendedByUser"
SPEC_OVERRIDDEN: Final = "SpecOverridden"  # kubectl ckpt resume/restart changed the spec (recorded in status)
SUSPENDING: Final = "Suspending"  # spec.suspend is true and the pods are checkpointing and exiting
RESUMED_BY_USER: Final = "ResumedByUser"
COMPLETED: Final = "Completed"
NODE_UNREACHABLE: Final = "NodeUnreachable"  # not Ready, not yet lost: waiting before acting
UNSCHEDULABLE: Final = "Unschedulable"
ADMISSION_REJECTED: Final = "AdmissionRejected"  # the kubelet refused the pod: a preemption, not a failure
UNKNOWN_DISRUPTION: Final = "UnknownDisruption"  # a DisruptionTarget condition without a reason
UNEXPLAINED_SIGTERM: Final = "UnexplainedSigterm"  # exit 143 with no deletion or disruption: a failure
NO_PROGRESS: Final = "NoProgress"  # maxAttemptsWithoutProgress consecutive attempts committed no checkpoint
CREATE_FAILED: Final = "PodCreateFailed"  # a transient error (429, 5xx, timeout) creating the pod: retried
QUOTA_EXCEEDED: Final = "QuotaExceeded"  # a ResourceQuota refused the pod: retried with back-off
DEADLINE_EXCEEDED: Final = "DeadlineExceeded"  # a time-limited slot (activeDeadlineSeconds) ended: a preemption
GANG_STOPPING: Final = "GangStopping"  # one rank ended: the others get SIGTERM so the attempt ends as one unit
GANG_UNSCHEDULABLE: Final = "GangUnschedulable"  # a rank found no node while others held theirs: NotStarted
START_TIMEOUT: Final = "StartTimeout"  # a pod was bound but did not start in time (volume attach...): NotStarted
START_FAILED: Final = "StartFailed"  # a pod cannot start as written (image, config): a failure, after the timeout
KUEUE_PREEMPTED: Final = "KueuePreempted"  # Kueue preempted the job's Workload: a preemption, never a failure
KUEUE_EVICTED: Final = "KueueEvicted"  # Kueue evicted it for another reason (pods-ready timeout, queue stopped...)
QUEUED: Final = "Queued"  # waiting in a Kueue queue for admission (the message is Kueue's)
KUEUE_ADMITTED: Final = "KueueAdmitted"  # Kueue admitted the Workload
PREVIOUS_INCARNATION: Final = "PreviousIncarnationTerminating"  # a deleted job of the same name still has the pod
INTERRUPTION_NOTICE: Final = "InterruptionNotice"  # the node got a notice taint: checkpoint, then migrate
INTERRUPTION_WITHDRAWN: Final = "InterruptionNoticeWithdrawn"  # the notice taint went away before the migration
POLICY_CURRENT: Final = "PolicyCurrent"  # the attempt runs with the spec's checkpoint policy
POLICY_NEXT_ATTEMPT: Final = "AppliesAtNextAttempt"  # the checkpoint policy changed: the next attempt gets it
FALLBACK_APPLIED: Final = "FallbackApplied"  # preemption.fallback's template patch is in force
FALLBACK_REVERTED: Final = "FallbackReverted"  # back to the unpatched template
SERVICE_CONFLICT: Final = "ServiceConflict"  # the headless Service's name is taken by an object not ours
RESIZED: Final = "Resized"  # an elastic gang runs at another size, or is stopped at a checkpoint to grow back

# interruption notice taints (cloud spot/preemptible reclaim, autoscaler scale-down) -> seconds of notice they give
DEFAULT_NOTICE_TAINTS: Final = {
    "aws-node-termination-handler/spot-itn": 120.0,  # EC2 spot interruption notice: 2 minutes
    "aws-node-termination-handler/rebalance-recommendation": 120.0,  # an earlier hint; no fixed deadline
    "aws-node-termination-handler/asg-lifecycle-termination": 120.0,
    "aws-node-termination-handler/scheduled-maintenance": 120.0,
    "cloud.google.com/impending-node-termination": 30.0,  # GKE spot/preemptible: 30 s
    "karpenter.sh/disrupted": 120.0,  # Karpenter is about to drain the node
    "ToBeDeletedByClusterAutoscaler": 120.0,  # the cluster autoscaler is about to drain the node
}

# DisruptionTarget reasons Kubernetes sets on pods it is about to take away: all of them are preemptions
DISRUPTION_REASONS: Final = frozenset({
    "PreemptionByScheduler", "PreemptionByKubeScheduler", "EvictionByEvictionAPI", "DeletionByTaintManager",
    "DeletionByPodGC", "TerminationByKubelet",
})

# pod.status.reason of a pod the kubelet ended because its node is going away -> the preemption reason used
NODE_TERMINATION_REASONS: Final = {"Terminated": "TerminationByKubelet", "Shutdown": "TerminationByKubelet",
                                   "NodeShutdown": "TerminationByKubelet", "Evicted": "EvictionByKubelet"}
# pod.status.reason of a pod the kubelet refused at admission (besides OutOf<resource>)
ADMISSION_REASONS: Final = frozenset({"UnexpectedAdmissionError", "NodeAffinity", "NodeSelectorMismatching",
                                      "InvalidNodeInfo", "PodOSNotSupported", "SysctlForbidden"})

# CKPT_RESTART_REASON values
RESTART_NONE: Final = C.RestartReason.NONE.value
RESTART_PREEMPTED: Final = C.RestartReason.PREEMPTED.value
RESTART_FAILED: Final = C.RestartReason.FAILED.value
RESTART_RESUMED: Final = C.RestartReason.RESUMED.value
RESTART_RESIZED: Final = C.RestartReason.RESIZED.value

# container waiting reasons that a retry of the same pod will not cure: the spec (image, config) must change
START_FAILURE_REASONS: Final = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                                          "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                                          "ErrImageNeverPull"})
