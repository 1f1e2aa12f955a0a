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

PACKAGES = ("retinaperf", "torch", "torchvision", "numpy", "pillow", "faster-coco-eval")


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return cpu_model()
    # torch.cuda, torch.xpu, ... each offer get_device_name; the accelerator API does not (yet).
    get_name = getattr(getattr(torch, device.type, None), "get_device_name", None)
    return get_name(device) if get_name else device.type


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def capture(device: torch.device, hosts: list[str]) -> dict:
    """Versions, devices and hosts; `hosts` is every rank's host name, in rank order."""
    env = {
        "command": sys.argv,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "hosts": sorted(set(hosts)),
        "device_type": device.type,
        "device_name": device_name(device),
        "device_count": torch.accelerator.device_count() if device.type != "cpu" else 1,
        "torch_cuda_runtime": torch.version.cuda,
    }
    if device.type == "cuda":
        env["cuda_driver"] = _nvidia_driver()
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML absent or not usable: the driver version is simply unknown
        return None


def hostname() -> str:
    return socket.gethostname()
