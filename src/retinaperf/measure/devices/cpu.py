"""The CPU as the device: its readings are the host's.

The monitor's host sampler (psutil: CPU use, RAM) and the host's RAPL package counters
(energy_counters.py) run for every run whatever its device; on a CPU run they are the device's
readings, so this plug-in adds no sampler of its own and counts the device's energy as the
host's packages'.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from retinaperf.measure.devices.base import Counter, DevicePlugin, Peak, Sampler, Unavailable


class Cpu(DevicePlugin):
    name = "cpu"
    source = "psutil and RAPL (the host's readings)"
    energy_is_host = True

    def matches(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def device_name(self, device: torch.device) -> str:
        return cpu_model()

    def sampler(self) -> Sampler:
        raise Unavailable("the device is the host's CPU: its readings are the host's")

    def energy_counter(self, device: torch.device) -> tuple[Counter | None, str | None]:
        return None, "the CPU's energy is its packages' (RAPL), read as the host's"

    def peak(self, device_name: str, math: str) -> Peak:
        return Peak(None, note="no peak FLOP/s table for CPUs: their peak depends on the cores")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
