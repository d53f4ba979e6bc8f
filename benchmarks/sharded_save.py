"""Sharded save throughput: 2 ranks each saving half of a state vs 1 rank saving all of it, same run, same disk.

Each rank is its own process (as on a real multi-node job, but on one machine and one disk here); a 2-rank save
counts from the first rank's call to the last rank's return, including the barrier and rank 0's commit. With
`keep=2` both overwrite the files of the checkpoint pruning would delete (the ranks their own shard files of it);
with `keep=1` there is nothing to reuse and every save writes new files. Both pairs are measured and compared.

    python benchmarks/sharded_save.py [--gb 1.0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _spans import rank_spans  # (benchmarks/, first on sys.path when run as a script)


def worker(args: argparse.Namespace) -> int:
    import numpy as np

    from ckpt_sdk import Checkpointer

    count = 16
    size = int(args.gb * 1e9 / args.world / count / 4)
    rng = np.random.default_rng(args.rank)
    state = {f"layer{index}": rng.random(size, dtype=np.float32) for index in range(count)}
    ckpt = Checkpointer(args.dir, keep=args.keep, every_steps=1, handle_sigterm=False)
    spans = []
    for step in range(1, args.repeat + 1):
        started = time.time()
        ckpt.save(step, state)
        spans.append((started, time.time()))
    print(json.dumps(spans))
    return 0


def run(world: int, gb: float, repeat: int, root: Path, keep: int = 2) -> list[float]:
    """Seconds per save (first call to last return over the ranks)."""
    directory = root / f"world{world}-keep{keep}"
    shutil.rmtree(directory, ignore_errors=True)
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_", "RANK", "WORLD_"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(rank), "--world",
                                       str(world), "--gb", str(gb), "--repeat", str(repeat), "--dir", str(directory),
                                       "--keep", str(keep)],
                                      stdout=subprocess.PIPE, text=True, env=env))
    return rank_spans(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-sharded-bench-"))
    try:
        single = run(1, args.gb, args.repeat, root)
        fresh = run(1, args.gb, args.repeat, root, keep=1)
        sharded = run(2, args.gb, args.repeat, root)
        sharded_fresh = run(2, args.gb, args.repeat, root, keep=1)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"sharded save: {args.gb:.2f} GB state, {args.repeat} saves each, {os.cpu_count()} cores, one disk")
    cases = (("1 rank, reused files", single), ("1 rank, new files", fresh), ("2 ranks, reused files", sharded),
             ("2 ranks, new files", sharded_fresh))
    for label, times in cases:
        median = statistics.median(times)
        print(f"  {label:<24} median {median:7.3f}s  best {min(times):7.3f}s  worst {max(times):7.3f}s  "
              f"{args.gb / median:5.2f} GB/s")
    ratio = statistics.median(fresh) / statistics.median(sharded)
    print(f"sharded-save: ranks=2 throughput_ratio={ratio:.2f} "
          f"reused_vs_reused={statistics.median(single) / statistics.median(sharded):.2f} "
          f"new_vs_new={statistics.median(fresh) / statistics.median(sharded_fresh):.2f} (2 ranks reusing files / "
          "1 rank writing new files, the issue's measure; then like for like; higher is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
