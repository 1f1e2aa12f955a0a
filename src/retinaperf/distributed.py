"""Who and where this process is: rank, world, device and collective backend, and the helpers that
reduce and gather across ranks. Nothing else in the package reads torchrun's environment.

One process per device, started by torchrun (which Slurm and Kubernetes launch the usual way).
Without torchrun's variables the process is a world of one and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from retinaperf.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    attempt: int = 0
    """How many times torchrun has started this job's workers again after a failure
    (--max-restarts); 0 for the first start and without torchrun."""
    job_id: str | None = None
    """torchrun's rendezvous id of the job (--rdzv-id, or a fresh one with --standalone); None
    without torchrun."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if dist.is_initialized() else None

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        """Element-wise "sum" or "max" of `values` over ranks (float64 on the wire)."""
        if not dist.is_initialized():
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any] | None:
        """`obj` of every rank, in rank order, on rank 0; None elsewhere."""
        if not dist.is_initialized():
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _collective_device(self) -> torch.device:
        # nccl reduces device tensors only; gloo reduces host tensors.
        return self.device if self.backend == "nccl" else torch.device("cpu")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` is the machine's accelerator (CUDA, XPU, MPS, ...) if it has one, else the CPU."""
    if requested == "auto":
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        requested = accelerator.type if accelerator is not None else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    try:
        device_type = torch.device(requested).type
    except RuntimeError:
        raise UserError(f"config: device={requested!r} is not a torch device type") from None
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type != device_type:
        found = accelerator.type if accelerator is not None else "none"
        raise UserError(
            f"config: device={requested!r} is not available here (accelerator found: {found}): "
            "use device=auto or device=cpu"
        )
    count = torch.accelerator.device_count()
    if local_rank >= count:
        raise UserError(
            f"local rank {local_rank} has no {device_type} device: this node has {count}; start "
            f"at most {count} processes per node"
        )
    torch.accelerator.set_device_index(local_rank)
    return torch.device(device_type, local_rank)


def setup(requested_device: str, timeout_s: float) -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    job_id = os.environ.get("TORCHELASTIC_RUN_ID")
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # The workers torchrun starts again after a failure (--max-restarts) meet in the store of
        # the workers before them, whose addresses are still there: each attempt gets keys of its
        # own, or the new ranks try to connect to the dead ones.
        dist.init_process_group(
            backend=dist.get_default_backend_for_device(device),
            store=dist.PrefixStore(f"retinaperf/attempt-{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type != "cpu" else None,
        )
    return DistEnv(
        rank,
        world_size,
        local_rank,
        local_world_size,
        device,
        attempt,
        job_id if job_id not in (None, "", "none") else None,
    )


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished the work queued so far (a no-op on the CPU, whose
    operations complete before they return)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


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
