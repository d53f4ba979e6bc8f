import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from ckpt_sdk import Checkpointer, CheckpointError

CKPT_RUN = str(Path(sys.executable).with_name("ckpt-run"))
CHILD = textwrap.dedent("""
    import signal, sys, time
    def on_term(*_):
        time.sleep(0.3)  # still finishing its checkpoint after its parent shell died
        open(sys.argv[1], "w").write("saved")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    open(sys.argv[1], "w").write("ready")
    time.sleep(60)
""")


def _wait_text(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == text:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never said {text!r}")


def test_ckpt_run_forwards_sigterm_through_a_shell_and_waits_for_the_trainer(tmp_path):
    marker, script = tmp_path / "marker", tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([CKPT_RUN, "--", "bash", "-c", f"{sys.executable} {script} {marker}"])
    _wait_text(marker, "ready")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 143  # the trainer's code, although bash died of the signal first
    assert marker.read_text() == "saved"


def test_ckpt_run_returns_the_command_exit_code():
    assert subprocess.run([CKPT_RUN, "--", "bash", "-c", "exit 7"]).returncode == 7
    assert subprocess.run([CKPT_RUN, "--", "/nonexistent/cmd"], capture_output=True).returncode == 127
    assert subprocess.run([CKPT_RUN], capture_output=True).returncode == 2


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt_sdk", *args], capture_output=True, text=True)


def test_cli_ls_and_verify(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5)
    for step in (10, 20):
        ckpt.save(step, {"w": np.ones(100)})
    out = _cli("ls", str(tmp_path))
    assert out.returncode == 0 and "        10" in out.stdout and "        20" in out.stdout
    assert _cli("verify", str(tmp_path)).returncode == 0
    with open(tmp_path / "step-000000000020" / "tensors.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    bad = _cli("verify", str(tmp_path))
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout and "checksum mismatch" in bad.stdout
    (tmp_path / "step-000000000030").mkdir()  # a crashed save's final-looking name without a manifest
    out = _cli("ls", str(tmp_path))
    assert "step-000000000030" in out.stdout and "INCOMPLETE" in out.stdout
    assert _cli("ls", str(tmp_path / "missing")).stdout.startswith("no checkpoints")


def test_disk_full_is_a_clear_error_and_keeps_older_checkpoints(tmp_path):
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from ckpt_sdk import Checkpointer, CheckpointError
        ckpt = Checkpointer({str(tmp_path)!r}, keep=1)
        ckpt.save(1, {{"w": np.ones(1000)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            ckpt.save(2, {{"w": np.ones(1 << 20)}})       # 8 MB > the 1 MB file-size limit
        except CheckpointError as exc:
            print("ERROR", exc)
            sys.exit(3)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 3, out.stderr
    assert "out of space" in out.stdout and "1 checkpoint(s) remain, newest step 1" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".fence")) == ["step-000000000001"]
    state: dict = {}
    from ckpt_sdk import maybe_resume

    assert maybe_resume(state, Checkpointer(tmp_path)) == 1 and state["w"].shape == (1000,)
    assert issubclass(CheckpointError, Exception)


def test_logs_the_automatic_interval_and_warns_when_saves_outgrow_the_grace_period(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CKPT_GRACE_PERIOD_SECONDS", "0.000001")
    with caplog.at_level(logging.INFO, logger="ckpt_sdk"):
        Checkpointer(tmp_path).save(1, {"w": np.ones(10)})
    assert "automatic interval" in caplog.text and "expected overhead" in caplog.text
    assert "grace period" in caplog.text and any(r.levelno == logging.WARNING for r in caplog.records)


def test_sigterm_in_process_saves_writes_the_message_and_exits_143(tmp_path):
    log = tmp_path / "termination-log"
    code = textwrap.dedent(f"""
        import os, signal
        from ckpt_sdk import Checkpointer
        ckpt = Checkpointer({str(tmp_path / "c")!r}, every_steps=1000)
        for step in range(1, 100):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)   # the handler only sets a flag
            assert not ckpt.maybe_save(step, {{"step": step}}) or step >= 5
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CKPT_TERMINATION_LOG": str(log)},
                         capture_output=True, text=True)
    assert out.returncode == 143, out.stderr
    message = json.loads(log.read_text())
    assert message["step"] == 5 and message["reason"] == "preempted"
    assert (tmp_path / "c" / "step-000000000005" / "MANIFEST.json").exists()
