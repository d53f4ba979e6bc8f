"""A PyTorch Lightning run made preemption-safe by one callback (`ckpt_sdk.integrations.lightning`).

A tiny regression model on synthetic data (each step's batch a function of the step, so a resumed run is bitwise
the uninterrupted one); your LightningModule and DataModule go in the same places. Inside a TrainingJob
`default_root_dir` is $CKPT_DIR: the callback saves `step-N.ckpt` there through the SDK's storage (every
`every_steps` and on SIGTERM, then exit 143), and the next attempt resumes from the newest complete one.

Environment (for the examples and tests): TRAIN_STEPS (60), SAVE_STEPS (10), STEP_SECONDS (0), RESULT (where the
final weights' SHA-256 goes; default $CKPT_DIR/result), TENSORBOARD (1: log the loss to TensorBoard).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from ckpt_sdk.integrations.lightning import CheckpointCallback, last_checkpoint


class Regressor(L.LightningModule):
    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        self.pause = pause

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.global_step)  # the step's own data
        x = torch.randn(8, 16, generator=generator)
        loss = nn.functional.mse_loss(self.net(x), x.sum(dim=1, keepdim=True))
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        print(f"step {self.global_step}", flush=True)
        if self.pause:
            time.sleep(self.pause)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    root = os.environ.get("CKPT_DIR", "./lightning-output")
    steps = int(os.environ.get("TRAIN_STEPS", "60"))
    L.seed_everything(1234)  # the initial weights too: a resumed run is then bitwise an uninterrupted one
    model = Regressor(float(os.environ.get("STEP_SECONDS", "0")))
    data = torch.utils.data.DataLoader(torch.zeros(steps * 4, 1), batch_size=1)  # only counts the steps
    # TensorBoard under $CKPT_DIR/tensorboard/run, one run across attempts (the callback drops what a killed one
    # logged past the resumed step)
    logger = TensorBoardLogger(root, name="tensorboard", version="run") if os.environ.get("TENSORBOARD") else False
    trainer = L.Trainer(max_steps=steps, default_root_dir=root, accelerator="cpu", devices=1, logger=logger,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[CheckpointCallback(every_steps=int(os.environ.get("SAVE_STEPS", "10")), keep=2)])
    resume = last_checkpoint(root)  # the newest *complete* checkpoint, or None
    print(f"resuming from {resume}", flush=True)
    trainer.fit(model, data, ckpt_path=resume)
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    with open(os.environ.get("RESULT") or os.path.join(root, "result"), "w") as f:
        f.write(digest.hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
