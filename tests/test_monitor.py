"""The background monitor: scripted samplers and a fake clock for the thread, this machine's own
numbers for the host sampler, and hand-computed summaries. The devices' samplers are their
plug-ins' (tests/test_devices_*.py)."""

import itertools
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest

from retinaperf.measure.monitor import HostSampler, Monitor, summarize

GIB = 1024**3
MEMINFO = Path("/proc/meminfo")


class StepClock:
    """Reads 100.0, 100.5, 101.0, ...: each read is half a second after the previous one."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return 100.0 + 0.5 * (self.reads - 1)


class ScriptedSampler:
    """Call n (from 0) reads `field` n and one device with util 10 n; raises on the calls in
    `fail_on`; blocks on call `block_on` until `release` is set."""

    def __init__(
        self, field: str = "cpu_util", fail_on: tuple[int, ...] = (), block_on: int | None = None
    ) -> None:
        self.field = field
        self.calls = 0
        self.closed = 0
        self.fail_on = fail_on
        self.block_on = block_on
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.closed_event = threading.Event()

    def sample(self) -> dict:
        n = self.calls
        self.calls += 1
        if n in self.fail_on:
            raise OSError(f"scripted failure on call {n}")
        if n == self.block_on:
            self.blocked.set()
            self.release.wait(5)  # stands for a driver call that does not return
        return {self.field: float(n), "devices": [{"index": 0, "util": 10.0 * n}]}

    def close(self) -> None:
        self.closed += 1
        self.closed_event.set()


class FailingClose(ScriptedSampler):
    def sample(self) -> dict:
        return {"mem_used_gib": 1.0}

    def close(self) -> None:
        raise OSError("scripted close failure")


def wait_until(condition, timeout: float = 2.0) -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the monitor thread"
        time.sleep(0.005)


def test_samples_merge_sampler_fields_and_time_from_command_start():
    sampler = ScriptedSampler()
    monitor = Monitor(interval_s=0.01, command_start=98.0, samplers=[sampler], clock=StepClock())
    monitor.start()
    wait_until(lambda: sampler.calls >= 4)
    samples = monitor.stop()

    assert len(samples) == sampler.calls >= 5  # at least 4 in the loop, then the last one
    for n, sample in enumerate(samples):
        assert sample["time"] == 2.0 + 0.5 * n  # clock 100.0 + 0.5 n, command start 98.0
        assert sample["host"] == socket.gethostname()
        assert sample["cpu_util"] == n
        assert sample["devices"] == [{"index": 0, "util": 10.0 * n}]
    assert sampler.closed == 1


def test_samples_repeatedly_every_interval_in_the_background():
    sampler = ScriptedSampler()
    start = time.perf_counter()
    monitor = Monitor(interval_s=0.02, command_start=start, samplers=[sampler])
    monitor.start()
    time.sleep(0.2)
    samples = monitor.stop()
    elapsed = time.perf_counter() - start

    assert len(samples) > 2
    times = [s["time"] for s in samples]
    assert 0 <= times[0] < times[-1] <= elapsed
    # Between loop samples the thread waits a whole interval; only the last (at stop) may come
    # sooner.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.015 for gap in gaps[:-1])


def test_stop_returns_promptly_and_is_idempotent():
    sampler = ScriptedSampler()
    monitor = Monitor(interval_s=60.0, command_start=time.perf_counter(), samplers=[sampler])
    monitor.start()
    wait_until(lambda: sampler.calls >= 1)  # the first sample is taken at once
    before = time.perf_counter()
    samples = monitor.stop()
    assert time.perf_counter() - before < 1.0

    assert [s["cpu_util"] for s in samples] == [0.0, 1.0]  # the first and the last
    assert monitor.stop() == samples
    assert sampler.calls == 2 and sampler.closed == 1


def test_stop_without_start_closes_the_samplers():
    sampler = ScriptedSampler()
    monitor = Monitor(interval_s=1.0, command_start=0.0, samplers=[sampler])
    assert monitor.stop() == []
    assert sampler.calls == 0 and sampler.closed == 1


def test_failing_samplers_warn_once_and_sampling_goes_on():
    good, flaky = ScriptedSampler(), ScriptedSampler(field="flaky", fail_on=(1, 3))
    bad_close = FailingClose()
    monitor = Monitor(
        interval_s=0.01, command_start=0.0, samplers=[good, flaky, bad_close], clock=StepClock()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.start()
        wait_until(lambda: flaky.calls >= 6)
        samples = monitor.stop()

    messages = [str(w.message) for w in caught]
    assert sum("ScriptedSampler.sample()" in m and "call 1" in m for m in messages) == 1
    assert not any("call 3" in m for m in messages)  # the second failure is not warned again
    assert sum("FailingClose.close()" in m for m in messages) == 1
    assert len(messages) == 2
    # A failed call leaves only that sampler's field out of that sample; sampling goes on.
    assert [s.get("flaky") for s in samples[:6]] == [0.0, None, 2.0, None, 4.0, 5.0]
    assert [s["cpu_util"] for s in samples[:6]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert len(samples) == flaky.calls >= 7
    assert all(s["mem_used_gib"] == 1.0 for s in samples)
    assert good.closed == flaky.closed == 1


def test_a_stuck_sampler_cannot_hang_stop():
    stuck = ScriptedSampler(block_on=1)
    monitor = Monitor(interval_s=0.01, command_start=0.0, samplers=[stuck], clock=StepClock())
    monitor.join_timeout_s = 0.1
    monitor.start()
    wait_until(stuck.blocked.is_set)
    before = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="did not finish"):
        samples = monitor.stop()
    assert time.perf_counter() - before < 1.0
    assert [s["cpu_util"] for s in samples] == [0.0]

    stuck.release.set()  # the driver call returns: the thread ends and still closes the sampler
    assert stuck.closed_event.wait(2)
    assert monitor.stop() == samples


@pytest.mark.skipif(not MEMINFO.exists(), reason="needs Linux /proc/meminfo")
def test_host_sampler_reads_this_machine():
    sampler = HostSampler()
    first = sampler.sample()
    assert first["cpu_util"] is None  # psutil has no window before its second call
    busy_until = time.perf_counter() + 0.05
    while time.perf_counter() < busy_until:
        pass
    reading = sampler.sample()

    assert 0.0 <= reading["cpu_util"] <= 100.0
    lines = MEMINFO.read_text().splitlines()
    kib = next(int(line.split()[1]) for line in lines if line.startswith("MemTotal:"))
    assert reading["mem_total_gib"] == pytest.approx(kib * 1024 / GIB, rel=0.01)
    assert 0 < reading["mem_used_gib"] < reading["mem_total_gib"]


def _device(index: int, util, mem, power, temp, clock) -> dict:
    return {
        "index": index,
        "uuid": f"GPU-{index}",
        "name": "Fake GPU",
        "util": util,
        "mem_used_gib": mem,
        "mem_total_gib": 80.0,
        "power_w": power,
        "temp_c": temp,
        "sm_clock_mhz": clock,
    }


def _host(host: str, time: float, cpu, mem, devices: list[dict]) -> dict:
    return {
        "time": time,
        "host": host,
        "cpu_util": cpu,
        "mem_used_gib": mem,
        "mem_total_gib": 16.0 if host == "b" else 32.0,
        "devices": devices,
    }


def test_summarize_two_hosts_means_peaks_and_none():
    b = [  # host b, t = 1..3, two devices; its first cpu_util is None (no window yet)
        (1.0, None, 3.0, [_device(0, 10, 1.0, 100.0, 50, 1000), _device(1, 0, 0.5, None, 30, 200)]),
        (2.0, 20.0, 5.0, [_device(0, 20, 3.0, None, 70, 1200), _device(1, 0, 0.5, None, 31, 200)]),
        (3.0, 40.0, 4.0, [_device(0, 60, 2.0, 300.0, 60, 1400), _device(1, 6, 0.5, None, 32, 200)]),
    ]
    a = [  # host a, t = 0.5..2.5, one device with the same index as b's first
        (0.5, 10.0, 7.0, [_device(0, 50, 4.0, 200.0, 40, 900)]),
        (2.5, 70.0, 6.0, [_device(0, 100, 6.0, 400.0, 45, 1100)]),
    ]
    # As the integrator concatenates nodes: b's samples, then a's.
    samples = [_host("b", *row) for row in b] + [_host("a", *row) for row in a]
    samples.insert(4, {"time": 1.5, "host": "a", "devices": []})  # a's host sampler failed here
    summary = summarize(samples)

    assert summary["samples"] == 6
    assert summary["seconds"] == 2.5  # 0.5 (a's first) to 3.0 (b's last), not last - first row
    assert summary["host"] == {
        "b": {
            "cpu_util_mean": 30.0,
            "cpu_util_peak": 40.0,
            "mem_used_peak_gib": 5.0,
            "mem_total_gib": 16.0,
        },
        "a": {
            "cpu_util_mean": 40.0,
            "cpu_util_peak": 70.0,
            "mem_used_peak_gib": 7.0,
            "mem_total_gib": 32.0,
        },
    }
    a0, b0, b1 = summary["devices"]  # ordered by host, then index
    assert [(d["host"], d["index"]) for d in (a0, b0, b1)] == [("a", 0), ("b", 0), ("b", 1)]
    assert b0 == {
        "host": "b",
        "index": 0,
        "uuid": "GPU-0",
        "name": "Fake GPU",
        "util_mean": 30.0,
        "mem_used_peak_gib": 3.0,
        "mem_total_gib": 80.0,
        "power_mean_w": 200.0,  # (100 + 300) / 2: the None reading is skipped
        "power_peak_w": 300.0,
        "temp_peak_c": 70,
        "sm_clock_mean_mhz": 1200.0,
    }
    assert b1["util_mean"] == 2.0
    assert b1["power_mean_w"] is None and b1["power_peak_w"] is None  # never supported
    assert b1["temp_peak_c"] == 32
    assert a0["util_mean"] == 75.0
    assert a0["power_mean_w"] == 300.0 and a0["power_peak_w"] == 400.0
    assert a0["mem_used_peak_gib"] == 6.0
    assert a0["sm_clock_mean_mhz"] == 1000.0


def test_summarize_nothing():
    assert summarize([]) == {"samples": 0, "seconds": 0.0, "host": {}, "devices": []}
