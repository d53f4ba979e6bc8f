"""Resharding on load: an FSDP2 checkpoint saved by 4 real rank processes (gloo, CPU) loaded by 2 and by 3 (and
one saved by 2 loaded by 3), compared with the saved full tensors; damaged or missing slices refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ranks import rendezvous_port

np = pytest.importorskip("numpy")
pytest.importorskip("torch")
TRAINER = Path(__file__).parent / "trainers" / "fsdp_trainer.py"


def run(world: int, mode: str, ckpt: Path, out: Path, *extra: str) -> list[tuple[int, str]]:
    """Every rank of one local FSDP2 run; (exit code, output) of each."""
    port = rendezvous_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_", "MASTER_", "RANK", "WORLD_"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, str(TRAINER), "--dir", str(ckpt), "--out", str(out),
                                       "--mode", mode, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env))
    return [(proc.wait(timeout=180), proc.stdout.read() if proc.stdout else "") for proc in procs]


def arrays(path: Path) -> dict[str, object]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def saved4(tmp_path_factory):
    """A 4-rank FSDP2 checkpoint after 3 AdamW steps (with a block checksum every 4 KiB, so that loads read the
    slices they need only), and the full tensors it holds."""
    tmp = tmp_path_factory.mktemp("fsdp4")
    results = run(4, "save", tmp / "ckpt", tmp / "saved.npz", "--small-blocks")
    assert [code for code, _ in results] == [0] * 4, results
    [step] = (tmp / "ckpt").glob("step-*")
    files = json.loads((step / "MANIFEST.json").read_text())["files"]
    assert len(files["rank-00001.tensors.safetensors"]["blocks"]) > 1  # loads read slices block by block
    return tmp / "ckpt", arrays(tmp / "saved.npz")


def _assert_equal(loaded: dict[str, object], saved: dict[str, object]) -> None:
    assert sorted(loaded) == sorted(saved)
    assert any(name.startswith("optim|") and name.endswith("exp_avg_sq") for name in saved)  # optimizer state too
    for name, value in saved.items():
        assert np.array_equal(loaded[name], value), name


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_4_rank_fsdp2_checkpoint_loads_on_fewer_ranks_with_every_tensor_equal(saved4, tmp_path, world):
    ckpt, saved = saved4
    results = run(world, "load", ckpt, tmp_path / "loaded.npz")
    assert [code for code, _ in results] == [0] * world, results
    assert f"resumed step 3 saved by 4 ranks onto {world}" in results[0][1]
    _assert_equal(arrays(tmp_path / "loaded.npz"), saved)
    for rank in range(world):  # ranks that existed draw what they would have drawn after the save
        assert np.array_equal(np.load(tmp_path / f"loaded.npz.rng{rank}.npy"),
                              np.load(ckpt.parent / f"saved.npz.rng{rank}.npy")), rank


def test_a_2_rank_checkpoint_grows_to_3_ranks_and_the_new_rank_is_seeded_from_step_and_rank(tmp_path):
    results = run(2, "save", tmp_path / "ckpt", tmp_path / "saved.npz")
    assert [code for code, _ in results] == [0] * 2, results
    again = []
    for attempt in range(2):
        results = run(3, "load", tmp_path / "ckpt", tmp_path / f"loaded{attempt}.npz")
        assert [code for code, _ in results] == [0] * 3, results
        assert "rank 2 did not exist when step 3 was saved" in results[2][1]
        again.append(np.load(tmp_path / f"loaded{attempt}.npz.rng2.npy"))
    _assert_equal(arrays(tmp_path / "loaded0.npz"), arrays(tmp_path / "saved.npz"))
    assert np.array_equal(again[0], again[1])  # deterministic
    assert not np.array_equal(again[0], np.load(tmp_path / "saved.npz.rng0.npy"))  # not a copy of rank 0's


def test_a_value_that_differs_between_ranks_is_an_error_naming_it(tmp_path):
    results = run(2, "save", tmp_path / "ckpt", tmp_path / "saved.npz", "--per-rank")
    assert [code for code, _ in results] == [0] * 2, results
    results = run(3, "load", tmp_path / "ckpt", tmp_path / "loaded.npz", "--per-rank")
    assert all(code != 0 for code, _ in results), results
    assert all("state/local/rank differs between rank 0 and rank 1" in output for _, output in results), results


def _damage(ckpt: Path, how: str) -> None:
    [step] = [path for path in ckpt.iterdir() if path.name.startswith("step-")]
    victim = step / "rank-00002.tensors.safetensors"
    if how == "missing":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[-3] ^= 0xFF  # a bit flip inside the last slice's data
        victim.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "flipped"])
def test_a_damaged_or_missing_slice_is_refused_on_every_rank_and_nothing_is_loaded(tmp_path, how):
    results = run(4, "save", tmp_path / "ckpt", tmp_path / "saved.npz", "--small-blocks")
    assert [code for code, _ in results] == [0] * 4, results
    _damage(tmp_path / "ckpt", how)
    results = run(3, "load", tmp_path / "ckpt", tmp_path / "loaded.npz")
    assert all(code != 0 for code, _ in results), results
    assert all("no loadable checkpoint" in output for _, output in results), results
    assert any("rank-00002.tensors.safetensors" in output for _, output in results), results
    assert not (tmp_path / "loaded.npz").exists()


@pytest.mark.parametrize("world", [2, 3])
def test_dcp_load_reads_our_checkpoint_through_the_storage_reader_on_another_world_size(saved4, tmp_path, world):
    ckpt, saved = saved4
    results = run(world, "dcp", ckpt, tmp_path / "dcp.npz")
    assert [code for code, _ in results] == [0] * world, results
    loaded = {name: value for name, value in arrays(tmp_path / "dcp.npz").items() if name != "step"}
    model = {name: value for name, value in saved.items() if name.startswith("model|")}
    assert model and sorted(loaded) == sorted(model)
    for name, value in model.items():
        assert np.array_equal(loaded[name], value), name


def test_a_float32_checkpoint_loads_resharded_into_a_bfloat16_model(saved4, tmp_path):
    """Rows that cannot be read straight into the target (another dtype, as another device) are read, then copied."""
    import torch

    ckpt, saved = saved4
    results = run(2, "load", ckpt, tmp_path / "loaded.npz", "--bf16")
    assert [code for code, _ in results] == [0] * 2, results
    loaded = arrays(tmp_path / "loaded.npz")
    for name, value in saved.items():
        if name.startswith("model|"):
            expected = torch.from_numpy(value).bfloat16().float().numpy()
            assert np.array_equal(loaded[name], expected), name
