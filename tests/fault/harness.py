"""Crash-point fault injection for the SDK's save path.

A trial runs a real trainer process that saves a deterministic state (a function of the step) while a hook on one
fault point (`ckpt_sdk._faults.POINTS`) SIGKILLs the process, or raises EIO or ENOSPC, at its n-th hit. Then the
promise is checked from the directory alone:

- the next `maybe_resume` loads a complete checkpoint whose state is exactly that of its step, and that step is
  >= the newest step whose `save()` returned (a journal the trainer fsyncs after each return);
- the loadable checkpoints never number fewer than `min(keep, saves done) - 1`;
- nothing half-written is ever visible.

`python -m tests.fault.harness random --trials 500` is `make fault`; tests/fault/test_crash_points.py runs every
point once in `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("kill", "eio", "enospc")
PREPARED_STEPS = 3  # checkpoints a trial starts with
SAVES = 2  # saves a trial attempts after resuming


@dataclass(frozen=True)
class Trial:
    point: str
    nth: int  # the n-th hit of `point` in the trainer process (1-based)
    kind: str
    async_save: bool = False
    keep: int = 2
    corrupt_newest: bool = False
    mutate: str | None = None  # re-introduce a known bug in the trainer (to prove the checks can fail)
    stride: int = 2  # steps between saves: 2 saves past a corrupt newest step, 1 re-saves it

    def label(self) -> str:
        mode = "async" if self.async_save else "sync"
        return (f"{self.point}#{self.nth}:{self.kind}:{mode}:keep{self.keep}"
                + (":corrupt-newest" if self.corrupt_newest else ""))


@dataclass
class Result:
    trial: Trial
    violations: list[str] = field(default_factory=list)
    fired: bool = False
    returned: list[int] = field(default_factory=list)
    loaded: int | None = None
    loadable: int = 0


def state_for(step: int) -> dict[str, Any]:
    """The exact training state after `step` steps (what every check compares against)."""
    import numpy as np

    return {"w": np.arange(8192, dtype=np.float64) * 0.5 + step, "b": np.full(33, step, dtype=np.int32),
            "extra": {"step": step, "name": f"s{step}", "hist": list(range(step % 7))}}


def _same(state: dict[str, Any], step: int) -> bool:
    import numpy as np

    expected = state_for(step)
    return (np.array_equal(state["w"], expected["w"]) and np.array_equal(state["b"], expected["b"])
            and state["extra"] == expected["extra"])


# -- the trainer process ------------------------------------------------------------------------------
def child(spec: dict[str, Any]) -> int:
    """Run in the trainer process: resume, then save SAVES more steps with the fault hook armed."""
    from ckpt_sdk import Checkpointer, CheckpointError, _faults, maybe_resume

    directory, journal = Path(spec["dir"]), Path(spec["journal"])
    hits: dict[str, int] = {}
    record: list[str] = []

    def hook(name: str) -> None:
        hits[name] = hits.get(name, 0) + 1
        record.append(name)
        if spec.get("point") == name and hits[name] == spec["nth"]:
            _append(journal, "fired")
            if spec["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            import errno

            code = errno.EIO if spec["kind"] == "eio" else errno.ENOSPC
            raise OSError(code, os.strerror(code))

    _faults.install(hook)
    if spec.get("mutate") == "recycle-any":  # the pre-fix rule: reuse the oldest doomed checkpoint, trusted or not
        def naive(self: Any, listed: list[Any], step: int) -> Any:
            found = [c for c in listed if c.step < step]
            retained = {c.step for c in found[len(found) - (self.keep - 1):]} if self.keep > 1 else set()
            doomed = [c for c in found if c.step not in retained]
            return doomed[0] if doomed and self.keep > 1 and doomed[0] is not found[-1] else None

        Checkpointer._recyclable = naive  # type: ignore[method-assign]
    try:
        ckpt = Checkpointer(directory, keep=spec["keep"], every_steps=1, handle_sigterm=False)
        state = state_for(0)
        step = maybe_resume(state, ckpt)
        if not _same(state, step):
            _append(journal, f"violation: resumed step {step} with a state that is not that step's")
        for _ in range(spec.get("saves", SAVES)):
            step += spec.get("stride", 1)
            ckpt.save(step, state_for(step), blocking=not spec["async_save"])
            ckpt.wait()
            _append(journal, f"returned {step}")
    except (CheckpointError, OSError) as exc:
        _append(journal, f"failed {type(exc).__name__}: {exc}")
    finally:
        if spec.get("record"):
            Path(spec["record"]).write_text(json.dumps(record))
    return 0


def _append(journal: Path, line: str) -> None:
    with open(journal, "a") as out:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())


def _spawn(spec: dict[str, Any], attempt: int = 1) -> subprocess.CompletedProcess[str]:
    """The trainer as attempt `attempt` (the prepared checkpoints are attempt 0's, so a trial claims the fence)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_") and k != "KUBERNETES_SERVICE_HOST"}
    env["CKPT_ATTEMPT"] = str(attempt)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "tests.fault.harness", "child", json.dumps(spec)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


# -- the checks -----------------------------------------------------------------------------------------
_templates: dict[tuple[int, str], Path] = {}
_templates_lock = threading.Lock()


def prepare(directory: Path, keep: int, corrupt_newest: bool) -> int:
    """Steps 1..PREPARED_STEPS saved by a clean run (attempt 0); the newest optionally bit-flipped.
    Returns the number of good checkpoints. The clean run is made once per `keep` and copied."""
    key = (keep, str(directory.parent.parent))
    with _templates_lock:
        if key not in _templates or not _templates[key].exists():
            template = directory.parent.parent / f"template-keep{keep}-{os.getpid()}"
            shutil.rmtree(template, ignore_errors=True)
            _spawn({"dir": str(template / "ckpt"), "journal": str(template / "journal"), "keep": keep,
                    "async_save": False, "saves": PREPARED_STEPS}, attempt=0)
            _templates[key] = template
    shutil.copytree(_templates[key] / "ckpt", directory, copy_function=shutil.copy2)
    good = min(keep, PREPARED_STEPS)
    if corrupt_newest:
        tensors = directory / f"step-{PREPARED_STEPS:012d}" / "tensors.safetensors"
        data = bytearray(tensors.read_bytes())
        data[len(data) // 2] ^= 0x10
        tensors.write_bytes(bytes(data))
        good -= 1
    return good


def loadable(directory: Path) -> int:
    from ckpt_sdk import CorruptCheckpointError
    from ckpt_sdk._store import Store, verify

    count = 0
    for info in Store(directory).list():
        try:
            verify(info)
            count += 1
        except CorruptCheckpointError:
            pass
    return count


def check(trial: Trial, directory: Path, journal: Path, good_before: int) -> Result:
    from ckpt_sdk import Checkpointer, CheckpointError, CorruptCheckpointError, maybe_resume

    result = Result(trial)
    lines = journal.read_text().splitlines() if journal.exists() else []
    result.fired = "fired" in lines
    result.returned = [int(line.split()[1]) for line in lines if line.startswith("returned ")]
    result.violations += [line for line in lines if line.startswith("violation")]
    result.loadable = loadable(directory)
    saves_done = good_before + len(result.returned)
    floor = min(trial.keep, saves_done) - 1
    if result.loadable < floor:
        result.violations.append(f"{result.loadable} loadable checkpoints < min(keep, saves done) - 1 = {floor}")
    newest_good = PREPARED_STEPS - (1 if trial.corrupt_newest else 0) if good_before else None
    newest_returned = max(result.returned, default=newest_good)
    state = state_for(0)
    try:
        step = maybe_resume(state, Checkpointer(directory, keep=trial.keep, handle_sigterm=False))
    except CorruptCheckpointError as exc:
        if newest_returned is None:  # only a damaged checkpoint exists: the promised answer is this loud error
            return result
        result.violations.append(f"resume failed: {exc}")
        return result
    except CheckpointError as exc:
        result.violations.append(f"resume failed: {exc}")
        return result
    if newest_returned is None and result.loadable == 0:
        result.violations.append(f"resumed step {step} although only damaged checkpoints exist")
    result.loaded = step
    if newest_returned is not None and step < newest_returned:
        result.violations.append(f"resumed step {step} < newest step whose save() returned ({newest_returned})")
    if not _same(state, step):
        result.violations.append(f"the state loaded for step {step} is not that step's state")
    visible = sorted(p.name for p in directory.iterdir() if p.name.startswith("step-"))
    if any(not (directory / name / "MANIFEST.json").exists() for name in visible):
        result.violations.append(f"a checkpoint without a manifest is visible: {visible}")
    return result


def run_trial(trial: Trial, workdir: Path) -> Result:
    base = Path(tempfile.mkdtemp(prefix="trial-", dir=workdir))
    try:
        directory, journal = base / "ckpt", base / "journal"
        good_before = prepare(directory, trial.keep, trial.corrupt_newest)
        spec = {"dir": str(directory), "journal": str(journal), "keep": trial.keep, "async_save": trial.async_save,
                **{k: v for k, v in asdict(trial).items() if k in ("point", "nth", "kind", "mutate", "stride")}}
        proc = _spawn(spec)
        if proc.returncode not in (0, -signal.SIGKILL):
            result = Result(trial, [f"trainer exited {proc.returncode}: {proc.stderr[-800:]}"])
        else:
            result = check(trial, directory, journal, good_before)
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def record_points(workdir: Path, async_save: bool = False, keep: int = 2, corrupt_newest: bool = False,
                  stride: int = 2) -> list[str]:
    """The fault points one trial's trainer passes, in order (from its construction to its last save)."""
    base = Path(tempfile.mkdtemp(prefix="record-", dir=workdir))
    try:
        prepare(base / "ckpt", keep, corrupt_newest)
        record = base / "points.json"
        _spawn({"dir": str(base / "ckpt"), "journal": str(base / "journal"), "keep": keep,
                "async_save": async_save, "record": str(record), "stride": stride})
        return list(json.loads(record.read_text()))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def every_point(workdir: Path, async_save: bool, corrupt_newest: bool = False) -> list[Trial]:
    """Each hit of every point once with SIGKILL; each distinct point once with EIO and once with ENOSPC."""
    sequence = record_points(workdir, async_save, 2, corrupt_newest)
    trials, seen = [], {}
    for name in sequence:
        seen[name] = seen.get(name, 0) + 1
        trials.append(Trial(name, seen[name], "kill", async_save, 2, corrupt_newest))
    trials += [Trial(name, 1, kind, async_save, 2, corrupt_newest) for name in dict.fromkeys(sequence)
               for kind in ("eio", "enospc")]
    return trials


def run_all(trials: list[Trial], workdir: Path, jobs: int = 2) -> list[Result]:
    """Run trials `jobs` at a time; the checks in this process act as attempt 2 (after the trainer's 1)."""
    saved = os.environ.get("CKPT_ATTEMPT")
    os.environ["CKPT_ATTEMPT"] = "2"
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(lambda t: run_trial(t, workdir), trials))
    finally:
        if saved is None:
            del os.environ["CKPT_ATTEMPT"]
        else:
            os.environ["CKPT_ATTEMPT"] = saved


def randomized(count: int, seed: int, workdir: Path) -> list[Trial]:
    rng = random.Random(seed)
    sequences = {(a, k, c, s): record_points(workdir, a, k, c, s) for a in (False, True) for k in (1, 2, 3)
                 for c in (False, True) for s in (1, 2)}
    trials = []
    for _ in range(count):
        async_save, keep, corrupt = rng.random() < 0.5, rng.choice((1, 2, 3)), rng.random() < 0.3
        stride = rng.choice((1, 2))
        sequence = sequences[(async_save, keep, corrupt, stride)]
        name = rng.choice(sorted(set(sequence)))  # every point equally likely, then one of its hits
        nth = rng.randint(1, sequence.count(name))
        trials.append(Trial(name, nth, rng.choice(KINDS), async_save, keep, corrupt, stride=stride))
    return trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("child").add_argument("spec")
    rand = sub.add_parser("random", help="randomized trials (make fault)")
    rand.add_argument("--trials", type=int, default=500)
    rand.add_argument("--seed", type=int, default=int(time.time()))
    rand.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "child":
        return child(json.loads(args.spec))
    from ckpt_sdk import _faults

    started = time.monotonic()
    import logging

    logging.getLogger("ckpt_sdk").setLevel(logging.ERROR)  # damaged checkpoints are skipped with a warning
    with tempfile.TemporaryDirectory(prefix="ckpt-fault-") as workdir:
        trials = randomized(args.trials, args.seed, Path(workdir))
        results = run_all(trials, Path(workdir), args.jobs)
    bad = [r for r in results if r.violations]
    by_kind = {kind: sum(1 for r in results if r.trial.kind == kind and r.fired) for kind in KINDS}
    covered = {r.trial.point for r in results if r.fired}
    for result in bad:
        print(f"VIOLATION {result.trial.label()}: {'; '.join(result.violations)}")
    print(f"seed {args.seed}; {len(results)} trials in {time.monotonic() - started:.0f}s; faults fired: "
          + ", ".join(f"{kind} {n}" for kind, n in by_kind.items())
          + f"; points covered: {len(covered)} of {len(_faults.POINTS)}"
          + (f" (never reached: {', '.join(sorted(set(_faults.POINTS) - covered))})"
             if set(_faults.POINTS) - covered else ""))
    print(f"fault: {len(results)} trials, {len(bad)} violations")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
