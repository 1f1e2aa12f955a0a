"""Running `retinaperf` commands in the test process, with the trainer's step or evaluation
wrapped (injected, not patched into a module)."""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable

from retinaperf import cli
from retinaperf.run import job


def run_cli(
    args: list[str], step_fn: Callable | None = None, evaluate_fn: Callable | None = None
) -> int:
    """`retinaperf ARGS` in this process, its clock started now as a new command's would be;
    `step_fn` and `evaluate_fn` replace the trainer's step and evaluation."""
    cli.COMMAND_START = time.perf_counter()
    injected = {"step_fn": step_fn, "evaluate_fn": evaluate_fn}
    injected = {name: fn for name, fn in injected.items() if fn is not None}
    return cli.main(args, run_fn=functools.partial(job.run, **injected) if injected else None)


class StepWatch:
    """A step function that notes when its latest call started and how long the longest took:
    tests that slow a part of a run on purpose scale the delay to the run's own steps, so that
    the part outweighs them however loaded the machine is."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.started: float | None = None
        self.longest = 0.0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.longest = max(self.longest, time.perf_counter() - self.started)


def at_call(fn: Callable, call: int, action: Callable[[], None]) -> Callable:
    """`fn`, doing `action` first at its `call`-th call (1-based)."""
    calls = []

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            action()
        return fn(*args, **kwargs)

    return wrapped


def signal_at(fn: Callable, call: int) -> Callable:
    """`fn`, sending this process SIGTERM during its `call`-th call (1-based)."""
    return at_call(fn, call, lambda: os.kill(os.getpid(), signal.SIGTERM))
