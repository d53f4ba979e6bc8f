from ckpt_operator import reasons as R
from ckpt_operator.builders import (
    JobRef,
    ResumeSource,
    build_pod,
    build_pods,
    failure_backoff,
    mean_time_between_preemptions,
    merge_patch,
    storage_subpath,
)
from ckpt_operator.models import CheckpointSpec, TrainingJobSpec

JOB = JobRef("demo", "team-a", "uid-1", "2026-11-01T10:00:00Z")


def _spec(**over):
    base = {"template": {"metadata": {"labels": {"team": "a"}},
                         "spec": {"containers": [{"name": "side", "image": "x"},
                                                 {"name": "trainer", "command": ["python", "t.py"],
                                                  "env": [{"name": "CKPT_DIR", "value": "/wrong"},
                                                          {"name": "MINE", "value": "1"}]}],
                                  "restartPolicy": "Always"}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "shared"}, "keep": 5, "intervalSeconds": 120},
            "preemption": {"gracePeriodSeconds": 45}}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def _env(pod):
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][1]["env"]}


def test_pod_of_an_attempt_has_storage_grace_env_labels_and_owner():
    pod = build_pod(JOB, _spec(), 2, "preempted", mtbp_seconds=3600)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "demo-2" and meta["namespace"] == "team-a"
    assert meta["labels"] == {"team": "a", R.LABEL_JOB: "demo", R.LABEL_JOB_UID: "uid-1", R.LABEL_ATTEMPT: "2",
                              R.LABEL_MANAGED_BY: R.MANAGER}
    assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"] is True
    assert meta["finalizers"] == [R.POD_FINALIZER]
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 45
    assert {"name": "ckpt-storage", "persistentVolumeClaim": {"claimName": "shared"}} in spec["volumes"]
    trainer = spec["containers"][1]
    assert {"name": "ckpt-storage", "mountPath": "/checkpoints", "subPath": "demo"} in trainer["volumeMounts"]
    assert "volumeMounts" not in spec["containers"][0]
    assert _env(pod) == {"MINE": "1", "CKPT_DIR": "/checkpoints", "CKPT_JOB_NAME": "demo",
                         "CKPT_NAMESPACE": "team-a", "CKPT_JOB_UID": "uid-1",
                         "CKPT_JOB_CREATED": "2026-11-01T10:00:00Z", "CKPT_ATTEMPT": "2",
                         "CKPT_RESTART_REASON": "preempted",
                         "CKPT_GRACE_PERIOD_SECONDS": "45", "CKPT_KEEP": "5", "CKPT_INTERVAL_SECONDS": "120",
                         "CKPT_MTBP_SECONDS": "3600", "CKPT_ANNOTATIONS_FILE": "/etc/ckpt-podinfo/annotations"}


def test_the_trainer_reads_its_annotations_through_a_downward_api_volume():
    pod = build_pod(JOB, _spec(), 0, "none")
    assert {"name": "ckpt-podinfo", "downwardAPI": {"items": [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}} in pod["spec"]["volumes"]
    assert {"name": "ckpt-podinfo", "mountPath": "/etc/ckpt-podinfo", "readOnly": True} \
        in pod["spec"]["containers"][1]["volumeMounts"]
    assert [v["name"] for v in build_pod(JOB, _spec(), 1, "none")["spec"]["volumes"]].count("ckpt-podinfo") == 1


def test_merge_patch_follows_rfc_7386():
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "keep": [1, 2]}
    assert merge_patch(target, {"a": "z", "c": {"f": None}, "new": {"x": 1}}) == {
        "a": "z", "c": {"d": "e"}, "keep": [1, 2], "new": {"x": 1}}
    assert merge_patch(target, {"keep": [3]})["keep"] == [3]  # lists replace, never merge
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}, "keep": [1, 2]}  # never mutated


def test_a_fallback_patch_changes_the_pods_and_not_the_spec():
    spec = _spec()
    patch = {"spec": {"nodeSelector": {"capacity": "on-demand"}, "tolerations": None}}
    pods = build_pods(JOB, spec, 3, "preempted", template_patch=patch)
    assert pods[0]["spec"]["nodeSelector"] == {"capacity": "on-demand"}
    assert _env(pods[0])["CKPT_DIR"] == "/checkpoints"  # everything else built as always
    assert "nodeSelector" not in spec.template["spec"]


def test_build_pod_does_not_mutate_the_spec():
    spec = _spec()
    build_pod(JOB, spec, 0, "none")
    assert spec.template["spec"]["restartPolicy"] == "Always"


def test_nfs_storage_uses_a_namespaced_subdirectory():
    spec = _spec(checkpoint={"nfs": {"server": "nfs.local", "path": "/export"}})
    pod = build_pod(JOB, spec, 0, "none")
    assert {"name": "ckpt-storage", "nfs": {"server": "nfs.local", "path": "/export"}} in pod["spec"]["volumes"]
    assert storage_subpath(JOB, None, spec.checkpoint) == "team-a/demo"
    assert "CKPT_INTERVAL_SECONDS" not in _env(pod)


def test_resume_from_mounts_the_source_read_only():
    source = ResumeSource("pretrain", CheckpointSpec.model_validate({"persistentVolumeClaim": {"claimName": "old"}}),
                          400)
    pod = build_pod(JOB, _spec(), 0, "none", resume=source)
    assert {"name": "ckpt-resume-from", "persistentVolumeClaim": {"claimName": "old", "readOnly": True}} \
        in pod["spec"]["volumes"]
    assert {"name": "ckpt-resume-from", "mountPath": "/ckpt-resume-from", "readOnly": True,
            "subPath": "pretrain"} in pod["spec"]["containers"][1]["volumeMounts"]
    assert _env(pod)["CKPT_RESUME_FROM"] == "/ckpt-resume-from/step-000000000400"


def test_failure_backoff_doubles_up_to_the_cap():
    assert [failure_backoff(n, 10, 60) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_mean_time_between_preemptions():
    assert mean_time_between_preemptions(7200, 0) is None
    assert mean_time_between_preemptions(7200, 2) == 3600
    assert mean_time_between_preemptions(10, 5) == 60.0


def test_a_time_limited_slot_gets_its_deadline():
    import datetime as dt

    spec = _spec()
    spec.template["spec"]["activeDeadlineSeconds"] = 3600
    created = dt.datetime(2026, 11, 1, 10, 0, tzinfo=dt.timezone.utc)
    pod = build_pod(JOB, spec, 0, "none", created=created)
    assert _env(pod)["CKPT_DEADLINE"] == "2026-11-01T11:00:00Z"
    assert "CKPT_DEADLINE" not in _env(build_pod(JOB, _spec(), 0, "none", created=created))
