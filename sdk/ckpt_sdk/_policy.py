"""When to save: every N steps, every T seconds, or an automatic Young/Daly interval from measured save cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

FIRST_AUTO_SAVE_SECONDS = 60.0  # before any save was measured, the automatic policy saves after this long


def daly_interval(cost: float, mtbp: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints for save cost C and mean time between failures M."""
    if cost <= 0:
        return 0.0
    if cost >= 2 * mtbp:
        return mtbp
    ratio = cost / (2 * mtbp)
    return math.sqrt(2 * cost * mtbp) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - cost


def expected_overhead(interval: float, cost: float, mtbp: float) -> float:
    """Fraction of wall time lost to saving plus expected recomputation after a preemption."""
    period = interval + cost
    return cost / period + period / (2 * mtbp)


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.7 * old + 0.3 * new


@dataclass
class SavePolicy:
    """Decides whether a step is due for a checkpoint. `every_seconds=None` and `every_steps=None` is automatic.

    Due-ness counts from when a save's snapshot was taken (`mark`), not from when its write ended."""

    every_steps: int | None
    every_seconds: float | None
    after: int
    mtbp_seconds: float
    last_step: int = 0
    last_time: float = 0.0
    save_cost: float | None = None  # moving average of the training stall a save causes (Daly's C)
    write_cost: float | None = None  # moving average of the time until a save is durable

    @property
    def automatic(self) -> bool:
        return self.every_steps is None and self.every_seconds is None

    @property
    def time_based(self) -> bool:
        """Due-ness depends on the clock (ranks that never meet cannot decide it alike)."""
        return self.automatic or self.every_seconds is not None

    def interval_seconds(self) -> float | None:
        """The time-based interval in force (automatic: from the measured cost, or the first-save default)."""
        if not self.automatic:
            return self.every_seconds
        if self.save_cost is None:
            return FIRST_AUTO_SAVE_SECONDS
        # an async save cannot be started more often than one is written
        return max(daly_interval(self.save_cost, self.mtbp_seconds), self.write_cost or 0.0, 1e-3)

    def due(self, step: int, now: float) -> bool:
        if step < self.after or step <= self.last_step:
            return False
        if self.every_steps is not None and step - self.last_step >= self.every_steps:
            return True
        interval = self.interval_seconds()
        return interval is not None and now - self.last_time >= interval

    def mark(self, step: int, now: float) -> None:
        """A save of `step` was started (its snapshot taken) at `now`."""
        self.last_step, self.last_time = step, now

    def measured(self, stall: float, write: float) -> None:
        """A save finished: it stalled training for `stall` seconds and was durable after `write` seconds."""
        self.save_cost = _average(self.save_cost, stall)
        self.write_cost = _average(self.write_cost, write)

    def record(self, step: int, now: float, cost: float | None) -> None:
        """A synchronous save (or a resume, with no cost) of `step` at `now`."""
        self.mark(step, now)
        if cost is not None:
            self.measured(cost, cost)
