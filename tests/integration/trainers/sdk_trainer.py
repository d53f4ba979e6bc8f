"""A small deterministic training loop used by the SDK's kill-and-resume tests (numpy or torch)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time

import numpy as np

from ckpt_sdk import Checkpointer, RNGState, maybe_resume


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=os.environ.get("CKPT_DIR"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every-steps", type=int, default=10)
    p.add_argument("--framework", choices=["numpy", "torch"], default="numpy")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--step-seconds", type=float, default=0.005)
    p.add_argument("--out", default=None, help="where to write the final hash (default: $CKPT_DIR/result)")
    p.add_argument("--crash-at", type=int, default=None, help="raise an exception (exit 1) at this step")
    p.add_argument("--crash-attempts", type=int, default=1 << 30, help="crash only while CKPT_ATTEMPT < this")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    np.random.seed(1234)
    ckpt = Checkpointer(args.dir, every_steps=args.every_steps, async_save=args.async_save, total_steps=args.steps)
    if args.framework == "torch":
        import torch

        torch.manual_seed(1234)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        state = {"model": model, "optimizer": opt, "rng": RNGState(), "extra": {"losses": []}}
    else:
        weights = np.zeros(8)
        state = {"w": weights, "rng": RNGState(), "extra": {"losses": []}}
    step = maybe_resume(state, ckpt)
    print(f"resumed {step}", flush=True)
    attempt = int(os.environ.get("CKPT_ATTEMPT", "0"))
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "progress.log"), "a") as f:
        f.write(f"attempt {attempt} start {step} reason {os.environ.get('CKPT_RESTART_REASON', 'none')}\n")
    began = time.time()
    reached = [step]
    try:
        return train(args, ckpt, state, reached, attempt, model if args.framework == "torch" else None,
                     opt if args.framework == "torch" else None)
    finally:  # the step this process reached, however it ends (0 redone = the next attempt starts there)
        with open(os.path.join(args.dir, "stops.log"), "a") as f:
            f.write(f"attempt {attempt} stop {reached[0]}\n")
        with open(os.path.join(args.dir, "times.log"), "a") as f:  # when its loop ran (wall clock)
            f.write(f"attempt {attempt} from {step} at {began:.3f} to {reached[0]} at {time.time():.3f}\n")


def train(args, ckpt, state, reached, attempt, model, opt):  # type: ignore[no-untyped-def]
    if args.framework == "torch":
        import torch
    step = reached[0]
    while step < args.steps:
        x = np.random.randn(32, 8)
        y = x @ np.arange(8.0) + 0.1 * np.random.randn(32)
        if args.framework == "torch":
            xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
            noise = torch.randn(1).item()  # consumes torch RNG so its state matters
            loss = ((model(xt).squeeze(-1) - yt) ** 2).mean() * (1 + 1e-6 * noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = float(loss)
        else:
            grad = 2 * x.T @ (x @ state["w"] - y) / len(y)
            state["w"] -= 0.01 * grad
            loss_value = float(((x @ state["w"] - y) ** 2).mean())
        state["extra"]["losses"].append(loss_value)
        step += 1
        reached[0] = step
        print(f"step {step}", flush=True)
        if step == args.crash_at and attempt < args.crash_attempts:
            raise RuntimeError(f"crashing on purpose at step {step}")
        time.sleep(args.step_seconds)
        ckpt.maybe_save(step, state)
    ckpt.wait()
    digest = hashlib.sha256()
    if args.framework == "torch":
        for t in model.state_dict().values():
            digest.update(t.numpy().tobytes())
    else:
        digest.update(state["w"].tobytes())
    digest.update(repr(state["extra"]["losses"]).encode())
    with open(args.out or os.path.join(args.dir, "result"), "w") as f:
        f.write(digest.hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
