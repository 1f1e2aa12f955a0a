"""A fake amdsmi package with scripted GPUs, put in sys.modules["amdsmi"] in place of the real
one (which does not import without ROCm); and what the real package, installed as a test
dependency, defines, read from its source without importing it, to hold the fake to it."""

import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# The files of the real package that define its Python interface.
SOURCES = ("__init__.py", "amdsmi_interface.py", "amdsmi_exception.py")


class AmdSmiException(Exception):
    """As amdsmi's: the base of everything it raises."""


class AmdSmiLibraryException(AmdSmiException):
    """As amdsmi's: a status code of libamd_smi other than success."""

    def __init__(self, err_code: int) -> None:
        super().__init__(err_code)
        self.err_code = err_code


NOT_SUPPORTED = 2  # AMDSMI_STATUS_NOT_SUPPORTED


def not_supported() -> AmdSmiLibraryException:
    return AmdSmiLibraryException(NOT_SUPPORTED)


class AmdSmiInitFlags(IntEnum):
    INIT_AMD_GPUS = 2


class AmdSmiTemperatureType(IntEnum):
    EDGE = 0
    HOTSPOT = 1


class AmdSmiTemperatureMetric(IntEnum):
    CURRENT = 0


class AmdSmiClkType(IntEnum):
    GFX = 1


@dataclass
class FakeGpu:
    """One GPU's readings, as amdsmi 7.0.2 returns them; an exception instead of a value is
    raised by the function that would return it."""

    bdf: str = "0000:c1:00.0"
    asic: Any = field(default_factory=lambda: {"market_name": "AMD Instinct MI300X"})
    board: Any = field(default_factory=lambda: {"product_name": "N/A"})
    activity: Any = field(
        default_factory=lambda: {"gfx_activity": 87, "umc_activity": 40, "mm_activity": "N/A"}
    )
    vram: Any = field(default_factory=lambda: {"vram_total": 196592, "vram_used": 40960})
    power: Any = field(
        default_factory=lambda: {
            "socket_power": 452,
            "current_socket_power": 452,
            "average_socket_power": "N/A",
            "gfx_voltage": "N/A",
            "soc_voltage": "N/A",
            "mem_voltage": "N/A",
            "power_limit": 750,
        }
    )
    temps: dict = field(default_factory=lambda: {"HOTSPOT": 65, "EDGE": not_supported()})
    clock: Any = field(
        default_factory=lambda: {
            "clk": 2100,
            "min_clk": 500,
            "max_clk": 2100,
            "clk_locked": False,
            "clk_deep_sleep": "N/A",
        }
    )
    energy: Any = field(
        default_factory=lambda: {
            "energy_accumulator": 1_000_000,
            "counter_resolution": 15.3,
            "timestamp": 0,
        }
    )
    driver: Any = field(
        default_factory=lambda: {
            "driver_name": "amdgpu",
            "driver_version": "6.10.5",
            "driver_date": "2015/01/01 00:00",
        }
    )


def _give(value: Any) -> Any:
    if isinstance(value, BaseException):
        raise value
    return value


class AmdSmiFake:
    """Scripted GPUs behind a fake amdsmi module: `gpus` maps a handle to its readings; amdsmi_init
    and amdsmi_shut_down are counted; `init_error` makes amdsmi_init raise."""

    def __init__(self, *gpus: FakeGpu) -> None:
        self.gpus = {f"h{i}": gpu for i, gpu in enumerate(gpus)}
        self.inits = 0
        self.shutdowns = 0
        self.init_error: BaseException | None = None
        self.handles_error: BaseException | None = None
        self.module = self._module()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "AmdSmiFake":
        monkeypatch.setitem(sys.modules, "amdsmi", self.module)
        return self

    def _gpu(self, handle: str) -> FakeGpu:
        return self.gpus[handle]

    def _module(self) -> ModuleType:
        module = ModuleType("amdsmi")
        classes: dict[str, Any] = {
            "AmdSmiException": AmdSmiException,
            "AmdSmiLibraryException": AmdSmiLibraryException,
            "AmdSmiInitFlags": AmdSmiInitFlags,
            "AmdSmiTemperatureType": AmdSmiTemperatureType,
            "AmdSmiTemperatureMetric": AmdSmiTemperatureMetric,
            "AmdSmiClkType": AmdSmiClkType,
        }
        for name, value in {**classes, **self.functions()}.items():
            setattr(module, name, value)
        return module

    def functions(self) -> dict[str, Any]:
        def init(flag: AmdSmiInitFlags = AmdSmiInitFlags.INIT_AMD_GPUS) -> None:
            assert isinstance(flag, AmdSmiInitFlags), flag  # the real one checks it too
            if self.init_error is not None:
                raise self.init_error
            self.inits += 1

        def shut_down() -> None:
            self.shutdowns += 1

        def handles() -> list[str]:
            if self.handles_error is not None:
                raise self.handles_error
            return list(self.gpus)

        def temperature(handle: str, sensor: Any, metric: Any) -> int:
            assert isinstance(sensor, AmdSmiTemperatureType), sensor
            assert metric is AmdSmiTemperatureMetric.CURRENT, metric
            return _give(self._gpu(handle).temps.get(sensor.name, not_supported()))

        def clock(handle: str, kind: Any) -> dict:
            assert kind is AmdSmiClkType.GFX, kind
            return _give(self._gpu(handle).clock)

        def reader(attribute: str):
            return lambda handle: _give(getattr(self._gpu(handle), attribute))

        return {
            "amdsmi_init": init,
            "amdsmi_shut_down": shut_down,
            "amdsmi_get_processor_handles": handles,
            "amdsmi_get_gpu_device_bdf": reader("bdf"),
            "amdsmi_get_gpu_asic_info": reader("asic"),
            "amdsmi_get_gpu_board_info": reader("board"),
            "amdsmi_get_gpu_activity": reader("activity"),
            "amdsmi_get_gpu_vram_usage": reader("vram"),
            "amdsmi_get_power_info": reader("power"),
            "amdsmi_get_temp_metric": temperature,
            "amdsmi_get_clock_info": clock,
            "amdsmi_get_energy_count": reader("energy"),
            "amdsmi_get_gpu_driver_info": reader("driver"),
        }


# The functions whose dict the fake returns, and the FakeGpu field that holds it.
DICTS = {
    "amdsmi_get_gpu_asic_info": "asic",
    "amdsmi_get_gpu_board_info": "board",
    "amdsmi_get_gpu_activity": "activity",
    "amdsmi_get_gpu_vram_usage": "vram",
    "amdsmi_get_power_info": "power",
    "amdsmi_get_clock_info": "clock",
    "amdsmi_get_energy_count": "energy",
    "amdsmi_get_gpu_driver_info": "driver",
}


def real_package() -> Path | None:
    """The installed amdsmi package's folder, found without importing it; None if absent."""
    spec = importlib.util.find_spec("amdsmi")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class RealApi:
    """What the real package defines: its exported names, its top-level functions and classes,
    each class's members (enum members), and the string keys of each function's dict literals."""

    exported: set[str]
    functions: dict[str, set[str]]
    classes: dict[str, set[str]]


def real_api(package: Path) -> RealApi:
    exported: set[str] = set()
    functions: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    for source in SOURCES:
        tree = ast.parse((package / source).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and source == "__init__.py":
                exported.update(alias.asname or alias.name for alias in node.names)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                functions[node.name] = {
                    key.value
                    for d in ast.walk(node)
                    if isinstance(d, ast.Dict)
                    for key in d.keys
                    if isinstance(key, ast.Constant) and isinstance(key.value, str)
                }
            elif isinstance(node, ast.ClassDef):
                classes[node.name] = {
                    target.id
                    for statement in node.body
                    if isinstance(statement, ast.Assign)
                    for target in statement.targets
                    if isinstance(target, ast.Name)
                }
    return RealApi(exported, functions, classes)
