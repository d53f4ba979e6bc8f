"""Multi-node data-parallel training (torch DDP) that survives preemption: the same script on every rank.

The operator gives each pod of a `workers: N` TrainingJob MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK (as
Kubeflow's PyTorchJob does), so `init_process_group` needs no arguments. Each rank saves its own shard; rank 0
commits the checkpoint once every shard is durable; SIGTERM to any rank makes all of them save the same step.

    WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 CKPT_DIR=/tmp/ddp python examples/train_ddp.py &
    WORLD_SIZE=2 RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 CKPT_DIR=/tmp/ddp python examples/train_ddp.py
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ckpt_sdk import Checkpointer, RNGState, maybe_resume


def wait_for_master(host: str, timeout: float = 600.0) -> None:
    """Rank 0's DNS name (`<job>-0.<job>`) resolves only once its pod exists; other ranks may start first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=int(os.environ.get("TRAIN_STEPS", "1000")))
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"rank {os.environ.get('RANK', '0')}: %(message)s")
    wait_for_master(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # identical initial weights on every rank
    net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # model and optimizer are the same on every rank: rank 0 writes them once, every rank loads them
    ckpt = Checkpointer(replicated=("model", "optimizer"))
    state = {"model": net, "optimizer": optimizer, "rng": RNGState()}
    step = maybe_resume(state, ckpt)
    while step < args.steps:
        data = torch.Generator().manual_seed(step * world + rank)  # each rank its own shard of the data
        x = torch.randn(args.batch, 32, generator=data).to(device)
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if rank == 0 and step % 100 == 0:
            logging.info("step %d loss %.4f", step, loss.item())
        ckpt.maybe_save(step, state)  # the same call on every rank, at the same step
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
