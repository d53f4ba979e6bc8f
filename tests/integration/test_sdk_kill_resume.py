"""Real training subprocesses killed at random steps (SIGTERM and SIGKILL) and resumed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"
STEPS, EVERY = 120, 10


def _frameworks() -> list[str]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return ["numpy"]
    return ["numpy", "torch"]


def _start(ckpt_dir: Path, out: Path, framework: str, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(TRAINER), "--dir", str(ckpt_dir), "--steps", str(STEPS), "--every-steps", str(EVERY),
           "--framework", framework, "--out", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run_to_end(ckpt_dir: Path, out: Path, framework: str, *extra: str) -> tuple[int, str]:
    proc = _start(ckpt_dir, out, framework, *extra)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout + stderr


def _kill_at(proc: subprocess.Popen[str], step: int, sig: int) -> int:
    """Read progress lines until `step` is reached, send `sig`, return the last step printed before exit."""
    assert proc.stdout is not None
    last = 0
    for line in proc.stdout:
        if line.startswith("step "):
            last = int(line.split()[1])
            if last == step:
                proc.send_signal(sig)
    proc.wait(timeout=120)
    return last


@pytest.fixture(scope="module", params=_frameworks())
def reference(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"ref-{request.param}")
    code, output = _run_to_end(tmp / "ckpt", tmp / "out", request.param)
    assert code == 0, output
    return request.param, (tmp / "out").read_text()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigterm_at_random_steps_resumes_bitwise_identically(reference, tmp_path, async_save):
    framework, expected = reference
    rng = random.Random(f"{framework}-{async_save}")
    extra = ["--async-save"] if async_save else []
    kills = sorted(rng.sample(range(3, STEPS - 5), 3))
    for kill_step in kills:
        proc = _start(tmp_path / "ckpt", tmp_path / "out", framework, *extra)
        _kill_at(proc, kill_step, signal.SIGTERM)
        assert proc.returncode == 143, proc.stderr.read() if proc.stderr else ""
    code, output = _run_to_end(tmp_path / "ckpt", tmp_path / "out", framework, *extra)
    assert code == 0, output
    assert (tmp_path / "out").read_text() == expected


def test_sigkill_redoes_at_most_one_interval_and_ends_identically(reference, tmp_path):
    framework, expected = reference
    rng = random.Random(f"kill-{framework}")
    for kill_step in sorted(rng.sample(range(3, STEPS - 5), 3)):
        proc = _start(tmp_path / "ckpt", tmp_path / "out", framework)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        resumed = int(first.split()[1])
        last = _kill_at(proc, max(kill_step, resumed + 1), signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL
        after = _start(tmp_path / "ckpt", tmp_path / "probe", framework)
        assert after.stdout is not None
        resumed_at = int(after.stdout.readline().split()[1])
        after.kill()
        after.wait()
        assert last - resumed_at <= EVERY, f"killed after step {last}, resumed at {resumed_at}"
    code, output = _run_to_end(tmp_path / "ckpt", tmp_path / "out", framework)
    assert code == 0, output
    assert (tmp_path / "out").read_text() == expected
