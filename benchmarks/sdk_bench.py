"""SDK benchmark: a ~1 GB torch state dict, all baselines measured in the same run.

    make bench            (or: python benchmarks/sdk_bench.py --gb 1 --repeat 3)

Prints medians and ratios: our sync save vs torch.save+fsync vs a raw sequential write+fsync of the same bytes;
our load (checksums verified) vs torch.load(weights_only=True); the async-save stall vs the sync save.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ckpt_sdk import Checkpointer, maybe_resume
from ckpt_sdk._serialize import COPY_THREADS, Snapshot


def state_dict(gb: float) -> dict[str, torch.Tensor]:
    """Layers like a transformer's: a few large matrices and many small vectors (about `gb` GiB in total)."""
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    per_layer = 4 * 2048 * 2048 * 4  # four 2048x2048 float32 matrices
    layers = max(1, int(gb * (1 << 30) / per_layer))
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            sd[f"layer{i}.{name}.weight"] = torch.randn(2048, 2048)
        sd[f"layer{i}.norm.weight"] = torch.ones(2048)
        sd[f"layer{i}.norm.bias"] = torch.zeros(2048, dtype=torch.bfloat16)
    return sd


PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The peak resident memory above the level at entry, sampled every 2 ms on a helper thread."""

    def __init__(self) -> None:
        self.extra = 0

    def __enter__(self) -> PeakRSS:
        self._base = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.extra = max(self.extra, rss_bytes() - self._base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(self.extra, rss_bytes() - self._base)


PEAKS: dict[str, int] = {}


def interleaved(cases: dict[str, tuple[Callable[[], None], Callable[[], object]]], repeat: int
                ) -> dict[str, list[float]]:
    """Median seconds per case; cases alternate within each round and every run starts after os.sync(), so
    writeback left by one case is never charged to the next. The peak extra RSS of each case goes to PEAKS."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, (prepare, fn) in cases.items():
            prepare()
            os.sync()
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            PEAKS[name] = max(PEAKS.get(name, 0), peak.extra)
    return times


def warm(path: Path) -> None:
    """Read a file once so both loaders start from the page cache (the common case right after a save)."""
    for file in ([path] if path.is_file() else sorted(path.rglob("*"))):
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass


def busy_cpu_seconds() -> float:
    """CPU time every core has spent busy since boot (not idle, not waiting for I/O), kernel threads included."""
    with open("/proc/stat") as f:
        ticks = [int(field) for field in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SAVE_SPACING_SECONDS = 3.0  # > the ~0.9 s an async 1 GB save takes here, so saves never queue behind each other


def training_loop_overhead(sd: dict[str, torch.Tensor], root: Path, interval: float) -> dict[str, float]:
    """What a user sees: a synthetic training step of fixed compute, run with and without saves, every step
    touching the state (so an async snapshot must be taken before it changes). The extra wall time per save,
    divided by `interval`, is the overhead of saving once every `interval` seconds of training."""
    weights = next(iter(sd.values()))
    work = torch.randn(1024, 1024)

    def train_step() -> None:
        for _ in range(4):
            work.copy_(torch.tanh(work @ work) * 0.5)
        weights.add_(1e-7)  # the step updates the state

    calibration = time.perf_counter()
    for _ in range(10):
        train_step()
    step_seconds = (time.perf_counter() - calibration) / 10
    every = max(1, math.ceil(SAVE_SPACING_SECONDS / step_seconds))  # saves further apart than one write takes
    steps = 4 * every  # three saves, then one more interval of training: the last write ends during training too,
    # as in a long run, instead of being waited for at the end
    checkpointers = {"ckpt_sdk async": Checkpointer(root / "loop-async", keep=2, async_save=True,
                                                    handle_sigterm=False),
                     "ckpt_sdk sync": Checkpointer(root / "loop-sync", keep=2, handle_sigterm=False)}
    state = {"model": sd}

    done = [0]  # steps trained over every run: saved step numbers only grow, as in a real job (re-saving a step
    # number is not the recycling path: it keeps the old copy until the new one is in)

    def run(save: Callable[[int], None] | None) -> float:
        os.sync()
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            train_step()
            done[0] += 1
            if save is not None and step % every == 0 and step < steps:
                save(done[0])
        for ckpt in checkpointers.values():
            ckpt.wait()
        return time.perf_counter() - t0

    def torch_save(step: int) -> None:
        path = root / "loop-torch.pt"
        torch.save(sd, path)
        fsync_path(path)

    saves = steps // every - 1
    result: dict[str, float] = {}
    for ckpt in checkpointers.values():
        for warm_step in (0, 1):  # warm: the arena and the two recycled checkpoints exist, as in a long run
            ckpt.save(warm_step, state)
            ckpt.wait()
    variants: dict[str, Callable[[int], None] | None] = {"no saves": None}
    variants.update({name: (lambda step, c=c: c.save(step, state)) for name, c in checkpointers.items()})
    variants["torch.save"] = torch_save
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(5):  # interleaved rounds, so drift in the machine's speed is shared by every variant
        for name, save in variants.items():
            times[name].append(run(save))
    base = statistics.median(times.pop("no saves"))
    for name, runs in times.items():
        result[name] = max(0.0, statistics.median(runs) - base) / saves / interval
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--loop-seconds", type=float, default=30.0,
                   help="training-loop case: the save interval the overhead is reported for")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    sd = state_dict(args.gb)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    state = {"model": sd}
    print(f"state: {len(sd)} tensors, {nbytes / 1e9:.2f} GB; dir {root}; torch {torch.__version__}; "
          f"median of {args.repeat} ({2 * args.repeat} for loads)")

    counter = {"raw": 0, "torch": 0}

    def rotate(name: str) -> Callable[[], None]:
        """Like our keep=1 retention: each save writes a new file; the previous one is deleted (untimed) after."""
        def run() -> None:
            (root / name).mkdir(exist_ok=True)
            counter[name] += 1
            for old in (root / name).iterdir():
                if old.name != f"{counter[name] - 1}":
                    old.unlink()
        return run

    def write_raw(path: Path, flags: int) -> None:
        """Every tensor's bytes written sequentially, then fsync: what the disk allows."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        for t in sd.values():
            view = memoryview(t.view(torch.uint8).numpy()) if t.dtype != torch.bfloat16 else \
                memoryview(t.view(torch.int16).numpy()).cast("B")
            written = 0
            while written < view.nbytes:
                written += os.write(fd, view[written:])
        os.fsync(fd)
        os.close(fd)

    def raw() -> None:
        write_raw(root / "raw" / f"{counter['raw']}", os.O_TRUNC)

    def tsave() -> None:
        path = root / "torch" / f"{counter['torch']}"
        torch.save(sd, path)
        fsync_path(path)

    inplace = [0]

    def raw_in_place() -> None:
        """The disk's floor for our file lifecycle: overwrite the older of two files in place, then fsync."""
        (root / "inplace").mkdir(exist_ok=True)
        inplace[0] ^= 1
        write_raw(root / "inplace" / str(inplace[0]), 0)

    ours = Checkpointer(root / "ours", keep=2, handle_sigterm=False)
    step = [0]

    def our_save() -> None:
        step[0] += 1
        ours.save(step[0], state)

    save_cases = {"raw": (rotate("raw"), raw), "inplace": (lambda: None, raw_in_place),
                  "torch": (rotate("torch"), tsave), "ours": (lambda: None, our_save)}
    # (peaks of the warm-up rounds are kept too: the first save of a process is the one that sizes everything)
    interleaved(save_cases, 2)  # warm-up: steady state of a job that saves periodically (file system blocks reused)
    saves = interleaved(save_cases, args.repeat)
    t_raw, t_inplace_raw, t_torch, t_ours = (statistics.median(saves[k]) for k in ("raw", "inplace", "torch", "ours"))
    b_raw, b_inplace_raw, b_torch, b_ours = (min(saves[k]) for k in ("raw", "inplace", "torch", "ours"))

    reader = Checkpointer(root / "ours", handle_sigterm=False)
    loaded: dict[str, object] = {}

    def our_load() -> None:
        loaded.clear()
        maybe_resume(loaded, reader)  # fresh tensors, every checksum verified, like torch.load returns
        loaded.clear()  # released inside the timed region, as torch.load's result is

    def torch_load() -> None:
        torch.load(root / "torch" / str(counter["torch"]), weights_only=True)

    # a live model's tensors: resident already (filled), so the RSS column shows only what loading adds
    target = {"model": {k: torch.full_like(v, 7) for k, v in sd.items()}}

    def our_load_in_place() -> None:
        maybe_resume(target, reader)  # what a resumed trainer does: straight into the model's own tensors

    def torch_load_mmap() -> None:
        loaded_mmap = torch.load(root / "torch" / str(counter["torch"]), weights_only=True, mmap=True)
        for tensor in loaded_mmap.values():  # touch every page: mmap alone reads nothing
            tensor.sum()

    load_cases = {"torch_load": (lambda: warm(root / "torch"), torch_load),
                  "torch_load_mmap": (lambda: warm(root / "torch"), torch_load_mmap),
                  "ours_load": (lambda: warm(root / "ours"), our_load),
                  "ours_load_in_place": (lambda: warm(root / "ours"), our_load_in_place)}
    try:
        from safetensors.torch import load_file, save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "st.safetensors"))
        def safetensors_load() -> None:
            for tensor in load_file(str(root / "st.safetensors")).values():  # touch: it maps lazily
                tensor.sum()

        load_cases["safetensors"] = (lambda: warm(root / "st.safetensors"), safetensors_load)
    except ImportError:
        print("(safetensors not installed: its baseline is skipped)")
    # fresh loads are dominated by getting new memory from the VM, whose cost varies five-fold between rounds here
    # (0.47-2.5 s for the same torch.load): twice the rounds, for a steadier median
    loads = interleaved(load_cases, 2 * args.repeat)
    t_tload, t_load = statistics.median(loads["torch_load"]), statistics.median(loads["ours_load"])
    b_tload, b_load = min(loads["torch_load"]), min(loads["ours_load"])
    t_inplace, b_inplace = statistics.median(loads["ours_load_in_place"]), min(loads["ours_load_in_place"])
    assert all(torch.equal(target["model"][k], v) for k, v in sd.items())

    def async_saves(direct_io: bool) -> tuple[list[float], list[float], list[float]]:
        """Stall, time to durable, and busy CPU seconds of the whole machine meanwhile (the caller only waits, so
        this is the writer's, the kernel's writeback included)."""
        ckpt = Checkpointer(root / f"async-{direct_io}", keep=1, async_save=True, handle_sigterm=False,
                            direct_io=direct_io)
        stalls, totals, cpu = [], [], []
        for i in range(args.repeat + 1):  # the first save sizes the snapshot arena; later ones reuse it
            os.sync()
            with PeakRSS() as peak:
                cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
                ckpt.save(i + 1, state)
                stall = time.perf_counter() - t0
                ckpt.wait()
            PEAKS["async"] = max(PEAKS.get("async", 0), peak.extra)
            if i:
                stalls.append(stall)
                totals.append(time.perf_counter() - t0)
                cpu.append(busy_cpu_seconds() - cpu0)
        check = {"model": {k: torch.zeros_like(v) for k, v in sd.items()}}  # what was timed is also right
        assert maybe_resume(check, Checkpointer(root / f"async-{direct_io}", handle_sigterm=False)) == args.repeat + 1
        assert all(torch.equal(check["model"][k], v) for k, v in sd.items())
        return stalls, totals, cpu

    stalls, totals, cpus = async_saves(direct_io=True)
    _, totals_buffered, cpus_buffered = async_saves(direct_io=False)
    t_stall, b_stall = statistics.median(stalls), min(stalls)
    encode, copy = [], []
    arena = None
    for _ in range(args.repeat):  # what the stall is made of: walking the state, then the snapshot copy
        t0 = time.perf_counter()
        snapshot = Snapshot(state)
        t1 = time.perf_counter()
        arena = snapshot.detach(arena)
        encode.append(t1 - t0)
        copy.append(time.perf_counter() - t1)
    overhead = training_loop_overhead(sd, root, args.loop_seconds)

    rows = [("raw write+fsync (new file)", saves["raw"], "raw"),
            ("raw overwrite in place+fsync", saves["inplace"], "inplace"),
            ("torch.save+fsync", saves["torch"], "torch"), ("ckpt_sdk save (sync)", saves["ours"], "ours"),
            ("torch.load(weights_only=True)", loads["torch_load"], "torch_load"),
            ("torch.load(mmap=True)+touch", loads["torch_load_mmap"], "torch_load_mmap")]
    if "safetensors" in loads:
        rows.append(("safetensors load_file+touch", loads["safetensors"], "safetensors"))
    rows += [("ckpt_sdk load (verified)", loads["ours_load"], "ours_load"),
             ("ckpt_sdk load in place (verified)", loads["ours_load_in_place"], "ours_load_in_place"),
             ("ckpt_sdk async save stall", stalls, "async")]
    print(f"{'':<34}{'median':>8}  {'best':>8}  {'worst':>8}  {'GB/s':>6}  {'peak extra RSS':>15}")
    for label, times, key in rows:
        med, extra = statistics.median(times), PEAKS.get(key, 0)
        print(f"{label:<34}{med:8.3f}s {min(times):8.3f}s {max(times):8.3f}s  {nbytes / med / 1e9:6.2f}  "
              f"{extra / 1e6:8.0f} MB {extra / nbytes:4.2f}x")
    print(f"(async stall = walking the state {statistics.median(encode) * 1e3:.1f} ms + the snapshot copy "
          f"{statistics.median(copy) * 1e3:.1f} ms on {COPY_THREADS} threads, medians)")
    print("(peak extra RSS: resident memory above the level before the case, as a multiple of the state size;"
          " the async case includes its arena)")
    print(f"(an async save is durable {statistics.median(totals):.3f} s after it starts and takes "
          f"{statistics.median(cpus):.3f} CPU-seconds (whole machine), in the background; through the page cache, "
          f"direct_io=False: {statistics.median(totals_buffered):.3f} s and {statistics.median(cpus_buffered):.3f}"
          " CPU-seconds)")
    print("ratios, median (best):")
    print(f"  save vs torch.save             {t_torch / t_ours:5.2f}x ({b_torch / b_ours:5.2f}x)   target >= 1.2x")
    print(f"  save vs raw write (new file)   {t_raw / t_ours:5.2f}x ({b_raw / b_ours:5.2f}x)   target >= 0.8x")
    print(f"  save vs raw overwrite in place {t_inplace_raw / t_ours:5.2f}x ({b_inplace_raw / b_ours:5.2f}x)"
          "   target >= 0.9x")
    print(f"  load vs torch.load             {t_tload / t_load:5.2f}x ({b_tload / b_load:5.2f}x)   target >= 1.5x")
    print(f"  load in place vs torch.load    {t_tload / t_inplace:5.2f}x ({b_tload / b_inplace:5.2f}x)")
    print(f"  async stall / sync save        {t_stall / t_ours:5.2f}  ({b_stall / b_ours:5.2f})    target <= 0.15")
    print(f"training loop, one save every {args.loop_seconds:.0f} s of compute: overhead "
          + ", ".join(f"{name} {100 * value:.2f}%" for name, value in overhead.items()) + "   target async <= 1%")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
