"""A deterministic training loop that logs every step to TensorBoard (ckpt_sdk.integrations.tensorboard) and to a
JSON-lines metrics log (ckpt_sdk.MetricsLog), both flushed at every step, so a killed attempt leaves events past
its last checkpoint on disk. Prints `step N` after logging step N."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ckpt_sdk import Checkpointer, MetricsLog, maybe_resume
from ckpt_sdk.integrations.tensorboard import SummaryWriter


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every-steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.02)
    args = parser.parse_args()
    ckpt = Checkpointer(os.environ["CKPT_DIR"], every_steps=args.every_steps)
    state = {"model": {"w": 1.0}}
    step = maybe_resume(state, ckpt)
    writer = SummaryWriter(resumed_step=step)  # $CKPT_DIR/tensorboard
    metrics = MetricsLog(resumed_step=step)  # $CKPT_DIR/metrics.jsonl
    print(f"resumed {step} dropped {writer.dropped_events} {metrics.dropped}", flush=True)
    while step < args.steps:
        state["model"]["w"] = state["model"]["w"] * 0.97 + 0.1 * ((step % 7) - 3)
        step += 1
        loss = state["model"]["w"] ** 2
        writer.add_scalar("train/loss", loss, step)
        writer.flush()
        metrics.log(step, loss=loss)
        print(f"step {step}", flush=True)
        time.sleep(args.step_seconds)
        ckpt.maybe_save(step, state)
    writer.close()
    metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
