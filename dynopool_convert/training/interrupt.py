"""Ctrl-C during fine-tuning: the first stops after the current step (saving last.pt), the second at once."""
from __future__ import annotations

import signal
import threading

__all__ = ["StopFlag"]


class StopFlag:
    """First Ctrl-C: stop after the current step (saving last.pt); second: interrupt at once."""

    def __init__(self, enabled: bool, callbacks) -> None:  # callbacks: a TrainCallbacks
        self.requested = False
        self._old = None
        self._callbacks = callbacks
        if enabled and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._callbacks.on_message("interrupt: stopping after this step and saving last.pt (Ctrl-C again to abort)")

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
