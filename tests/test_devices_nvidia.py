"""The NVIDIA plug-in: NVML's readings through a fake pynvml (every faked name is a real one),
the peak table against the datasheet numbers, and NVML against torch on a real GPU."""

import warnings
from types import SimpleNamespace

import pynvml
import pytest
import torch
from nvml_fake import NvmlFake

from retinaperf.measure.devices.nvidia import PEAKS, Nvidia, NvmlSampler
from retinaperf.measure.devices.registry import open_sampler, plugin_for
from retinaperf.measure.monitor import HostSampler, Monitor

GIB = 1024**3


def _nvml_absent() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return True
    pynvml.nvmlShutdown()
    return False


@pytest.mark.skipif(not _nvml_absent(), reason="this machine has NVML")
def test_without_nvml_there_is_a_reason_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a machine without NVIDIA is normal, not worth a warning
        sampler, reason = open_sampler(Nvidia())
    assert sampler is None
    assert reason == "NVML is not installed: it comes with the NVIDIA driver"


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


def test_the_plugin_opens_an_nvml_sampler_where_nvml_initialises(fake_nvml):
    sampler, reason = open_sampler(Nvidia())
    assert isinstance(sampler, NvmlSampler) and reason is None
    samplers = [HostSampler(), sampler]
    monitor = Monitor(interval_s=60.0, command_start=0.0, samplers=samplers)
    monitor.start()
    samples = monitor.stop()
    assert [d["uuid"] for d in samples[-1]["devices"]] == ["GPU-00000000-aaaa", "GPU-11111111-bbbb"]
    assert "cpu_util" in samples[-1]
    assert fake_nvml.shutdowns == 1  # the monitor closed its samplers


def test_a_failing_nvml_is_warned_about_and_gives_a_reason(fake_nvml, monkeypatch):
    fake_nvml.count_error = pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    with pytest.warns(RuntimeWarning, match="nvidia plug-in's sampler did not start"):
        sampler, reason = open_sampler(Nvidia())
    assert sampler is None and "Unknown Error" in reason
    assert fake_nvml.inits == fake_nvml.shutdowns == 1  # initialised, then released

    def driver_not_loaded() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", driver_not_loaded)
    with pytest.warns(RuntimeWarning, match="Driver Not Loaded"):
        assert open_sampler(Nvidia())[0] is None


# The peak table: expected numbers typed from the vendor datasheets (dense, no sparsity).


@pytest.mark.parametrize(
    ("name", "fp32", "tf32", "fp16", "bf16"),
    [
        ("NVIDIA A100-SXM4-40GB", 19.5, 156, 312, 312),
        ("NVIDIA A100-SXM4-80GB", 19.5, 156, 312, 312),
        ("NVIDIA A100-PCIE-40GB", 19.5, 156, 312, 312),
        ("NVIDIA A100 80GB PCIe", 19.5, 156, 312, 312),
        ("NVIDIA H100 80GB HBM3", 67, 494.7, 989.4, 989.4),
        ("NVIDIA H100 PCIe", 51, 378, 756, 756),
        ("NVIDIA H200", 67, 494.7, 989.4, 989.4),
        ("Tesla V100-SXM2-16GB", 15.7, None, 125, None),
        ("Tesla V100-SXM2-32GB", 15.7, None, 125, None),
        ("Tesla V100-PCIE-16GB", 14, None, 112, None),
        ("NVIDIA A10", 31.2, 62.5, 125, 125),
        ("NVIDIA L4", 30.3, 60, 121, 121),
        ("NVIDIA L40S", 91.6, 183, 362, 362),
    ],
)
def test_each_device_resolves_to_its_row(name, fp32, tf32, fp16, bf16):
    got = {math: PEAKS.peak(name, math).tflops for math in ("fp32", "tf32", "fp16", "bf16")}
    assert got == {"fp32": fp32, "tf32": tf32, "fp16": fp16, "bf16": bf16}


@pytest.mark.parametrize(
    "name",
    [
        "cpu",
        "AMD EPYC 7763 64-Core Processor",
        "Intel(R) Xeon(R) Platinum 8480+",
        "",
        "NVIDIA A10G",  # AWS's A10 variant: not the A10's peaks
        "NVIDIA L40",  # not the L40S
        "NVIDIA H100 NVL",  # neither the SXM nor the PCIe part
        "NVIDIA H200 NVL",
        "Tesla V100S-PCIE-32GB",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a slice of an A100, not the whole device
        "NVIDIA GeForce RTX 4090",
        "AMD Instinct MI300X",
    ],
)
def test_unknown_devices_give_none(name):
    assert all(PEAKS.peak(name, math).tflops is None for math in ("fp32", "tf32", "fp16", "bf16"))


def test_a_precision_name_is_not_a_math():
    # amp's peak is fp16's: the caller asks Precision.peak_math, never passes a precision name
    with pytest.raises(ValueError, match="amp"):
        PEAKS.peak("NVIDIA H100 PCIe", "amp")


@pytest.mark.gpu
def test_nvml_readings_agree_with_torch_on_the_jobs_gpu():
    """The driver's view (NVML) of the device torch uses: same device, same capacity, and it
    sees an allocation torch makes."""
    import torch

    device = torch.device("cuda", 0)
    torch.ones(1, device=device)  # the CUDA context exists before the first reading
    torch.cuda.synchronize(device)
    wanted = Nvidia().device_id(device).lower().removeprefix("gpu-")
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


def test_nvidia_reads_cuda_devices_of_cuda_builds_only(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert Nvidia().matches(torch.device("cuda", 0))
    assert not Nvidia().matches(torch.device("cpu"))
    assert plugin_for(torch.device("cuda", 0)).name == "nvidia"
    monkeypatch.setattr(torch.version, "hip", "6.4.1")  # a ROCm build calls AMD GPUs cuda too
    assert not Nvidia().matches(torch.device("cuda", 0))


def test_the_device_id_is_spelled_as_nvml_spells_the_uuid(monkeypatch):
    props = SimpleNamespace(uuid="00000000-AAAA")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert Nvidia().device_id(torch.device("cuda", 0)) == "GPU-00000000-aaaa"
