"""Small tensors made on the host (an index, per-box scales), handed to the device's queue."""

from __future__ import annotations

import torch


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small tensor made on the host, on `device`, without making the host wait: from pinned
    memory the copy is queued behind the device's work, where from pageable memory CUDA first
    waits for that work to finish. On the CPU the tensor itself."""
    if device.type == "cpu":
        return host
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type == device.type:
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
