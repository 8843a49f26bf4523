"""Ctrl-C, SIGTERM and SIGHUP during training: stop at the end of the step, save, say where, exit
non-zero.

The first signal asks the loop to stop once the current step is done (under torchrun every
process learns it at the same step, through one all-reduce); the loop then saves a checkpoint
(when `save_on_interrupt`) and raises `Interrupted`, which the CLI prints as one line. A second
signal during a step abandons the step at once.

SIGHUP (the terminal closed, the ssh connection dropped) is a request to stop like SIGTERM; a
terminal that is gone cannot be written to, so what the run would print goes to /dev/null from
then on (metrics.jsonl still gets every step).

After the last step the handlers stay installed until the trained model is saved:
- a signal during the final evaluation abandons it at once (`unless_stopped`) and the run goes on
  to save the trained model, then stops with `Interrupted`, saying where the model is;
- during the final save every signal waits for the save to end (`deferred`, a few seconds):
  stopping half-way would lose every step trained. Only SIGKILL cuts it short, and then the
  model's temporary directory is what is lost, never a model already in place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from grpo.errors import GrpoError


class Interrupted(GrpoError):
    """The run stopped on a signal; the message says at which step and where it was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP


class Abandoned(BaseException):
    """Raised by the handler out of a block that a signal cuts short (`unless_stopped`). Not an
    Exception: a reward function's `except Exception` must not swallow it."""


STEP, ABANDON, DEFER = "step", "abandon", "defer"


class StopRequests:
    """A context that turns SIGINT / SIGTERM / SIGHUP into a request the loop reads at step
    boundaries."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self, say=None):
        self.signum: int | None = None
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous = {}
        self._mode = STEP
        self._abandoned = False

    def _tell(self, message: str) -> None:
        try:
            self.say(message)
        except (OSError, ValueError):  # a terminal that is gone: the run goes on regardless
            pass

    def _handle(self, signum, frame):
        first = self.signum is None
        if first:
            self.signum = signum
        if signum == getattr(signal, "SIGHUP", None):
            _silence_terminal()
        name = signal.Signals(signum).name
        if self._mode == DEFER:
            self._tell(f"grpo: {name}: saving the trained model first, then stopping")
            return
        if self._mode == ABANDON:
            if not self._abandoned:
                self._abandoned = True
                self._tell(f"grpo: {name}: skipping the final evaluation; saving the trained model")
                raise Abandoned
            return
        if not first:
            raise KeyboardInterrupt  # the second one: stop now
        self._tell(f"grpo: {name}: stopping at the end of this step (again to stop at once, without saving)")

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

    def unless_stopped(self, fn):
        """`fn()`, unless a stop was requested before it starts or while it runs (a signal then
        abandons it at once): None then. For work after the last step that is worth less than
        saving what was trained (the final evaluation)."""
        if self.requested:
            return None
        previous = self._mode
        try:
            self._mode = ABANDON
            try:
                return fn()
            finally:
                self._mode = previous
        except Abandoned:
            self._mode = previous
            return None

    @contextlib.contextmanager
    def deferred(self):
        """A block no signal interrupts (what follows the last step: the final save): signals are
        recorded, and read after it; `unless_stopped` inside it still abandons its work."""
        previous, self._mode = self._mode, DEFER
        try:
            yield
        finally:
            self._mode = previous


def _silence_terminal() -> None:
    """After SIGHUP: standard output and error, when they were the terminal that is gone, go to
    /dev/null (a write to a hung-up terminal fails, and would stop the run before it saves)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for fd in (1, 2):
            try:
                if os.isatty(fd):
                    os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)
