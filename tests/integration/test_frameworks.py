"""The framework integrations with the real frameworks (issue #26): the Hugging Face Trainer (one process, and two
DDP ranks on gloo), PyTorch Lightning and Accelerate, each as a real process signalled or killed mid-run; every
resumed run must end bitwise where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kube import wait_for
from tests.ranks import rendezvous_port

pytest.importorskip("transformers")
pytest.importorskip("lightning")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]
HF = ROOT / "examples" / "hf-trainer" / "train.py"
LIGHTNING = ROOT / "examples" / "lightning" / "train.py"
ACCELERATE = Path(__file__).parent / "trainers" / "accelerate_trainer.py"
WITH_FAULTS = Path(__file__).parent / "trainers" / "with_faults.py"
STEPS = 60


def _env(directory: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CKPT_", "MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    env.update({"CKPT_DIR": str(directory), "TRAIN_STEPS": str(STEPS), "CKPT_TERMINATION_LOG": f"{directory}.msg",
                "OMP_NUM_THREADS": "1", **extra})
    return env


def run(script: Path, directory: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(script), *args], env=_env(directory, **extra), capture_output=True,
                          text=True, timeout=300)


def signal_at(script: Path, directory: Path, step: int, sig: int = signal.SIGTERM, **extra: str) -> tuple[int, str]:
    """Run the script and send `sig` when it prints `step N`; (exit code, output)."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(directory, STEP_SECONDS="0.05", **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == f"step {step}":
            proc.send_signal(sig)
    return proc.wait(timeout=120), "".join(lines)


def message(directory: Path) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(Path(f"{directory}.msg").read_text()))


def result(directory: Path) -> str:
    return (directory / "result").read_text()


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The final weights of an uninterrupted run of each script."""
    found = {}
    for name, script in (("hf", HF), ("lightning", LIGHTNING), ("accelerate", ACCELERATE)):
        directory = tmp_path_factory.mktemp(f"{name}-reference")
        out = run(script, directory)
        assert out.returncode == 0, out.stdout + out.stderr
        found[name] = result(directory)
    return found


# -- Hugging Face Trainer ---------------------------------------------------------------------------------------------
def test_hf_sigterm_saves_the_step_exits_143_and_resumes_bitwise(tmp_path, references):
    from ckpt_sdk.integrations.transformers import last_checkpoint

    code, output = signal_at(HF, tmp_path / "ckpt", 23)
    assert code == 143, output
    said = message(tmp_path / "ckpt")
    assert said["reason"] == "preempted" and said["step"] >= 23 and said["resumed"] == 0
    assert last_checkpoint(tmp_path / "ckpt") == str(tmp_path / "ckpt" / f"checkpoint-{said['step']}")
    resumed = run(HF, tmp_path / "ckpt")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {tmp_path / 'ckpt'}/checkpoint-{said['step']}" in resumed.stdout
    assert result(tmp_path / "ckpt") == references["hf"]
    assert message(tmp_path / "ckpt")["resumed"] == said["step"]


def test_hf_a_save_killed_before_its_commit_is_never_resumed_and_rotation_kept_the_last_complete(
        tmp_path, references):
    """save_total_limit=1: the Trainer's own rotation deletes every older checkpoint right after writing the new
    one, before anything says it is complete. Killed there, nothing complete was left; its own
    get_last_checkpoint then picks the partial directory."""
    from transformers.trainer_utils import get_last_checkpoint

    from ckpt_sdk.integrations.transformers import last_checkpoint

    directory = tmp_path / "ckpt"
    killed = run(WITH_FAULTS, directory, "commit.check", "3", str(HF), SAVE_TOTAL_LIMIT="1")  # the save of 30
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert get_last_checkpoint(str(directory)) == str(directory / "checkpoint-30")  # partial: no commit marker
    assert last_checkpoint(directory) == str(directory / "checkpoint-20")
    resumed = run(HF, directory, SAVE_TOTAL_LIMIT="1")
    assert resumed.returncode == 0 and f"resuming from {directory}/checkpoint-20" in resumed.stdout, resumed.stderr
    assert result(directory) == references["hf"]
    assert sorted(p.name for p in directory.glob("checkpoint-*")) == ["checkpoint-60"]


def test_hf_a_checkpoint_request_is_answered_and_training_goes_on(tmp_path, references):
    annotations = tmp_path / "annotations"
    annotations.write_text('ckpt.dev/restart-reason="none"')
    directory = tmp_path / "ckpt"
    directory.mkdir()
    proc = subprocess.Popen([sys.executable, str(HF)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(directory, STEP_SECONDS="0.05", CKPT_ANNOTATIONS_FILE=str(annotations)))
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "step 13":
            annotations.write_text('ckpt.dev/checkpoint-requested="2099-01-01T00:00:00Z"')
    assert proc.wait(timeout=120) == 0
    assert result(directory) == references["hf"]
    assert message(directory)["checkpointRequested"] == "2099-01-01T00:00:00Z"


def _ddp(directory: Path, stop_rank_1_at: int | None = None) -> tuple[list[int], str]:
    """Two DDP ranks of the HF example on gloo, as the operator starts them (RANK, WORLD_SIZE, MASTER_*); SIGTERM to
    rank 1 alone once it prints `step N`. (exit codes, both ranks' output for a failure's message)."""
    port, procs, logs = rendezvous_port(), [], [Path(f"{directory}.out{rank}") for rank in range(2)]
    for rank in range(2):
        env = _env(directory, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", TRAIN_STEPS="40",
                   STEP_SECONDS="0.05", CKPT_TERMINATION_LOG=f"{directory}.msg{rank}")
        with logs[rank].open("w") as log:  # files, not pipes: nothing blocks on an unread pipe
            procs.append(subprocess.Popen([sys.executable, str(HF)], env=env, stdout=log, stderr=subprocess.STDOUT))

    def output() -> str:
        return "".join(f"\n--- rank {rank} ---\n{path.read_text()[-6000:]}" for rank, path in enumerate(logs))

    if stop_rank_1_at is not None:
        wait_for(f"rank 1 at step {stop_rank_1_at}", lambda: f"\nstep {stop_rank_1_at}\n" in logs[1].read_text()
                 or procs[1].poll() is not None, timeout=120, interval=0.01)
        procs[1].send_signal(signal.SIGTERM)  # rank 0 never gets one: the ranks agree
    try:
        return [proc.wait(timeout=180) for proc in procs], output()
    finally:
        for proc in procs:
            proc.kill()


def test_hf_ddp_ranks_agree_on_the_sigterm_step_and_resume_bitwise(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    codes, output = _ddp(directory, stop_rank_1_at=13)
    assert codes == [143, 143], output
    steps = [json.loads(Path(f"{directory}.msg{rank}").read_text())["step"] for rank in (0, 1)]
    assert steps[0] == steps[1] and steps[0] >= 13 and (directory / f"checkpoint-{steps[0]}" / "ckpt-commit.json"
                                                        ).exists(), output
    codes, output = _ddp(directory)
    assert codes == [0, 0], output
    reference = tmp_path / "reference"
    reference.mkdir()
    codes, output = _ddp(reference)
    assert codes == [0, 0], output
    assert result(directory) == result(reference)


# -- Lightning ---------------------------------------------------------------------------------------------------------
def test_lightning_sigterm_saves_exits_143_and_resumes_bitwise_skipping_a_damaged_newest(tmp_path, references):
    from ckpt_sdk.integrations.lightning import last_checkpoint

    directory = tmp_path / "ckpt"
    code, output = signal_at(LIGHTNING, directory, 23)
    assert code == 143, output
    said = message(directory)
    assert said["reason"] == "preempted" and said["step"] >= 23
    newest = directory / f"step-{said['step']}.ckpt"
    assert last_checkpoint(directory) == str(newest)
    assert not list(directory.glob("*.pt")) and (newest / "ckpt-commit.json").exists()  # the SDK's format: no pickle
    damaged = directory / "step-30.ckpt"  # a copy of the newest with one flipped byte, "newer" than it
    subprocess.run(["cp", "-a", str(newest), str(damaged)], check=True)
    data = bytearray((damaged / "tensors.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "tensors.safetensors").write_bytes(bytes(data))
    assert last_checkpoint(directory) == str(newest)
    resumed = run(LIGHTNING, directory)
    assert resumed.returncode == 0 and f"resuming from {newest}" in resumed.stdout, resumed.stdout + resumed.stderr
    assert result(directory) == references["lightning"]


# -- Accelerate --------------------------------------------------------------------------------------------------------
def test_accelerate_sigterm_saves_exits_143_and_resumes_bitwise(tmp_path, references):
    directory = tmp_path / "ckpt"
    code, output = signal_at(ACCELERATE, directory, 23)
    assert code == 143, output
    assert message(directory)["step"] == 23
    resumed = run(ACCELERATE, directory)
    assert resumed.returncode == 0 and "resumed 23" in resumed.stdout, resumed.stdout + resumed.stderr
    assert result(directory) == references["accelerate"]


# -- TensorBoard across attempts (issue #29) ---------------------------------------------------------------------------
def _summaries(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every `tag` summary in the event files under `log_dir`, file by file in order: what a
    reader that does not purge sees."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.util.tensor_util import make_ndarray

    from ckpt_sdk._monitoring import event_records

    found = []
    for path in sorted(log_dir.rglob("*tfevents*")):
        data = path.read_bytes()
        for start, end, _ in event_records(data):
            event = Event.FromString(data[start + 12:end - 4])
            found += [(event.step, float(value.simple_value if value.HasField("simple_value")
                                         else make_ndarray(value.tensor))) for value in event.summary.value
                      if value.tag == tag]
    return found


@pytest.mark.parametrize(("script", "extra", "tag", "log_dir"), [
    (HF, {"REPORT_TO": "tensorboard", "LOGGING_STEPS": "1"}, "train/loss", "tensorboard"),
    (LIGHTNING, {"TENSORBOARD": "1"}, "train/loss", "tensorboard/run"),
], ids=["hf", "lightning"])
def test_tensorboard_curves_continue_across_a_kill_each_step_once(tmp_path, script, extra, tag, log_dir):
    pytest.importorskip("tensorboard")
    reference = tmp_path / "reference"
    assert run(script, reference, **extra).returncode == 0
    expected = _summaries(reference / log_dir, tag)
    assert len(expected) >= STEPS - 1 and len({step for step, _ in expected}) == len(expected)
    code, output = signal_at(script, tmp_path / "ckpt", 15, signal.SIGKILL, **extra)  # last checkpoint: step 10
    assert code == -signal.SIGKILL, output
    killed = [step for step, _ in _summaries(tmp_path / "ckpt" / log_dir, tag)]
    assert max(killed) > 10, killed  # the killed attempt logged steps past its last checkpoint
    resumed = run(script, tmp_path / "ckpt", **extra)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _summaries(tmp_path / "ckpt" / log_dir, tag) == expected  # each step once, in order, the same values
