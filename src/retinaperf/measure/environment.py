"""The software and hardware a run ran on, for results.json."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from retinaperf.distributed import cpu_count
from retinaperf.measure.devices.base import DevicePlugin
from retinaperf.measure.devices.cpu import cpu_model

PACKAGES = ("retinaperf", "torch", "torchvision", "numpy", "pillow", "faster-coco-eval")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the retinaperf checkout, when the package runs from one."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def capture(
    device: torch.device, hosts: list[str], plugin: DevicePlugin, readings_note: str | None
) -> dict:
    """Versions, devices and hosts; `hosts` is every rank's host name, in rank order. `plugin`
    reads the device; `readings_note` says why the monitor has no device readings (None: it
    has them)."""
    return {
        "command": sys.argv,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "hosts": sorted(set(hosts)),
        "device_type": device.type,
        "device_name": plugin.device_name(device),
        "device_count": torch.accelerator.device_count() if device.type != "cpu" else 1,
        "device_plugin": plugin.name,
        "device_readings": plugin.source if readings_note is None else None,
        "device_readings_note": readings_note,
        "torch_cuda_runtime": torch.version.cuda,
        **plugin.facts(device),
    }


def hostname() -> str:
    return socket.gethostname()
