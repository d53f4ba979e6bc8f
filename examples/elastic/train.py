"""Elastic data-parallel training (torch DDP): the same script at any gang size, the global batch kept constant.

A TrainingJob with `workers: {min: 1, max: 4}` runs at the largest size that fits and restarts at another size
when capacity changes (WORLD_SIZE tells this attempt's size). The checkpoint is resharded on load: the model and
optimizer are replicated (rank 0 writes them, every rank loads them), and the data position is a global sample
count, the same on every rank. Each step consumes GLOBAL_BATCH samples: at a smaller size every rank accumulates
gradients over more micro-batches, so the training is the same (up to float rounding) whatever the size.

    WORLD_SIZE=1 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 CKPT_DIR=/tmp/elastic python examples/elastic/train.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ckpt_sdk import Checkpointer, MetricsLog, maybe_resume

GLOBAL_BATCH = 32  # samples per step, whatever the number of ranks
MICRO_BATCH = 8  # samples per forward pass: a rank of a smaller gang accumulates more of them


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `micro` of step `step`: the same samples whichever rank computes it."""
    x = torch.randn(MICRO_BATCH, 16, generator=torch.Generator().manual_seed(step * 1000 + micro))
    return x, x.sum(dim=1, keepdim=True)


def train_step(model: DistributedDataParallel, optimizer: torch.optim.Optimizer, step: int, accumulate: int
               ) -> float:
    """One step over the global batch: `accumulate` micro-batches on every rank, one all-reduce; the mean loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer.zero_grad()
    total = torch.zeros(())
    for index in range(accumulate):
        x, y = batch(step, index * world + rank)
        loss = ((model(x) - y) ** 2).mean() / accumulate
        if index < accumulate - 1:
            with model.no_sync():  # DDP all-reduces the gradients once, after the last micro-batch
                loss.backward()
        else:
            loss.backward()
        total += loss.detach()
    optimizer.step()
    dist.all_reduce(total)
    return float(total) / world


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=int(os.environ.get("TRAIN_STEPS", "1000")))
    parser.add_argument("--every-steps", type=int, default=int(os.environ.get("SAVE_EVERY_STEPS", "20")))
    parser.add_argument("--step-seconds", type=float, default=float(os.environ.get("STEP_SECONDS", "0")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"rank {os.environ.get('RANK', '0')}: %(message)s")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from train_ddp import wait_for_master  # rank 0's DNS name resolves once its pod exists

    wait_for_master(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % (MICRO_BATCH * world):
        raise SystemExit(f"{world} ranks cannot split a global batch of {GLOBAL_BATCH} in micro-batches of "
                         f"{MICRO_BATCH}")
    accumulate = GLOBAL_BATCH // (MICRO_BATCH * world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ckpt = Checkpointer(every_steps=args.every_steps, replicated=("model", "optimizer"), total_steps=args.steps)
    state = {"model": net, "optimizer": optimizer, "data": {"samples": 0}}
    step = maybe_resume(state, ckpt)
    logging.info("attempt %s: %d rank(s), %d micro-batch(es) each per step; resumed step %d (saved by %s rank(s))",
                 os.environ.get("CKPT_ATTEMPT", "0"), world, accumulate, step, ckpt.resumed_world_size)
    metrics = MetricsLog(resumed_step=step) if rank == 0 else None
    while step < args.steps:
        loss = train_step(model, optimizer, step, accumulate)
        step += 1
        state["data"]["samples"] += GLOBAL_BATCH
        if metrics is not None:
            metrics.log(step, loss=loss, world_size=world)
        time.sleep(args.step_seconds)
        ckpt.maybe_save(step, state)
    if rank == 0:
        weights = [value.flatten().tolist() for value in net.state_dict().values()]
        with open(os.path.join(ckpt.directory, "weights.json"), "w") as out:
            json.dump({"step": step, "samples": state["data"]["samples"], "weights": weights}, out)
    dist.barrier()
    dist.destroy_process_group()
    ckpt.close()
    sys.stdout.flush()
    os._exit(0)  # (torch's gloo teardown at interpreter exit can abort a finished run)


if __name__ == "__main__":
    sys.exit(main())
