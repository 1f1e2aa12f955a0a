"""`retinaperf run ARGS` on each rank torchrun starts, DDP's all-reduce slowed on purpose: each
bucket's all-reduce completes `DELAY_S` late, as over a slow network.

Used by test_breakdown.py: `torchrun --nproc-per-node 2 tests/dist_slow_comm.py ARGS`. The
trainer's communication hook wraps DDP's default all-reduce (`default_hooks.allreduce_hook`),
looked up at each call: this script replaces it with the same all-reduce, delayed.
"""

import sys
import time

import torch
from cli_helpers import run_cli
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

DELAY_S = 4.0  # over a tiny step on a loaded 2-core CI machine

real_allreduce = default_hooks.allreduce_hook


def slow_allreduce(state, bucket) -> torch.futures.Future:
    def late(future: torch.futures.Future) -> torch.Tensor:
        time.sleep(DELAY_S)
        return future.value()

    return real_allreduce(state, bucket).then(late)


if __name__ == "__main__":
    default_hooks.allreduce_hook = slow_allreduce
    sys.exit(run_cli(sys.argv[1:]))
