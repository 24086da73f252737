"""Reasons a run stops early, and the signal handling that turns SIGTERM/SIGINT into a clean stop.

Exit codes (documented in the README, returned by the CLI): 75 = preempted by a signal, a checkpoint of the stop
step was written, rerun with `--resume_from_checkpoint latest` (75 is EX_TEMPFAIL: "try again later");
3 = stopped after too many consecutive non-finite losses or gradients, or because the weights themselves became
non-finite (never checkpointed or exported; the checkpoints on disk are intact).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3


class TrainingStopped(Exception):
    """The run stopped before max_train_steps for a reason the CLI reports with its own exit code."""

    exit_code = 1


class Preempted(TrainingStopped):
    exit_code = EXIT_PREEMPTED


class NonFiniteLoss(TrainingStopped):
    exit_code = EXIT_NONFINITE


class NonFiniteWeights(TrainingStopped):
    """The weights (or their EMA) hold NaN/Inf: they are not checkpointed or exported."""

    exit_code = EXIT_NONFINITE


class SignalStop(KeyboardInterrupt):
    """SIGTERM/SIGINT outside the training steps (start-up, the end-of-run report): the CLI prints one line and
    exits with 75. A KeyboardInterrupt, so that no library's `except Exception` swallows it."""

    exit_code = EXIT_PREEMPTED


class _SignalHandling:
    """While active, `_handle` answers the signals in `SIGNALS`; the previous handlers come back on exit. Handlers
    can only be installed from the main thread; in other threads this is inert."""

    SIGNALS: tuple = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError


def _inside_import(frame) -> bool:
    """Whether `frame` (where a signal handler interrupted the main thread) runs inside an import statement: the
    import system's frames are in the frozen importlib modules."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


class _RaiseOutsideImports(_SignalHandling):
    """Signal handling that raises an exception in the main thread, but never inside an import statement.

    An exception raised in the middle of an import leaves half-initialised modules behind (numpy's lazy submodule
    imports then fail with a RecursionError instead of the stop), so a signal that lands inside one is recorded
    and delivered again, by this process to itself, every `RETRY_S` until the import is done; leaving the block
    with a signal still pending raises at the block's end. Subclasses say what to raise (`_exception`)."""

    RETRY_S = 0.05

    def __enter__(self):
        self._pending = None
        self._retry = None
        self._lock = threading.Lock()
        self._closed = False
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        with self._lock:  # no redelivery once the handlers are being restored
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()
        super().__exit__(*exc)
        if self._pending is not None and exc[0] is None:
            raise self._exception(self._pending)

    def _redeliver(self, signum) -> None:
        with self._lock:
            if not self._closed:
                os.kill(os.getpid(), signum)

    def _handle(self, signum, frame) -> None:
        if _inside_import(frame):
            self._pending = signum
            # a redelivery that still lands inside the import comes back here and schedules the next one
            self._retry = threading.Timer(self.RETRY_S, self._redeliver, (signum,))
            self._retry.daemon = True
            self._retry.start()
            return
        self._pending = None
        raise self._exception(signum)

    def _exception(self, signum) -> BaseException:
        raise NotImplementedError


class StopOutsideSteps(_RaiseOutsideImports):
    """While active (main thread only), SIGTERM and SIGINT raise `SignalStop`, saying `where` the signal arrived
    and what to do (`advice`): at once, or when the import it interrupted is done. Where there is no step to finish
    and nothing to checkpoint (start-up: the imports, the data source, the model; the end-of-run report) stopping
    at once loses nothing. A StopRequest entered inside takes over both signals for the training steps and then
    hands them back."""

    def __init__(self, where: str, advice: str):
        self.where, self.advice = where, advice

    def _exception(self, signum) -> BaseException:
        return SignalStop(f"stopped by {signal.Signals(signum).name} {self.where}; {self.advice}")


class StopRequest(_SignalHandling):
    """While active, SIGTERM and SIGINT only set `received`; the trainer stops at the next step boundary.

    A second SIGINT (Ctrl-C twice) interrupts at once. Handlers can only be installed from the main thread; in
    other threads this is inert.
    """

    def __init__(self):
        self.received: str | None = None

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("received %s: finishing the current step, then saving a checkpoint", self.received)


class InterruptOnSigterm(_RaiseOutsideImports):
    """While active (main thread only), SIGTERM raises KeyboardInterrupt like Ctrl-C does (when any import it
    landed in is done), so work outside the training steps (a sweep trial's evaluation, for example) stops with a
    message instead of dying silently. A StopRequest entered inside takes over both signals for the training steps
    and then hands SIGTERM back."""

    SIGNALS = (signal.SIGTERM,)

    def _exception(self, signum) -> BaseException:
        return KeyboardInterrupt()
