"""Preemption-safe checkpoints for the Hugging Face `Trainer`, with one line of code:

    from ckpt_sdk.integrations.transformers import CheckpointCallback, last_checkpoint
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CheckpointCallback()])
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))

At each step end the callback checks SIGTERM, the slot's end (CKPT_DEADLINE) and interruption notices (every rank
agrees, under torchrun/DDP too) and has the Trainer save; after SIGTERM or the slot's end it also stops training,
and the process exits 143 with the termination message. Each `checkpoint-N/` the Trainer writes is made durable
and complete (every file fsynced, then a commit marker naming every file with its size and CRC-32, under the job's
fence); `save_total_limit` rotation is done after that commit, never deleting the newest complete checkpoint;
`last_checkpoint` returns the newest complete one (a partial `checkpoint-N/` of a killed save is skipped).
Transformers has no hook that adds a callback from the environment (its Kubeflow callback is built in), so the
callback is passed explicitly.

TensorBoard (`report_to="tensorboard"`): inside a TrainingJob the callback points the Trainer's writer at
`$CKPT_DIR/tensorboard` (unless TENSORBOARD_LOGGING_DIR is set), and after a resume drops the events a killed
attempt logged past the resumed step, so each step appears once across attempts.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .._decide import Action
from .._monitoring import truncate_event_files
from ._commit import newest_complete
from ._core import FrameworkRun, default_directory

log = logging.getLogger("ckpt_sdk")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the Trainer's PREFIX_CHECKPOINT_DIR
TENSORBOARD_DIR_ENV = "TENSORBOARD_LOGGING_DIR"  # where the Trainer's TensorBoardCallback writes


def last_checkpoint(output_dir: str | Path | None = None, *, verify: bool = True) -> str | None:
    """The newest complete `checkpoint-N` under `output_dir` (default $CKPT_DIR), for
    `trainer.train(resume_from_checkpoint=...)`; None if there is none. Incomplete or damaged ones are skipped with a
    log line. `verify=False` checks sizes only (not every byte's checksum)."""
    found = newest_complete(default_directory(output_dir), CHECKPOINT, verify)
    return str(found) if found is not None else None


class CheckpointCallback(TrainerCallback):
    """The SDK's promises for a `Trainer` (see the module docstring). `every_steps`/`every_seconds` add saves of
    the SDK's own cadence (also $CKPT_INTERVAL_SECONDS); without them the Trainer's `save_steps` schedule stands."""

    def __init__(self, *, every_steps: int | None = None, every_seconds: float | None = None) -> None:
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.run: FrameworkRun | None = None
        self.keep: int | None = None
        if os.environ.get("CKPT_DIR"):  # read by the Trainer's TensorBoardCallback, built after this one
            os.environ.setdefault(TENSORBOARD_DIR_ENV, os.path.join(os.environ["CKPT_DIR"], "tensorboard"))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **_: Any) -> None:
        if getattr(args, "enable_jit_checkpoint", False):
            raise ValueError("CheckpointCallback and TrainingArguments(enable_jit_checkpoint=True) both act on "
                             "SIGTERM (the latter replaces the signal handler without chaining): use one of them")
        if self.run is None:
            self.keep = args.save_total_limit if args.save_total_limit and args.save_total_limit > 0 else None
            args.save_total_limit = None  # rotated after the commit instead: never before the new one is complete
            self.run = FrameworkRun(args.output_dir, CHECKPOINT, keep=self.keep, every_steps=self.every_steps,
                                    every_seconds=self.every_seconds)
        self.run.resumed(state.global_step)  # the Trainer has loaded its checkpoint by now
        self.run.total(state.max_steps)
        if state.is_world_process_zero and "tensorboard" in (args.report_to or []):
            truncate_event_files(os.environ.get(TENSORBOARD_DIR_ENV) or os.path.join(args.output_dir or ".", "runs"),
                                 state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **_: Any) -> None:
        assert self.run is not None
        decision = self.run.check(state.global_step)
        if decision.action in (Action.SAVE, Action.ANSWER_REQUEST, Action.SAVE_AND_EXIT):
            control.should_save = True
        if decision.action in (Action.SAVE_AND_EXIT, Action.EXIT):
            control.should_training_stop = True
            log.warning("ckpt: stopping the Trainer at step %d (%s)", state.global_step,
                        decision.reason.value if decision.reason else "preempted")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        assert self.run is not None
        path = self.run.directory / f"checkpoint-{state.global_step}"
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
        self.run.committed(path, state.global_step, protect=best)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **_: Any) -> None:
        if self.run is not None and self.run.stopping is not None:
            self.run.stop(state.global_step)  # exits 143: a preemption, not the end of training
