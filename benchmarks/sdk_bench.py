"""SDK benchmark: a ~1 GB torch state dict, all baselines measured in the same run.

    make bench            (or: python benchmarks/sdk_bench.py --gb 1 --repeat 3)

Prints medians and ratios: our sync save vs torch.save+fsync vs a raw sequential write+fsync of the same bytes;
our load (checksums verified) vs torch.load(weights_only=True); the async-save stall vs the sync save.
"""

from __future__ import annotations

import argparse
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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    sd = state_dict(args.gb)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    state = {"model": sd}
    print(f"state: {len(sd)} tensors, {nbytes / 1e9:.2f} GB; dir {root}; torch {torch.__version__}; "
          f"median of {args.repeat}")

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

    def raw() -> None:
        path = root / "raw" / f"{counter['raw']}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for t in sd.values():
            view = memoryview(t.view(torch.uint8).numpy()) if t.dtype != torch.bfloat16 else \
                memoryview(t.view(torch.int16).numpy()).cast("B")
            written = 0
            while written < view.nbytes:
                written += os.write(fd, view[written:])
        os.fsync(fd)
        os.close(fd)

    def tsave() -> None:
        path = root / "torch" / f"{counter['torch']}"
        torch.save(sd, path)
        fsync_path(path)

    ours = Checkpointer(root / "ours", keep=2, handle_sigterm=False)
    step = [0]

    def our_save() -> None:
        step[0] += 1
        ours.save(step[0], state)

    save_cases = {"raw": (rotate("raw"), raw), "torch": (rotate("torch"), tsave), "ours": (lambda: None, our_save)}
    # (peaks of the warm-up rounds are kept too: the first save of a process is the one that sizes everything)
    interleaved(save_cases, 2)  # warm-up: steady state of a job that saves periodically (file system blocks reused)
    saves = interleaved(save_cases, args.repeat)
    t_raw, t_torch, t_ours = (statistics.median(saves[k]) for k in ("raw", "torch", "ours"))
    b_raw, b_torch, b_ours = (min(saves[k]) for k in ("raw", "torch", "ours"))

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

    loads = interleaved({"torch_load": (lambda: warm(root / "torch"), torch_load),
                         "ours_load": (lambda: warm(root / "ours"), our_load),
                         "ours_load_in_place": (lambda: warm(root / "ours"), our_load_in_place)}, args.repeat)
    t_tload, t_load = statistics.median(loads["torch_load"]), statistics.median(loads["ours_load"])
    b_tload, b_load = min(loads["torch_load"]), min(loads["ours_load"])
    t_inplace, b_inplace = statistics.median(loads["ours_load_in_place"]), min(loads["ours_load_in_place"])
    assert all(torch.equal(target["model"][k], v) for k, v in sd.items())

    async_ckpt = Checkpointer(root / "async", keep=1, async_save=True, handle_sigterm=False)
    stalls, totals = [], []
    for i in range(args.repeat + 1):  # the first save sizes the snapshot arena; later ones reuse it
        os.sync()
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            async_ckpt.save(i + 1, state)
            stall = time.perf_counter() - t0
            async_ckpt.wait()
        PEAKS["async"] = max(PEAKS.get("async", 0), peak.extra)
        if i:
            stalls.append(stall)
            totals.append(time.perf_counter() - t0)
    t_stall, b_stall = statistics.median(stalls), min(stalls)

    print(f"{'':<32}{'median':>8}  {'best':>8}  {'GB/s (median)':>14}  {'peak extra RSS':>15}")
    for label, med, best, key in (("raw write+fsync", t_raw, b_raw, "raw"),
                                  ("torch.save+fsync", t_torch, b_torch, "torch"),
                                  ("ckpt_sdk save (sync)", t_ours, b_ours, "ours"),
                                  ("torch.load(weights_only=True)", t_tload, b_tload, "torch_load"),
                                  ("ckpt_sdk load (verified)", t_load, b_load, "ours_load"),
                                  ("ckpt_sdk load in place", t_inplace, b_inplace, "ours_load_in_place"),
                                  ("ckpt_sdk async save stall", t_stall, b_stall, "async")):
        extra = PEAKS.get(key, 0)
        print(f"{label:<32}{med:8.3f}s {best:8.3f}s  {nbytes / med / 1e9:14.2f}  "
              f"{extra / 1e6:8.0f} MB {extra / nbytes:4.2f}x")
    print("(peak extra RSS: resident memory above the level before the case, as a multiple of the state size;"
          " the async case includes its arena)")
    print(f"(an async save completes in {statistics.median(totals):.3f} s, in the background)")
    print("ratios, median (best):")
    print(f"  save vs torch.save      {t_torch / t_ours:5.2f}x ({b_torch / b_ours:5.2f}x)   target >= 1.2x")
    print(f"  save vs raw write       {t_raw / t_ours:5.2f}x ({b_raw / b_ours:5.2f}x)   target >= 0.8x")
    print(f"  load vs torch.load      {t_tload / t_load:5.2f}x ({b_tload / b_load:5.2f}x)   target >= 1.5x")
    print(f"  async stall / sync save {t_stall / t_ours:5.2f}  ({b_stall / b_ours:5.2f})    target <= 0.15")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
