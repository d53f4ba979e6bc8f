"""A deterministic multi-rank training loop: torch DDP on gloo (CPU), or independent numpy ranks without
torch.distributed (`--mode files`). The same script runs on every rank, locally or in a multi-node TrainingJob.

Rank 0 writes the final weights' SHA-256 to `--out`; every rank prints `step N` (also appended to
`$CKPT_DIR/progress-rank<R>.log`) and appends `rank R attempt A start S` to `$CKPT_DIR/progress.log`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

from ckpt_sdk import Checkpointer, maybe_resume


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=os.environ.get("CKPT_DIR"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every-steps", type=int, default=10)
    parser.add_argument("--mode", choices=["torch", "files"], default="torch")
    parser.add_argument("--step-seconds", type=float, default=0.02)
    parser.add_argument("--out", default=None, help="where rank 0 writes the final hash (default: $CKPT_DIR/result)")
    parser.add_argument("--slow-rank", type=int, default=1, help="files mode: the rank that steps slower")
    parser.add_argument("--slowdown", type=float, default=2.0, help="files mode: how much slower it steps")
    parser.add_argument("--offset", type=float, default=0.0, help="files mode: shift the initial weights")
    parser.add_argument("--ema", action="store_true",
                        help="files mode: also a replicated top-level key `model` and a per-rank key `model/ema`")
    parser.add_argument("--kill-at", default=None, metavar="RANK:POINT:N",
                        help="SIGKILL this rank at the N-th hit of a fault point of the save path")
    args = parser.parse_args()
    if args.kill_at:
        _kill_at(*args.kill_at.split(":"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"rank {os.environ.get('RANK')}: %(message)s")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.mode == "torch":
        return _torch(args, rank, world)
    return _files(args, rank)


def _torch(args: argparse.Namespace, rank: int, world: int) -> int:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
    from train_ddp import wait_for_master  # the example's own wait (rank 0's DNS name exists once its pod does)

    wait_for_master(os.environ["MASTER_ADDR"])
    dist.init_process_group("gloo")  # MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK from the environment
    torch.manual_seed(1234)  # the same initial weights on every rank
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                                        torch.nn.Linear(32, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = Checkpointer(args.dir, every_steps=args.every_steps, replicated=("model", "optimizer"))
    state = {"model": model.module, "optimizer": optimizer, "seen": {"samples": 0}}
    step = maybe_resume(state, ckpt)
    _progress(args.dir, rank, step)
    while step < args.steps:
        data = torch.Generator().manual_seed(step * world + rank)  # each rank its own batch, fixed per step
        x = torch.randn(32, 16, generator=data)
        y = x.sum(dim=1, keepdim=True)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces the gradients across ranks here
        optimizer.step()
        state["seen"]["samples"] += len(x)
        step += 1
        _step(args.dir, rank, step)
        time.sleep(args.step_seconds)
        ckpt.maybe_save(step, state)
    if rank == 0:
        digest = hashlib.sha256()
        for tensor in model.module.state_dict().values():
            digest.update(tensor.detach().numpy().tobytes())
        _result(args, digest.hexdigest())
    dist.barrier()  # neither rank tears its connections down while the other still uses them
    dist.destroy_process_group()
    ckpt.close()  # what the interpreter's exit would run (atexit): the termination message
    # Done, results written: skip the interpreter's teardown, where torch 2.15 on gloo rarely aborts the process
    # ("terminate called without an active exception", exit -6: seen once in CI, in a run that had finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _files(args: argparse.Namespace, rank: int) -> int:
    import numpy as np

    ckpt = Checkpointer(args.dir, every_steps=args.every_steps, replicated=("model",) if args.ema else ())
    state = {"w": np.zeros(8) + rank + args.offset}
    if args.ema:  # `model` is the same on every rank (rank 0 writes it); `model/ema` is each rank's own
        state["model"] = {"w": np.zeros(8)}
        state["model/ema"] = {"w": np.zeros(8) + 10 * rank}
    step = maybe_resume(state, ckpt)
    _progress(args.dir, rank, step)
    while step < args.steps:
        state["w"] = state["w"] * 0.99 + np.arange(8.0) * (step + 1)
        if args.ema:
            state["model"]["w"] = state["model"]["w"] * 0.9 + step
            state["model/ema"]["w"] = 0.5 * state["model/ema"]["w"] + state["w"]
        step += 1
        _step(args.dir, rank, step)
        time.sleep(args.step_seconds * (args.slowdown if rank == args.slow_rank else 1.0))  # ranks never meet
        ckpt.maybe_save(step, state)
    digest = hashlib.sha256(state["w"].tobytes())
    if args.ema:
        digest.update(state["model"]["w"].tobytes())
        digest.update(state["model/ema"]["w"].tobytes())
    _result(args, digest.hexdigest(), suffix=f".rank{rank}")
    return 0


def _kill_at(rank: str, point: str, nth: str) -> None:
    import signal

    from ckpt_sdk import _faults

    hits = [0]

    def hook(name: str) -> None:
        if name == point:
            hits[0] += 1
            if hits[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)

    if os.environ.get("RANK") == rank:
        _faults.install(hook)


def _step(directory: str, rank: int, step: int) -> None:
    """`step N` on stdout and in `progress-rank<R>.log` (where a test outside the pod sees it)."""
    print(f"step {step}", flush=True)
    with open(os.path.join(directory, f"progress-rank{rank}.log"), "a") as f:
        f.write(f"step {step}\n")


def _progress(directory: str, rank: int, step: int) -> None:
    print(f"resumed {step}", flush=True)
    with open(os.path.join(directory, "progress.log"), "a") as f:
        f.write(f"rank {rank} attempt {os.environ.get('CKPT_ATTEMPT', '0')} start {step}\n")


def _result(args: argparse.Namespace, digest: str, suffix: str = "") -> None:
    with open((args.out or os.path.join(args.dir, "result")) + suffix, "w") as f:
        f.write(digest)


if __name__ == "__main__":
    sys.exit(main())
