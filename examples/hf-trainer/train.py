"""A Hugging Face `Trainer` run made preemption-safe by one callback (`ckpt_sdk.integrations.transformers`).

A tiny regression model on synthetic data, so it runs on a CPU in seconds; your own model, dataset and
`TrainingArguments` go in the same places. Inside a TrainingJob the output directory is $CKPT_DIR (the shared
volume): every `checkpoint-N` the Trainer writes is committed there, SIGTERM saves the current step and exits 143,
and the next attempt resumes from the newest complete checkpoint.

Environment (for the examples and tests): TRAIN_STEPS (60), SAVE_STEPS (10), SAVE_TOTAL_LIMIT (2),
STEP_SECONDS (0: no pause per step), RESULT (where the final weights' SHA-256 goes; default $CKPT_DIR/result),
REPORT_TO (none; `tensorboard`: curves under $CKPT_DIR/tensorboard), LOGGING_STEPS (10).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from ckpt_sdk.integrations.transformers import CheckpointCallback, last_checkpoint


class TinyRegressor(nn.Module):
    """Any model whose forward returns a loss when given labels works with the Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        out = self.net(x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class Synthetic(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Fixed samples (a function of the index): y = sum(x) + noise."""

    def __len__(self) -> int:
        return 4096

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(16, generator=generator)
        return {"x": x, "labels": x.sum(dim=0, keepdim=True) + 0.01 * torch.randn(1, generator=generator)}


class Progress(TrainerCallback):
    """Prints `step N` after each step (tests signal the trainer at a given step) and paces the run."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        print(f"step {state.global_step}", flush=True)
        if self.pause:
            time.sleep(self.pause)


def main() -> int:
    output_dir = os.environ.get("CKPT_DIR", "./hf-output")
    args = TrainingArguments(
        output_dir=output_dir, max_steps=int(os.environ.get("TRAIN_STEPS", "60")), per_device_train_batch_size=8,
        learning_rate=0.01, save_steps=int(os.environ.get("SAVE_STEPS", "10")),
        save_total_limit=int(os.environ.get("SAVE_TOTAL_LIMIT", "2")),
        logging_steps=int(os.environ.get("LOGGING_STEPS", "10")), report_to=os.environ.get("REPORT_TO", "none"),
        use_cpu=True, seed=1234, data_seed=1234, dataloader_num_workers=0, disable_tqdm=True)
    set_seed(1234)  # the model's initial weights too: a resumed run is then bitwise an uninterrupted one
    trainer = Trainer(model=TinyRegressor(), args=args, train_dataset=Synthetic(),
                      callbacks=[CheckpointCallback(), Progress(float(os.environ.get("STEP_SECONDS", "0")))])
    resume = last_checkpoint(output_dir)  # the newest *complete* checkpoint-N, or None
    print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        digest = hashlib.sha256()
        for tensor in trainer.model.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        with open(os.environ.get("RESULT") or os.path.join(output_dir, "result"), "w") as f:
            f.write(digest.hexdigest())
    if torch.distributed.is_initialized():  # ranks leave together: torch aborts a process exiting with a live group
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
