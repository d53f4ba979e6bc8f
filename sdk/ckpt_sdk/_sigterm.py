"""One process-wide SIGTERM handler, shared by every Checkpointer: it only sets a flag (the save happens at the next
maybe_save) and chains to the handler it replaced. It also records an uncaught exception for the termination
message, since Kubernetes shows the container's log tail only when that message is empty."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType, TracebackType

log = logging.getLogger("ckpt_sdk")

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]
SignalHandler = Callable[[int, FrameType | None], object]


class Sigterm:
    """One process-wide SIGTERM handler shared by every Checkpointer; it chains to the handler it replaced.
    It also records an uncaught exception (through a chained sys.excepthook) for the termination message, since
    Kubernetes shows the container's log tail only when that message is empty."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.arrived: float | None = None  # time.monotonic() of the first SIGTERM
        self.installed = False
        self.previous: SignalHandler | None = None
        self.error: str | None = None  # the uncaught exception that is ending the process

    def _excepthook(self, previous: ExceptHook) -> ExceptHook:
        def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            self.error = "".join(traceback.format_exception_only(kind, value)).strip()[-1500:]
            previous(kind, value, tb)
        return hook

    def install(self) -> bool:
        if self.installed:
            return True
        sys.excepthook = self._excepthook(sys.excepthook)
        if threading.current_thread() is not threading.main_thread():
            log.warning("ckpt: Checkpointer created off the main thread; SIGTERM is not handled")
            return False
        previous = signal.getsignal(signal.SIGTERM)
        self.previous = previous if callable(previous) else None
        signal.signal(signal.SIGTERM, self.handle)
        self.installed = True
        return True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.arrived is None:
            self.arrived = time.monotonic()
        self.event.set()  # only a flag: the save happens at the next maybe_save
        if self.previous is not None:
            self.previous(signum, frame)


SIGTERM = Sigterm()


def grace_left(grace_seconds: float) -> float | None:
    """Seconds left of the grace period since SIGTERM arrived (None before it did)."""
    if SIGTERM.arrived is None:
        return None
    return grace_seconds - (time.monotonic() - SIGTERM.arrived)
