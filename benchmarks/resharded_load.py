"""Resharded load vs same-shape load of the same bytes: FSDP2 (fully_shard) state on gloo, CPU, one rank per process.

A state of `--gb` GB of float32 weights (16 square-ish layers, sharded row-wise by FSDP2) is saved once by 4 ranks,
once by 2 and once by 3. Then, timed (`maybe_resume`, first rank's call to the last rank's return):

- 4 -> 2 (resharded) vs 2 -> 2 (same shape), and 4 -> 3 vs 3 -> 3;

each checkpoint read once before (warm page cache for both sides: a cold read would time the disk, not the SDK).

    python benchmarks/resharded_load.py [--gb 0.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _spans import rank_spans  # (benchmarks/, first on sys.path when run as a script)

LAYERS = 16


def _model(gb: float) -> object:
    import torch
    from torch.distributed.fsdp import fully_shard

    rows = int((gb * 1e9 / LAYERS / 4) ** 0.5)
    with torch.device("cpu"):
        model = torch.nn.Sequential(*[torch.nn.Linear(rows, rows, bias=False) for _ in range(LAYERS)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from ckpt_sdk import Checkpointer, maybe_resume

    dist.init_process_group("gloo")
    state = {"model": get_model_state_dict(_model(args.gb))}
    ckpt = Checkpointer(args.dir, handle_sigterm=False, keep=1)
    spans = []
    if args.save:
        ckpt.save(1, state)
    else:
        for _ in range(args.repeat + 1):  # the first one warms the page cache
            dist.barrier()
            started = time.time()
            if os.environ.get("BENCH_PROFILE") and dist.get_rank() == 0 and len(spans) == args.repeat:
                import cProfile

                cProfile.runctx("maybe_resume(state, ckpt)", globals(), locals(), os.environ["BENCH_PROFILE"])
            else:
                assert maybe_resume(state, ckpt) == 1
            spans.append((started, time.time()))
    ckpt.close()
    dist.barrier()
    print(json.dumps(spans[1:]), flush=True)
    dist.destroy_process_group()
    os._exit(0)


def run(world: int, directory: Path, gb: float, repeat: int, save: bool) -> list[float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_", "RANK", "WORLD_", "MASTER_"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--gb", str(gb), "--repeat",
                                       str(repeat), "--dir", str(directory), *(["--save"] if save else [])],
                                      stdout=subprocess.PIPE, text=True, env=env))
    return rank_spans(procs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    root = Path(tempfile.mkdtemp(prefix="ckpt-reshard-", dir=os.environ.get("BENCH_DIR")))
    try:
        for world in (4, 2, 3):
            run(world, root / f"saved{world}", args.gb, 0, save=True)
        print(f"resharded load, {args.gb} GB of FSDP2 state (float32, {LAYERS} layers), warm page cache, "
              f"{args.repeat} loads each")
        print(f"{'case':34} {'median':>8} {'best':>8} {'worst':>8}")
        medians = {}
        for saved, loaded in ((2, 2), (4, 2), (3, 3), (4, 3)):
            times = run(loaded, root / f"saved{saved}", args.gb, args.repeat, save=False)
            medians[(saved, loaded)] = statistics.median(times)
            label = f"saved by {saved}, loaded by {loaded}" + (" (resharded)" if saved != loaded else "")
            print(f"{label:34} {statistics.median(times):7.3f}s {min(times):7.3f}s {max(times):7.3f}s")
        for world in (2, 3):
            ratio = medians[(4, world)] / medians[(world, world)]
            print(f"resharded 4->{world} / same-shape {world}->{world}: {ratio:.2f}x   target <= 1.5x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
