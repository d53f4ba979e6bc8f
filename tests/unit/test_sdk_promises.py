"""Regression tests for the SDK's promise under faults (issue #14, items 1-11): each failed on the old SDK."""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ckpt_sdk import (
    CheckpointConfigError,
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    FencedError,
    IncompatibleCheckpointError,
    UnsupportedStateError,
    _faults,
    maybe_resume,
)
from ckpt_sdk._env import Environment
from ckpt_sdk._store import Store

ROOT = Path(__file__).resolve().parents[2]


def _steps(path: Path) -> list[int]:
    return [c.step for c in Store(path).list()]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # in the tensor data, not the header
    path.write_bytes(bytes(data))


def _run(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_") and k != "KUBERNETES_SERVICE_HOST"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


@pytest.fixture()
def hook():
    """Install a fault hook for one test."""
    yield _faults.install
    _faults.install(None)


# 1 ---------------------------------------------------------------------------------------------------
def test_async_saves_keep_the_configured_cadence(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=5, async_save=True, keep=100, handle_sigterm=False)
    saved = []
    for step in range(1, 31):
        if ckpt.maybe_save(step, {"w": np.full(10, step)}):
            saved.append(step)
        ckpt.wait()  # let each write finish: the cadence alone is under test here
    assert saved == [5, 10, 15, 20, 25, 30]
    assert _steps(tmp_path) == saved


def test_a_due_save_while_one_is_in_flight_waits_for_it_and_every_due_step_is_saved(tmp_path, hook):
    """Back-pressure (issue #25, defect 9): with a slow disk, every_steps=5 used to save steps 5, 32, 57 (a due save
    was skipped while the previous one was still being written). Every due step is saved now; the wait shows as
    the save's stall, and the automatic interval would see it."""
    ckpt = Checkpointer(tmp_path, every_steps=5, async_save=True, keep=100, handle_sigterm=False)
    hook(lambda name: time.sleep(0.3) if name == "file.write" else None)  # each write takes longer than 5 steps
    saved = [step for step in range(1, 31) if ckpt.maybe_save(step, {"w": np.full(10, step)})]
    ckpt.wait()
    hook(None)
    assert saved == [5, 10, 15, 20, 25, 30]
    assert _steps(tmp_path) == saved
    assert ckpt.policy.save_cost is not None and ckpt.policy.save_cost >= 0.2  # the stall includes the wait


def test_the_automatic_interval_uses_the_stall_and_the_write_time(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=True, handle_sigterm=False)
    ckpt.save(1, {"w": np.ones(1 << 20)})
    ckpt.wait()
    policy = ckpt.policy
    assert policy.save_cost is not None and policy.write_cost is not None
    assert policy.save_cost < policy.write_cost  # async: the stall is only the snapshot copy
    assert policy.interval_seconds() >= policy.write_cost


# 2 ---------------------------------------------------------------------------------------------------
def _kill_during_save(directory: Path, keep: int, step: int, point: str = "file.write", nth: int = 1,
                      attempt: int = 1) -> subprocess.CompletedProcess[str]:
    return _run(f"""
        import os, signal
        import numpy as np
        from ckpt_sdk import Checkpointer, maybe_resume, _faults
        ckpt = Checkpointer({str(directory)!r}, keep={keep})
        state = {{"w": np.zeros(1000)}}
        print("resumed", maybe_resume(state, ckpt), flush=True)
        hits = []
        def hook(name):
            hits.append(name)
            if name == {point!r} and hits.count(name) == {nth}:
                os.kill(os.getpid(), signal.SIGKILL)
        _faults.install(hook)
        ckpt.save({step}, {{"w": np.full(1000, {step}.0)}})
    """, env={"CKPT_ATTEMPT": str(attempt)})


def test_recycling_never_reuses_the_only_loadable_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep=2, handle_sigterm=False)
    for step in (10, 20):
        ckpt.save(step, {"w": np.full(1000, float(step))})
    _flip(tmp_path / "step-000000000020" / "tensors.safetensors")
    out = _kill_during_save(tmp_path, keep=2, step=30)  # resumes from 10, dies in the middle of saving 30
    assert out.returncode == -signal.SIGKILL and "resumed 10" in out.stdout, out.stderr
    monkeypatch.setenv("CKPT_ATTEMPT", "2")
    state = {"w": np.zeros(1000)}
    assert maybe_resume(state, Checkpointer(tmp_path, keep=2, handle_sigterm=False)) == 10
    assert np.all(state["w"] == 10.0)


def test_recycling_never_overwrites_hard_linked_backups(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", keep=2, handle_sigterm=False)
    for step in (1, 2):
        ckpt.save(step, {"w": np.full(1000, float(step))})
    backup = tmp_path / "backup"
    subprocess.run(["cp", "-al", str(tmp_path / "c"), str(backup)], check=True)  # what rsync --link-dest does
    before = (backup / "step-000000000001" / "tensors.safetensors").read_bytes()
    ckpt.save(3, {"w": np.full(1000, 3.0)})
    assert (backup / "step-000000000001" / "tensors.safetensors").read_bytes() == before
    assert _steps(tmp_path / "c") == [2, 3]


# 3 ---------------------------------------------------------------------------------------------------
def test_resaving_a_step_that_dies_at_the_rename_keeps_the_step(tmp_path, monkeypatch):
    Checkpointer(tmp_path, keep=1, handle_sigterm=False).save(5, {"w": np.full(1000, 5.0)})
    out = _kill_during_save(tmp_path, keep=1, step=5, point="commit.rename")
    assert out.returncode == -signal.SIGKILL, out.stderr
    monkeypatch.setenv("CKPT_ATTEMPT", "2")
    state = {"w": np.zeros(1000)}
    assert maybe_resume(state, Checkpointer(tmp_path, keep=1, handle_sigterm=False)) == 5
    assert np.all(state["w"] == 5.0)


# 4 ---------------------------------------------------------------------------------------------------
def test_disk_full_after_recycling_says_what_is_left(tmp_path, hook):
    ckpt = Checkpointer(tmp_path, keep=2, handle_sigterm=False)
    for step in (1, 2):
        ckpt.save(step, {"w": np.full(1000, float(step))})

    def full(name: str) -> None:
        if name == "file.write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    hook(full)
    with pytest.raises(CheckpointError) as info:
        ckpt.save(3, {"w": np.full(1000, 3.0)})
    hook(None)
    message = str(info.value)
    loadable = _steps(tmp_path)
    assert loadable == [2]  # step 1 was being reused for step 3
    assert "out of space" in message and "1 checkpoint(s) remain, newest step 2" in message
    assert "step 1, which was being reused for this save, is gone" in message


# 5 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [0, ("a",), "__ckpt_dict__"])
def test_state_keys_that_cannot_be_restored_in_place_are_refused_at_save(tmp_path, key):
    with pytest.raises(UnsupportedStateError, match="state keys must be strings"):
        Checkpointer(tmp_path, handle_sigterm=False).save(1, {key: np.ones(3)})
    assert _steps(tmp_path) == []


# 6 ---------------------------------------------------------------------------------------------------
TRAINER = """
    import os, signal, sys, errno
    import numpy as np
    from ckpt_sdk import Checkpointer, maybe_resume, _faults
    ckpt = Checkpointer({directory!r}, every_steps={every}, async_save={async_save})
    state = {{"w": np.zeros(1000)}}
    step = maybe_resume(state{resume_arg})
    print("resumed", step, flush=True)
    {setup}
    while step < 50:
        step += 1
        state["w"][:] = step
        print("step", step, flush=True)
        ckpt.maybe_save(step, state)
"""


def _trainer(tmp_path: Path, setup: str = "", every: int = 1, async_save: bool = False, resume_arg: str = ", ckpt",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = TRAINER.format(directory=str(tmp_path / "c"), every=every, async_save=async_save, setup=setup,
                          resume_arg=resume_arg)
    return _run(code, env={"CKPT_TERMINATION_LOG": str(tmp_path / "msg"), **(env or {})})


def test_a_failed_async_save_on_the_sigterm_path_saves_again_and_exits_143(tmp_path):
    setup = """
    import threading
    failing, failed = [False], threading.Event()
    def hook(name):
        if name == "file.write" and failing[0]:
            failed.set()
            raise OSError(errno.EIO, "I/O error")
    _faults.install(hook)
    """
    out = _trainer(tmp_path, setup + textwrap.dedent("""
    orig = ckpt.maybe_save
    def maybe_save(step, state, **kw):
        if step == 3:  # the async save of step 3 fails in the background
            ckpt.wait()
            failing[0] = True
        if step == 4:  # SIGTERM once it failed; the disk recovers: the save on SIGTERM must succeed
            assert failed.wait(30)
            os.kill(os.getpid(), signal.SIGTERM)
            failing[0] = False
        return orig(step, state, **kw)
    ckpt.maybe_save = maybe_save
    """).replace("\n", "\n    "), async_save=True)
    assert out.returncode == 143, out.stderr
    message = json.loads((tmp_path / "msg").read_text())
    assert message["step"] == 4 and message["reason"] == "preempted"
    state = {"w": np.zeros(1000)}
    assert maybe_resume(state, Checkpointer(tmp_path / "c", handle_sigterm=False)) == 4


def test_sigterm_during_a_save_ends_with_that_save(tmp_path):
    setup = """
    def hook(name):
        if name == "file.fsync" and step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
    _faults.install(hook)
    """
    out = _trainer(tmp_path, setup)
    assert out.returncode == 143, out.stderr
    assert "step 6" not in out.stdout  # no further step and no second save inside the grace period
    assert _steps(tmp_path / "c")[-1] == 5
    assert json.loads((tmp_path / "msg").read_text())["step"] == 5


def test_maybe_resume_without_a_checkpointer_keeps_the_users_sigterm_handling(tmp_path):
    setup = """
    chained = []
    signal.signal(signal.SIGTERM, lambda *a: chained.append(1)) if False else None
    if step == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    """
    out = _trainer(tmp_path, setup, every=1000, resume_arg="", env={"CKPT_DIR": str(tmp_path / "c")})
    assert out.returncode == 143, out.stderr
    assert _steps(tmp_path / "c") == [1]


def test_the_sigterm_handler_chains_to_the_one_it_replaced(tmp_path):
    out = _run(f"""
        import os, signal
        from ckpt_sdk import Checkpointer
        seen = []
        signal.signal(signal.SIGTERM, lambda *a: seen.append("user"))
        ckpt = Checkpointer({str(tmp_path)!r})
        Checkpointer({str(tmp_path)!r})  # a second one installs nothing more
        os.kill(os.getpid(), signal.SIGTERM)
        print(seen, ckpt.preempted)
    """)
    assert out.stdout.strip() == "['user'] True", out.stderr


def test_a_process_that_resumed_and_exited_writes_the_termination_message(tmp_path):
    Checkpointer(tmp_path / "c", handle_sigterm=False).save(12, {"w": np.ones(3)})
    out = _run(f"""
        import numpy as np
        from ckpt_sdk import Checkpointer, maybe_resume
        maybe_resume({{"w": np.zeros(3)}}, Checkpointer({str(tmp_path / "c")!r}))
    """, env={"CKPT_TERMINATION_LOG": str(tmp_path / "msg")})
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "msg").read_text())["step"] == 12


def test_the_termination_message_is_never_empty_while_rewritten(tmp_path, monkeypatch):
    log = tmp_path / "msg"
    log.write_text(json.dumps({"step": 123456789, "reason": "checkpoint", "padding": "x" * 200}))
    monkeypatch.setenv("CKPT_TERMINATION_LOG", str(log))
    seen = []
    real_pwrite = os.pwrite

    def watching(fd: int, data: bytes, offset: int) -> int:
        seen.append(json.loads(log.read_text()))  # what a reader sees just before the write: never empty
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", watching)
    ckpt = Checkpointer(tmp_path / "c", handle_sigterm=False)
    ckpt.save(1, {"a": 1})
    assert seen and json.loads(log.read_text())["step"] == 1


# 7 ---------------------------------------------------------------------------------------------------
def test_all_damaged_is_an_error_not_a_warm_start(tmp_path, monkeypatch):
    Checkpointer(tmp_path / "other", handle_sigterm=False).save(400, {"w": np.ones(3)})
    mine = Checkpointer(tmp_path / "mine", handle_sigterm=False)
    mine.save(7, {"w": np.full(3, 7.0)})
    _flip(tmp_path / "mine" / "step-000000000007" / "tensors.safetensors")
    monkeypatch.setenv("CKPT_RESUME_FROM", str(tmp_path / "other"))
    state = {"w": np.zeros(3)}
    with pytest.raises(CorruptCheckpointError, match="no loadable checkpoint") as info:
        maybe_resume(state, Checkpointer(tmp_path / "mine", handle_sigterm=False))
    assert "step-000000000007" in str(info.value) and "checksum mismatch" in str(info.value)


def test_a_damaged_explicit_resume_step_is_an_error(tmp_path, monkeypatch):
    Checkpointer(tmp_path / "other", handle_sigterm=False).save(400, {"w": np.ones(3)})
    _flip(tmp_path / "other" / "step-000000000400" / "tensors.safetensors")
    monkeypatch.setenv("CKPT_RESUME_FROM", str(tmp_path / "other" / "step-000000000400"))
    with pytest.raises(CorruptCheckpointError, match="CKPT_RESUME_FROM"):
        maybe_resume({"w": np.zeros(3)}, Checkpointer(tmp_path / "mine", handle_sigterm=False))
    monkeypatch.setenv("CKPT_RESUME_FROM", str(tmp_path / "other" / "step-000000000300"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        maybe_resume({"w": np.zeros(3)}, Checkpointer(tmp_path / "mine2", handle_sigterm=False))


def test_a_newer_format_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path, handle_sigterm=False)
    ckpt.save(1, {"w": np.ones(3)})
    ckpt.save(2, {"w": np.ones(3)})
    manifest = tmp_path / "step-000000000002" / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"ckpt-sdk/1"', '"ckpt-sdk/3"'))
    with pytest.raises(IncompatibleCheckpointError, match="upgrade ckpt_sdk"):
        maybe_resume({"w": np.zeros(3)}, Checkpointer(tmp_path, handle_sigterm=False))
    out = subprocess.run([sys.executable, "-m", "ckpt_sdk", "ls", str(tmp_path)], capture_output=True, text=True)
    assert "NEWER FORMAT" in out.stdout, out.stdout


# 8 ---------------------------------------------------------------------------------------------------
def test_fencing_is_claimed_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_ATTEMPT", "0")
    zombie = Checkpointer(tmp_path, handle_sigterm=False)
    monkeypatch.setenv("CKPT_ATTEMPT", "1")
    Checkpointer(tmp_path, handle_sigterm=False)  # the new attempt starts; it has not saved anything yet
    with pytest.raises(FencedError):
        zombie.save(99, {"w": np.ones(3)})
    assert _steps(tmp_path) == []


def test_a_restarted_job_is_a_new_incarnation_that_fences_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_JOB_UID", "uid-old")
    monkeypatch.setenv("CKPT_JOB_CREATED", "2026-11-01T10:00:00Z")
    monkeypatch.setenv("CKPT_ATTEMPT", "4")
    old = Checkpointer(tmp_path, handle_sigterm=False)
    old.save(10, {"w": np.ones(3)})
    monkeypatch.setenv("CKPT_JOB_UID", "uid-new")  # `kubectl ckpt restart`: same name, new object, attempt 0
    monkeypatch.setenv("CKPT_JOB_CREATED", "2026-11-01T11:00:00Z")
    monkeypatch.setenv("CKPT_ATTEMPT", "0")
    new = Checkpointer(tmp_path, handle_sigterm=False)
    assert maybe_resume({"w": np.zeros(3)}, new) == 10
    new.save(11, {"w": np.ones(3)})
    with pytest.raises(FencedError):
        old.save(12, {"w": np.ones(3)})  # the old incarnation's zombie is refused
    monkeypatch.setenv("CKPT_JOB_UID", "uid-old")
    monkeypatch.setenv("CKPT_JOB_CREATED", "2026-11-01T10:00:00Z")
    monkeypatch.setenv("CKPT_ATTEMPT", "9")
    with pytest.raises(FencedError, match="newer incarnation"):
        Checkpointer(tmp_path, handle_sigterm=False)  # nor can it claim again, at any attempt
    assert _steps(tmp_path) == [10, 11]


# 9 ---------------------------------------------------------------------------------------------------
def test_restore_reads_straight_into_existing_arrays(tmp_path):
    import tracemalloc

    size = 32 << 20
    Checkpointer(tmp_path, handle_sigterm=False).save(1, {"w": np.full(size // 8, 3.0)})
    target = np.zeros(size // 8)
    state = {"w": target}
    tracemalloc.start()
    try:
        maybe_resume(state, Checkpointer(tmp_path, handle_sigterm=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert state["w"] is target and target[0] == 3.0 and target[-1] == 3.0
    assert peak < 0.1 * size, f"restore allocated {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB state"


def test_a_checkpoint_damaged_after_reading_in_place_falls_back_cleanly(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, handle_sigterm=False)
    ckpt.save(1, {"w": np.full(1000, 1.0)})
    ckpt.save(2, {"w": np.full(1000, 2.0)})
    _flip(tmp_path / "step-000000000002" / "tensors.safetensors")
    target = np.zeros(1000)
    assert maybe_resume({"w": target}, Checkpointer(tmp_path, handle_sigterm=False)) == 1
    assert np.all(target == 1.0)  # the damaged bytes read into it first were all overwritten


def test_peak_memory_of_save_and_load_stays_near_the_state_size(tmp_path):
    torch = pytest.importorskip("torch")
    del torch
    size_mb = 256
    code = f"""
        import resource, torch
        from ckpt_sdk import Checkpointer, maybe_resume
        def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        state = {{"a": torch.randn({size_mb} << 18), "b": torch.randn(1000)}}
        base = rss()
        ckpt = Checkpointer({str(tmp_path)!r})
        ckpt.save(1, state)
        saved = rss()
        maybe_resume(state, ckpt)
        print(base, saved, rss())
    """
    out = _run(code, timeout=120)
    base, saved, loaded = map(float, out.stdout.split())
    assert saved - base < 0.1 * size_mb, (base, saved, loaded)
    assert loaded - base < 0.1 * size_mb, (base, saved, loaded)


# 10 --------------------------------------------------------------------------------------------------
def test_nan_metrics_are_never_best_and_json_stays_standard(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=1, keep_best=1, metric="loss", handle_sigterm=False)
    ckpt.save(1, {"s": 1}, metrics={"loss": 2.0})
    ckpt.save(2, {"s": 2}, metrics={"loss": math.nan})
    ckpt.save(3, {"s": 3}, metrics={"loss": 5.0})
    assert _steps(tmp_path) == [1, 3]
    text = (tmp_path / "step-000000000002" / "MANIFEST.json") if (tmp_path / "step-000000000002").exists() else None
    assert text is None
    manifest = (tmp_path / "step-000000000003" / "MANIFEST.json").read_text()
    json.loads(manifest, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_nan_metric_written_as_null(tmp_path):
    Checkpointer(tmp_path, handle_sigterm=False).save(1, {"s": 1}, metrics={"loss": math.nan})
    manifest = json.loads((tmp_path / "step-000000000001" / "MANIFEST.json").read_text(),
                          parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert manifest["metrics"] == {"loss": None}


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_invalid_steps_are_refused(tmp_path, step):
    with pytest.raises(CheckpointConfigError, match="step must be an int"):
        Checkpointer(tmp_path, handle_sigterm=False).save(step, {"a": 1})


def test_a_directory_that_is_a_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoint directory"):
        Checkpointer(tmp_path / "file" / "c", handle_sigterm=False)


def test_a_zero_grace_period_is_zero(monkeypatch):
    monkeypatch.setenv("CKPT_GRACE_PERIOD_SECONDS", "0")
    assert Environment.read().grace_period_seconds == 0


def test_ckpt_run_forwards_a_sigterm_that_arrives_while_the_child_starts(tmp_path, monkeypatch):
    from ckpt_sdk import _launcher

    real_popen = subprocess.Popen

    class SignalledDuringStart(real_popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives before the child exists
            super().__init__(*args, **kwargs)

    saved = {sig: signal.getsignal(sig) for sig in _launcher.FORWARDED}
    monkeypatch.setattr(_launcher.subprocess, "Popen", SignalledDuringStart)
    try:
        code = _launcher.main(["--", sys.executable, "-c", "import time; time.sleep(30)"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert code == 143  # the child got the SIGTERM (and died of it) instead of outliving its launcher


# 11 --------------------------------------------------------------------------------------------------
def test_the_pod_termination_log_is_used_only_inside_a_pod(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert Environment.read().termination_log is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert Environment.read().termination_log == "/dev/termination-log"
    monkeypatch.setenv("CKPT_TERMINATION_LOG", "/tmp/x")
    assert Environment.read().termination_log == "/tmp/x"


def test_no_termination_message_is_written_outside_a_pod(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    written = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: written.append(str(path)) or real_open(path, *a, **k))
    ckpt = Checkpointer(tmp_path / "c", handle_sigterm=False)
    ckpt.save(1, {"a": 1})
    ckpt.close()
    assert "/dev/termination-log" not in written and written  # it did write its checkpoint files


del shutil, resource  # imported for type-checkers of the subprocess snippets only


def test_an_uncaught_exception_reaches_the_termination_message(tmp_path):
    """Kubernetes shows the log tail only when the message is empty: the SDK carries the error instead."""
    out = _run(f"""
        import numpy as np
        from ckpt_sdk import Checkpointer
        ckpt = Checkpointer({str(tmp_path / "c")!r})
        ckpt.save(3, {{"w": np.ones(3)}})
        raise RuntimeError("diverged at step 4")
    """, env={"CKPT_TERMINATION_LOG": str(tmp_path / "msg")})
    assert out.returncode == 1 and "Traceback" in out.stderr  # the default hook still prints it
    message = json.loads((tmp_path / "msg").read_text())
    assert message["step"] == 3 and message["reason"] == "error"
    assert message["error"] == "RuntimeError: diverged at step 4"


def test_a_time_limited_slot_checkpoints_and_exits_before_its_deadline(tmp_path):
    """CKPT_DEADLINE (activeDeadlineSeconds): save at the last step boundary that still fits, exit 143."""
    import datetime as dt

    deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=9)
    out = _run(f"""
        import time
        import numpy as np
        from ckpt_sdk import Checkpointer, maybe_resume
        ckpt = Checkpointer({str(tmp_path / "c")!r}, every_steps=100000)
        state = {{"w": np.zeros(3)}}
        step = maybe_resume(state, ckpt)
        started = time.time()
        while step < 100000:
            step += 1
            state["w"][:] = step
            print(step, round(time.time() - started, 2), flush=True)
            time.sleep(0.02)
            ckpt.maybe_save(step, state)
    """, env={"CKPT_TERMINATION_LOG": str(tmp_path / "msg"),
              "CKPT_DEADLINE": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert out.returncode == 143, out.stderr
    last_step, elapsed = out.stdout.split()[-2:]
    assert float(elapsed) < 9  # before the deadline, not killed at it
    message = json.loads((tmp_path / "msg").read_text())
    assert message["reason"] == "deadline" and message["step"] == int(last_step)  # no step lost
    assert _steps(tmp_path / "c") == [int(last_step)]
