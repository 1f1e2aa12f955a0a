"""Who and where this process is: how it was launched (rank, world, torchrun's restarts and job),
its device and collective backend, the CPUs it may use, and the helpers that reduce and gather
across ranks. Nothing else in the package reads the launcher's environment.

One process per device, started by torchrun (which Slurm and Kubernetes launch the usual way), or
by a launcher that starts every rank itself and sets only `RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
`MASTER_ADDR`, `MASTER_PORT` and perhaps `NODE_RANK` (FlagPerf's harness, mpirun wrappers, older
Slurm scripts): such a launcher does not say how many ranks share a node, so the node layout is
derived from every rank's node once the process group is up (`node_layout`). Without a
launcher's variables the process is a world of one and no process group is created.

torch is imported where it is used, not at the top: the CLI (before its commands import torch),
the signal handlers and the dataset generator read the launch and the CPUs without paying for
torch's import, seconds that `retinaperf report` or `synth` would otherwise spend for nothing.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
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
    """What the launcher told this process through its environment (`launch()`): torchrun, or
    one that starts every rank itself; a world of one without either."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = 1
    """The ranks on this node: torchrun's LOCAL_WORLD_SIZE; None where a launcher of several
    ranks did not say (`setup` derives it)."""
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
    node_rank: int | None = None
    """NODE_RANK, which launchers that start every rank themselves set (FlagPerf's harness);
    None where it is not set."""

    @property
    def rank_prefix(self) -> str:
        """What begins this process's messages: "[rank N] " in a job of several ranks, so that
        the interleaved lines of a job say whose they are; "" in a world of one."""
        return f"[rank {self.rank}] " if self.world_size > 1 else ""


def launch() -> Launch:
    """This process's launch, from its launcher's environment variables. Needs no torch."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    # torchrun sets TORCHELASTIC_RUN_ID for every worker ("none" without --rdzv-id); a launcher
    # that starts the ranks itself sets LOCAL_RANK too, but has no restarts and no job id: its
    # processes must not read a stale TORCHELASTIC_* variable as theirs.
    by_torchrun = "TORCHELASTIC_RUN_ID" in env
    torchrun = env if by_torchrun else {}
    job_id = torchrun.get("TORCHELASTIC_RUN_ID")
    local_world_size = env.get("LOCAL_WORLD_SIZE")
    node_rank = env.get("NODE_RANK")
    return Launch(
        rank=int(env.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=(
            int(local_world_size) if local_world_size else (1 if world_size == 1 else None)
        ),
        attempt=int(torchrun.get("TORCHELASTIC_RESTART_COUNT", "0")),
        job_id=job_id if job_id not in (None, "", "none") else None,
        by_torchrun=by_torchrun,
        error_file=torchrun.get("TORCHELASTIC_ERROR_FILE"),
        node_rank=int(node_rank) if node_rank else None,
    )


# What a launcher that starts every rank itself must set besides WORLD_SIZE (torch's env://
# rendezvous reads them; LOCAL_RANK picks the device).
PER_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_variables(launched: Launch) -> None:
    """Refuse a job of several ranks whose launcher left out a variable it needs, naming it,
    before the rendezvous would wait for it or every rank took device 0."""
    missing = [name for name in PER_RANK_VARIABLES if not os.environ.get(name)]
    if launched.world_size > 1 and missing:
        raise UserError(
            f"launch: WORLD_SIZE={launched.world_size} but {', '.join(missing)} not set: a "
            f"launcher that starts every rank itself sets {', '.join(PER_RANK_VARIABLES)} "
            "(and NODE_RANK on several nodes) for each; or start the job with torchrun"
        )


Peer = tuple[int | None, str, int]
"""What a rank says of where it runs: (NODE_RANK or None, host name, local rank)."""


def node_layout(peers: list[Peer]) -> int:
    """The ranks per node of a job whose launcher did not say, from every rank's `Peer`.

    The ranks are grouped by NODE_RANK where every rank has one, else by host name. A launcher
    numbers the local ranks of each node 0, 1, ...: a group whose local ranks repeat holds
    several nodes (launchers of several "nodes" on one host, which a host name cannot tell
    apart), as many as it has local ranks 0. Every node must hold the same number of ranks, as
    the seed's `nodes x devices` shapes and torchrun require."""
    by_node_rank = all(node is not None for node, _, _ in peers)
    groups: dict[object, list[int]] = {}
    for node, host, local_rank in peers:
        groups.setdefault(node if by_node_rank else host, []).append(local_rank)
    what = "NODE_RANK" if by_node_rank else "host"
    sizes = []
    for key, local_ranks in sorted(groups.items(), key=lambda item: str(item[0])):
        nodes_here = local_ranks.count(0)
        size = len(local_ranks) // max(nodes_here, 1)
        numbered = Counter(local_ranks) == Counter({local: nodes_here for local in range(size)})
        if not numbered or nodes_here == 0 or (by_node_rank and nodes_here > 1):
            raise UserError(
                f"launch: the ranks of {what} {key} have local ranks {sorted(local_ranks)}: a "
                "launcher numbers each node's ranks 0, 1, ... once each; set LOCAL_RANK (and "
                "NODE_RANK) so"
            )
        sizes += [size] * nodes_here
    if len(set(sizes)) > 1:
        raise UserError(
            f"launch: the nodes run {', '.join(map(str, sizes))} ranks: start the same number of "
            "ranks on every node"
        )
    return sizes[0]


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
    """Join the process group the launcher describes (if any), this rank on `device`
    (`pick_device`'s choice). `backend` is the collective backend (the device plug-in's); None:
    torch's default for the device type."""
    import torch.distributed as dist

    launched = launch()
    check_variables(launched)
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
    local_world_size = launched.local_world_size
    if local_world_size is None:
        local_world_size = _gathered_layout(launched)
    return DistEnv(
        rank,
        world_size,
        launched.local_rank,
        local_world_size,
        device,
        launched.attempt,
        launched.job_id,
    )


def _gathered_layout(launched: Launch) -> int:
    """`node_layout` of every rank's place, gathered over the process group just joined; a
    layout refused ends the group first (every rank refuses the same), so that no collective
    thread outlives the process's exit."""
    import torch.distributed as dist

    peers: list[Any] = [None] * launched.world_size
    place: Peer = (launched.node_rank, socket.gethostname(), launched.local_rank)
    dist.all_gather_object(peers, place)
    try:
        return node_layout(peers)
    except UserError:
        teardown()
        raise


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
