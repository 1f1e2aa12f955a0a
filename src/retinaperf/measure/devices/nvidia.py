"""NVIDIA GPUs: readings and the energy counter from NVML (the driver library behind
nvidia-smi, through the nvidia-ml-py package), peaks from NVIDIA's datasheets.

ROCm builds of torch also call their devices `cuda`: a CUDA device is NVIDIA's only where torch
was built for CUDA (`torch.version.hip` is None); see amd.py for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pynvml
import torch

from retinaperf.measure.devices.base import Counter, DevicePlugin, Peak, PeakTable, Unavailable
from retinaperf.units import GIB

# Dense peak TFLOP/s (vendor datasheets; their "with sparsity" figures are twice these). "fp32" is
# the non-tensor-core rate, "tf32" the tensor-core rate on float32 inputs. A math the device does
# not have is absent.
PEAKS = PeakTable(
    vendor="NVIDIA",
    rows={
        # NVIDIA A100 Tensor Core GPU datasheet: SXM4 and PCIe (40 and 80 GB) have the same peaks.
        "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
        # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (sparse 989 / 1979 halved).
        "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
        # The same datasheet, H100 PCIe column (sparse 756 / 1513 halved).
        "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
        # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: the H100 SXM's compute.
        "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
        # NVIDIA Tesla V100 datasheet, SXM2 column ("tensor performance" is fp16); no tf32, bf16.
        "V100 SXM2": {"fp32": 15.7, "fp16": 125.0},
        # The same datasheet, PCIe column.
        "V100 PCIe": {"fp32": 14.0, "fp16": 112.0},
        # NVIDIA A10 Tensor Core GPU datasheet.
        "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0},
        # NVIDIA L4 Tensor Core GPU datasheet (sparse 120 / 242 halved).
        "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0},
        # NVIDIA L40S datasheet (sparse 366 / 733 halved).
        "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.0, "bf16": 362.0},
    },
    # "NVIDIA A10G", "NVIDIA L40", "NVIDIA H100 NVL" or a MIG slice ("... MIG 1g.5gb") are other
    # devices, with other peaks: they match no row.
    names={
        frozenset({"A100", "SXM4"}): "A100",  # NVIDIA A100-SXM4-40GB, NVIDIA A100-SXM4-80GB
        frozenset({"A100", "PCIE"}): "A100",  # NVIDIA A100-PCIE-40GB, NVIDIA A100 80GB PCIe
        frozenset({"H100", "HBM3"}): "H100 SXM",  # NVIDIA H100 80GB HBM3: the SXM5 part's name
        frozenset({"H100", "SXM5"}): "H100 SXM",
        frozenset({"H100", "PCIE"}): "H100 PCIe",  # NVIDIA H100 PCIe
        frozenset({"H200"}): "H200",  # NVIDIA H200 (the NVL part, "NVIDIA H200 NVL", is slower)
        frozenset({"V100", "SXM2"}): "V100 SXM2",  # Tesla V100-SXM2-16GB, Tesla V100-SXM2-32GB
        frozenset({"V100", "PCIE"}): "V100 PCIe",  # Tesla V100-PCIE-16GB (not V100S-PCIE-32GB)
        frozenset({"A10"}): "A10",  # NVIDIA A10
        frozenset({"L4"}): "L4",  # NVIDIA L4
        frozenset({"L40S"}): "L40S",  # NVIDIA L40S
    },
    vendor_words=frozenset({"NVIDIA", "TESLA"}),
)


class Nvidia(DevicePlugin):
    name = "nvidia"
    source = "NVML"
    memory_view = "driver peak used / device total (NVML, as nvidia-smi shows)"

    def matches(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.version.hip is None

    def device_id(self, device: torch.device) -> str | None:
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        return None if uuid is None else "GPU-" + bare_uuid(str(uuid))

    def sampler(self) -> NvmlSampler:
        try:
            return NvmlSampler()
        except pynvml.NVMLError_LibraryNotFound:
            raise Unavailable("NVML is not installed: it comes with the NVIDIA driver") from None

    def energy_counter(self, device: torch.device) -> tuple[Counter | None, str | None]:
        uuid = self.device_id(device)
        if uuid is None:
            return None, "torch reports no UUID for this GPU: NVML cannot find its counter"
        return nvml_counter(uuid)

    def peak(self, device_name: str, math: str) -> Peak:
        return PEAKS.peak(device_name, math)

    def facts(self, device: torch.device) -> dict[str, Any]:
        return {"cuda_driver": driver_version(), "cudnn": torch.backends.cudnn.version()}


def bare_uuid(uuid: str) -> str:
    """A GPU's UUID in one spelling for comparing: NVML writes "GPU-<hex>", torch "<hex>"."""
    return uuid.lower().removeprefix("gpu-")


class NvmlSampler:
    """Per-device readings from NVML.

    Raises pynvml.NVMLError where NVML does not initialise (no NVIDIA driver). Name and UUID are
    read once; a reading the device does not support is None in every sample.
    """

    def __init__(self) -> None:
        pynvml.nvmlInit()
        try:
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            self._devices = [
                (index, handle, _uuid(handle), pynvml.nvmlDeviceGetName(handle))
                for index, handle in enumerate(handles)
            ]
        except BaseException:
            pynvml.nvmlShutdown()  # nvmlInit counts references: leave none behind
            raise

    def sample(self) -> dict[str, Any]:
        return {"devices": [self._read(*device) for device in self._devices]}

    def _read(self, index: int, handle: Any, uuid: str, name: str) -> dict[str, Any]:
        util = _supported(pynvml.nvmlDeviceGetUtilizationRates, handle)
        memory = _supported(pynvml.nvmlDeviceGetMemoryInfo, handle)  # bytes
        power_mw = _supported(pynvml.nvmlDeviceGetPowerUsage, handle)
        return {
            "index": index,
            "uuid": uuid,
            "name": name,
            "util": None if util is None else util.gpu,
            "mem_used_gib": None if memory is None else memory.used / GIB,
            "mem_total_gib": None if memory is None else memory.total / GIB,
            "power_w": None if power_mw is None else power_mw / 1000,
            "temp_c": _supported(
                pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
            ),
            "sm_clock_mhz": _supported(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
        }

    def close(self) -> None:
        pynvml.nvmlShutdown()


def _uuid(handle: Any) -> str:
    """The device's UUID as `Nvidia.device_id` spells it, to match a rank's device exactly."""
    return "GPU-" + bare_uuid(pynvml.nvmlDeviceGetUUID(handle))


def _supported(read: Callable[..., Any], *args: Any) -> Any:
    """`read(*args)`, or None where NVML refuses it (a reading this device does not support)."""
    try:
        return read(*args)
    except pynvml.NVMLError:
        return None


class NvmlCounter:
    """A GPU's NVML energy counter. Holds a reference to NVML (nvmlInit) until `close()`."""

    source = "NVML energy counter"
    wrap_j: float | None = None  # a 64-bit count of mJ: 584 million years at 1 kW

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


def driver_version() -> str | None:
    """The NVIDIA driver's version; None where NVML is absent or unusable."""
    try:
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
