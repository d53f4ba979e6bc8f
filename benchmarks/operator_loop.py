"""The operator's CPU for what a storm repeats besides requests, each against a baseline measured in the same run.

- A job worker's hand-off: woken by an event, it runs a small pass in the thread pool and returns to the loop
  (`asyncio.to_thread`), for thousands of workers at once; on asyncio's event loop (the baseline) and on uvloop's,
  which the operator runs.
- Taking rate-limiter tokens with 16 threads waiting in one lane (the creates of a storm): the limiter as it was, all
  waiters sleeping in the bucket and woken by every token (the baseline), against the limiter the operator runs, whose
  waiters queue on a gate with one polling the bucket.

CPU is this process's (`time.process_time`), best of `--repeat` rounds.

    python benchmarks/operator_loop.py [--workers 2000] [--passes 20] [--seconds 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "sdk")]

from ckpt_operator.apiclient import NORMAL, RECONCILE_THREADS, TokenBucket  # noqa: E402

LoopFactory = Callable[[], asyncio.AbstractEventLoop] | None


def small_pass() -> int:
    """Stands for a pass that changes nothing: a little Python work in a thread."""
    return sum(range(200))


async def workers(count: int, passes: int) -> None:
    """`count` workers, each woken `passes` times and running a pass in the thread pool each time."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(RECONCILE_THREADS))

    async def worker() -> None:
        wakeup = asyncio.Event()
        for _ in range(passes):
            wakeup.set()
            await asyncio.wait_for(wakeup.wait(), timeout=60)
            wakeup.clear()
            await asyncio.to_thread(small_pass)

    await asyncio.gather(*(worker() for _ in range(count)))


def cpu_per_hand_off(factory: LoopFactory, count: int, passes: int, repeat: int) -> float:
    """Microseconds of CPU per wake-up and hand-off, best of `repeat` rounds."""
    best = float("inf")
    for _ in range(repeat):
        began = time.process_time()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(workers(count, passes))
        best = min(best, (time.process_time() - began) / (count * passes) * 1e6)
    return best


class AllWakeBucket(TokenBucket):
    """The limiter before the gates: every waiting thread sleeps in the bucket and wakes for every token."""

    def acquire(self, level: int = NORMAL) -> None:
        with self._cond:
            self._waiting[level] += 1
            try:
                while (wait := self._take(level)) is not None:
                    self._cond.wait(wait)
            finally:
                self._waiting[level] -= 1
                self._cond.notify_all()


def cpu_per_token(bucket: TokenBucket, threads: int, seconds: float) -> tuple[float, int]:
    """Microseconds of CPU per token taken by `threads` threads for `seconds`, and the tokens taken."""
    stop, taken = time.monotonic() + seconds, [0] * threads

    def take(index: int) -> None:
        while time.monotonic() < stop:
            bucket.acquire()
            taken[index] += 1

    pool = [threading.Thread(target=take, args=(index,)) for index in range(threads)]
    began = time.process_time()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return (time.process_time() - began) / sum(taken) * 1e6, sum(taken)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2000, help="job workers woken at once")
    parser.add_argument("--passes", type=int, default=20, help="passes of each worker per round")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each limiter round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (the best one counts)")
    args = parser.parse_args()
    baseline = cpu_per_hand_off(None, args.workers, args.passes, args.repeat)
    ours = cpu_per_hand_off(uvloop.new_event_loop, args.workers, args.passes, args.repeat)
    print(f"{'CPU per wake-up and hand-off (us)':44s} {'asyncio':>10s} {'uvloop':>10s} {'ratio':>7s}")
    label = f"{args.workers} workers x {args.passes} passes"
    print(f"{label:44s} {baseline:10.1f} {ours:10.1f} {ours / baseline:7.2f}")
    print(f"{'CPU per token, qps 50, 16 threads waiting (us)':44s} {'all wake':>10s} {'gated':>10s} {'ratio':>7s}")
    for round_ in range(args.repeat):
        before, before_taken = cpu_per_token(AllWakeBucket(50, 1), 16, args.seconds)
        after, after_taken = cpu_per_token(TokenBucket(50, 1), 16, args.seconds)
        label = f"round {round_ + 1} (tokens {before_taken} / {after_taken})"
        print(f"{label:44s} {before:10.1f} {after:10.1f} {after / before:7.2f}")


if __name__ == "__main__":
    main()
