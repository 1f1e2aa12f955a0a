"""SIGTERM and SIGINT, what Slurm and Kubernetes send before they kill a job (and Ctrl-C).

The first signal sets a flag: the training loop finishes its step (an evaluation under way is
abandoned after its batch, and run again when the run goes on), writes a checkpoint and
results.json with "status": "interrupted", and exits non-zero, saying how long after the signal.
A second signal exits at once. The same signal often arrives twice within a moment: Slurm and a
terminal signal every process of the job, and torchrun forwards what it receives to its
workers; a repeat within `repeat_window_s` of the first is taken as the same request.

DataLoader workers ignore both signals (`ignore_in_worker`): the training process decides, and
shuts them down as it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeAlias

from retinaperf.distributed import launch

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What `signal.signal` takes and gives back: a function, SIG_DFL or SIG_IGN, or None (a handler
# that was not set from Python).
Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class StopRequest:
    """Installs handlers for SIGTERM and SIGINT (in the main thread) while it is entered."""

    def __init__(self, repeat_window_s: float = 2.0) -> None:
        self.repeat_window_s = repeat_window_s
        self.signal: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Handler] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def seconds_since(self) -> float:
        """Seconds since the (first) signal arrived."""
        return time.monotonic() - self._received_at

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self._received_at = signum, time.monotonic()
            _say(
                f"{name} received: stopping after this step (or this evaluation batch) with a "
                "checkpoint; send it again to exit at once"
            )
        elif time.monotonic() - self._received_at > self.repeat_window_s:
            _say(f"{name} received again: exiting now, without a checkpoint")
            os._exit(128 + signum)


def _say(message: str) -> None:
    print(f"retinaperf: {launch().rank_prefix}{message}", file=sys.stderr, flush=True)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: leave the signals to the training process."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def run_child(
    command: list[str], env: dict[str, str] | None = None, received: list[int] | None = None
) -> int:
    """Run `command` (a run, or torchrun starting one) to its end and return its exit status,
    as a shell gives it (128 + N for a child a signal N ended).

    While it runs this process passes SIGTERM on to it and ignores SIGINT, which a terminal's
    Ctrl-C sends to the child as well: the child stops with a checkpoint, where being killed with
    this process would lose its work. Given `received` (a sweep, which must stop after its point),
    SIGINT is passed on too, so that one sent to this process alone stops the child (which takes
    a terminal's second copy, a moment later, as the same request), and each signal passed on is
    appended to `received`."""
    started: list[subprocess.Popen] = []  # filled once started; the handlers are set before

    def pass_on(signum: int, _: FrameType | None) -> None:
        if received is not None:
            received.append(signum)
        for child in started:
            child.send_signal(signum)

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on),
        signal.SIGINT: signal.signal(
            signal.SIGINT, signal.SIG_IGN if received is None else pass_on
        ),
    }
    try:
        started.append(subprocess.Popen(command, env=env))
        code = started[0].wait()
        return 128 - code if code < 0 else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
