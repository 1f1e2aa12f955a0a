"""`retinaperf run ARGS` on each rank torchrun starts, DDP's all-reduce slowed on purpose: each
step's last bucket completes late, as over a slow network, by twice the step's time so far (at
least `DELAY_S`), so that the exposed all-reduce outweighs the step's compute however loaded the
machine is.

Used by test_breakdown.py: `torchrun --nproc-per-node 2 tests/dist_slow_comm.py ARGS`. The
trainer's communication hook wraps DDP's default all-reduce (`default_hooks.allreduce_hook`),
looked up at each call: this script replaces it with the same all-reduce, delayed.
"""

import sys
import time

import torch
from cli_helpers import StepWatch, run_cli
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from retinaperf.run import step

DELAY_S = 2.0

real_allreduce = default_hooks.allreduce_hook
watch = StepWatch(step.train_step)


def slow_allreduce(state, bucket) -> torch.futures.Future:
    def late(future: torch.futures.Future) -> torch.Tensor:
        if bucket.is_last():  # backward is done: all the step's compute so far is behind it
            assert watch.started is not None
            time.sleep(max(DELAY_S, 2 * (time.perf_counter() - watch.started)))
        return future.value()

    return real_allreduce(state, bucket).then(late)


if __name__ == "__main__":
    default_hooks.allreduce_hook = slow_allreduce
    sys.exit(run_cli(sys.argv[1:], step_fn=watch))
