"""What a node's host and devices were doing during a run, sampled in the background.

One `Monitor` per node (the caller starts it on local rank 0 only). It samples on its own daemon
thread every `interval_s`, so the training loop never waits for it, and every sampler call happens
on that one thread. Monitoring is an extra that must never stop a benchmark: a reading a device
does not support is None, a sampler that raises is warned about once and left out of the samples
where it fails, a sampler stuck in a driver call cannot hang `stop()`, and a machine whose device
plug-in samples nothing (measure/devices/) records `"devices": []`.

A sample (times in seconds since command start, memory in GiB, power in W):
    {"time", "host", "cpu_util", "mem_used_gib", "mem_total_gib",
     "devices": [{"index", "uuid", "name", "util", "mem_used_gib", "mem_total_gib", "power_w",
                  "temp_c", "sm_clock_mhz"}, ...]}
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import psutil

from retinaperf.measure.devices.base import Sampler
from retinaperf.units import GIB


class HostSampler:
    """CPU use over all cores and RAM use of this host.

    psutil measures CPU use between two calls made by the same thread, so the first sample has no
    window: it records cpu_util None rather than a meaningless number.
    """

    def __init__(self) -> None:
        self._primed = False

    def sample(self) -> dict[str, Any]:
        cpu = psutil.cpu_percent(interval=None)  # since this thread's last call; never blocks
        memory = psutil.virtual_memory()
        cpu_util = cpu if self._primed else None
        self._primed = True
        return {
            "cpu_util": cpu_util,
            # psutil calls its own `used` platform-dependent and informational; total - available
            # is what programs hold and cannot get back.
            "mem_used_gib": (memory.total - memory.available) / GIB,
            "mem_total_gib": memory.total / GIB,
        }

    def close(self) -> None:
        """Holds nothing."""


class Monitor:
    """Samples every `interval_s` on a daemon thread, from `start()` to `stop()`.

    `command_start` is the `clock` reading at command start (the Meter's), so sample times line
    up with the event log's. `samplers` defaults to the host's alone; the caller adds the device
    plug-in's (`devices.registry.open_sampler`). The Monitor closes them.
    """

    join_timeout_s: float = 10.0
    """How long `stop()` waits for the thread: a sampler stuck in a driver call must not hang the
    run. Its samples so far are returned and the thread is left to finish on its own."""

    def __init__(
        self,
        interval_s: float,
        command_start: float,
        samplers: list[Sampler] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.command_start = command_start
        self.samplers = [HostSampler()] if samplers is None else samplers
        self.clock = clock
        self._host = socket.gethostname()
        self._samples: list[dict] = []
        self._lock = threading.Lock()  # the thread appends while a timed-out stop() may copy
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[int] = set()  # indices of the samplers already warned about
        self._result: list[dict] | None = None

    def start(self) -> None:
        """Starts the thread, which takes a first sample at once."""
        if self._thread is not None:
            raise RuntimeError("Monitor.start() was called twice")
        self._thread = threading.Thread(target=self._run, name="retinaperf-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> list[dict]:
        """Takes a last sample, ends the thread and returns every sample. Later calls return the
        same samples."""
        if self._result is not None:
            return list(self._result)
        self._stopping.set()
        if self._thread is None:
            self._close()  # never started: there is no thread to close the samplers
        else:
            # Waits for the last sample and the samplers' close: the thread's wait() returns as
            # soon as the event is set, so this takes one sample's time, not an interval.
            self._thread.join(self.join_timeout_s)
            if self._thread.is_alive():
                warnings.warn(
                    f"the monitor thread did not finish within {self.join_timeout_s} s (a sampler "
                    "is stuck); returning the samples taken so far",
                    RuntimeWarning,
                    stacklevel=2,
                )
        with self._lock:
            self._result = list(self._samples)
        return list(self._result)

    def _run(self) -> None:
        self._take()
        # Waits one interval, or less when stop() sets the event; True means stop.
        while not self._stopping.wait(self.interval_s):
            self._take()
        self._take()
        self._close()

    def _take(self) -> None:
        record: dict[str, Any] = {"time": self.clock() - self.command_start, "host": self._host}
        for i, sampler in enumerate(self.samplers):
            try:
                record.update(sampler.sample())
            except Exception as exc:
                self._warn_once(i, sampler, "sample", exc)
        record.setdefault("devices", [])
        with self._lock:
            self._samples.append(record)

    def _close(self) -> None:
        for i, sampler in enumerate(self.samplers):
            try:
                sampler.close()
            except Exception as exc:
                self._warn_once(i, sampler, "close", exc)

    def _warn_once(self, index: int, sampler: Sampler, method: str, exc: Exception) -> None:
        if index in self._warned:
            return
        self._warned.add(index)
        warnings.warn(
            f"{type(sampler).__name__}.{method}() failed ({exc!r}); its readings are missing "
            "where it fails and sampling goes on (warned once per sampler)",
            RuntimeWarning,
            stacklevel=2,
        )


def summarize(samples: list[dict]) -> dict:
    """Means and peaks per host and per device over the samples of one node or several.

    Means and peaks skip None (unsupported or failed readings, each node's first cpu_util); a field
    with no reading at all summarises to None. `seconds` spans the earliest to the latest sample;
    hosts keep their order of appearance, devices are ordered by host, then index.
    """
    if not samples:
        return {"samples": 0, "seconds": 0.0, "host": {}, "devices": []}
    by_host: dict[str, list[dict]] = {}
    by_device: dict[tuple[str, int], list[dict]] = {}
    for sample in samples:
        by_host.setdefault(sample["host"], []).append(sample)
        for device in sample.get("devices", []):
            by_device.setdefault((sample["host"], device["index"]), []).append(device)
    times = [sample["time"] for sample in samples]
    return {
        "samples": len(samples),
        "seconds": max(times) - min(times),
        "host": {
            host: {
                "cpu_util_mean": _mean(rows, "cpu_util"),
                "cpu_util_peak": _peak(rows, "cpu_util"),
                "mem_used_peak_gib": _peak(rows, "mem_used_gib"),
                "mem_total_gib": _peak(rows, "mem_total_gib"),
            }
            for host, rows in by_host.items()
        },
        "devices": [
            {
                "host": host,
                "index": index,
                "uuid": rows[-1]["uuid"],
                "name": rows[-1]["name"],
                "util_mean": _mean(rows, "util"),
                "mem_used_peak_gib": _peak(rows, "mem_used_gib"),
                "mem_total_gib": _peak(rows, "mem_total_gib"),
                "power_mean_w": _mean(rows, "power_w"),
                "power_peak_w": _peak(rows, "power_w"),
                "temp_peak_c": _peak(rows, "temp_c"),
                "sm_clock_mean_mhz": _mean(rows, "sm_clock_mhz"),
            }
            for (host, index), rows in sorted(by_device.items(), key=lambda item: item[0])
        ],
    }


def _readings(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if row.get(key) is not None]


def _mean(rows: list[dict], key: str) -> float | None:
    values = _readings(rows, key)
    return sum(values) / len(values) if values else None


def _peak(rows: list[dict], key: str) -> float | None:
    values = _readings(rows, key)
    return max(values) if values else None
