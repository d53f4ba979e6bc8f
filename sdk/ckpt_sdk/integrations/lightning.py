"""Preemption-safe checkpoints for PyTorch Lightning, with one line of code:

    from ckpt_sdk.integrations.lightning import CheckpointCallback, last_checkpoint
    trainer = L.Trainer(callbacks=[CheckpointCallback()], default_root_dir=ckpt_dir)
    trainer.fit(model, data, ckpt_path=last_checkpoint(ckpt_dir))

`CheckpointIO` (installed by the callback unless you set another) writes every Lightning checkpoint through the
SDK's storage: the SDK's format (no pickle on the load path), fsynced, a commit marker written last, the job's
fence checked, then renamed into place, so a checkpoint is complete the moment it appears. At each training batch's
end the callback checks SIGTERM, the slot's end and interruption notices (every rank agrees) and saves `step-N.ckpt`;
after SIGTERM or the slot's end the process exits 143 with the termination message.

Lightning's own SIGTERM handler runs a collective inside the signal handler and ends `fit` with a `SystemExit`
that carries no code (exit status 0: the operator would read a success). While `fit` runs, the callback puts the
SDK's handler back in its place (one handler, chained to whatever was installed before), so a SIGTERM only sets a
flag and everything else happens at the next batch end. Launch ranks with torchrun or the operator (one process per
rank): Lightning's own process launcher does not pass SIGTERM on to its children.

TensorBoard: with a `TensorBoardLogger`, the callback drops the events a killed attempt logged past the resumed
step from every version under the logger's `root_dir` (give it a fixed `version` to keep one run across attempts).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _LightningCheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger

from .. import _serialize, _tree
from .._decide import Action
from .._errors import CorruptCheckpointError
from .._fileio import fsync_dir
from .._manifest import Manifest
from .._monitoring import truncate_event_files
from .._serialize import Snapshot
from .._sigterm import SIGTERM
from .._store import CheckpointInfo
from ._commit import commit, newest_complete, verify
from ._core import FrameworkRun, default_directory

log = logging.getLogger("ckpt_sdk")
CHECKPOINT = re.compile(r"(?:.*[-_])?step[-=](\d+)(?:[-_].*)?\.ckpt")  # ours (step-N.ckpt) and Lightning's names


def last_checkpoint(dirpath: str | Path | None = None, *, verify_data: bool = True) -> str | None:
    """The newest complete checkpoint under `dirpath` (default $CKPT_DIR), for `trainer.fit(..., ckpt_path=...)`;
    None if there is none. Incomplete or damaged ones are skipped with a log line."""
    found = newest_complete(default_directory(dirpath), CHECKPOINT, verify_data)
    return str(found) if found is not None else None


class CheckpointIO(_LightningCheckpointIO):
    """Lightning checkpoints through the SDK's storage (see the module docstring)."""

    def __init__(self, run: FrameworkRun | None = None) -> None:
        self.run = run

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any = None) -> None:
        final = Path(path)
        run = self.run or FrameworkRun(final.parent, CHECKPOINT)
        self.run = run
        step = int(checkpoint.get("global_step", 0))
        temp = final.with_name(f".tmp-{final.name}-{secrets.token_hex(4)}")
        temp.mkdir(parents=True)
        try:
            files = Snapshot(checkpoint).write(temp)
            commit(temp, step, run.checkpointer.store, run.checkpointer.fence, files)
            _replace(temp, final)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        directory = Path(path)
        marker = verify(directory, full=False)  # every byte's checksum is checked as the tensors are read
        manifest = Manifest(step=marker.step, files=marker.files)
        tree, tensors = _serialize.load(CheckpointInfo(marker.step, directory, manifest))
        loaded = _tree.decode(tree, lambda name, kind: tensors[name])
        if not isinstance(loaded, dict):
            raise CorruptCheckpointError(f"{directory}: holds no checkpoint dict")
        return loaded

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()

    def teardown(self) -> None:
        return None


def _stepping_batches(trainer: pl.Trainer) -> int | None:
    """The run's optimizer steps when only epochs bound it (None if Lightning cannot tell: an endless loader)."""
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if isinstance(estimated, (int, float)) and estimated != float("inf") else None


def _replace(temp: Path, final: Path) -> None:
    """Rename the complete checkpoint into place; a re-save of the same name (`last.ckpt`) swaps the old one out
    only once the new one is complete."""
    old = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}") if final.exists() else None
    if old is not None:
        os.rename(final, old)
    os.rename(temp, final)
    fsync_dir(final.parent)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


class CheckpointCallback(pl.Callback):
    """The SDK's promises for a Lightning `Trainer` (see the module docstring). `dirpath`: where `step-N.ckpt`
    goes (default: the trainer's `default_root_dir`); `every_steps`/`every_seconds` add periodic saves (also
    $CKPT_INTERVAL_SECONDS); `keep`: how many of them are kept."""

    def __init__(self, dirpath: str | Path | None = None, *, every_steps: int | None = None,
                 every_seconds: float | None = None, keep: int | None = None) -> None:
        self.dirpath = dirpath
        self.every_steps, self.every_seconds, self.keep = every_steps, every_seconds, keep
        self.run: FrameworkRun | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.run is None:
            directory = Path(self.dirpath or trainer.default_root_dir)
            self.run = FrameworkRun(directory, CHECKPOINT, keep=self.keep, every_steps=self.every_steps,
                                    every_seconds=self.every_seconds)
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, CheckpointIO):
            if type(strategy.checkpoint_io).__name__ != "TorchCheckpointIO":
                raise ValueError(f"CheckpointCallback writes through ckpt_sdk's CheckpointIO; this trainer has "
                                 f"{type(strategy.checkpoint_io).__name__}: remove it, or pass CheckpointIO()")
            strategy.checkpoint_io = CheckpointIO(self.run)
        else:
            strategy.checkpoint_io.run = strategy.checkpoint_io.run or self.run

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One SIGTERM handler while fitting: the SDK's (Lightning's composed one is set aside; see above)."""
        if SIGTERM.installed:
            signal.signal(signal.SIGTERM, SIGTERM.handle)
        assert self.run is not None
        self.run.resumed(trainer.global_step)
        self.run.total(trainer.max_steps if trainer.max_steps > 0 else _stepping_batches(trainer))
        if trainer.global_step > 0:
            self._truncate_tensorboard(trainer, trainer.global_step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fresh start: drop what a killed attempt logged before it ever checkpointed (before the loggers write)."""
        if trainer.ckpt_path is None and not trainer.strategy.restore_checkpoint_after_setup:
            self._truncate_tensorboard(trainer, 0)

    @staticmethod
    def _truncate_tensorboard(trainer: pl.Trainer, resumed_step: int) -> None:
        """TensorBoard curves continue across attempts: Lightning logs batch `k` (0-based) at step `k`, the batch
        that makes `global_step` k + 1, so what was logged at steps >= the resumed global step is dropped."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    truncate_event_files(logger.root_dir, resumed_step - 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.run is not None
        step = trainer.global_step
        decision = self.run.check(step)
        if decision.action in (Action.SAVE, Action.ANSWER_REQUEST, Action.SAVE_AND_EXIT):
            path = self.run.directory / f"step-{step}.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # every rank: Lightning's rank 0 writes, all meet
            self.run.saved(step)
        if decision.action in (Action.SAVE_AND_EXIT, Action.EXIT):
            self.run.stop(step)  # exits 143 (Lightning runs its on_exception hooks and tears down on the way)
