"""Where the training time went (docs/metrics.md, "Where the time went: `breakdown`"): the
exposed part of DDP's all-reduce, timed by a communication hook, and the breakdown of the
training time (evaluation and checkpoints apart) into data, host, device, communication and
other, with the verdict of what bounds the run. On the CPU the device is the host: its one part
is `device`, and the breakdown says so (`device_is_host`) rather than invent a split.

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
HOST, DEVICE, DATA, COMMUNICATION, OTHER = "host", "device", "data", "communication", "other"

# What to try when a part bounds the run (README: "One node of 8, or many nodes" for the network).
ADVICE = {
    DATA: "more data loader workers (num_workers), or faster storage and decoding",
    HOST: "fewer kernel launches per step: compile_mode=reduce-overhead (CUDA graphs), or a "
    "larger batch",
    DEVICE: "the device is the limit: a cheaper precision (bf16, amp), channels_last, compile, or "
    "a larger batch where memory allows",
    COMMUNICATION: "the network settings of the README (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, "
    "GLOO_SOCKET_IFNAME), or a larger batch per rank (fewer all-reduces per image)",
}
# On the CPU the device is the host: what helps it is not what helps an accelerator.
CPU_DEVICE_ADVICE = (
    "the CPU computes the step (it is host and device at once): more cores or threads, a cheaper "
    "precision, or an accelerator"
)


class CommTimer:
    """A DDP communication hook: DDP's default all-reduce, timed. Each bucket's all-reduce starts
    as backward makes its gradients ready; what backward's compute does not hide is the time from
    the last bucket's start (backward has no more to compute) to the completion of the last
    all-reduce, which the reducer waits for before the step goes on: the exposed communication.

    `stamp` marks a moment: the host clock on the CPU (a float), or on an accelerator a timing
    event recorded on the current stream (the device stamps it when it gets there), so that
    NCCL's all-reduce is timed where it runs, not when the host enqueued it. In the completion
    callback the current stream is one that waits for the all-reduce, so its event is stamped
    when the all-reduce is done."""

    def __init__(self, stamp: Callable[[], Any]) -> None:
        self.stamp = stamp
        self._last_ready: Any = None
        self._last_done: Any = None

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self._last_ready = self.stamp()
        # Looked up at each call, so that a test can slow the collective it wraps.
        reduced = default_hooks.allreduce_hook(state, bucket)

        def done(future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            # The all-reduces complete in the order they started: the last callback is the latest.
            self._last_done = self.stamp()
            return future.value()

        return reduced.then(done)

    def step_done(self) -> tuple[Any, Any] | None:
        """The stamps (last bucket ready, last all-reduce done) of the step just ended; None when
        it had no all-reduce. DDP waits for every bucket's future before backward returns, so
        both are taken by then."""
        ready, done = self._last_ready, self._last_done
        self._last_ready = self._last_done = None
        return None if ready is None or done is None else (ready, done)


def breakdown(
    total: float,
    data: float,
    core: float,
    communication: float,
    host_bound: float | None,
) -> dict:
    """The parts of `total` (the training time less evaluation and checkpoints), each as seconds
    and share, and the verdict. `core` is the core windows' time, which holds the exposed
    `communication`; `host_bound` the part of the core windows in which the device waited for
    the host, None on the CPU, where the device is the host: there the core windows less the
    communication are one part, `device`."""
    work = max(0.0, core - communication)
    device_is_host = host_bound is None
    host = 0.0 if host_bound is None else min(host_bound, work)
    measured = {DATA: data, DEVICE: work - host, COMMUNICATION: communication}
    if not device_is_host:
        measured = {HOST: host, **measured}
    # Whatever no part measured is shown, so that the parts add up to the total: negative when
    # parts overlapped (on an accelerator the host waits for the next batch while the device
    # still computes the last step).
    seconds = {**measured, OTHER: total - sum(measured.values())}
    parts = [
        {"part": name, "seconds": value, "share": value / total if total > 0 else None}
        for name, value in seconds.items()
    ]
    bound, evidence = verdict(measured, total)
    advice = CPU_DEVICE_ADVICE if device_is_host and bound == DEVICE else ADVICE.get(bound or "")
    return {
        "total": total,
        "parts": parts,
        "device_is_host": device_is_host,
        "bound_by": bound,
        "evidence": evidence,
        "advice": advice,
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
