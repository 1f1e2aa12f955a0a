"""The hardware's cumulative energy counters, read the same way: NVML's per GPU, RAPL's per CPU
package (Linux powercap). Where there is none, the functions give the reason as a sentence for
the report; a reading that fails gives None (see energy.py for how the run uses them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pynvml

from retinaperf.measure.monitor import bare_uuid

POWERCAP = Path("/sys/class/powercap")


# Top-level RAPL domains only: "intel-rapl:0:0" (core, uncore, dram) are parts of a package, and
# "intel-rapl-mmio:0" counts the same package again through another interface.
_RAPL_DOMAIN = re.compile(r"^intel-rapl:(\d+)$")


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


class NvmlCounter:
    """A GPU's NVML energy counter. Holds a reference to NVML (nvmlInit) until `close()`."""

    source = "NVML energy counter"
    wrap_j = None  # a 64-bit count of mJ: 584 million years at 1 kW

    def __init__(self, handle: Any, label: str) -> None:
        self._handle = handle
        self.label = label

    def read(self) -> float | None:
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000  # mJ
        except pynvml.NVMLError:
            return None

    def close(self) -> None:
        pynvml.nvmlShutdown()


def nvml_counter(uuid: str) -> tuple[Counter | None, str | None]:
    """The NVML energy counter of the GPU with this UUID ("GPU-..." as NVML writes it, or without
    the prefix as torch does), or (None, why there is none). Never raises an NVML error."""
    label = "GPU-" + bare_uuid(uuid)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, (
            f"no NVML energy counter for {label}: NVML did not initialise ({exc}); it comes "
            "with the NVIDIA driver"
        )
    try:
        handle, reason = _energy_handle(label)
    except BaseException:
        pynvml.nvmlShutdown()  # nvmlInit counts references: leave none behind
        raise
    if reason is not None:
        pynvml.nvmlShutdown()
        return None, reason
    return NvmlCounter(handle, label), None


def _energy_handle(label: str) -> tuple[Any, str | None]:
    """(the handle of device `label`, None), or (None, why it has no readable energy counter)."""
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(label)
    except pynvml.NVMLError as exc:
        return None, (
            f"no NVML energy counter for {label}: NVML finds no such device ({exc}); give the "
            "UUID of a GPU of this node"
        )
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # one trial reading decides support
    except pynvml.NVMLError_NotSupported:
        return None, (
            f"no NVML energy counter on {label}: NVML says Not Supported (Volta and newer GPUs "
            "have one)"
        )
    except pynvml.NVMLError as exc:
        return None, f"no NVML energy counter on {label}: its first reading failed ({exc})"
    return handle, None


@dataclass
class RaplCounter:
    """A RAPL domain's counter, read from its powercap `energy_uj` file."""

    label: str
    path: Path
    wrap_j: float | None
    source: str = "RAPL package energy (powercap)"

    def read(self) -> float | None:
        try:
            return int(self.path.read_text()) / 1e6  # µJ
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Holds nothing."""


def rapl_counters(root: Path = POWERCAP) -> tuple[list[Counter], str | None]:
    """The counters of the CPU packages, or ([], why there are none). All or none: the energy of
    some of the packages would pass for the CPUs'."""
    domains = []
    if root.is_dir():
        for folder in root.iterdir():
            match = _RAPL_DOMAIN.match(folder.name)
            name = _text(folder / "name")
            if match and name.startswith("package"):
                domains.append((int(match.group(1)), name, folder))
    if not domains:
        return [], (
            f"no RAPL package domain under {root}: this kernel or machine (e.g. a container or "
            "VM) exposes no CPU energy counter"
        )
    counters: list[Counter] = []
    for _, name, folder in sorted(domains):
        energy = folder / "energy_uj"
        try:
            int(energy.read_text())  # one trial reading decides access
        except PermissionError as exc:
            return [], (
                f"cannot read {energy} ({exc.strerror}): since Linux 5.10 only root can; run as "
                "root or make it readable"
            )
        except OSError as exc:
            return [], f"cannot read {energy} ({exc.strerror})"
        except ValueError:
            return [], f"cannot read {energy}: it does not hold a whole number of µJ"
        wrap_uj = _text(folder / "max_energy_range_uj")
        # Without its range a wrap looks like a reset: that interval is lost, not miscounted.
        wrap_j = int(wrap_uj) / 1e6 if wrap_uj.isdigit() else None
        counters.append(RaplCounter(name, energy, wrap_j))
    return counters, None


def _text(path: Path) -> str:
    """The file's text, stripped; "" where it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""
