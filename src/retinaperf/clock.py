"""The two clocks of a run. Durations are read on `time.perf_counter` (monotonic, fine-grained);
what another process or a log reader must place in time is on the wall clock (`time.time`).
A reading of one is turned into the other by the clocks' offset now: both tick at one rate
over a run, so the offset holds for any moment of it."""

from __future__ import annotations

import time


def wall_time_at(perf_counter: float) -> float:
    """The wall-clock time of a `time.perf_counter()` reading taken by this process."""
    return time.time() - (time.perf_counter() - perf_counter)


def perf_counter_at(wall_time: float) -> float:
    """The `time.perf_counter()` reading of a wall-clock time (one another process handed on)."""
    return time.perf_counter() - (time.time() - wall_time)
