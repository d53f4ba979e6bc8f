import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (`pip install -e .[torch]`); .ci/run installs it")

from ckpt_sdk import Checkpointer, RNGState, maybe_resume  # noqa: E402


def _model() -> "torch.nn.Module":
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_model_and_optimizer_restore_exactly(tmp_path):
    torch.manual_seed(0)
    model, ref = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    Checkpointer(tmp_path).save(3, {"model": model, "optimizer": opt})
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.5)
    assert maybe_resume({"model": ref, "optimizer": ref_opt}, Checkpointer(tmp_path)) == 3
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ref_opt.param_groups[0]["lr"] == 0.1 and tuple(ref_opt.param_groups[0]["betas"]) == (0.8, 0.9)
    assert torch.equal(ref_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int64", "bool", "uint8"])
def test_tensor_dtypes_roundtrip_in_place(tmp_path, dtype):
    t = (torch.arange(24) % 3).to(getattr(torch, dtype)).reshape(2, 3, 4)
    Checkpointer(tmp_path).save(1, {"t": t, "scalar": torch.tensor(3.5), "view": t[:, 1]})
    target = torch.zeros_like(t)
    state = {"t": target}
    maybe_resume(state, Checkpointer(tmp_path))
    assert state["t"] is target and torch.equal(target, t)
    assert state["scalar"].item() == 3.5 and torch.equal(state["view"], t[:, 1])


def test_torch_rng_state_restores(tmp_path):
    torch.manual_seed(7)
    Checkpointer(tmp_path).save(1, {"rng": RNGState()})
    expected = torch.rand(3)
    torch.manual_seed(99)
    maybe_resume({"rng": RNGState()}, Checkpointer(tmp_path))
    assert torch.equal(torch.rand(3), expected)


def test_no_load_path_unpickles(tmp_path, monkeypatch):
    import pickle

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    Checkpointer(tmp_path).save(1, {"model": model, "optimizer": opt, "rng": RNGState(), "extra": {"t": (1, 2)}})

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load path tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    target = {"model": _model(), "optimizer": torch.optim.SGD(_model().parameters(), lr=0.5), "rng": RNGState()}
    assert maybe_resume(target, Checkpointer(tmp_path)) == 1

