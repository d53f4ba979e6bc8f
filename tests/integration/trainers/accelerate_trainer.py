"""A hand-written loop under Hugging Face Accelerate, checkpointed with ckpt_sdk.integrations.accelerate.

Environment: CKPT_DIR, TRAIN_STEPS (60), SAVE_STEPS (10), STEP_SECONDS (0), RESULT (default $CKPT_DIR/result)."""

from __future__ import annotations

import hashlib
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from ckpt_sdk.integrations.accelerate import load_state, save_state


def main() -> int:
    set_seed(1234)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    every = int(os.environ.get("SAVE_STEPS", "10"))
    step = load_state(accelerator, every_steps=every)  # the newest complete checkpoint into every object
    print(f"resumed {step}", flush=True)
    while step < int(os.environ.get("TRAIN_STEPS", "60")):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 16, generator=generator) + torch.rand(1).item()  # the global RNG: restored too
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        step += 1
        print(f"step {step}", flush=True)
        time.sleep(float(os.environ.get("STEP_SECONDS", "0")))
        save_state(accelerator, step)  # when due; on SIGTERM: save, then exit 143
    digest = hashlib.sha256()
    for tensor in accelerator.unwrap_model(model).state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    with open(os.environ.get("RESULT") or os.path.join(os.environ["CKPT_DIR"], "result"), "w") as f:
        f.write(digest.hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
