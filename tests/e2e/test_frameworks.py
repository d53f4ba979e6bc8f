"""The framework examples as TrainingJobs (issue #26): examples/hf-trainer and examples/lightning, applied as
written (the command pointed at this checkout), evicted mid-run, resumed by the operator from the newest complete
checkpoint the framework wrote, and ending bitwise where an uninterrupted local run ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.kube import Jobs, evict, wait_for

pytest.importorskip("transformers")
pytest.importorskip("lightning")
pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
ENV = {"TRAIN_STEPS": "80", "SAVE_STEPS": "20", "STEP_SECONDS": "0.05"}


def manifest(example: str) -> dict:  # type: ignore[type-arg]
    [job] = [doc for doc in yaml.safe_load_all((ROOT / "examples" / example / "trainingjob.yaml").read_text())
             if doc and doc.get("kind") == "TrainingJob"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [sys.executable, str(ROOT / "examples" / example / "train.py")]
    container["env"] = [{"name": k, "value": v} for k, v in ENV.items()]
    job["spec"]["checkpoint"]["persistentVolumeClaim"]["claimName"] = "ckpt"
    return dict(job)


def reference(example: str, directory: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env.update(ENV, CKPT_DIR=str(directory), STEP_SECONDS="0")
    subprocess.run([sys.executable, str(ROOT / "examples" / example / "train.py")], env=env, check=True,
                   capture_output=True, timeout=300)
    return (directory / "result").read_text()


@pytest.mark.parametrize(("example", "first_checkpoint"), [("hf-trainer", "checkpoint-20"),
                                                            ("lightning", "step-20.ckpt")])
def test_a_framework_example_is_evicted_and_resumes_from_its_newest_complete_checkpoint(
        operator, core, namespace, claim, tmp_path, example, first_checkpoint):
    expected = reference(example, tmp_path / "reference")
    jobs = Jobs(namespace)
    body = manifest(example)
    name = body["metadata"]["name"]
    jobs.create(body)
    host = claim / name
    wait_for(f"{first_checkpoint} committed", (host / first_checkpoint / "ckpt-commit.json").exists, 120)
    evict(core, namespace, f"{name}-0")  # SIGTERM: the framework saves the step it is at, the pod exits 143
    st = jobs.wait_phase(name, "Succeeded", 240)
    assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 1), st
    first, second = st["attempts"]
    assert first["result"] == "Preempted" and first["reason"] == "EvictionByEvictionAPI"
    assert second["startStep"] == first["checkpointStep"] > 20  # resumed from the step saved on SIGTERM
    assert (host / "result").read_text() == expected
