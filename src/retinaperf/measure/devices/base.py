"""What retinaperf reads of a device, behind one interface: `DevicePlugin`.

Training is vendor-neutral (torch's accelerator API, the collective backend torch picks for the
device); what is *read* is not: utilisation, memory, power and energy come from the vendor's
management library (NVML, amdsmi, ...), peak FLOP/s from the vendor's datasheets, the driver's
version from its driver. A plug-in supplies those for one kind of device. Each rank takes the
plug-in of the device it runs on (`registry.plugin_for`); the node's monitor (local rank 0)
samples every device of the node through it.

A reading a plug-in cannot give is None with a reason, never a zero: the base class answers
"unavailable" for everything, so that a plug-in overrides only what its device offers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# The maths a device's peaks are given for: what `Precision.peak_math` answers.
MATHS = ("fp32", "tf32", "fp16", "bf16")


class Unavailable(Exception):
    """A reading that this machine cannot give, for a reason worth a line in the report (no
    driver library, no such counter); not a failure to warn about."""


class Sampler(Protocol):
    """One source of monitor readings. The Monitor calls both methods from its thread only.

    A device sampler returns {"devices": [{"index", "uuid", "name", "util", "mem_used_gib",
    "mem_total_gib", "power_w", "temp_c", "sm_clock_mhz"}, ...]}: per device of the node, its
    index, its identifier (as `DevicePlugin.device_id` spells it), its name, and each reading or
    None where the device does not give it (utilisation %, GiB, W, °C, MHz of its main clock).
    """

    def sample(self) -> dict[str, Any]:
        """Fields to merge into the current sample."""
        ...

    def close(self) -> None:
        """Release what the sampler holds; called once, after its last sample."""
        ...


class Counter(Protocol):
    """A cumulative energy counter."""

    source: str
    """What counts, e.g. "NVML energy counter"."""
    label: str
    """Which one: the GPU's UUID, the RAPL domain's name ("package-0")."""
    wrap_j: float | None
    """The value at which it starts again from 0; None where it never does in practice."""

    def read(self) -> float | None:
        """Joules counted so far; None when this reading failed."""
        ...

    def close(self) -> None:
        """Release what the counter holds; called once, after its last reading."""
        ...


@dataclass(frozen=True)
class Peak:
    """A device's dense peak TFLOP/s in one math, and where the figure comes from; or None and
    why there is none."""

    tflops: float | None
    source: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class PeakTable:
    """Datasheet peaks by product, and how the driver names each product.

    `rows`: product -> {math: dense TFLOP/s}; a math the product lacks is absent. `names`: the
    set of words of a device name (upper case, without `vendor_words` and memory sizes like
    "80GB") -> product. A name must match a set exactly, so that "A10" is not read as "A100".
    """

    vendor: str
    rows: dict[str, dict[str, float]]
    names: dict[frozenset[str], str]
    vendor_words: frozenset[str] = field(default_factory=frozenset)

    def words(self, device_name: str) -> frozenset[str]:
        found = re.split(r"[^A-Z0-9]+", device_name.upper())
        return frozenset(
            w for w in found if w and w not in self.vendor_words and not re.fullmatch(r"\d+GB", w)
        )

    def peak(self, device_name: str, math: str) -> Peak:
        if math not in MATHS:
            raise ValueError(f"unknown math {math!r}: one of {', '.join(MATHS)}")
        product = self.names.get(self.words(device_name))
        if product is None:
            return Peak(None, note=f"{device_name!r} is not in the {self.vendor} peak table")
        tflops = self.rows[product].get(math)
        if tflops is None:
            return Peak(None, note=f"the {product} has no {math} peak in its datasheet")
        return Peak(tflops, source=f"{self.vendor} datasheet, {product}, dense {math}")


class DevicePlugin:
    """The readings of one kind of device. Subclasses override what their device offers.

    `name` identifies the plug-in in results.json; `source` names where its readings come from
    ("NVML"), for the report's labels.
    """

    name: str = "none"
    source: str | None = None
    collective_backend: str | None = None
    """The torch.distributed backend for this device; None: torch's default for the device
    type (NCCL for CUDA, Gloo for the CPU, what a vendor's torch extension registers)."""
    energy_is_host: bool = False
    """True where the device *is* the host (a CPU): its energy is the host's CPU packages'."""
    memory_view: str | None = None
    """How the sampler's memory reading is labelled in results.json ("driver peak used / device
    total (NVML, as nvidia-smi shows)"); None: the sampler reads no device memory."""

    def matches(self, device: torch.device) -> bool:
        """Whether this plug-in reads `device` (a rank's torch device)."""
        return False

    def device_name(self, device: torch.device) -> str:
        """The device's product name, as the driver reports it."""
        get_name = getattr(getattr(torch, device.type, None), "get_device_name", None)
        return get_name(device) if get_name else device.type

    def device_id(self, device: torch.device) -> str | None:
        """`device`'s identifier as this plug-in's sampler spells it in "uuid", to find a rank's
        device among the node's; None where there is none."""
        return None

    def sampler(self) -> Sampler:
        """A sampler of every device of this node. Raises `Unavailable` where the readings
        cannot be had on this machine (say why); any other error is warned about."""
        raise Unavailable(f"the {self.name} plug-in samples no device readings")

    def energy_counter(self, device: torch.device) -> tuple[Counter | None, str | None]:
        """`device`'s energy counter, or (None, why there is none). Never raises."""
        return None, f"the {self.name} plug-in reads no energy counter"

    def peak(self, device_name: str, math: str) -> Peak:
        """The dense peak TFLOP/s of one device of this name in `math` (one of `MATHS`)."""
        return Peak(None, note=f"the {self.name} plug-in knows no peak FLOP/s")

    def facts(self, device: torch.device) -> dict[str, Any]:
        """Driver and runtime versions for results.json's environment (keys the plug-in names)."""
        return {}


class Unsupported(DevicePlugin):
    """Where no plug-in matches the device: training runs, and every reading says why not."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.why = (
            f"no device plug-in reads {device_type!r} devices: install the vendor's retinaperf "
            "plug-in (README: Adding a device)"
        )

    def sampler(self) -> Sampler:
        raise Unavailable(self.why)

    def energy_counter(self, device: torch.device) -> tuple[Counter | None, str | None]:
        return None, self.why

    def peak(self, device_name: str, math: str) -> Peak:
        return Peak(None, note=self.why)
