"""Ctrl-C and SIGTERM during training: stop at the end of the step, save, say where, exit non-zero.

The first signal asks the loop to stop once the current step is done (under torchrun every
process learns it at the same step, through one all-reduce); the loop then saves a checkpoint
(when `save_on_interrupt`) and raises `Interrupted`, which the CLI prints as one line. A second
signal abandons the step at once.
"""

from __future__ import annotations

import signal
import sys
import threading

from grpo.errors import GrpoError


class Interrupted(GrpoError):
    """The run stopped on a signal; the message says at which step and where it was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequests:
    """A context that turns SIGINT / SIGTERM into a request the loop reads at step boundaries."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say=None):
        self.signum: int | None = None
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt  # the second one: stop now
        self.signum = signum
        self.say(f"grpo: {signal.Signals(signum).name}: stopping at the end of this step "
                 f"(again to stop at once, without saving)")

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
