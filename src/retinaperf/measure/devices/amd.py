"""AMD Instinct GPUs: readings and the energy counter from amdsmi (the library behind amd-smi,
through the amdsmi package of the same ROCm release), peaks from AMD's datasheets.

ROCm builds of torch call AMD GPUs `cuda` devices too: a CUDA device is AMD's where torch was
built for ROCm (`torch.version.hip` is set). amdsmi is imported only when a reading is asked
for: the package loads libamd_smi.so as it is imported and raises there (a KeyError, not an
ImportError) on a machine without ROCm, which must cost a reading, never the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from retinaperf.measure.devices.base import Counter, DevicePlugin, Peak, PeakTable, Unavailable
from retinaperf.units import GIB

# Dense peak TFLOP/s (AMD datasheets; their "with structured sparsity" figures are twice these),
# of the whole GPU as one device: the default SPX mode (a GPU split into CPX partitions is several
# devices of the same name, each with a share). "fp32" is the best rate of IEEE float32 math: on
# CDNA that is the datasheet's FP32 *matrix* rate (equal to its packed FP32 vector rate), since
# rocBLAS and MIOpen run float32 GEMMs and convolutions on matrix cores, which (unlike NVIDIA's
# tensor cores) compute in full float32; the unpacked "FP32 vector" figure would let MFU pass
# 100%. "tf32" is the TF32 matrix rate, which only CDNA 3 has. A math the device lacks is absent.
PEAKS = PeakTable(
    vendor="AMD",
    rows={
        # AMD Instinct MI300X datasheet: FP32 vector and FP32 matrix 163.4, TF32 653.7, FP16 and
        # BF16 1307.4 (sparse 1307.4 / 2614.9 halved). Its 81.7 is the FP64 vector rate.
        "MI300X": {"fp32": 163.4, "tf32": 653.7, "fp16": 1307.4, "bf16": 1307.4},
        # AMD Instinct MI325X datasheet: the MI300X's compute (304 CUs, 2100 MHz), more HBM.
        "MI325X": {"fp32": 163.4, "tf32": 653.7, "fp16": 1307.4, "bf16": 1307.4},
        # AMD Instinct MI300A datasheet (228 CUs): FP32 vector and matrix 122.6, TF32 490.3, FP16
        # and BF16 980.6.
        "MI300A": {"fp32": 122.6, "tf32": 490.3, "fp16": 980.6, "bf16": 980.6},
        # AMD Instinct MI210 datasheet: FP32 matrix and packed FP32 45.3 (FP32 vector 22.6),
        # FP16 and BF16 181.0; no TF32.
        "MI210": {"fp32": 45.3, "fp16": 181.0, "bf16": 181.0},
    },
    # Not here: the MI250X and MI250. ROCm names both "AMD Instinct MI250X / MI250", and each of
    # their two dies is a device of its own with half the datasheet's peaks (MI250X: FP32 matrix
    # 95.7, FP16/BF16 383.0 per card), so the name does not tell which peak a device has.
    names={
        frozenset({"MI300X"}): "MI300X",  # AMD Instinct MI300X
        frozenset({"MI325X"}): "MI325X",  # AMD Instinct MI325X
        frozenset({"MI300A"}): "MI300A",  # AMD Instinct MI300A
        frozenset({"MI210"}): "MI210",  # AMD Instinct MI210
    },
    vendor_words=frozenset({"AMD", "INSTINCT"}),
)

NO_ROCM = "it comes with ROCm; pip install amdsmi matching the ROCm version"

# What amdsmi returns for a reading the device does not give, where it returns one: "N/A", or
# the raw sentinel of the C struct's field (UINT16_MAX from GPU metrics, UINT32_MAX elsewhere).
_NONE_VALUES = (0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


def load_amdsmi() -> ModuleType:
    """The amdsmi module. Raises `Unavailable` where it does not import, whatever the error:
    amdsmi 7 raises a KeyError where libamd_smi.so is absent."""
    try:
        return importlib.import_module("amdsmi")
    except Exception as exc:
        raise Unavailable(f"amdsmi did not load ({type(exc).__name__}: {exc}): {NO_ROCM}") from None


class Amd(DevicePlugin):
    name = "amd"
    source = "amdsmi"
    memory_view = "driver peak used / device total (amdsmi, as amd-smi shows)"

    def matches(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.version.hip is not None

    def device_id(self, device: torch.device) -> str | None:
        """The GPU's PCI address, "dddd:bb:dd.f" as amdsmi writes it: neither HIP nor amdsmi
        gives an identifier that the other knows (HIP's UUID is not amdsmi's)."""
        props = torch.cuda.get_device_properties(device)
        domain, bus, slot = (
            getattr(props, f"pci_{p}_id", None) for p in ("domain", "bus", "device")
        )
        if domain is None or bus is None or slot is None:
            return None
        return f"{domain:04x}:{bus:02x}:{slot:02x}.0"  # torch gives no function: a GPU's is 0

    def sampler(self) -> AmdSmiSampler:
        return AmdSmiSampler(load_amdsmi())

    def energy_counter(self, device: torch.device) -> tuple[Counter | None, str | None]:
        bdf = self.device_id(device)
        if bdf is None:
            return None, "torch reports no PCI address for this GPU: amdsmi cannot find its counter"
        return amdsmi_counter(bdf)

    def peak(self, device_name: str, math: str) -> Peak:
        return PEAKS.peak(device_name, math)

    def facts(self, device: torch.device) -> dict[str, Any]:
        return {"rocm_driver": driver_version(), "hip_runtime": torch.version.hip}


def _supported(amdsmi: ModuleType, read: Callable[..., Any], *args: Any) -> Any:
    """`read(*args)`, or None where amdsmi refuses it (a reading this device does not give)."""
    try:
        return read(*args)
    except amdsmi.AmdSmiException:
        return None


def _number(value: Any) -> Any:
    """A reading, or None where amdsmi says "N/A" or returns a field's "no value" sentinel."""
    if value is None or isinstance(value, str) or value in _NONE_VALUES:
        return None
    return value


def _bdf(amdsmi: ModuleType, handle: Any) -> str | None:
    bdf = _supported(amdsmi, amdsmi.amdsmi_get_gpu_device_bdf, handle)
    return None if bdf is None else str(bdf).lower()


def _name(amdsmi: ModuleType, handle: Any) -> str | None:
    """The product name: the ASIC's market name ("AMD Instinct MI300X"), else the board's."""
    for read, key in (
        (amdsmi.amdsmi_get_gpu_asic_info, "market_name"),
        (amdsmi.amdsmi_get_gpu_board_info, "product_name"),
    ):
        info = _supported(amdsmi, read, handle) or {}
        if isinstance(info.get(key), str) and info[key].strip() not in ("", "N/A"):
            return info[key].strip()
    return None


class AmdSmiSampler:
    """Per-device readings from amdsmi.

    Raises amdsmi.AmdSmiException where amdsmi does not initialise (no amdgpu driver). PCI
    address and name are read once; a reading the device does not give is None in every sample.
    """

    def __init__(self, amdsmi: ModuleType) -> None:
        self._smi = amdsmi
        amdsmi.amdsmi_init(amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
        try:
            self._devices = [
                (index, handle, _bdf(amdsmi, handle), _name(amdsmi, handle))
                for index, handle in enumerate(amdsmi.amdsmi_get_processor_handles())
            ]
        except BaseException:
            amdsmi.amdsmi_shut_down()  # amdsmi_init counts references: leave none behind
            raise

    def sample(self) -> dict[str, Any]:
        return {"devices": [self._read(*device) for device in self._devices]}

    def _read(self, index: int, handle: Any, bdf: str | None, name: str | None) -> dict[str, Any]:
        smi = self._smi
        activity = _supported(smi, smi.amdsmi_get_gpu_activity, handle) or {}
        vram = _supported(smi, smi.amdsmi_get_gpu_vram_usage, handle) or {}  # MiB ("MB")
        power = _supported(smi, smi.amdsmi_get_power_info, handle) or {}  # W
        clock = _supported(smi, smi.amdsmi_get_clock_info, handle, smi.AmdSmiClkType.GFX) or {}
        util = _number(activity.get("gfx_activity"))
        used, total = _number(vram.get("vram_used")), _number(vram.get("vram_total"))
        # MI300 and newer give the current socket power, MI200 and older an average.
        watts = _number(power.get("current_socket_power"))
        return {
            "index": index,
            "uuid": bdf,
            "name": name,
            "util": util if util is None or util <= 100 else None,
            "mem_used_gib": None if used is None else used * 1024**2 / GIB,
            "mem_total_gib": None if total is None else total * 1024**2 / GIB,
            "power_w": _number(power.get("average_socket_power")) if watts is None else watts,
            "temp_c": self._temperature(handle),
            "sm_clock_mhz": _number(clock.get("clk")),
        }

    def _temperature(self, handle: Any) -> float | None:
        """°C at the hotspot (junction), the sensor that throttles; the edge where there is none
        (MI300 has no edge sensor, some Radeons no hotspot)."""
        smi = self._smi
        current = smi.AmdSmiTemperatureMetric.CURRENT
        for sensor in (smi.AmdSmiTemperatureType.HOTSPOT, smi.AmdSmiTemperatureType.EDGE):
            celsius = _number(_supported(smi, smi.amdsmi_get_temp_metric, handle, sensor, current))
            if celsius is not None:
                return celsius
        return None

    def close(self) -> None:
        self._smi.amdsmi_shut_down()


def _joules(reading: dict[str, Any]) -> float:
    """The joules of an amdsmi_get_energy_count reading: a count of `counter_resolution` µJ,
    named "energy_accumulator" in amdsmi 7 (the package's source) and "power" in amdsmi 6.0."""
    count = reading["energy_accumulator"] if "energy_accumulator" in reading else reading["power"]
    return count * reading["counter_resolution"] / 1e6


class AmdSmiCounter:
    """A GPU's amdsmi energy counter. Holds a reference to amdsmi (amdsmi_init) until `close()`.

    The count can also start again from 0 (a driver reload): the energy summary marks such a
    figure a lower bound.
    """

    source = "amdsmi energy counter"
    # A 64-bit count (uint64 in amdsmi_get_energy_count and in the driver's GPU metrics) of
    # ~15.3 µJ: 2.8e14 J, nine thousand years at 1 kW.
    wrap_j: float | None = None

    def __init__(self, amdsmi: ModuleType, handle: Any, label: str) -> None:
        self._smi = amdsmi
        self._handle = handle
        self.label = label

    def read(self) -> float | None:
        try:
            return _joules(self._smi.amdsmi_get_energy_count(self._handle))
        except self._smi.AmdSmiException:
            return None

    def close(self) -> None:
        self._smi.amdsmi_shut_down()


def amdsmi_counter(bdf: str) -> tuple[Counter | None, str | None]:
    """The amdsmi energy counter of the GPU at this PCI address ("0000:c1:00.0"), or (None, why
    there is none). Never raises an amdsmi error."""
    bdf = bdf.lower()
    try:
        amdsmi = load_amdsmi()
    except Unavailable as why:
        return None, f"no amdsmi energy counter for {bdf}: {why}"
    try:
        amdsmi.amdsmi_init(amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
    except amdsmi.AmdSmiException as exc:
        return None, (
            f"no amdsmi energy counter for {bdf}: amdsmi did not initialise ({exc}); it needs "
            "the amdgpu driver"
        )
    try:
        handle, reason = _energy_handle(amdsmi, bdf)
    except BaseException:
        amdsmi.amdsmi_shut_down()  # amdsmi_init counts references: leave none behind
        raise
    if reason is not None:
        amdsmi.amdsmi_shut_down()
        return None, reason
    return AmdSmiCounter(amdsmi, handle, bdf), None


def _energy_handle(amdsmi: ModuleType, bdf: str) -> tuple[Any, str | None]:
    """(the handle of the GPU at `bdf`, None), or (None, why it has no readable energy counter)."""
    handles = _supported(amdsmi, amdsmi.amdsmi_get_processor_handles) or []
    handle = next((h for h in handles if _bdf(amdsmi, h) == bdf), None)
    if handle is None:
        return None, (
            f"no amdsmi energy counter for {bdf}: amdsmi finds no GPU at this PCI address; give "
            "the address of a GPU of this node"
        )
    try:
        _joules(amdsmi.amdsmi_get_energy_count(handle))  # one trial reading decides support
    except (amdsmi.AmdSmiException, KeyError, TypeError) as exc:
        return None, f"no amdsmi energy counter on {bdf}: its first reading failed ({exc!r})"
    return handle, None


def driver_version() -> str | None:
    """The amdgpu driver's version; None where amdsmi is absent or unusable."""
    try:
        amdsmi = load_amdsmi()
    except Unavailable:
        return None
    try:
        amdsmi.amdsmi_init(amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
    except amdsmi.AmdSmiException:
        return None
    try:
        handles = _supported(amdsmi, amdsmi.amdsmi_get_processor_handles) or []
        info = (
            _supported(amdsmi, amdsmi.amdsmi_get_gpu_driver_info, handles[0]) if handles else None
        )
        version = (info or {}).get("driver_version")
        return version if isinstance(version, str) and version not in ("", "N/A") else None
    finally:
        amdsmi.amdsmi_shut_down()
