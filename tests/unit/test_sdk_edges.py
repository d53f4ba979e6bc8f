"""Issue #25's SDK edge-path defects (each of these tests failed on the SDK before it), and the pure pieces the
redesign split out: the decision, retention, the contract, the rounds of ranks meeting through files."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ckpt_sdk import Checkpointer, maybe_resume
from ckpt_sdk._coordinate import Agreement, FileCoordinator, Signals
from ckpt_sdk._decide import Action, decide
from ckpt_sdk._ranks import Ranks
from ckpt_sdk._retention import Retention
from ckpt_sdk._store import Store
from ckpt_sdk.contract import ExitReason

TENSORS = "tensors.safetensors"


def _steps(path: Path) -> list[int]:
    return [c.step for c in Store(path).list()]


def _save(directory: Path, steps: tuple[int, ...], keep: int = 2) -> Checkpointer:
    ckpt = Checkpointer(directory, keep=keep, handle_sigterm=False)
    for step in steps:
        ckpt.save(step, {"w": np.full(1000, float(step))})
    return ckpt


# 1 -- links are never written through, recycled or pruned ---------------------------------------------------------
def test_a_step_directory_linked_to_an_archive_is_never_overwritten_or_pruned(tmp_path, caplog):
    work, archive = tmp_path / "ckpt", tmp_path / "archive"
    ckpt = _save(work, (1, 2))
    archive.mkdir()
    (work / "step-000000000001").rename(archive / "step-000000000001")  # archived, then linked back in
    (work / "step-000000000001").symlink_to(archive / "step-000000000001")
    before = (archive / "step-000000000001" / TENSORS).read_bytes()
    with caplog.at_level(logging.WARNING, logger="ckpt_sdk"):
        ckpt.save(3, {"w": np.full(1000, 3.0)})  # keep=2: step 1 would be recycled, then pruned
        ckpt.save(4, {"w": np.full(1000, 4.0)})
    ckpt.store.wait_pruned()
    assert (archive / "step-000000000001" / TENSORS).read_bytes() == before
    assert (work / "step-000000000001").is_symlink() and 1 in _steps(work)
    assert "not pruning step-000000000001" in caplog.text
    state = {"w": np.zeros(1000)}
    assert maybe_resume(state, Checkpointer(work, handle_sigterm=False)) == 4 and state["w"][0] == 4.0


def test_a_data_file_linked_elsewhere_is_never_written_through(tmp_path):
    work, outside = tmp_path / "ckpt", tmp_path / "backup.safetensors"
    ckpt = _save(work, (1, 2))
    data = work / "step-000000000001" / TENSORS
    data.rename(outside)
    data.symlink_to(outside)  # what `cp -as` leaves: every file a link to the original
    before = outside.read_bytes()
    ckpt.save(3, {"w": np.full(1000, 3.0)})
    ckpt.save(4, {"w": np.full(1000, 4.0)})
    ckpt.store.wait_pruned()
    assert outside.read_bytes() == before
    assert _steps(work)[-2:] == [3, 4]


# 5 -- every header problem is a CorruptCheckpointError -------------------------------------------------------------
def test_a_zero_size_tensor_with_an_absurd_dimension_falls_back_to_the_older_checkpoint(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    ckpt = Checkpointer(tmp_path, keep=3, handle_sigterm=False)
    for step in (1, 2):
        ckpt.save(step, {"empty": torch.zeros(0, 4, 8), "w": torch.full((3,), float(step))})
    path = tmp_path / "step-000000000002" / TENSORS
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["empty"]["shape"] = [0, 2**62, 8]  # still zero bytes: the data offsets stay right
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + length :])
    manifest = path.parent / "MANIFEST.json"  # the size agrees (only the checksum, read last, would not)
    data = json.loads(manifest.read_text())
    data["files"][TENSORS]["size"] = path.stat().st_size
    manifest.write_text(json.dumps(data))
    state = {"empty": torch.zeros(0, 4, 8), "w": torch.zeros(3)}
    with caplog.at_level(logging.WARNING, logger="ckpt_sdk"):
        assert maybe_resume(state, Checkpointer(tmp_path, handle_sigterm=False)) == 1
    assert state["w"].tolist() == [1.0, 1.0, 1.0]
    assert "step-000000000002 is unusable" in caplog.text and "bad header entry 'empty'" in caplog.text


# 7 -- a superseded `.prev` copy is not an incomplete checkpoint ------------------------------------------------------
def test_verify_calls_a_directory_with_a_leftover_prev_copy_healthy(tmp_path):
    _save(tmp_path, (5,))
    subprocess.run(["cp", "-a", str(tmp_path / "step-000000000005"), str(tmp_path / "step-000000000005.prev")],
                   check=True)  # a re-save of step 5 killed after its commit, before removing the old copy
    out = subprocess.run([sys.executable, "-m", "ckpt_sdk", "verify", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "INCOMPLETE" not in out.stdout and "superseded copy" in out.stdout


# 8 -- an invalid name in a manifest is damage, not a ValueError ------------------------------------------------------
def test_a_nul_byte_in_a_manifest_marks_that_checkpoint_damaged_and_nothing_else(tmp_path):
    ckpt = _save(tmp_path, (1, 2), keep=5)
    manifest = tmp_path / "step-000000000001" / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    data["files"]["state\u0000.json"] = data["files"].pop("state.json")
    manifest.write_text(json.dumps(data))
    ckpt.save(3, {"w": np.full(1000, 3.0)})  # raised ValueError: embedded null byte
    assert _steps(tmp_path) == [2, 3]
    out = subprocess.run([sys.executable, "-m", "ckpt_sdk", "verify", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "step-000000000001" in out.stdout and "DAMAGED" in out.stdout


# -- the decision ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("signals", "last", "action", "reason"), [
    (Signals(), None, Action.NOTHING, None),
    (Signals(due=True), 3, Action.SAVE, None),
    (Signals(due=True, request=100.0), 3, Action.ANSWER_REQUEST, None),
    (Signals(stop=True, due=True, request=100.0), 3, Action.SAVE_AND_EXIT, ExitReason.PREEMPTED),
    (Signals(deadline=True), 3, Action.SAVE_AND_EXIT, ExitReason.DEADLINE),
    (Signals(stop=True, covered=True), 3, Action.EXIT, ExitReason.PREEMPTED),
    (Signals(stop=True, covered=True), None, Action.SAVE_AND_EXIT, ExitReason.PREEMPTED),  # nothing durable yet
])
def test_decide(signals, last, action, reason):
    decision = decide(Agreement(signals, 7), last)
    assert (decision.action, decision.reason) == (action, reason)


def test_an_incomplete_stop_agreement_exits_on_the_last_durable_checkpoint():
    assert decide(Agreement(Signals(stop=True), 7, complete=False), 3).action is Action.EXIT


# -- retention -------------------------------------------------------------------------------------------------------
def test_retention_keeps_the_newest_and_the_best_and_never_counts_damage(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=10, handle_sigterm=False)
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.9), (4, 0.8), (5, 0.7)):
        ckpt.save(step, {"w": np.ones(2)}, metrics={"loss": loss})
    found = Store(tmp_path).list()
    policy = Retention(keep=2, keep_best=1, metric="loss")
    assert policy.retained(found, 5) == {4, 5, 2}
    assert [c.step for c in policy.doomed(found, 5)] == [1, 3]
    assert [c.step for c in policy.doomed(found, 5, bad={4})] == [1]  # damaged: not kept, not deleted, not counted
    assert policy.retained(found, 5, bad={4}) == {3, 5, 2}
    assert policy.recyclable(found, 6, good={2}, bad=()).step == 1
    assert policy.recyclable(found, 6, good=(), bad=()) is None  # nothing else known good: never reuse


# -- ranks meeting through files: rounds -----------------------------------------------------------------------------
def _rank(tmp_path: Path, rank: int) -> FileCoordinator:
    coordinator = FileCoordinator(Ranks(rank, 2), tmp_path, "a0-test", lambda step: Signals(), lambda s: 5.0,
                                  lambda: False, lambda: 5.0)
    coordinator._run = "run1"  # as if the rendezvous had happened
    return coordinator


def _in_thread(work):  # type: ignore[no-untyped-def]
    """Run `work` on a thread; a callable that returns its result (or raises its error)."""
    result: list = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def get():  # type: ignore[no-untyped-def]
        thread.join(30)
        assert result, "the thread did not finish"
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]
    return get


def _wait_for(condition) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_round_agrees_on_the_furthest_step_and_ranks_behind_train_on_to_it(tmp_path):
    behind, ahead = _rank(tmp_path, 1), _rank(tmp_path, 0)
    assert ahead.agree(15, Signals()) == Agreement(Signals(), 15)  # no round: nothing to agree on
    stopped = _in_thread(lambda: behind.agree(12, Signals(stop=True)))  # SIGTERM on rank 1 at step 12
    _wait_for((tmp_path / ".agree-a0-test-rrun1-0").exists)
    assert ahead.agree(15, Signals(due=True)) == Agreement(Signals(stop=True, due=True), 15)  # rank 0 stops here
    assert stopped() == Agreement(Signals(), 12)  # rank 1 trains on ...
    assert behind.agree(13, Signals(stop=True)) == Agreement(Signals(), 13)  # (its SIGTERM is on its way already)
    assert behind.agree(15, Signals(stop=True)).signals.stop  # ... to step 15, where it stops too


def test_a_rank_waiting_in_a_save_joins_a_round_from_inside_the_wait(tmp_path):
    waiting, stopping = _rank(tmp_path, 1), _rank(tmp_path, 0)
    waiting._step = 20  # in its save of step 20, waiting for rank 0's commit
    round_of_rank0 = _in_thread(lambda: stopping.agree(15, Signals(stop=True)))
    _wait_for((tmp_path / ".agree-a0-test-rrun1-0").exists)
    waiting.join_started_round()  # what its wait does between two polls
    assert round_of_rank0() == Agreement(Signals(), 15)  # rank 0 trains on to step 20
    assert stopping.agree(20, Signals(due=True)).signals.stop
    assert waiting.agree(20, Signals()).signals.stop


def test_a_rank_that_never_joins_leaves_an_incomplete_stop(tmp_path):
    alone = FileCoordinator(Ranks(0, 2), tmp_path, "a0-test", lambda step: Signals(), lambda s: 0.3,
                            lambda: False, lambda: 5.0)
    alone._run = "run1"
    agreement = alone.agree(7, Signals(stop=True))
    assert agreement.signals.stop and not agreement.complete
    assert decide(agreement, 5).action is Action.EXIT  # exit 143 on step 5: no sharded checkpoint can be complete


def test_the_ranks_agree_on_a_run_no_earlier_run_used(tmp_path):
    first = [_in_thread(lambda r=r: FileCoordinator(Ranks(r, 2), tmp_path, "a0-test", lambda step: Signals(),
                                                     lambda s: 5.0, lambda: False, lambda: 5.0).run_id())
             for r in (0, 1)]
    run1 = {get() for get in first}
    second = [_in_thread(lambda r=r: FileCoordinator(Ranks(r, 2), tmp_path, "a0-test", lambda step: Signals(),
                                                      lambda s: 5.0, lambda: False, lambda: 5.0).run_id())
              for r in (1, 0)]  # the same attempt again (no CKPT_ATTEMPT): rank 1 first, with rank 0's old files
    run2 = {get() for get in second}
    assert len(run1) == 1 and len(run2) == 1 and run1 != run2


def test_a_sigterm_while_the_ranks_agree_on_the_run_gives_up_the_wait(tmp_path):
    from ckpt_sdk._coordinate import Interrupted

    lonely = FileCoordinator(Ranks(1, 2), tmp_path, "a0-test", lambda step: Signals(), lambda s: 5.0,
                             lambda: True, lambda: 5.0)
    with pytest.raises(Interrupted):
        lonely.run_id()
