"""Where the training time went (docs/metrics.md, "Where the time went: `breakdown`"): the
exposed part of DDP's all-reduce, timed by a communication hook, and the breakdown of the
training time (evaluation and checkpoints apart) into data, host, device (or, on the CPU,
compute), communication and other, with the verdict of what bounds the run.

The meter collects the seconds (`Meter.data_seconds`, `comm_seconds`, `host_bound_seconds`);
`breakdown` is the pure function that turns them into parts, shares and a verdict.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

# The parts a verdict may name; "other" (the loop's own work: logging, polls, the progress bar,
# and what no part measured) never bounds a run.
HOST, DEVICE, COMPUTE, DATA, COMMUNICATION, OTHER = (
    "host", "device", "compute", "data", "communication", "other",
)  # fmt: skip

# What to try when a part bounds the run (README: "One node of 8, or many nodes" for the network).
ADVICE = {
    DATA: "more data loader workers (num_workers), or faster storage and decoding",
    HOST: "fewer kernel launches per step: compile_mode=reduce-overhead (CUDA graphs), or a "
    "larger batch",
    DEVICE: "the device is the limit: a cheaper precision (bf16, amp), channels_last, compile, or "
    "a larger batch where memory allows",
    COMPUTE: "the CPU computes the step (host and device are one here): more cores or threads, "
    "a cheaper precision, or an accelerator",
    COMMUNICATION: "the network settings of the README (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, "
    "GLOO_SOCKET_IFNAME), or a larger batch per rank (fewer all-reduces per image)",
}


class CommTimer:
    """A DDP communication hook: DDP's default all-reduce, timed. Each bucket's all-reduce starts
    as backward makes its gradients ready; what backward's compute does not hide is the time from
    the last bucket's start (backward has no more to compute) to the completion of the last
    all-reduce, which the reducer waits for before the step goes on: the exposed communication."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._last_ready: float | None = None
        self._last_done: float | None = None

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self._last_ready = self.clock()
        # Looked up at each call, so that a test can slow the collective it wraps.
        reduced = default_hooks.allreduce_hook(state, bucket)

        def done(future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            now = self.clock()
            self._last_done = now if self._last_done is None else max(self._last_done, now)
            return future.value()

        return reduced.then(done)

    def step_done(self) -> float:
        """The exposed seconds of the step just ended (0 when it had no all-reduce)."""
        ready, done = self._last_ready, self._last_done
        self._last_ready = self._last_done = None
        return max(0.0, done - ready) if ready is not None and done is not None else 0.0


def breakdown(
    total: float,
    data: float,
    core: float,
    communication: float,
    host_bound: float | None,
) -> dict:
    """The parts of `total` (the training time less evaluation and checkpoints), each as seconds
    and share, and the verdict. `core` is the core windows' time, which holds the exposed
    `communication`; `host_bound` the part of the core windows in which the device waited for the
    host (None on the CPU, where host and device are one part, compute)."""
    work = max(0.0, core - communication)
    if host_bound is None:
        measured = {DATA: data, COMPUTE: work, COMMUNICATION: communication}
    else:
        host = min(host_bound, work)
        measured = {DATA: data, HOST: host, DEVICE: work - host, COMMUNICATION: communication}
    # Whatever no part measured is shown, so that the parts add up to the total: negative when
    # parts overlapped (on an accelerator the host waits for the next batch while the device
    # still computes the last step).
    seconds = {**measured, OTHER: total - sum(measured.values())}
    parts = [
        {"part": name, "seconds": value, "share": value / total if total > 0 else None}
        for name, value in seconds.items()
    ]
    bound, evidence = verdict(measured, total)
    return {
        "total": total,
        "parts": parts,
        "bound_by": bound,
        "evidence": evidence,
        "advice": ADVICE[bound] if bound is not None else None,
    }


def verdict(measured: dict[str, float], total: float) -> tuple[str | None, str]:
    """The rule of docs/metrics.md: the run is bound by the measured part with the largest share
    of the total; none when no step was timed (total 0 or no part above 0)."""
    ranked = sorted(measured.items(), key=lambda item: item[1], reverse=True)
    (first, most), (second, next_most) = ranked[0], ranked[1]
    if total <= 0 or most <= 0:
        return None, "no training step was timed"
    return first, (
        f"{first} {100 * most / total:.0f}% of {total:.1f} s of training (next: {second} "
        f"{100 * next_most / total:.0f}%)"
    )
