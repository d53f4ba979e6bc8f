import subprocess
import sys
from pathlib import Path

import ckpt_sdk

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_are_exactly_the_documented_ones():
    assert sorted(ckpt_sdk.__all__) == sorted([
        "PREEMPTED_EXIT_CODE", "CheckpointConfigError", "CheckpointError", "CheckpointInfo", "Checkpointer",
        "CorruptCheckpointError", "FencedError", "IncompatibleCheckpointError", "MetricsLog", "RNGState", "Stateful",
        "UnsupportedStateError", "__version__",
        "default_checkpointer", "maybe_resume",
    ])
    for name in ckpt_sdk.__all__:
        assert hasattr(ckpt_sdk, name), name
    readme = (ROOT / "README.md").read_text()
    for name in ckpt_sdk.__all__:
        assert f"`{name}`" in readme, f"{name} is not documented in README.md"


def test_errors_share_one_base():
    for exc in (ckpt_sdk.CheckpointConfigError, ckpt_sdk.CorruptCheckpointError, ckpt_sdk.FencedError,
                ckpt_sdk.IncompatibleCheckpointError, ckpt_sdk.UnsupportedStateError):
        assert issubclass(exc, ckpt_sdk.CheckpointError)


def test_sdk_imports_with_the_standard_library_only(tmp_path):
    # -S -I: no site-packages at all, only the SDK source on the path.
    code = ("import sys, ckpt_sdk; "
            "bad = [m for m in ('numpy', 'torch', 'pydantic', 'kopf') if m in sys.modules]; "
            "c = ckpt_sdk.Checkpointer(sys.argv[1], every_steps=1); c.save(1, {'x': [1, 2.5, 'a']}); "
            "s = {}; assert ckpt_sdk.maybe_resume(s, c) == 1 and s == {'x': [1, 2.5, 'a']}, s; print(bad)")
    out = subprocess.run([sys.executable, "-S", "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'sdk')!r}); "
                          + code, str(tmp_path / "c")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
