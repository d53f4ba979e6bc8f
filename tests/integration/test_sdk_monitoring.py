"""Monitoring across preemptions (issue #29): a run stopped by SIGTERM twice and SIGKILLed once between checkpoints,
its TensorBoard event files read back with TensorBoard's own reader and its JSON-lines log, shows every step once,
in order, with the values of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TRAINER = Path(__file__).parent / "trainers" / "monitored_trainer.py"
STEPS = 80


def _run(ckpt_dir: Path, stop_at: int | None = None, sig: int = signal.SIGTERM) -> tuple[int, str]:
    """The trainer until it ends, or until it printed `step stop_at` and `sig` ended it."""
    env = {**os.environ, "CKPT_DIR": str(ckpt_dir), "CKPT_TERMINATION_LOG": str(ckpt_dir.parent / "termination")}
    proc = subprocess.Popen([sys.executable, str(TRAINER), "--steps", str(STEPS)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_at is not None and line.strip() == f"step {stop_at}":
            proc.send_signal(sig)
            stop_at = None
    return proc.wait(timeout=120), "".join(lines)


def _scalars(log_dir: Path) -> list[tuple[int, float]]:
    reader = EventAccumulator(str(log_dir))
    reader.Reload()
    return [(event.step, event.value) for event in reader.Scalars("train/loss")]


def _raw_steps(log_dir: Path) -> list[int]:
    """The step of every summary in every event file, in file order (what a reader that does not purge sees)."""
    from tensorboard.compat.proto.event_pb2 import Event

    from ckpt_sdk._monitoring import event_records

    steps = []
    for path in sorted(log_dir.glob("*tfevents*")):
        data = path.read_bytes()
        events = [Event.FromString(data[start + 12:end - 4]) for start, end, _ in event_records(data)]
        steps += [event.step for event in events if event.summary.value]
    return steps


def test_a_run_preempted_twice_and_killed_once_logs_every_step_once_in_order(tmp_path):
    reference = tmp_path / "reference" / "ckpt"
    assert _run(reference)[0] == 0
    ckpt = tmp_path / "run" / "ckpt"
    code, out = _run(ckpt, 23)
    assert code == 143, out  # preempted: checkpoint of step 23, exit 143
    code, out = _run(ckpt, 47, signal.SIGKILL)  # saves every 10 steps from 23: 33, 43; steps 44..47 logged, lost
    assert code == -signal.SIGKILL and out.startswith("resumed 23 dropped 0 0"), out
    code, out = _run(ckpt, 61)
    assert code == 143 and out.startswith("resumed 43 dropped 4 4"), out  # the killed attempt's 44..47 dropped
    code, out = _run(ckpt)
    assert code == 0 and out.startswith("resumed 61 dropped 0 0"), out
    expected = _scalars(reference / "tensorboard")
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    assert _scalars(ckpt / "tensorboard") == expected  # each step once, in order, the uninterrupted run's values
    assert _raw_steps(ckpt / "tensorboard") == list(range(1, STEPS + 1))  # in the files themselves too
    assert len(list((ckpt / "tensorboard").glob("*tfevents*"))) == 4  # one file per attempt
    logged = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    unbroken = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, STEPS + 1))
    assert [entry["loss"] for entry in logged] == [entry["loss"] for entry in unbroken]
