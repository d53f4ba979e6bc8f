"""Which checkpoints to keep: the `keep` newest plus the `keep_best` best by a metric (as Orbax's LatestN and
BestN preservation policies), as pure functions of the listing. Damaged checkpoints never count as kept."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ._store import CheckpointInfo


@dataclass(frozen=True)
class Retention:
    keep: int
    keep_best: int = 0
    metric: str | None = None
    mode: str = "min"  # "min": a lower metric is better; "max": higher

    def retained(self, found: Sequence[CheckpointInfo], newest: int, bad: Collection[int] = ()) -> set[int]:
        """Steps to keep once `newest` is committed: the `keep` last (newest included) and the `keep_best` best."""
        usable = [c for c in found if c.step != newest and c.step not in bad]
        kept = {c.step for c in usable[len(usable) - (self.keep - 1):]} if self.keep > 1 else set()
        kept.add(newest)
        metric = self.metric
        if self.keep_best and metric:
            scored = [c for c in found if metric in c.metrics and c.step not in bad]
            scored.sort(key=lambda c: c.metrics[metric], reverse=self.mode == "max")
            kept |= {c.step for c in scored[: self.keep_best]}
        return kept

    def doomed(self, found: Sequence[CheckpointInfo], newest: int, bad: Collection[int] = ()) -> list[CheckpointInfo]:
        """What pruning deletes once `newest` is durable (never a damaged one: it is evidence, and never counted)."""
        ordered = sorted(found, key=lambda c: c.step)
        kept = self.retained(ordered, newest, bad)
        return [c for c in ordered if c.step not in kept and c.step not in bad]

    def recyclable(self, found: Sequence[CheckpointInfo], step: int, good: Collection[int],
                   bad: Collection[int]) -> CheckpointInfo | None:
        """The oldest checkpoint that pruning will delete after saving `step` anyway, if reusing its files is safe:
        never the newest, and never unless another checkpoint is known good (written or verified by this process)."""
        if self.keep < 2:
            return None
        older = [c for c in found if c.step < step and c.step not in bad]
        doomed = self.doomed(older, step, bad)
        if not doomed or doomed[0] is older[-1]:
            return None
        victim = doomed[0]
        if not any(c.step in good for c in older if c is not victim):
            return None
        return victim
