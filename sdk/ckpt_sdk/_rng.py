"""RNGState: a Stateful that captures Python, numpy and torch (CPU and CUDA) random number generators."""

from __future__ import annotations

import hashlib
import random
import sys
from typing import Any

MARKER = "ckpt_sdk_rng"  # in every state_dict: tells a resharded load which values are per-rank random state
RESEED = "reseed"  # a state_dict of only {MARKER, RESEED: seed}: seed every generator from it (a rank that is new)


def derived_seed(step: int, rank: int) -> int:
    """The seed of a rank that did not exist when the checkpoint was saved: the same for the same step and rank."""
    return int.from_bytes(hashlib.sha256(f"ckpt-sdk-rng/{step}/{rank}".encode()).digest()[:4], "little")


class RNGState:
    """Include it in the state (`state["rng"] = RNGState()`) to make a resumed run bitwise-identical.

    Global generators are captured when present; pass numpy `Generator`s or `torch.Generator`s you own as extra.
    """

    def __init__(self, *generators: Any) -> None:
        self.generators = list(generators)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {MARKER: 1, "python": random.getstate()}
        np = sys.modules.get("numpy")
        if np is not None:
            state["numpy"] = np.random.get_state()
        torch = sys.modules.get("torch")
        if torch is not None:
            state["torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                state["torch_cuda"] = torch.cuda.get_rng_state_all()
        state["generators"] = [_get(g) for g in self.generators]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if RESEED in state:
            self.reseed(int(state[RESEED]))
            return
        random.setstate(state["python"])
        if "numpy" in state:
            import numpy as np

            np.random.set_state(state["numpy"])
        if "torch" in state:
            import torch

            torch.set_rng_state(state["torch"])
            if "torch_cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["torch_cuda"])
        for generator, saved in zip(self.generators, state.get("generators", []), strict=False):
            _set(generator, saved)


    def reseed(self, seed: int) -> None:
        """Seed every generator from `seed` (each of the extra ones from `seed` plus its position)."""
        random.seed(seed)
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed(seed)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.manual_seed(seed)
        for index, generator in enumerate(self.generators):
            if hasattr(generator, "bit_generator"):
                generator.bit_generator.state = type(generator.bit_generator)(seed + index + 1).state
            else:
                generator.manual_seed(seed + index + 1)


def _get(generator: Any) -> Any:
    if hasattr(generator, "bit_generator"):  # numpy.random.Generator
        return generator.bit_generator.state
    return generator.get_state()  # torch.Generator


def _set(generator: Any, saved: Any) -> None:
    if hasattr(generator, "bit_generator"):
        generator.bit_generator.state = saved
    else:
        generator.set_state(saved)
