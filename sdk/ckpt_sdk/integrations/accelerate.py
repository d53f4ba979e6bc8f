"""Preemption-safe `save_state`/`load_state` for Hugging Face Accelerate, through the SDK's own storage:

    from ckpt_sdk.integrations.accelerate import load_state, save_state
    step = load_state(accelerator)             # the newest complete checkpoint into every prepared object; 0 if none
    while step < total_steps:
        ...; step += 1
        save_state(accelerator, step)          # when due; on SIGTERM: save, then exit 143

The prepared models (unwrapped), optimizers, schedulers and objects registered with `register_for_checkpointing`
are saved with every rank's RNG state as one SDK checkpoint: atomic, fenced, no pickle on the load path (Accelerate's
own `save_state` pickles RNG and sampler state). Models, optimizers and schedulers are the same on every rank under
DDP: rank 0 writes them once (`replicated`), every rank its own RNG state. It is `Checkpointer.maybe_save` with the
Accelerator's objects as the state: the same signals, agreement across ranks and exit codes.
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator

from .._checkpointer import Checkpointer
from .._rng import RNGState

SHARED = ("models", "optimizers", "schedulers", "objects")  # identical on every rank under DDP
_checkpointers: dict[int, Checkpointer] = {}


def checkpointer_for(accelerator: Accelerator, **options: Any) -> Checkpointer:
    """The Checkpointer `save_state`/`load_state` use for this Accelerator (made once; `options` as
    `Checkpointer(...)`'s, e.g. `every_steps=100`, `async_save=True`, `keep=5`)."""
    known = _checkpointers.get(id(accelerator))
    if known is None:
        known = _checkpointers[id(accelerator)] = Checkpointer(replicated=SHARED, **options)
    return known


def state_of(accelerator: Accelerator) -> dict[str, Any]:
    """What Accelerate's own `save_state` saves, as a state dict the SDK stores without pickle."""
    return {
        "models": [accelerator.unwrap_model(model) for model in accelerator._models],
        "optimizers": list(accelerator._optimizers),
        "schedulers": list(accelerator._schedulers),
        "objects": list(accelerator._custom_objects),
        "rng": RNGState(),
    }


def save_state(accelerator: Accelerator, step: int, *, metrics: dict[str, float] | None = None,
               **options: Any) -> bool:
    """Save when due (and on SIGTERM or the slot's end: save, then exit 143); call it at every step on every rank.
    True if a checkpoint was saved."""
    return checkpointer_for(accelerator, **options).maybe_save(step, state_of(accelerator), metrics=metrics)


def load_state(accelerator: Accelerator, **options: Any) -> int:
    """Load the newest complete checkpoint into the Accelerator's prepared objects; its step, or 0 if none."""
    return checkpointer_for(accelerator, **options).restore(state_of(accelerator))
