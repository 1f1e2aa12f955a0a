"""The background monitor: scripted samplers and a fake clock for the thread, a fake pynvml for the
NVML readings, this machine's own numbers for the host sampler, and hand-computed summaries."""

import itertools
import socket
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest
from nvml_fake import NvmlFake

from retinaperf.measure.monitor import (
    HostSampler,
    Monitor,
    NvmlSampler,
    default_samplers,
    summarize,
)

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


def _nvml_absent() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return True
    pynvml.nvmlShutdown()
    return False


@pytest.mark.skipif(not _nvml_absent(), reason="this machine has NVML")
def test_without_nvml_only_the_host_is_sampled():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a machine without NVIDIA is normal, not worth a warning
        samplers = default_samplers()
    assert [type(s) for s in samplers] == [HostSampler]

    monitor = Monitor(interval_s=0.02, command_start=time.perf_counter())
    monitor.start()
    time.sleep(0.06)
    samples = monitor.stop()
    assert len(samples) >= 2
    assert all(s["devices"] == [] for s in samples)
    assert 0.0 <= samples[-1]["cpu_util"] <= 100.0
    assert 0 < samples[-1]["mem_used_gib"] < samples[-1]["mem_total_gib"]


class FakeNvml(NvmlFake):
    """Two devices: h0 reads everything; h1 does not support power readings."""

    def __init__(self) -> None:
        super().__init__()
        self.count_error: pynvml.NVMLError | None = None
        self.devices = {
            "h0": {
                "name": "NVIDIA A100-SXM4-80GB",
                "uuid": "GPU-00000000-aaaa",
                "util": 87,
                "memory": SimpleNamespace(used=3 * 2**29, total=80 * 2**30, free=0),
                "power_mw": 250_500,
                "temp": 61,
                "sm_clock": 1410,
            },
            "h1": {
                "name": "NVIDIA A100-SXM4-40GB",
                "uuid": "GPU-11111111-bbbb",
                "util": 0,
                "memory": SimpleNamespace(used=2**28, total=40 * 2**30, free=0),
                "power_mw": None,
                "temp": 35,
                "sm_clock": 210,
            },
        }

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def count() -> int:
            if self.count_error is not None:
                raise self.count_error
            return len(self.devices)

        def power(handle: str) -> int:
            value = self.devices[handle]["power_mw"]
            if value is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return value

        def temperature(handle: str, sensor: int) -> int:
            assert sensor == pynvml.NVML_TEMPERATURE_GPU
            return self.devices[handle]["temp"]

        def clock(handle: str, kind: int) -> int:
            assert kind == pynvml.NVML_CLOCK_SM
            return self.devices[handle]["sm_clock"]

        fakes = {
            "nvmlDeviceGetCount": count,
            "nvmlDeviceGetHandleByIndex": lambda i: f"h{i}",
            "nvmlDeviceGetName": lambda h: self.devices[h]["name"],
            "nvmlDeviceGetUUID": lambda h: self.devices[h]["uuid"],
            "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(
                gpu=self.devices[h]["util"], memory=0
            ),
            "nvmlDeviceGetMemoryInfo": lambda h: self.devices[h]["memory"],
            "nvmlDeviceGetPowerUsage": power,
            "nvmlDeviceGetTemperature": temperature,
            "nvmlDeviceGetClockInfo": clock,
        }
        self.patch(monkeypatch, fakes)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.install(monkeypatch)
    return fake


def test_nvml_sampler_converts_units_and_leaves_unsupported_readings_none(fake_nvml):
    sampler = NvmlSampler()
    assert fake_nvml.inits == 1
    reading = sampler.sample()
    assert reading == {
        "devices": [
            {
                "index": 0,
                "uuid": "GPU-00000000-aaaa",
                "name": "NVIDIA A100-SXM4-80GB",
                "util": 87,
                "mem_used_gib": 1.5,
                "mem_total_gib": 80.0,
                "power_w": 250.5,
                "temp_c": 61,
                "sm_clock_mhz": 1410,
            },
            {
                "index": 1,
                "uuid": "GPU-11111111-bbbb",
                "name": "NVIDIA A100-SXM4-40GB",
                "util": 0,
                "mem_used_gib": 0.25,
                "mem_total_gib": 40.0,
                "power_w": None,
                "temp_c": 35,
                "sm_clock_mhz": 210,
            },
        ]
    }
    fake_nvml.devices["h0"]["power_mw"] = 300_000  # readings are fresh on every sample
    assert sampler.sample()["devices"][0]["power_w"] == 300.0
    assert fake_nvml.shutdowns == 0
    sampler.close()
    assert fake_nvml.shutdowns == 1


def test_default_samplers_add_nvml_where_it_initialises(fake_nvml):
    samplers = default_samplers()
    assert [type(s) for s in samplers] == [HostSampler, NvmlSampler]
    monitor = Monitor(interval_s=60.0, command_start=0.0, samplers=samplers, clock=StepClock())
    monitor.start()
    samples = monitor.stop()
    assert [d["uuid"] for d in samples[-1]["devices"]] == ["GPU-00000000-aaaa", "GPU-11111111-bbbb"]
    assert "cpu_util" in samples[-1]
    assert fake_nvml.shutdowns == 1  # the monitor closed its samplers


def test_default_samplers_warn_and_keep_the_host_when_nvml_fails(fake_nvml, monkeypatch):
    fake_nvml.count_error = pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    with pytest.warns(RuntimeWarning, match="NVML did not initialise"):
        samplers = default_samplers()
    assert [type(s) for s in samplers] == [HostSampler]
    assert fake_nvml.inits == fake_nvml.shutdowns == 1  # initialised, then released

    def driver_not_loaded() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", driver_not_loaded)
    with pytest.warns(RuntimeWarning, match="Driver Not Loaded"):
        assert [type(s) for s in default_samplers()] == [HostSampler]


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


@pytest.mark.gpu
def test_nvml_readings_agree_with_torch_on_the_jobs_gpu():
    """The driver's view (NVML) of the device torch uses: same device, same capacity, and it
    sees an allocation torch makes."""
    import torch

    from retinaperf.measure.memory import device_uuid

    device = torch.device("cuda", 0)
    torch.ones(1, device=device)  # the CUDA context exists before the first reading
    torch.cuda.synchronize(device)
    wanted = device_uuid(device).lower().removeprefix("gpu-")
    sampler = NvmlSampler()
    try:

        def reading() -> dict:
            (mine,) = [
                d
                for d in sampler.sample()["devices"]
                if d["uuid"].lower().removeprefix("gpu-") == wanted
            ]
            return mine

        before = reading()
        _free, total = torch.cuda.mem_get_info(device)
        assert before["name"] == torch.cuda.get_device_name(device)
        assert before["mem_total_gib"] == pytest.approx(total / GIB, rel=0.01)
        block = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        after = reading()
        assert after["mem_used_gib"] - before["mem_used_gib"] == pytest.approx(2.0, abs=0.2)
        assert after["power_w"] is None or 0 < after["power_w"] < 2000
        assert after["sm_clock_mhz"] is None or after["sm_clock_mhz"] > 0
        del block
    finally:
        sampler.close()
