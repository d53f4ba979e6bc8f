"""Rank detection and the sharded manifest's checks (the multi-process behaviour is in integration tests)."""

import json

import numpy as np
import pytest

from ckpt_sdk import CheckpointConfigError, Checkpointer, CorruptCheckpointError
from ckpt_sdk._manifest import read_manifest
from ckpt_sdk._ranks import Ranks
from ckpt_sdk._store import Fence, Store


def test_ranks_come_from_the_environment_without_torch_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Ranks.detect() == Ranks(0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert Ranks.detect() == Ranks(3, 4) and not Ranks.detect().coordinator
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(CheckpointConfigError, match="not within"):
        Ranks.detect()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(CheckpointConfigError, match="not integers"):
        Ranks.detect()


def test_a_time_based_save_cannot_be_agreed_on_without_torch_distributed(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    ckpt = Checkpointer(tmp_path, every_seconds=30, handle_sigterm=False)
    with pytest.raises(CheckpointConfigError, match="every_steps"):
        ckpt.maybe_save(1, {"w": np.ones(2)})


def test_replicated_must_name_keys(tmp_path):
    with pytest.raises(CheckpointConfigError, match="not one string"):
        Checkpointer(tmp_path, replicated="model", handle_sigterm=False)


def _sharded_manifest(path, shards):
    path.mkdir()
    files = {f"rank-0000{r}.state.json": {"size": 1, "crc32": "00000000"} for r in range(2)}
    (path / "MANIFEST.json").write_text(json.dumps({
        "format": "ckpt-sdk/2", "step": 5, "world_size": 2, "shards": shards, "files": files}))


def test_a_manifest_that_misses_a_shard_is_never_loaded(tmp_path):
    _sharded_manifest(tmp_path / "ok", {"0": ["rank-00000.state.json"], "1": ["rank-00001.state.json"]})
    assert read_manifest(tmp_path / "ok").world_size == 2
    _sharded_manifest(tmp_path / "missing", {"0": ["rank-00000.state.json"]})
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        read_manifest(tmp_path / "missing")
    _sharded_manifest(tmp_path / "unlisted", {"0": ["rank-00000.state.json"], "1": ["rank-00001.other"]})
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        read_manifest(tmp_path / "unlisted")


def test_another_ranks_shared_temp_is_never_cleaned_by_a_later_rank(tmp_path):
    me = Fence("uid", 1.0, 3)
    store = Store(tmp_path)
    temp = store.shared_temp(7, me, "run1", 1)
    store.clean_stale(me)  # rank 0 started after rank 1 made the temp, before the run is agreed: it stays
    assert temp.exists()
    store.clean_stale(me, "run1")  # this run's: it stays
    assert temp.exists()
    store.clean_stale(me, "run2")  # a later run of the same attempt (no CKPT_ATTEMPT: a local rerun) removes it
    assert not temp.exists()
    temp = store.shared_temp(7, me, "run2", 1)
    store.clean_stale(Fence("uid", 1.0, 4))  # the next attempt's rank 0 removes it
    assert not temp.exists()


def test_a_sharded_checkpoint_whose_rank_has_no_files_is_refused_not_resharded(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    ckpt = Checkpointer(tmp_path, handle_sigterm=False)
    ckpt.save(3, {"w": np.ones(2)})
    manifest = tmp_path / "step-000000000003" / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    data.update(format="ckpt-sdk/2", world_size=2, shards={"0": sorted(data["files"]), "1": []})
    manifest.write_text(json.dumps(data))
    state = {"w": np.zeros(2)}
    with pytest.raises(CorruptCheckpointError, match=r"no loadable checkpoint.*unexpected files"):
        Checkpointer(tmp_path, handle_sigterm=False).restore(state)
    assert not state["w"].any()


def test_distributed_false_saves_alone_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    ckpt = Checkpointer(tmp_path, distributed=False, every_seconds=30, handle_sigterm=False)
    ckpt.save(4, {"w": np.ones(2)})  # no other rank is waited for
    info = ckpt.latest()
    assert info is not None and info.step == 4 and info.world_size == 1
    assert Checkpointer(tmp_path, distributed=False, handle_sigterm=False).restore({"w": np.zeros(2)}) == 4
