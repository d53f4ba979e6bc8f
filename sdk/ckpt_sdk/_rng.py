"""RNGState: a Stateful that captures Python, numpy and torch (CPU and CUDA) random number generators."""

from __future__ import annotations

import random
import sys
from typing import Any


class RNGState:
    """Include it in the state (`state["rng"] = RNGState()`) to make a resumed run bitwise-identical.

    Global generators are captured when present; pass numpy `Generator`s or `torch.Generator`s you own as extra.
    """

    def __init__(self, *generators: Any) -> None:
        self.generators = list(generators)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate()}
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


def _get(generator: Any) -> Any:
    if hasattr(generator, "bit_generator"):  # numpy.random.Generator
        return generator.bit_generator.state
    return generator.get_state()  # torch.Generator


def _set(generator: Any, saved: Any) -> None:
    if hasattr(generator, "bit_generator"):
        generator.bit_generator.state = saved
    else:
        generator.set_state(saved)
