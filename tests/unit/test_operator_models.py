from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import ckpt_operator
from ckpt_operator.crd import render, render_validation, schema
from ckpt_operator.models import Phase, TrainingJobSpec, TrainingJobStatus

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "/w/train.py"]}]}},
        "checkpoint": {"persistentVolumeClaim": {"claimName": "ckpt-shared"}}}


def test_public_names_are_exactly_the_documented_ones():
    assert sorted(ckpt_operator.__all__) == ["InvalidSpecError", "OperatorError", "Phase", "TrainingJobSpec",
                                             "TrainingJobStatus", "__version__"]
    readme = (ROOT / "README.md").read_text()
    for name in ckpt_operator.__all__:
        assert f"`{name}`" in readme, f"{name} is not documented in README.md"
    assert issubclass(ckpt_operator.InvalidSpecError, ckpt_operator.OperatorError)


def test_spec_defaults_match_the_contract():
    spec = TrainingJobSpec.model_validate(SPEC)
    assert spec.checkpoint.mount_path == "/checkpoints" and spec.checkpoint.keep == 3
    assert spec.checkpoint.interval_seconds is None
    assert spec.preemption.grace_period_seconds == 30 and spec.preemption.max_preemptions is None
    assert spec.backoff_limit == 3 and spec.suspend is False and spec.resume_from is None
    assert spec.dump()["checkpoint"]["persistentVolumeClaim"] == {"claimName": "ckpt-shared"}


@pytest.mark.parametrize(("patch", "message"), [
    ({"checkpoint": {}}, "exactly one"),
    ({"checkpoint": {"persistentVolumeClaim": {"claimName": "a"}, "nfs": {"server": "s", "path": "/p"}}},
     "exactly one"),
    ({"preemption": {"gracePeriodSeconds": 0}}, "greater than or equal to 1"),
    ({"preemption": {"gracePeriodSeconds": 3601}}, "less than or equal to 3600"),
    ({"template": {"spec": {"containers": []}}}, "at least one container"),
    ({"backoffLimit": -1}, "greater than or equal to 0"),
])
def test_invalid_specs_are_rejected_with_a_clear_message(patch, message):
    with pytest.raises(ValidationError, match=message):
        TrainingJobSpec.model_validate({**SPEC, **patch})


def test_trainer_container_is_named_trainer_or_first():
    two = {**SPEC, "template": {"spec": {"containers": [{"name": "sidecar"}, {"name": "trainer"}]}}}
    assert TrainingJobSpec.model_validate(two).trainer_index() == 1
    other = {**SPEC, "template": {"spec": {"containers": [{"name": "main"}, {"name": "x"}]}}}
    assert TrainingJobSpec.model_validate(other).trainer_index() == 0


def test_status_roundtrips_in_camel_case():
    status = TrainingJobStatus.model_validate({"phase": "Preempted", "attempt": 2, "preemptions": 2,
                                               "lastCheckpoint": {"step": 400, "time": "2026-01-01T00:00:00Z"}})
    assert status.phase is Phase.PREEMPTED and status.dump()["lastCheckpoint"]["step"] == 400


@pytest.mark.parametrize("path", ["crds/trainingjobs.ckpt.dev.yaml",
                                  "charts/ckpt-operator/crds/trainingjobs.ckpt.dev.yaml"])
def test_committed_crd_is_generated_from_the_models(path):
    assert (ROOT / path).read_text() == render(), f"{path} is stale: run `make crd`"


@pytest.mark.parametrize("path", ["crds/trainingjobs.ckpt.dev-validation.yaml",
                                  "charts/ckpt-operator/crds/trainingjobs.ckpt.dev-validation.yaml"])
def test_committed_workers_validation_is_generated(path):
    assert (ROOT / path).read_text() == render_validation(), f"{path} is stale: run `make crd`"


def test_crd_schema_is_structural_and_carries_the_rules():
    text = yaml.safe_dump(schema())
    for forbidden in ("$ref", "anyOf", "title:", "exclusiveMinimum"):
        assert forbidden not in text
    spec = schema()["properties"]["spec"]
    rules = [r["rule"] for r in spec["properties"]["checkpoint"]["x-kubernetes-validations"]]
    assert "has(self.persistentVolumeClaim) != has(self.nfs)" in rules
    assert any("oldSelf.persistentVolumeClaim" in rule and "oldSelf.nfs" in rule for rule in rules)  # storage only
    grace = spec["properties"]["preemption"]["properties"]["gracePeriodSeconds"]
    assert (grace["minimum"], grace["maximum"], grace["default"]) == (1, 3600, 30)
    assert set(schema()["properties"]["status"]["properties"]["phase"]["enum"]) == {p.value for p in Phase}
