"""Keras-style "save best only": keep the 3 most recent checkpoints plus the one with the lowest validation loss.

    python examples/keep_best.py --dir /tmp/kb && python -m ckpt_sdk ls /tmp/kb
"""

from __future__ import annotations

import argparse
import math

from ckpt_sdk import Checkpointer, maybe_resume


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="./checkpoints-keep-best")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    state = {"w": [0.0, 0.0], "extra": {"best": None}}
    ckpt = Checkpointer(args.dir, every_steps=10, keep=3, keep_best=1, metric="val_loss", mode="min")
    step = maybe_resume(state, ckpt)
    while step < args.steps:
        step += 1
        state["w"] = [w + 0.01 for w in state["w"]]
        val_loss = 1 + math.sin(step / 15)  # noisy: the best checkpoint is not the newest
        ckpt.maybe_save(step, state, metrics={"val_loss": val_loss})
    for info in ckpt.checkpoints():
        print(f"step {info.step:4d}  val_loss {info.metrics['val_loss']:.3f}")


if __name__ == "__main__":
    main()
