"""One run that ends as asked, then the threads left in this process, for test_distributed.py.

`torchrun --nproc-per-node 2 tests/exit_threads.py HOW REPORT_DIR RUN_ARGS...`: HOW is how the
run ends (`completed`; `interrupted`: SIGTERM as the first evaluation starts, which the ranks
abandon together; `failed`: an error raised by the 2nd step). Each rank writes
REPORT_DIR/rank-<R>.json with the exit code (or the error it raised) and the names of its
threads after the run's teardown, read from /proc as the kernel knows them (Gloo names its own
`gloo_tcp_loop` and `pt_gloo_runloop`). The cyclic garbage collector is off: what frees the
process group must be the run letting go of it, not a collection that may or may not come
before the interpreter ends.
"""

import gc
import json
import os
import sys
from pathlib import Path

gc.disable()

from cli_helpers import run_cli, signal_at  # noqa: E402

from retinaperf.run import evaluation, step  # noqa: E402


def fail_at(call: int):
    """The training step, raising a RuntimeError (a bug, not a user error) at its `call`-th."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return step.train_step(*args, **kwargs)

    return failing


def thread_names() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


def main(how: str, report_dir: Path, run_args: list[str]) -> None:
    injected = {
        "completed": {},
        "interrupted": {"evaluate_fn": signal_at(evaluation.evaluate_model, 1)},
        "failed": {"step_fn": fail_at(2)},
    }
    try:
        ended = run_cli(run_args, **injected[how])
        threads = thread_names()
    except RuntimeError as err:  # read while the error, and its traceback, are alive
        ended, threads = f"raised {err}", thread_names()
    report = {"ended": ended, "threads": threads}
    (report_dir / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
