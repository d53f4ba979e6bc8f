"""Exceptions of ckpt_operator.

OperatorError                base of everything the operator raises on purpose
 +-- InvalidSpecError        the TrainingJob passed the CRD schema but cannot run as written (e.g. missing claim)
 +-- WatchError              the pod watch's stream reported an error
      +-- WatchExpired       ... that its resourceVersion is too old (410 Gone): list again
"""

from __future__ import annotations


class OperatorError(Exception):
    """Base class for the operator's own errors."""


class InvalidSpecError(OperatorError):
    """A schema-valid spec that cannot be acted on; `reason` becomes the condition reason."""

    def __init__(self, reason: str, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_seconds = retry_after_seconds  # when to try again (None: the default problem retry)


class WatchError(OperatorError):
    """An ERROR event in the pod watch's stream (the watch resumes from its last resourceVersion)."""


class WatchExpired(WatchError):
    """The pod watch's resourceVersion is too old (410 Gone): the pods are listed again."""
