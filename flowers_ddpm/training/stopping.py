"""Reasons a run stops early, and the signal handling that turns SIGTERM/SIGINT into a clean stop.

Exit codes (documented in the README, returned by the CLI): 75 = preempted by a signal, a checkpoint of the stop
step was written, rerun with `--resume_from_checkpoint latest` (75 is EX_TEMPFAIL: "try again later");
3 = stopped after too many consecutive non-finite losses or gradients, or because the weights themselves became
non-finite (never checkpointed or exported; the checkpoints on disk are intact).
"""

from __future__ import annotations

import logging
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


class StopOutsideSteps:
    """While active (main thread only), SIGTERM and SIGINT raise `SignalStop` at once, saying `where` the signal
    arrived and what to do (`advice`). Where there is no step to finish and nothing to checkpoint (start-up: the
    imports, the data source, the model; the end-of-run report) stopping at once loses nothing. A StopRequest
    entered inside takes over both signals for the training steps and then hands them back."""

    def __init__(self, where: str, advice: str):
        self.where, self.advice = where, advice
        self._previous: dict = {}

    def __enter__(self) -> "StopOutsideSteps":
        if threading.current_thread() is threading.main_thread():
            for sig in StopRequest.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        raise SignalStop(f"stopped by {signal.Signals(signum).name} {self.where}; {self.advice}")


class StopRequest:
    """While active, SIGTERM and SIGINT only set `received`; the trainer stops at the next step boundary.

    A second SIGINT (Ctrl-C twice) interrupts at once. Handlers can only be installed from the main thread; in
    other threads this is inert.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("received %s: finishing the current step, then saving a checkpoint", self.received)


class InterruptOnSigterm:
    """While active (main thread only), SIGTERM raises KeyboardInterrupt like Ctrl-C does, so work outside the
    training steps (a sweep trial's evaluation, for example) stops with a message instead of dying silently. A
    StopRequest entered inside takes over both signals for the training steps and then hands SIGTERM back."""

    def __enter__(self) -> "InterruptOnSigterm":
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _handle(signum, frame) -> None:
        raise KeyboardInterrupt
