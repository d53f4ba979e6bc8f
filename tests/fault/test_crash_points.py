"""Every fault point of a save, once: SIGKILL at each hit, EIO and ENOSPC at each distinct point."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.fault import harness


@pytest.mark.parametrize(("async_save", "corrupt_newest"), [(False, False), (True, False), (False, True)],
                         ids=["sync", "async", "sync-corrupt-newest"])
def test_every_crash_point_keeps_the_promise(tmp_path: Path, async_save: bool, corrupt_newest: bool) -> None:
    trials = harness.every_point(tmp_path, async_save, corrupt_newest)
    points = {t.point for t in trials}
    assert {"fence.write", "recycle.rename" if not corrupt_newest else "temp.mkdir", "file.write", "file.fsync",
            "manifest.write", "commit.rename"} <= points, points
    results = harness.run_all(trials, tmp_path)
    assert all(r.fired for r in results), [r.trial.label() for r in results if not r.fired]
    violations = [f"{r.trial.label()}: {'; '.join(r.violations)}" for r in results if r.violations]
    assert not violations, "\n".join(violations)


def test_resaving_a_step_and_pruning_are_covered(tmp_path: Path) -> None:
    """The re-save path (`.prev`) and pruning are reached with a corrupt newest checkpoint and keep=3."""
    resave = harness.record_points(tmp_path, False, 2, True, stride=1)
    prune = harness.record_points(tmp_path, False, 1, False)
    assert "resave.rename" in resave and "prune.rename" in prune
    trials = [harness.Trial(p, nth, kind, False, keep, corrupt, stride=stride)
              for p, keep, corrupt, stride, sequence in (("resave.rename", 2, True, 1, resave),
                                                         ("commit.rename", 2, True, 1, resave),
                                                         ("prune.rename", 1, False, 2, prune))
              for nth in range(1, sequence.count(p) + 1) for kind in harness.KINDS]
    results = harness.run_all(trials, tmp_path)
    assert all(r.fired for r in results), [r.trial.label() for r in results if not r.fired]
    violations = [f"{r.trial.label()}: {'; '.join(r.violations)}" for r in results if r.violations]
    assert not violations, "\n".join(violations)


def test_the_checks_catch_the_recycling_bug_they_were_written_for(tmp_path: Path) -> None:
    """With the old recycling rule put back, a crash mid-save after resuming past a corrupt newest checkpoint
    leaves nothing loadable, and the harness reports it."""
    trial = harness.Trial("file.write", 2, "kill", False, 2, True, mutate="recycle-any", stride=2)
    result = harness.run_all([trial], tmp_path)[0]
    assert result.fired
    assert any("resume failed" in v or "loadable" in v for v in result.violations), result
    fixed = harness.run_all([dataclasses.replace(trial, mutate=None)], tmp_path)[0]
    assert fixed.fired and not fixed.violations, fixed
