"""Sharded checkpoints of several real rank processes: torch DDP on gloo, and ranks without torch.distributed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_sdk._storage import Store
from tests.ranks import finish as _finish
from tests.ranks import start_ranks as _start

WORLD = 2


def _signal_rank_at(procs: list[subprocess.Popen[str]], rank: int, step: int, sig: int) -> list[tuple[int, str]]:
    """Send `sig` to one rank when it prints `step N`; then wait for every rank."""
    target = procs[rank]
    assert target.stdout is not None
    lines = []
    for line in target.stdout:
        lines.append(line)
        if line.strip() == f"step {step}":
            target.send_signal(sig)
            break
    results = _finish(procs)
    code, rest = results[rank]
    results[rank] = (code, "".join(lines) + rest)
    return results


def _complete(directory: Path) -> list[int]:
    return [info.step for info in Store(directory).list()]


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("ddp-reference")
    results = _finish(_start(tmp / "ckpt", tmp / "out", "torch", 60))
    assert [code for code, _ in results] == [0, 0], results
    return (tmp / "out").read_text()


def test_ddp_sigterm_to_one_rank_both_save_the_same_step_and_resume_bitwise(tmp_path, torch_reference):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    results = _signal_rank_at(_start(ckpt, out, "torch", 60, "--every-steps", "1000"), 1, 23, signal.SIGTERM)
    assert [code for code, _ in results] == [143, 143], results  # rank 0 never got the signal: it agreed
    [stopped] = _complete(ckpt)  # one checkpoint, of the step both agreed on, with both shards
    assert stopped >= 23
    manifest = json.loads((ckpt / f"step-{stopped:012d}" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2 and sorted(manifest["shards"]) == ["0", "1"]
    assert manifest["replicated"] == ["model", "optimizer"]
    assert not any(name.startswith("rank-00001.model") for name in manifest["files"])
    message = [line for line in results[0][1].splitlines() if "exiting 143" in line]
    assert message, results[0][1]
    resumed = _finish(_start(ckpt, out, "torch", 60, "--every-steps", "1000"))
    assert [code for code, _ in resumed] == [0, 0], resumed
    starts = (ckpt / "progress.log").read_text().splitlines()
    assert sorted(starts[-2:]) == [f"rank 0 attempt 0 start {stopped}", f"rank 1 attempt 0 start {stopped}"]
    assert out.read_text() == torch_reference  # bitwise the weights of the uninterrupted run


def test_ddp_a_checkpoint_request_seen_by_one_rank_is_saved_by_all_and_training_goes_on(tmp_path, torch_reference):
    ckpt, out, annotations = tmp_path / "ckpt", tmp_path / "out", tmp_path / "annotations"
    annotations.write_text('ckpt.dev/restart-reason="none"')
    procs = _start(ckpt, out, "torch", 60, "--every-steps", "1000", "--step-seconds", "0.05",
                   rank_env={1: {"CKPT_ANNOTATIONS_FILE": str(annotations)}})  # only rank 1's node got a notice
    assert procs[1].stdout is not None
    lines = []
    for line in procs[1].stdout:
        lines.append(line)
        if line.strip() == "step 10":  # the operator annotates the pod: the kubelet rewrites the file
            annotations.write_text('ckpt.dev/checkpoint-requested="2099-01-01T00:00:00Z"\n'
                                   'ckpt.dev/restart-reason="none"')
            break
    results = _finish(procs)
    results[1] = (results[1][0], "".join(lines) + results[1][1])
    assert [code for code, _ in results] == [0, 0], results  # nobody stopped: a request is not a SIGTERM
    saved = _complete(ckpt)
    requested = [step for step in saved if 10 <= step < 60]
    assert len(requested) == 1, saved  # answered once, by both ranks at the same step
    manifest = json.loads((ckpt / f"step-{requested[0]:012d}" / "MANIFEST.json").read_text())
    assert sorted(manifest["shards"]) == ["0", "1"]
    assert "checkpoint requested before 2099-01-01T00:00:00Z" in results[0][1]  # rank 0 learnt it in the reduce
    assert out.read_text() == torch_reference


def test_ddp_rank_killed_in_the_middle_of_a_save_never_yields_a_visible_checkpoint(tmp_path):
    pytest.importorskip("torch")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    # rank 1 dies after the data of its second shard (step 20) is written, before its marker
    results = _finish(_start(ckpt, out, "torch", 60, "--kill-at", "1:shard.marker:2"))
    assert results[1][0] == -signal.SIGKILL, results
    assert results[0][0] != 0  # rank 0 learned it from the collective instead of hanging
    assert _complete(ckpt) == [10]
    assert not (ckpt / "step-000000000020").exists()
    verify = subprocess.run([sys.executable, "-m", "ckpt_sdk", "verify", str(ckpt)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_ranks_without_torch_distributed_agree_on_the_furthest_step(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    reference = _finish(_start(tmp_path / "ref", tmp_path / "ref-out", "files", 40))
    assert [code for code, _ in reference] == [0, 0], reference
    # the ranks run at different speeds; SIGTERM reaches rank 0 only (the faster one)
    results = _signal_rank_at(_start(ckpt, out, "files", 40, "--every-steps", "1000"), 0, 15, signal.SIGTERM)
    assert [code for code, _ in results] == [143, 143], results
    [stopped] = _complete(ckpt)
    assert stopped >= 15
    resumed = _finish(_start(ckpt, out, "files", 40, "--every-steps", "1000"))
    assert [code for code, _ in resumed] == [0, 0], resumed
    for rank in range(WORLD):
        expected = (tmp_path / f"ref-out.rank{rank}").read_text()
        assert (tmp_path / f"out.rank{rank}").read_text() == expected


def test_ls_shows_the_ranks_of_a_sharded_checkpoint(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    results = _finish(_start(ckpt, out, "files", 10, "--every-steps", "5"))
    assert [code for code, _ in results] == [0, 0], results
    listing = subprocess.run([sys.executable, "-m", "ckpt_sdk", "ls", str(ckpt)], capture_output=True, text=True)
    assert listing.returncode == 0
    rows = [line for line in listing.stdout.splitlines() if line.strip().startswith(("5 ", "10 "))]
    assert len(rows) == 2 and all(" 2 " in row for row in rows), listing.stdout
