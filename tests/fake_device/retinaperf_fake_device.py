"""A device plug-in as a vendor would ship it: the "Fake X1", which takes over the CPU device so
that a run on this machine is read through it. The README's "Adding a device" shows this file."""

import time

import torch

from retinaperf.measure.devices.base import DevicePlugin, Peak


class FakeSmi:
    """The vendor's management library: one device, readings that move with time."""

    def sample(self) -> dict:
        return {"devices": [{"index": 0, "uuid": "fake-0", "name": "Fake X1", "util": 75.0,
                             "mem_used_gib": 3.5, "mem_total_gib": 64.0, "power_w": 123.0,
                             "temp_c": 50.0, "sm_clock_mhz": 1500.0}]}  # fmt: skip

    def close(self) -> None:
        pass


class FakeCounter:
    source, label, wrap_j = "fake-smi energy counter", "fake-0", None

    def read(self) -> float:
        return 123.0 * time.perf_counter()  # joules at a steady 123 W

    def close(self) -> None:
        pass


class FakeX1(DevicePlugin):
    name, source = "fake", "fake-smi"
    memory_view = "driver peak used / device total (fake-smi)"

    def matches(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def device_name(self, device: torch.device) -> str:
        return "Fake X1"

    def device_id(self, device: torch.device) -> str:
        return "fake-0"

    def sampler(self) -> FakeSmi:
        return FakeSmi()

    def energy_counter(self, device: torch.device) -> tuple[FakeCounter, None]:
        return FakeCounter(), None

    def peak(self, device_name: str, math: str) -> Peak:
        return Peak(0.5, source="Fake X1 datasheet") if math == "fp32" else Peak(None, note="-")

    def facts(self, device: torch.device) -> dict:
        return {"fake_driver": "1.2.3"}
