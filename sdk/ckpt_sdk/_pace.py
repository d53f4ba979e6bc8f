"""How fast this process trains, for the operator's progress, ETA and goodput (reported in the termination
message): the mean time of a step (time between `maybe_save` calls, per step), the time training waited inside
`maybe_save`/`save` (saves and the ranks' agreement), and how long the resume took."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pace:
    total_steps: int | None = None  # the run's length, if the trainer said
    resume_seconds: float | None = None
    stall_seconds: float = 0.0
    train_seconds: float = 0.0
    trained_steps: int = 0
    left_at: float | None = None  # time.monotonic() when the last maybe_save returned
    left_step: int | None = None
    inside: bool = False  # in maybe_save (a save() it makes is not counted twice)

    def enter(self, step: int, now: float) -> bool:
        """Training reached `step` (the time since the last maybe_save was training). False if already inside."""
        if self.inside:
            return False
        if self.left_at is not None and self.left_step is not None and step > self.left_step:
            self.train_seconds += now - self.left_at
            self.trained_steps += step - self.left_step
        self.inside = True
        return True

    def leave(self, step: int, entered: float, now: float) -> None:
        """Training goes on after `step`: the time inside counts as a stall."""
        self.stall_seconds += max(0.0, now - entered)
        self.left_at, self.left_step, self.inside = now, step, False

    @property
    def step_seconds(self) -> float | None:
        return self.train_seconds / self.trained_steps if self.trained_steps else None
