import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ckpt_sdk import (
    CheckpointConfigError,
    Checkpointer,
    CorruptCheckpointError,
    FencedError,
    RNGState,
    UnsupportedStateError,
    maybe_resume,
)
from ckpt_sdk._store import Store, verify


def _dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("step-"))


def test_roundtrip_plain_data_and_arrays_in_place(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1)
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"w": weights, "meta": {"epoch": 3, "name": "x", "ids": (1, 2), 7: None, "blob": b"\x00\xff"},
             "scalar": np.float64(2.5), "half": np.ones(3, dtype=np.float16), "empty": np.zeros((0, 2))}
    ckpt.save(5, state)
    target_w = np.zeros((3, 4), dtype=np.float32)
    restored = {"w": target_w, "meta": {"epoch": 0}, "untouched": 1}
    assert maybe_resume(restored, ckpt) == 5
    assert restored["w"] is target_w and np.array_equal(target_w, weights)
    assert restored["meta"] == {"epoch": 3, "name": "x", "ids": (1, 2), 7: None, "blob": b"\x00\xff"}
    assert restored["scalar"] == 2.5 and isinstance(restored["scalar"], np.float64)
    assert restored["half"].dtype == np.float16 and restored["empty"].shape == (0, 2)
    assert restored["untouched"] == 1


def test_no_checkpoint_returns_zero(tmp_path):
    state = {"a": 1}
    assert maybe_resume(state, Checkpointer(tmp_path / "none")) == 0
    assert state == {"a": 1}


def test_unsupported_values_are_refused_with_the_path(tmp_path):
    with pytest.raises(UnsupportedStateError, match=r"state/extra/fn"):
        Checkpointer(tmp_path).save(1, {"extra": {"fn": object()}})
    assert not _dirs(tmp_path)


@pytest.mark.parametrize("damage", ["flip_tensor_byte", "truncate_tensors", "drop_manifest", "garbage_manifest",
                                    "flip_state_json", "missing_file", "bad_header"])
def test_damaged_newest_checkpoint_falls_back_to_older(tmp_path, damage, caplog):
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=5)
    for step in (1, 2):
        ckpt.save(step, {"w": np.full(1000, float(step))})
    newest = tmp_path / "step-000000000002"
    tensors = newest / "tensors.safetensors"
    if damage == "flip_tensor_byte":
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0x01
        tensors.write_bytes(bytes(data))
    elif damage == "truncate_tensors":
        os.truncate(tensors, tensors.stat().st_size - 100)
    elif damage == "drop_manifest":
        (newest / "MANIFEST.json").unlink()
    elif damage == "garbage_manifest":
        (newest / "MANIFEST.json").write_text("{not json")
    elif damage == "flip_state_json":
        (newest / "state.json").write_text((newest / "state.json").read_text().replace("w", "v"))
    elif damage == "missing_file":
        tensors.unlink()
    elif damage == "bad_header":
        data = bytearray(tensors.read_bytes())
        data[0:8] = (10**12).to_bytes(8, "little")
        tensors.write_bytes(bytes(data))
    state = {"w": np.zeros(1000)}
    with caplog.at_level(logging.WARNING, logger="ckpt_sdk"):
        assert maybe_resume(state, Checkpointer(tmp_path)) == 1
    assert np.all(state["w"] == 1.0)
    assert "step-000000000002" in caplog.text


def test_unmanifested_temp_dirs_are_invisible_and_cleaned(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1)
    ckpt.save(1, {"a": 1})
    stale = tmp_path / ".tmp-a0-step-000000000009-dead"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    half = tmp_path / "step-000000000010"  # a final-looking name without a manifest
    half.mkdir()
    state: dict = {}
    assert maybe_resume(state, Checkpointer(tmp_path)) == 1
    Checkpointer(tmp_path).save(2, {"a": 2})
    assert not stale.exists()


def test_keep_last_n_prunes_only_after_commit(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=2)
    for step in range(1, 6):
        ckpt.maybe_save(step, {"s": step})
    assert _dirs(tmp_path) == ["step-000000000004", "step-000000000005"]


def test_failed_save_keeps_older_checkpoints(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=1)
    ckpt.save(1, {"s": 1})
    with pytest.raises(UnsupportedStateError):
        ckpt.save(2, {"s": object()})
    assert _dirs(tmp_path) == ["step-000000000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(("mode", "best"), [("min", 2), ("max", 4)])
def test_keep_best_by_metric(tmp_path, mode, best):
    ckpt = Checkpointer(tmp_path, keep=1, keep_best=1, metric="val_loss", mode=mode)
    for step, loss in [(1, 5.0), (2, 1.0), (3, 3.0), (4, 9.0), (5, 4.0)]:
        ckpt.save(step, {"s": step}, metrics={"val_loss": loss})
    assert _dirs(tmp_path) == sorted({f"step-{best:012d}", "step-000000000005"})


@pytest.mark.parametrize("kwargs", [{"keep": 0}, {"every_steps": 0}, {"every_seconds": -1}, {"after": -1},
                                    {"mode": "avg"}, {"keep_best": 1}])
def test_invalid_options_fail_at_construction(tmp_path, kwargs):
    with pytest.raises(CheckpointConfigError):
        Checkpointer(tmp_path, **kwargs)


def test_invalid_environment_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_KEEP", "many")
    with pytest.raises(CheckpointConfigError, match="CKPT_KEEP"):
        Checkpointer(tmp_path)


def test_environment_configures_directory_keep_and_interval(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("CKPT_KEEP", "1")
    monkeypatch.setenv("CKPT_INTERVAL_SECONDS", "0.001")
    ckpt = Checkpointer()
    assert ckpt.directory == tmp_path / "env" and ckpt.keep == 1
    assert ckpt.policy.interval_seconds() == 0.001


def test_fencing_refuses_an_older_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_ATTEMPT", "1")
    old = Checkpointer(tmp_path, every_steps=1)
    old.save(10, {"s": 10})
    monkeypatch.setenv("CKPT_ATTEMPT", "2")
    new = Checkpointer(tmp_path, every_steps=1)
    new.save(11, {"s": 11})
    with pytest.raises(FencedError):
        old.save(12, {"s": 12})
    assert _dirs(tmp_path) == ["step-000000000010", "step-000000000011"]
    assert json.loads((tmp_path / ".fence").read_text())["attempt"] == 2
    state: dict = {}
    assert maybe_resume(state, new) == 11


def test_relocated_directory_still_loads(tmp_path):
    Checkpointer(tmp_path / "a", every_steps=1).save(3, {"w": np.arange(5.0)})
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    shutil.rmtree(tmp_path / "a")
    state = {"w": np.zeros(5)}
    assert maybe_resume(state, Checkpointer(tmp_path / "elsewhere" / "b")) == 3
    assert list(state["w"]) == [0, 1, 2, 3, 4]


def test_warm_start_from_resume_from(tmp_path, monkeypatch):
    Checkpointer(tmp_path / "other", every_steps=1).save(400, {"w": np.ones(3)})
    monkeypatch.setenv("CKPT_RESUME_FROM", str(tmp_path / "other"))
    state = {"w": np.zeros(3)}
    ckpt = Checkpointer(tmp_path / "mine")
    assert maybe_resume(state, ckpt) == 400
    assert list(state["w"]) == [1, 1, 1]
    ckpt.save(401, state)  # writes go to its own directory, never to the source
    assert _dirs(tmp_path / "other") == ["step-000000000400"]


def test_rng_state_makes_random_streams_resume_exactly(tmp_path):
    import random

    random.seed(1)
    np.random.seed(2)
    gen = np.random.default_rng(3)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"rng": RNGState(gen)})
    expected = (random.random(), np.random.rand(), gen.random())
    random.seed(99)
    np.random.seed(99)
    gen2 = np.random.default_rng(99)
    maybe_resume({"rng": RNGState(gen2)}, ckpt)
    assert (random.random(), np.random.rand(), gen2.random()) == expected


def test_async_save_snapshots_before_returning(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=True)
    w = np.ones(100_000)
    assert ckpt.save(1, {"w": w}) is None
    w[:] = 7  # training goes on while the save is in flight
    ckpt.wait()
    state = {"w": np.zeros(100_000)}
    assert maybe_resume(state, Checkpointer(tmp_path)) == 1
    assert np.all(state["w"] == 1)


def test_termination_message_names_the_last_durable_step(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("CKPT_TERMINATION_LOG", str(log))
    ckpt = Checkpointer(tmp_path / "c", every_steps=1)
    ckpt.save(7, {"a": 1})
    assert json.loads(log.read_text())["step"] == 7
    ckpt.close()
    message = json.loads(log.read_text())
    assert message["step"] == 7 and message["reason"] == "exit"


def test_verify_detects_corruption(tmp_path):
    Checkpointer(tmp_path).save(1, {"w": np.ones(10)})
    (info,) = Store(tmp_path).list()
    verify(info)
    with open(info.path / "tensors.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x55")
    with pytest.raises(CorruptCheckpointError):
        verify(info)


def test_tensor_file_is_readable_by_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is a dev extra")
    Checkpointer(tmp_path).save(1, {"a": np.arange(3, dtype=np.int8), "b": np.ones((2, 2), dtype=np.float64)})
    loaded = safetensors_numpy.load_file(str(tmp_path / "step-000000000001" / "tensors.safetensors"))
    assert loaded["a"].tolist() == [0, 1, 2] and loaded["b"].shape == (2, 2)


def test_warm_start_from_one_step_directory(tmp_path, monkeypatch):
    source = Checkpointer(tmp_path / "other", every_steps=1, keep=5)
    for step in (10, 20):
        source.save(step, {"w": np.full(2, float(step))})
    monkeypatch.setenv("CKPT_RESUME_FROM", str(tmp_path / "other" / "step-000000000010"))
    state = {"w": np.zeros(2)}
    assert maybe_resume(state, Checkpointer(tmp_path / "mine")) == 10
    assert list(state["w"]) == [10.0, 10.0]


def test_a_checkpoint_pruning_would_delete_is_recycled_in_place(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2):
        ckpt.save(step, {"w": np.full(1000, float(step))})
    inode = (tmp_path / "step-000000000001" / "tensors.safetensors").stat().st_ino
    ckpt.save(3, {"w": np.full(10, 3.0)})  # smaller: the reused file is truncated to the new size
    assert _dirs(tmp_path) == ["step-000000000002", "step-000000000003"]
    assert (tmp_path / "step-000000000003" / "tensors.safetensors").stat().st_ino == inode
    state = {"w": np.zeros(10)}
    assert maybe_resume(state, Checkpointer(tmp_path)) == 3 and list(state["w"]) == [3.0] * 10
    verify(Store(tmp_path).list()[-1])


def test_recycling_never_touches_the_newest_or_best_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, keep_best=1, metric="loss")
    for step, loss in ((1, 0.1), (2, 5.0), (3, 6.0)):
        ckpt.save(step, {"s": step}, metrics={"loss": loss})
    assert _dirs(tmp_path) == ["step-000000000001", "step-000000000002", "step-000000000003"]
    with pytest.raises(UnsupportedStateError):  # a failed save: the best and the newest survive it
        ckpt.save(4, {"s": object()}, metrics={"loss": 9.0})
    assert {"step-000000000001", "step-000000000003"} <= set(_dirs(tmp_path))
    single = Checkpointer(tmp_path / "one", keep=1)
    single.save(1, {"s": 1})
    # keep=1: the only checkpoint is never reused before the new one is durable
    assert single._recyclable(single.checkpoints(), 2) is None


def test_a_header_claiming_terabytes_is_refused_before_any_allocation(tmp_path, caplog):
    """A damaged tensor header (here: one tensor claiming 4 TB, offsets consistent, file size unchanged) is a
    damaged checkpoint, skipped for the previous one; it never makes the loader allocate what it claims."""
    import json
    import struct

    ckpt = Checkpointer(tmp_path, every_steps=1, keep=5)
    ckpt.save(1, {"w": np.arange(4.0)})
    ckpt.save(2, {"w": np.arange(4.0) + 1})
    path = tmp_path / "step-000000000002" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__")  # (room for the bigger numbers in the same bytes)
    name = next(iter(header))
    header[name].update(shape=[1 << 40], data_offsets=[0, 8 << 40])
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    data[8 : 8 + length] = text + b" " * (length - len(text))
    path.write_bytes(bytes(data))
    state = {"w": np.zeros(4)}
    assert maybe_resume(state, Checkpointer(tmp_path)) == 1  # the older, intact checkpoint
    assert np.array_equal(state["w"], np.arange(4.0))
    assert "data size does not match its header" in caplog.text
