"""A run's life, from the process group to its teardown: `run`.

The event log is made first, and everything after it is owned by a context that closes it
however the run ends. The run's outcome is decided once: `finish.finish` writes results.json
with it (completed; interrupted by SIGTERM or SIGINT, after a checkpoint; or failed: divergence,
out of memory, any error once set up), and what is written after it (`finish.publish`: report,
plots) never changes it.
"""

from __future__ import annotations

import contextlib
import traceback

from retinaperf import distributed, files
from retinaperf.config import RunConfig
from retinaperf.measure import memory
from retinaperf.measure.devices import registry
from retinaperf.report.events import EventLog
from retinaperf.run import build, evaluation, finish, rundir, signals, step
from retinaperf.run.trainer import EvaluateFn, Interrupted, StepFn, Trainer


def run(
    config: RunConfig,
    command_start: float,
    resume: bool = False,
    step_fn: StepFn = step.train_step,
    evaluate_fn: EvaluateFn = evaluation.evaluate_model,
) -> dict:
    """Run the benchmark (or, with `resume`, continue the run in the config's `output_dir` from its
    newest checkpoint); returns the results written to `<run_dir>/results.json` on rank 0, and
    {"status": ...} on the other ranks. `step_fn` and `evaluate_fn` are the step and the
    evaluation (tests wrap them)."""
    device = distributed.pick_device(config.device, distributed.launch().local_rank)
    plugin = registry.plugin_for(device)
    memory.limit_memory(device, config.memory_limit_gib)
    env = distributed.setup(device, config.dist_timeout, plugin.collective_backend)
    trainer = None
    with (
        signals.StopRequest() as stop,
        contextlib.ExitStack() as held,  # the run directory's lock
        EventLog(command_start, keep=env.is_main) as events,  # closed before the lock goes
    ):
        try:
            build.check_topology(config, env)
            run_dir, lock = rundir.claim(config, env, resume)
            if lock is not None:
                # Last, once results are written: release the lock, then remove the folder if
                # the run was refused before it wrote anything there.
                held.callback(files.remove_if_unused, run_dir)
                held.callback(lock.release)
            trainer = Trainer(
                config, env, plugin, run_dir, events, command_start, resume, stop, step_fn,
                evaluate_fn,
            )  # fmt: skip
            if trainer.setup_failure is not None:  # out of memory counting the FLOPs
                raise trainer.setup_failure
            trainer.train()
            results = finish.finish(trainer, "completed")
        except Interrupted:
            assert trainer is not None  # raised by its training alone
            results = finish.finish(trainer, "interrupted", f"stopped by {stop.name}")
            # What a scheduler's grace time must cover (the step or evaluation batch under
            # way, the checkpoint, the results), for the admin who sets it.
            stopped_in = stop.seconds_since()
            events.emit("stopped", signal=stop.name, seconds=stopped_in)
            return {**results, "signal": stop.name, "stopped_in_s": stopped_in}
        except BaseException as raised:
            # An allocation that failed (in an evaluation, building the model) is out of memory:
            # recorded as such, and told in one line.
            err = step.as_out_of_memory(raised, device)
            events.emit("run_failed", error=f"{type(err).__name__}: {err}")
            if trainer is not None:
                finish.record_failure(trainer, err)
            # The traceback keeps the frames it passed through, and their locals (the trainer,
            # the DDP model of a step) alive while the error rises past the teardown below:
            # the printed traceback needs the code and lines alone.
            _clear_frames(raised)
            if err is not raised:
                raise err from None
            raise
        else:
            # Outside the handlers above: once results.json holds the outcome, nothing that
            # follows records the run again as failed.
            return finish.publish(run_dir, results) if env.is_main else results
        finally:
            if trainer is not None:
                trainer.close()
            # The process group goes once nothing holds it, and its Gloo or NCCL threads with
            # it; a thread that outlives it dies with the interpreter and can abort the process
            # (std::terminate) after a run that had completed.
            trainer = None
            distributed.teardown()


def _clear_frames(err: BaseException) -> None:
    """Drop the locals of the finished frames in `err`'s traceback and in those of the errors
    it was raised from or during (the frames still running are left as they are)."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        traceback.clear_frames(link.__traceback__)
        link = link.__cause__ or link.__context__
