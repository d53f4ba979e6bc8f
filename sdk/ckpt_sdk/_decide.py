"""What to do at a step, as a pure function of what the ranks agreed (see _coordinate): nothing, a save, a save
that answers a checkpoint request, a save then exit 143, or exit 143 on the last durable checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ._coordinate import Agreement
from .contract import ExitReason


class Action(Enum):
    NOTHING = "nothing"
    SAVE = "save"  # the save policy says this step is due
    ANSWER_REQUEST = "answer-request"  # an interruption notice asked for a checkpoint: save, train on
    SAVE_AND_EXIT = "save-and-exit"  # SIGTERM or the slot's end: save this step, then exit 143
    EXIT = "exit"  # stop on the last durable checkpoint: a save now would not fit, or cannot be complete


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: ExitReason | None = None  # why the process exits (SAVE_AND_EXIT, EXIT)
    request: float | None = None  # the request's deadline (ANSWER_REQUEST)


def decide(agreement: Agreement, last_step: int | None) -> Decision:
    """The action for the agreed signals at the agreed step. A stop wins over a request, a request over a due save."""
    signals = agreement.signals
    if signals.stop or signals.deadline:
        reason = ExitReason.PREEMPTED if signals.stop else ExitReason.DEADLINE
        if not agreement.complete or (signals.covered and last_step is not None):
            return Decision(Action.EXIT, reason)
        return Decision(Action.SAVE_AND_EXIT, reason)
    if signals.request is not None:
        return Decision(Action.ANSWER_REQUEST, request=signals.request)
    return Decision(Action.SAVE if signals.due else Action.NOTHING)
