"""TrainingJob spec and status as pydantic v2 models: the single source of the CRD schema (see crd.py)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ABSOLUTE_PATH = r"^/.*"
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123)]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    def dump(self) -> dict[str, Any]:
        """Camel-case JSON-ready dict without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class PersistentVolumeClaimSource(_Model):
    """A PersistentVolumeClaim in the job's namespace, shared by every attempt (ReadWriteMany for multi-node)."""

    claim_name: Name


class NFSSource(_Model):
    """An NFS export mounted directly."""

    server: str = Field(min_length=1, max_length=253)
    path: str = Field(min_length=1, pattern=ABSOLUTE_PATH)


class CheckpointSpec(_Model):
    """Where checkpoints live and how many to keep. Each job writes to its own subdirectory of the volume; the
    storage is fixed at creation, the policy (keep, intervalSeconds, mountPath) applies from the next attempt."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.persistentVolumeClaim) != has(self.nfs)",
         "message": "exactly one of checkpoint.persistentVolumeClaim or checkpoint.nfs must be set"},
        {"rule": "has(self.persistentVolumeClaim) == has(oldSelf.persistentVolumeClaim) && "
                 "(!has(self.persistentVolumeClaim) || self.persistentVolumeClaim == oldSelf.persistentVolumeClaim) "
                 "&& (!has(self.nfs) || self.nfs == oldSelf.nfs)",
         "message": "checkpoint storage (persistentVolumeClaim or nfs) is immutable; create a new TrainingJob. "
                    "keep, intervalSeconds and mountPath may change: they apply from the next attempt"},
    ]})

    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    nfs: NFSSource | None = None
    mount_path: str = Field("/checkpoints", pattern=ABSOLUTE_PATH, max_length=1024,
                            description="Where the job's checkpoint directory is mounted in the trainer container.")
    keep: int = Field(3, ge=1, le=1000, description="How many recent checkpoints the SDK keeps.")
    interval_seconds: int | None = Field(None, ge=1, le=604800,
                                         description="Seconds between checkpoints; absent = automatic (Young/Daly).")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> CheckpointSpec:
        if (self.persistent_volume_claim is None) == (self.nfs is None):
            raise ValueError("exactly one of checkpoint.persistentVolumeClaim or checkpoint.nfs must be set")
        return self


class FallbackSpec(_Model):
    """Capacity fallback: after `afterPreemptions` preemptions within `windowSeconds`, the next attempts run with
    `templatePatch` merged into the pod template (e.g. on-demand nodes); back to the template after
    `revertAfterSeconds`, if set."""

    after_preemptions: int = Field(ge=1, le=1000, description="Preemptions within the window that switch to the "
                                                                "fallback.")
    window_seconds: int = Field(3600, ge=1, le=31536000, description="The window the preemptions are counted in.")
    template_patch: dict[str, Any] = Field(json_schema_extra={
        "type": "object", "x-kubernetes-preserve-unknown-fields": True},
        description="A JSON merge patch (RFC 7386) of spec.template for the fallback attempts (nodeSelector, "
                    "tolerations, affinity, resources...).")
    revert_after_seconds: int | None = Field(None, ge=1, le=31536000,
                                             description="Return to the unpatched template this long after the "
                                                         "switch (at the next attempt); absent = stay.")


class PreemptionSpec(_Model):
    """How a preempted attempt is treated."""

    grace_period_seconds: int = Field(30, ge=1, le=3600,
                                      description="SIGTERM-to-SIGKILL time the trainer gets to checkpoint.")
    max_preemptions: int | None = Field(None, ge=0, description="Give up after this many preemptions; absent = never.")
    max_attempts_without_progress: int = Field(
        5, ge=1, le=1000,
        description="Fail the job after this many consecutive attempts (preempted or failed) that committed no new "
                    "checkpoint.")
    fallback: FallbackSpec | None = None


class ResumeFrom(_Model):
    """Warm-start from another TrainingJob's checkpoints (mounted read-only) when this job has none."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self == oldSelf", "message": "resumeFrom is immutable"}]})

    training_job: Name
    step: int | None = Field(None, ge=0, description="A specific step; absent = the source's latest.")


POD_TEMPLATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A standard PodTemplateSpec; the container named 'trainer' (or the first) runs the startup script.",
    "x-kubernetes-preserve-unknown-fields": True,
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "spec": {
            "type": "object", "x-kubernetes-preserve-unknown-fields": True, "required": ["containers"],
            "properties": {"containers": {
                "type": "array", "minItems": 1,
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "required": ["name"],
                          "properties": {"name": {"type": "string", "minLength": 1}}}}},
        },
    },
}


class WorkersRange(_Model):
    """An elastic gang's size: the attempt runs at the largest size in [min, max] that fits."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(ge=1, le=1024)
    max: int = Field(ge=1, le=1024)

    @model_validator(mode="after")
    def _ordered(self) -> WorkersRange:
        if self.min > self.max:
            raise ValueError(f"workers.min ({self.min}) is larger than workers.max ({self.max})")
        return self


class TrainingJobSpec(_Model):
    """What to run, where its checkpoints live, and how preemptions and failures are budgeted."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.resumeFrom) == has(oldSelf.resumeFrom)", "message": "resumeFrom is immutable"}]})

    template: dict[str, Any] = Field(json_schema_extra=POD_TEMPLATE_SCHEMA)
    checkpoint: CheckpointSpec
    preemption: PreemptionSpec = PreemptionSpec()
    backoff_limit: int = Field(3, ge=0, le=1000,
                               description="Application failures before the job is Failed (preemptions never count).")
    suspend: bool = Field(False, description="true: checkpoint and stop the pod; false again: resume.")
    resume_from: ResumeFrom | None = None
    workers: int | WorkersRange = Field(
        1, description="Pods per attempt (a multi-node gang): started together, stopped together, one preemption "
                       "restarts all of them. Or {min, max}: an elastic gang that runs at the largest size that fits "
                       "and grows back at a checkpoint when capacity returns.")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_shape(cls, value: Any) -> Any:
        if isinstance(value, bool) or (not isinstance(value, (int, dict, WorkersRange))):
            raise ValueError(f"workers is a count (1-1024) or {{min: M, max: N}}, got {value!r}")
        if isinstance(value, int) and not 1 <= value <= 1024:
            raise ValueError(f"workers must be between 1 and 1024, got {value}")
        if isinstance(value, dict):
            try:
                return WorkersRange.model_validate(value)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                raise ValueError(f"workers {{min, max}}: {where + ': ' if where else ''}{error['msg']}") from None
        return value

    @property
    def elastic(self) -> bool:
        """workers: {min, max}."""
        return isinstance(self.workers, WorkersRange)

    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) pods per attempt; equal for a fixed gang."""
        if isinstance(self.workers, WorkersRange):
            return self.workers.min, self.workers.max
        return self.workers, self.workers

    @property
    def ranked(self) -> bool:
        """Pods get ranks (names, WORLD_SIZE, a Service): a gang of more than one pod, or any elastic one."""
        return self.elastic or self.worker_range()[1] > 1

    @field_validator("template")
    @classmethod
    def _has_containers(cls, template: dict[str, Any]) -> dict[str, Any]:
        containers = (template.get("spec") or {}).get("containers") or []
        if not containers or not all(isinstance(c, dict) and c.get("name") for c in containers):
            raise ValueError("template.spec.containers needs at least one container with a name")
        return template

    def trainer(self) -> dict[str, Any]:
        """The container that runs the startup script (see trainer_index)."""
        return dict(self.template["spec"]["containers"][self.trainer_index()])

    def trainer_index(self) -> int:
        """Index of the container that runs the startup script: 'trainer', else the first."""
        names = [c["name"] for c in self.template["spec"]["containers"]]
        return names.index("trainer") if "trainer" in names else 0


class Phase(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    PREEMPTED = "Preempted"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class Result(str, Enum):
    """How an attempt ended."""

    SUCCEEDED = "Succeeded"
    PREEMPTED = "Preempted"  # taken away (eviction, node loss, a slot's end, a notice): never a failure
    FAILED = "Failed"  # the application failed (or its pods could not start as written): counts backoffLimit
    SUSPENDED = "Suspended"  # stopped for spec.suspend
    NOT_STARTED = "NotStarted"  # its pods could not all start in time (no capacity): counts in no budget

    @property
    def counted_for_progress(self) -> bool:
        return self in (Result.PREEMPTED, Result.FAILED)


class LastCheckpoint(_Model):
    step: int | None = None
    time: str | None = None


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None  # the spec generation this condition was computed from


class Outcome(_Model):
    """How one attempt ended, recorded once so counters are never incremented twice."""

    attempt: int = Field(ge=0)
    result: Result
    reason: str
    message: str = ""
    exit_code: int | None = None
    finished_at: str
    retry_after: str | None = None


class WorkerStatus(_Model):
    """One rank of a multi-node attempt, as last seen: kept until the next attempt starts."""

    rank: int = Field(ge=0)
    pod: str
    node: str | None = None
    state: Literal["Pending", "Running", "Terminating", "Succeeded", "Preempted", "Failed", "NotStarted"] = "Pending"
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    checkpoint_step: int | None = None  # the step its SDK reported (rank 0 reports the gang's)
    stopped: bool = False  # stopped by the operator because another rank ended first (never the cause)


class ElasticStatus(_Model):
    """An elastic gang (workers: {min, max}): what bounds its size, and a resize in progress."""

    limit: int | None = None  # at most this many ranks, after ranks found no place (see elastic_policy)
    limit_capacity: int | None = None  # the ranks the nodes seemed to fit when the limit was set
    resizing_to: int | None = None  # the gang is being stopped to restart at this size
    resizes: int = Field(0, ge=0)  # attempts that started at another size than the one before
    message: str | None = None  # why the current attempt runs at its size


class InterruptionStatus(_Model):
    """A cloud interruption notice (a notice taint on a node of the current attempt) and what was done about it."""

    attempt: int = Field(ge=0)
    node: str
    taint: str
    seen_time: str  # when the operator first saw the taint on this attempt's node
    deadline: str  # when the node is expected to go: seen + the taint's notice seconds
    migrate_time: str  # when the pods get SIGTERM (after the requested checkpoint had time to become durable)
    migrating: bool = False  # the operator has ended the pods to move them


class KueueStatus(_Model):
    """The job's Kueue Workload (one for its whole life) and an eviction being acted on."""

    workload: str
    cluster_queue: str | None = None  # where it holds quota while admitted
    evicting_attempt: int | None = None  # the attempt being stopped because Kueue evicted the Workload
    eviction_reason: str | None = None  # KueuePreempted or KueueEvicted
    eviction_message: str | None = None


class FallbackStatus(_Model):
    """Whether the capacity fallback patch is in force, and the preemptions that count towards it."""

    active: bool = False
    since: str | None = None
    recent_preemptions: list[str] = []  # times of the last preemptions (at most afterPreemptions of them)


class AttemptRecord(_Model):
    """One attempt of the job's history: where it ran, how it ended, what it resumed from and what it redid."""

    attempt: int = Field(ge=0)
    pods: list[str] = []
    nodes: list[str] = []
    start_time: str | None = None
    end_time: str | None = None
    result: Result | None = None
    reason: str | None = None
    start_step: int | None = None  # the checkpoint it resumed from (as its trainer reported, else as last known)
    checkpoint_step: int | None = None  # the newest checkpoint when it ended
    reached_step: int | None = None  # the furthest step it trained (as its SDK reported)
    steps_redone: int | None = None  # steps the previous attempt trained past the checkpoint this one resumed from
    running_time: str | None = None  # when its trainer started (every rank's, for a gang)
    step_seconds: float | None = None  # its mean step time, as its SDK measured
    stall_seconds: float | None = None  # time its training waited on saves
    resume_seconds: float | None = None  # time its resume (the checkpoint's load) took
    workers: int | None = None  # its number of ranks (an elastic gang's size changes between attempts)


class Progress(_Model):
    """How far the job is, from its trainers' reports (the SDK's termination messages: a running attempt's
    progress is known when it ends), and when it would finish at the measured pace."""

    step: int = Field(0, ge=0)  # the furthest step trained
    total_steps: int | None = None
    percent: int | None = None
    step_seconds: float | None = None  # the latest measured mean step time
    estimated_completion_time: str | None = None  # the current attempt's start + its remaining steps at that pace
    display: str = ""  # the PROGRESS column: "120/400 (30%)"


class Goodput(_Model):
    """Useful training time over the wall time since creation, as of the end of the last attempt that ended, and
    where the rest went."""

    as_of: str
    ratio: float = Field(ge=0, le=1)
    wall_seconds: float = Field(ge=0)
    useful_seconds: float = Field(ge=0)
    redone_seconds: float = Field(ge=0)  # steps trained again after a preemption
    saving_seconds: float = Field(ge=0)  # training waiting on checkpoint saves
    restart_seconds: float = Field(ge=0)  # from an attempt's end to the next one training (incl. the resume)
    queued_seconds: float = Field(ge=0)  # from creation to the first attempt running
    display: str = ""  # the GOODPUT column: "87%"


class OverrideRecord(_Model):
    """A change of the spec made by `kubectl ckpt resume|restart -f/--set`, as the plugin described it."""

    time: str
    command: str
    changes: dict[str, Any] = Field(json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    generation: int | None = None  # the spec generation it produced
    attempt: int | None = None  # the first attempt that ran with it


class AttemptPolicy(_Model):
    """The checkpoint policy the current attempt's pods were created with (a spec change applies from the next)."""

    keep: int
    interval_seconds: int | None = None
    mount_path: str


class TrainingJobStatus(_Model):
    """Observed state; written by the operator only when it changes."""

    model_config = ConfigDict(frozen=False)  # the planner works on a mutable copy

    phase: Phase = Phase.PENDING
    attempt: int = Field(0, ge=0)
    preemptions: int = Field(0, ge=0)
    failures: int = Field(0, ge=0)
    last_checkpoint: LastCheckpoint | None = None
    conditions: list[Condition] = []
    start_time: str | None = None
    completion_time: str | None = None
    active_pod: str | None = None
    last_outcome: Outcome | None = None
    message: str | None = None
    observed_generation: int | None = None
    attempts_without_progress: int = Field(0, ge=0)
    # attempts that ended with no report from their trainer (a lost node, a force-deleted pod): whether they made
    # progress is known only once a later attempt reports the step it resumed from
    attempts_progress_unknown: int = Field(0, ge=0)
    progress_unknown_since: int | None = None  # lastCheckpoint.step when the first of them started
    attempt_start_step: int | None = None  # lastCheckpoint.step when the current attempt was created
    workers: list[WorkerStatus] = []  # per-rank state of the current (or last) attempt of a gang
    world_size: int | None = None  # the current attempt's number of ranks
    elastic: ElasticStatus | None = None  # for workers: {min, max}
    interruption: InterruptionStatus | None = None  # the last interruption notice acted on
    fallback: FallbackStatus | None = None  # spec.preemption.fallback's state
    kueue: KueueStatus | None = None  # for a job in a Kueue queue
    policy: AttemptPolicy | None = None  # the checkpoint policy of the current attempt
    attempts: list[AttemptRecord] = []  # the latest attempts (at most 100), oldest first
    progress: Progress | None = None
    goodput: Goodput | None = None
    overrides: list[OverrideRecord] = []  # the spec overrides made with the plugin (at most 20), oldest first
    resume_request: str | None = None  # the last `kubectl ckpt resume` of a finished job acted on
