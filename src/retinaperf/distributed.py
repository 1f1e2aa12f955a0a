"""Who and where this process is: how it was launched (rank, world, torchrun's restarts and job),
its device and collective backend, the CPUs it may use, and the helpers that reduce and gather
across ranks. Nothing else in the package reads torchrun's environment.

One process per device, started by torchrun (which Slurm and Kubernetes launch the usual way).
Without torchrun's variables the process is a world of one and no process group is created.

torch is imported where it is used, not at the top: the CLI (before its commands import torch),
the signal handlers and the dataset generator read the launch and the CPUs without paying for
torch's import, seconds that `retinaperf report` or `synth` would otherwise spend for nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from retinaperf.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process through its environment (`launch()`); a world of one
    without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    attempt: int = 0
    """How many times torchrun has started this job's workers again after a failure
    (--max-restarts); 0 for the first start and without torchrun."""
    job_id: str | None = None
    """torchrun's rendezvous id of the job (--rdzv-id, or a fresh one with --standalone); None
    without torchrun."""
    by_torchrun: bool = False
    """Whether this process is one of torchrun's workers."""
    error_file: str | None = None
    """Where torchrun's failure summary reads this worker's error; None without torchrun."""

    @property
    def rank_prefix(self) -> str:
        """What begins this process's messages: "[rank N] " in a job of several ranks, so that
        the interleaved lines of a job say whose they are; "" in a world of one."""
        return f"[rank {self.rank}] " if self.world_size > 1 else ""


def launch() -> Launch:
    """This process's launch, from torchrun's environment variables. Needs no torch."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    job_id = env.get("TORCHELASTIC_RUN_ID")
    return Launch(
        rank=int(env.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))),
        attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        job_id=job_id if job_id not in (None, "", "none") else None,
        by_torchrun="LOCAL_RANK" in env,
        error_file=env.get("TORCHELASTIC_ERROR_FILE"),
    )


def cpu_count() -> int:
    """The CPUs this process may run on: its affinity (which taskset, Slurm and a container's
    cpuset narrow) where the system has one, else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    attempt: int = 0
    """As Launch.attempt."""
    job_id: str | None = None
    """As Launch.job_id."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def backend(self) -> str | None:
        import torch.distributed as dist

        return dist.get_backend() if dist.is_initialized() else None

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def node_first(self, first: Callable[[], T], then: Callable[[], T] | None = None) -> T:
        """`first()` on each node's local rank 0, then, after a barrier, `then()` (or `first()`)
        on the others: work that fills a node's cache once, which the others read."""
        if self.local_rank == 0:
            result = first()
            self.barrier()
            return result
        self.barrier()
        return (then or first)()

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        """Element-wise "sum", "max" or "min" of `values` over ranks (float64 on the wire)."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any] | None:
        """`obj` of every rank, in rank order, on rank 0; None elsewhere."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _collective_device(self) -> torch.device:
        import torch

        # gloo reduces host tensors; nccl and the vendors' backends (hccl, xccl, ...) reduce
        # device tensors.
        return torch.device("cpu") if self.backend == "gloo" else self.device


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` is the machine's accelerator (CUDA, XPU, MPS, ...) if it has one, else the CPU."""
    import torch

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


def setup(device: torch.device, timeout_s: float, backend: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (if any), this rank on `device` (`pick_device`'s
    choice). `backend` is the collective backend (the device plug-in's); None: torch's default
    for the device type."""
    import torch.distributed as dist

    launched = launch()
    rank, world_size = launched.rank, launched.world_size
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # The workers torchrun starts again after a failure (--max-restarts) meet in the store of
        # the workers before them, whose addresses are still there: each attempt gets keys of its
        # own, or the new ranks try to connect to the dead ones.
        dist.init_process_group(
            backend=backend or dist.get_default_backend_for_device(device),
            store=dist.PrefixStore(f"retinaperf/attempt-{launched.attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type != "cpu" else None,
        )
    return DistEnv(
        rank,
        world_size,
        launched.local_rank,
        launched.local_world_size,
        device,
        launched.attempt,
        launched.job_id,
    )


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished the work queued so far (a no-op on the CPU, whose
    operations complete before they return)."""
    import torch

    if device.type != "cpu":
        torch.accelerator.synchronize(device)
