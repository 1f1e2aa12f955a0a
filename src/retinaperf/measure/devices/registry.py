"""Which plug-in reads a device: installed plug-ins first, then the built-in ones.

A vendor's package adds a plug-in without a change to retinaperf by declaring an entry point in
the group `retinaperf.devices` whose object is a `DevicePlugin` subclass (or instance); see the
README's "Adding a device". Installed plug-ins come first, in the order of their entry points'
names, so that a vendor's own plug-in takes over from a built-in one. A plug-in that fails to
load, or whose `matches` raises, is warned about and passed over: reading a device is an extra
that must never stop a benchmark.
"""

from __future__ import annotations

import warnings
from importlib import metadata

import torch

from retinaperf.measure.devices.amd import Amd
from retinaperf.measure.devices.base import DevicePlugin, Sampler, Unavailable, Unsupported
from retinaperf.measure.devices.cpu import Cpu
from retinaperf.measure.devices.nvidia import Nvidia

GROUP = "retinaperf.devices"


def installed() -> list[DevicePlugin]:
    """The plug-ins of the installed entry points of `GROUP`, by name."""
    plugins = []
    for entry in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        try:
            loaded = entry.load()
            plugin = loaded() if isinstance(loaded, type) else loaded
            if not isinstance(plugin, DevicePlugin):
                raise TypeError(f"{type(plugin).__name__} is not a DevicePlugin")
        except Exception as exc:
            warnings.warn(
                f"the device plug-in {entry.name!r} ({entry.value}) did not load ({exc!r}); it "
                "is ignored",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        plugins.append(plugin)
    return plugins


def built_in() -> list[DevicePlugin]:
    """AMD before NVIDIA: ROCm's torch calls its devices `cuda` too."""
    return [Amd(), Nvidia(), Cpu()]


def plugin_for(device: torch.device) -> DevicePlugin:
    """The plug-in that reads `device`; `Unsupported` where none does."""
    for plugin in installed() + built_in():
        try:
            if plugin.matches(device):
                return plugin
        except Exception as exc:
            warnings.warn(
                f"the device plug-in {plugin.name!r} failed to tell whether it reads {device} "
                f"({exc!r}); it is passed over",
                RuntimeWarning,
                stacklevel=2,
            )
    return Unsupported(device.type)


def open_sampler(plugin: DevicePlugin) -> tuple[Sampler | None, str | None]:
    """The plug-in's sampler of this node's devices, or (None, why there is none). Never raises:
    an unexpected failure is warned about, and its reason recorded."""
    try:
        return plugin.sampler(), None
    except Unavailable as why:
        return None, str(why)
    except Exception as exc:
        reason = f"the {plugin.name} plug-in's sampler did not start ({type(exc).__name__}: {exc})"
        warnings.warn(f"{reason}; no device readings", RuntimeWarning, stacklevel=2)
        return None, reason
