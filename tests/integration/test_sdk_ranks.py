"""Sharded checkpoints of several real rank processes: torch DDP on gloo, and ranks without torch.distributed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_sdk._store import Store
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


# -- issue #25: ranks meeting through files -------------------------------------------------------------------------
def _lines_until(proc: subprocess.Popen[str], text: str) -> list[str]:
    """Read a rank's output until the line `text`; the lines read."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == text:
            return lines
    raise AssertionError(f"the rank ended before printing {text!r}: {''.join(lines)[-2000:]}")


def test_file_ranks_agree_on_sigterm_while_one_waits_for_the_commit(tmp_path):
    """Defect 2: rank 1 (fast) waits for rank 0's commit of step 20 while rank 0 (slow) gets SIGTERM at step 15.
    Before, rank 0 waited for rank 1 to join the stop while rank 1 waited for the commit: both timed out, no
    preemption checkpoint. Now rank 1 joins from inside its wait, both agree on step 20 and exit 143 with it."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    reference = _finish(_start(tmp_path / "ref", tmp_path / "ref-out", "files", 40, "--slow-rank", "0",
                               "--slowdown", "4"))
    assert [code for code, _ in reference] == [0, 0], reference
    procs = _start(ckpt, out, "files", 40, "--every-steps", "10", "--slow-rank", "0", "--slowdown", "4",
                   "--step-seconds", "0.05")
    lines = _lines_until(procs[0], "step 15")
    assert (ckpt / "progress-rank1.log").read_text().splitlines()[-1] == "step 20"  # rank 1 is in its save of 20
    procs[0].send_signal(signal.SIGTERM)
    results = _finish(procs, timeout=60)
    results[0] = (results[0][0], "".join(lines) + results[0][1])
    assert [code for code, _ in results] == [143, 143], results
    assert _complete(ckpt) == [10, 20]
    resumed = _finish(_start(ckpt, out, "files", 40, "--slow-rank", "0", "--slowdown", "4"))
    assert [code for code, _ in resumed] == [0, 0], resumed
    for rank in range(WORLD):
        assert (tmp_path / f"out.rank{rank}").read_text() == (tmp_path / f"ref-out.rank{rank}").read_text()


def test_file_ranks_answer_a_checkpoint_request_together_and_train_on(tmp_path):
    """Defect 3: a checkpoint request (interruption notice) seen by one rank of ranks without torch.distributed
    was ignored. Now the ranks agree on a step, both save it, and nobody stops."""
    ckpt, out, annotations = tmp_path / "ckpt", tmp_path / "out", tmp_path / "annotations"
    reference = _finish(_start(tmp_path / "ref", tmp_path / "ref-out", "files", 40))
    assert [code for code, _ in reference] == [0, 0], reference
    annotations.write_text('ckpt.dev/restart-reason="none"')
    procs = _start(ckpt, out, "files", 40, "--every-steps", "1000", "--step-seconds", "0.05",
                   rank_env={1: {"CKPT_ANNOTATIONS_FILE": str(annotations)}})  # only rank 1's node got a notice
    lines = _lines_until(procs[1], "step 10")
    annotations.write_text('ckpt.dev/checkpoint-requested="2099-01-01T00:00:00Z"\nckpt.dev/restart-reason="none"')
    results = _finish(procs)
    results[1] = (results[1][0], "".join(lines) + results[1][1])
    assert [code for code, _ in results] == [0, 0], results
    requested = [step for step in _complete(ckpt) if 10 <= step < 40]
    assert len(requested) == 1, _complete(ckpt)  # answered once, by both ranks at the same step
    manifest = json.loads((ckpt / f"step-{requested[0]:012d}" / "MANIFEST.json").read_text())
    assert sorted(manifest["shards"]) == ["0", "1"]
    for rank in range(WORLD):
        assert (tmp_path / f"out.rank{rank}").read_text() == (tmp_path / f"ref-out.rank{rank}").read_text()


def test_a_dead_runs_shard_is_never_committed_by_a_later_run_of_the_same_attempt(tmp_path):
    """Defect 4: without CKPT_ATTEMPT (local runs, a Slurm requeue) every run had the same temp names: rank 0 of a
    new run found the shard marker a dead run's rank 1 had left and committed that stale shard."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    # the dead run: its rank 1 (fast) wrote its shard of step 5 and waits for rank 0 (slow), then both die
    dead = _start(ckpt, tmp_path / "dead-out", "files", 40, "--every-steps", "5", "--offset", "100",
                  "--slow-rank", "0", "--slowdown", "20")
    deadline = time.monotonic() + 60
    while not list(ckpt.glob(".tmp-*/rank-00001.done.json")):
        assert time.monotonic() < deadline and dead[1].poll() is None, "the dead run's rank 1 never wrote its shard"
        time.sleep(0.05)
    for proc in dead:
        proc.kill()
        proc.wait()
    assert not _complete(ckpt)
    results = _finish(_start(ckpt, out, "files", 5, "--every-steps", "5"))  # a new run, ending with its save of 5
    assert [code for code, _ in results] == [0, 0], results
    assert _complete(ckpt) == [5]
    resumed = _finish(_start(ckpt, out, "files", 20, "--every-steps", "5"))
    assert [code for code, _ in resumed] == [0, 0], resumed
    reference = _finish(_start(tmp_path / "ref", tmp_path / "ref-out", "files", 20, "--every-steps", "5"))
    assert [code for code, _ in reference] == [0, 0], reference
    for rank in range(WORLD):
        assert (tmp_path / f"out.rank{rank}").read_text() == (tmp_path / f"ref-out.rank{rank}").read_text()


def test_replicated_keys_match_whole_keys_only(tmp_path):
    """Defect 6: replicated=("model",) also matched the separate key "model/ema", so rank 1 resumed with rank 0's
    `model/ema`. Every rank gets its own back now."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    reference = _finish(_start(tmp_path / "ref", tmp_path / "ref-out", "files", 20, "--ema", "--every-steps", "5"))
    assert [code for code, _ in reference] == [0, 0], reference
    first = _finish(_start(ckpt, out, "files", 10, "--ema", "--every-steps", "5"))
    assert [code for code, _ in first] == [0, 0], first
    manifest = json.loads((ckpt / "step-000000000010" / "MANIFEST.json").read_text())
    assert manifest["replicated"] == ["model"]
    resumed = _finish(_start(ckpt, out, "files", 20, "--ema", "--every-steps", "5"))
    assert [code for code, _ in resumed] == [0, 0], resumed
    for rank in range(WORLD):
        assert (tmp_path / f"out.rank{rank}").read_text() == (tmp_path / f"ref-out.rank{rank}").read_text()


# -- issue #30: a sharded save reuses the files of the checkpoint pruning would delete --------------------------------
def test_a_sharded_save_overwrites_a_doomed_checkpoints_shards_and_a_kill_while_it_takes_them_loses_nothing(tmp_path):
    keep = {rank: {"CKPT_KEEP": "2"} for rank in range(WORLD)}
    reference = _finish(_start(tmp_path / "ref", tmp_path / "ref-out", "files", 30, "--every-steps", "5",
                               rank_env=keep))
    assert [code for code, _ in reference] == [0, 0], reference
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    # the save of step 15 reuses step 5 (keep=2): rank 1's 1st fault point there renames step 5 out of sight (if
    # rank 0 did not first), its 2nd moves its first file out of it; it is killed there, then its gang with it
    procs = _start(ckpt, out, "files", 30, "--every-steps", "5", "--kill-at", "1:recycle.rename:2", rank_env=keep)
    assert procs[1].wait(timeout=120) == -signal.SIGKILL
    procs[0].kill()
    _finish(procs)
    assert _complete(ckpt) == [10]  # step 5 was being reused, step 10 stands
    verify = subprocess.run([sys.executable, "-m", "ckpt_sdk", "verify", str(ckpt)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert list(ckpt.glob(".tmp-*reused*")), "nothing was reused"
    resumed = _finish(_start(ckpt, out, "files", 30, "--every-steps", "5", rank_env=keep))
    assert [code for code, _ in resumed] == [0, 0], resumed
    assert _complete(ckpt) == [25, 30]
    assert not list(ckpt.glob(".tmp-*")), sorted(path.name for path in ckpt.iterdir())
    for rank in range(WORLD):
        assert (tmp_path / f"out.rank{rank}").read_text() == (tmp_path / f"ref-out.rank{rank}").read_text()
