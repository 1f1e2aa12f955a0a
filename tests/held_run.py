"""`retinaperf RUN_ARGS` in a process of its own that holds before a step while a file exists:
a live run a test can act on while it is surely live, and then let go on, or kill.

`python tests/held_run.py HOLD_FILE STEP RUN_ARGS...`: the run's training step, at its STEP-th
call (1-based), waits while HOLD_FILE exists (the steps before it are done and logged, their
checkpoints written), then steps on as usual. Used by test_rundir.py.
"""

import sys
import time
from pathlib import Path

from cli_helpers import at_call, run_cli

from retinaperf.run import step

HOLD_LIMIT_S = 600.0  # a test that never lets go fails on its own timeout first


def hold_at(fn, call: int, hold: Path):
    """`fn`, waiting at its `call`-th call while `hold` exists."""

    def wait() -> None:
        deadline = time.monotonic() + HOLD_LIMIT_S
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    return at_call(fn, call, wait)


if __name__ == "__main__":
    hold, at, *args = sys.argv[1:]
    raise SystemExit(run_cli(args, step_fn=hold_at(step.train_step, int(at), Path(hold))))
