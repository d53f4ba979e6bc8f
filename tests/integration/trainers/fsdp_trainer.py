"""FSDP2 (torch.distributed.fsdp.fully_shard) on gloo, CPU: `--mode save` trains a few steps on WORLD_SIZE ranks and
saves through the Checkpointer; `--mode load` builds the same model on WORLD_SIZE ranks (any number), resumes, and
`--mode dcp` loads the model through torch.distributed.checkpoint with ckpt_sdk's StorageReader instead.

Every mode gathers the full tensors (model, and the optimizer state after a save or a resume) and rank 0 writes them
to `--out` (an .npz file, no pickle) for the test to compare.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from ckpt_sdk import Checkpointer, RNGState, maybe_resume


def build(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(7)  # the same initial weights on every rank and every world size
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Tanh(), torch.nn.Linear(11, 5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, rank: int) -> None:
    for step in range(steps):
        x = torch.randn(8, 13, generator=torch.Generator().manual_seed(step * 100 + rank))
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def full(state: Any, prefix: str, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of a state dict as a full numpy array (DTensors gathered: a collective)."""
    if isinstance(state, dict):
        for key in sorted(state, key=str):
            full(state[key], f"{prefix}/{key}", out)
    elif isinstance(state, torch.Tensor):
        tensor = state.full_tensor() if hasattr(state, "full_tensor") else state
        out[prefix] = tensor.detach().float().numpy().copy() if tensor.is_floating_point() else \
            tensor.detach().numpy().copy()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["save", "load", "dcp"], required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-rank", action="store_true", help="also save a value that differs between ranks")
    parser.add_argument("--bf16", action="store_true", help="load into a bfloat16 model (the saved one is float32)")
    parser.add_argument("--small-blocks", action="store_true",
                        help="block checksums every 4 KiB, so these small files are read in part, block by block")
    args = parser.parse_args()
    if args.small_blocks:
        from ckpt_sdk import _fileio

        _fileio.BLOCK = 4096
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"rank {os.environ['RANK']}: %(message)s")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer = build(torch.bfloat16 if args.bf16 else torch.float32)
    if args.mode == "dcp":
        return _dcp(args, model, rank)
    if args.mode == "save":
        train(model, optimizer, args.steps, rank)
    model_state, optim_state = get_state_dict(model, optimizer)  # (a fresh optimizer's state is initialized)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state, "rng": RNGState(),
                             "data": {"samples": args.steps * 8 * world if args.mode == "save" else 0}}
    if args.per_rank:
        state["local"] = {"rank": rank}
    ckpt = Checkpointer(args.dir, handle_sigterm=False)
    if args.mode == "save":
        torch.manual_seed(1000 + rank)
        ckpt.save(args.steps, state)
        step = args.steps
    else:
        step = maybe_resume(state, ckpt)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        print(f"resumed step {step} saved by {ckpt.resumed_world_size} ranks onto {ckpt.world_size}", flush=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    arrays = full({"model": model_state, "optim": optim_state["state"]}, "", {})
    arrays["/samples"] = np.array(state["data"]["samples"])
    arrays["/rng"] = torch.rand(3).numpy()  # what this rank's generator draws next
    _write(args.out, rank, arrays, step)
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # (see ddp_trainer: torch's gloo teardown at interpreter exit)


def _dcp(args: argparse.Namespace, model: torch.nn.Module, rank: int) -> int:
    import torch.distributed.checkpoint as dcp

    from ckpt_sdk.integrations.dcp import CheckpointReader

    model_state, _ = get_state_dict(model, [])
    state = {"model": model_state}
    dcp.load(state, storage_reader=CheckpointReader(args.dir))
    set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    arrays = full({"model": get_state_dict(model, [])[0]}, "", {})
    _write(args.out, rank, arrays, 0)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _write(out: str, rank: int, arrays: dict[str, np.ndarray], step: int) -> None:
    rng = arrays.pop("/rng", None)
    if rng is not None:
        np.save(f"{out}.rng{rank}.npy", rng)
    if rank == 0:
        named = {name.lstrip("/").replace("/", "|"): value for name, value in arrays.items()}
        np.savez(out, step=np.array(step), **named)


if __name__ == "__main__":
    sys.exit(main())
