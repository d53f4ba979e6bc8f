"""Example trainer: a small PyTorch MLP on synthetic data that survives preemption with ckpt_sdk.

Exact resume: the model, optimizer and every RNG are checkpointed, and each step's batch is drawn from a
generator seeded by (seed, step), so the data order does not depend on when the run was interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import torch

from ckpt_sdk import Checkpointer, RNGState, maybe_resume


def batch(seed: int, step: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(size, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    return x, y


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=int(os.environ.get("TRAIN_STEPS", 300)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-seconds", type=float, default=float(os.environ.get("TRAIN_STEP_SECONDS", 0.05)),
                   help="extra time per step, to make a tiny model behave like a long run")
    p.add_argument("--every-steps", type=int, default=int(os.environ.get("TRAIN_EVERY_STEPS", 0)) or None)
    p.add_argument("--fail-at", type=int, default=int(os.environ.get("TRAIN_FAIL_AT", 0)) or None,
                   help="fault injection: raise at this step (to see failures counted apart from preemptions)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = {"model": model, "optimizer": optimizer, "rng": RNGState(), "extra": {"loss": None}}

    ckpt = Checkpointer(every_steps=args.every_steps)
    step = maybe_resume(state, ckpt)
    attempt = os.environ.get("CKPT_ATTEMPT", "0")
    os.makedirs(ckpt.directory, exist_ok=True)
    progress = open(os.path.join(ckpt.directory, "progress.log"), "a")  # noqa: SIM115 (one per run)
    progress.write(f"attempt {attempt} start {step} reason {os.environ.get('CKPT_RESTART_REASON', 'none')}\n")
    progress.flush()
    print(f"attempt {attempt}: resuming at step {step}/{args.steps}", flush=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    while step < args.steps:
        x, y = batch(args.seed, step)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.fail_at:
            raise RuntimeError(f"injected failure at step {step}")
        state["extra"]["loss"] = float(loss)
        progress.write(f"step {step}\n")
        progress.flush()
        if step % 50 == 0:
            print(f"step {step} loss {float(loss):.4f}", flush=True)
        time.sleep(args.step_seconds)
        ckpt.maybe_save(step, state, metrics={"loss": float(loss)})
    if ckpt.last_step != step:
        ckpt.save(step, state)
    ckpt.wait()
    result = {"steps": step, "weights_sha256": weights_hash(model), "attempt": int(attempt)}
    with open(os.path.join(ckpt.directory, "result.json"), "w") as f:
        json.dump(result, f)
    print(f"done: {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
