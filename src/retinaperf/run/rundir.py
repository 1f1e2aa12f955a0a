"""The run directory: which one a run writes (new, resumed, or a restarted job's), and claiming it
before training: writable, with room for a checkpoint, holding the configuration a resume reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from retinaperf import files, invocation
from retinaperf.config import RunConfig
from retinaperf.distributed import DistEnv
from retinaperf.errors import UserError
from retinaperf.model.precision import Precision
from retinaperf.report import loading
from retinaperf.report.results import RESULTS
from retinaperf.run import checkpoint

CONFIG = "config.json"


def claim(config: RunConfig, env: DistEnv, resume: bool) -> tuple[Path, files.FolderLock | None]:
    """The run directory (rank 0's choice, shared with every rank) and, on rank 0, the lock that
    makes this job its only writer, held until the run ends. A default name is created, never
    shared; a folder another process writes in is refused, naming it. A new run's must be new or
    empty; a resumed run's must hold a run that has not completed; workers that torchrun started
    again after a failure take the directory as they find it (their dead attempt's lock is
    gone with it)."""
    lock, name = None, None
    if env.is_main:
        path, lock = _claim_name(config, env, resume)
        name = str(path)
    return Path(env.broadcast(name)), lock


def _claim_name(config: RunConfig, env: DistEnv, resume: bool) -> tuple[Path, files.FolderLock]:
    if config.output_dir:
        path = Path(config.output_dir)
    elif env.job_id:
        # Named after the torchrun job, so that its restarted workers find it again.
        path = files.RUNS / f"torchrun-{env.job_id}"
    else:
        path = files.new_timestamped_dir()
    what, what_to_do = (
        ("--resume", "wait for it to stop, then resume it")
        if resume
        else ("output", "wait for it to end, or choose another --output-dir")
    )
    lock = files.claim_folder(path, what, what_to_do, lambda: _check_usable(path, resume, env))
    return path, lock


def _check_usable(path: Path, resume: bool, env: DistEnv) -> None:
    if resume:
        _check_resumable(path)
    elif not env.attempt:
        _offer_resume(path)
        files.require_empty(path, "output", "choose a new --output-dir")


# How a run that can go on ended, by the status in its results.json (none: killed, or crashed).
_ENDED = {None: "stopped without results (killed or crashed)", "interrupted": "was interrupted"}


def _offer_resume(path: Path) -> None:
    """Refuse a new run into the folder of a run that can go on (its configuration and a
    checkpoint, not completed), offering `--resume` instead of a new folder."""
    newest = checkpoint.newest(path)
    if newest is None or not (path / CONFIG).is_file():
        return
    status = None
    if (path / RESULTS).is_file():
        try:
            status = files.read_json(path / RESULTS, "output").get("status")
        except (UserError, AttributeError):  # not a results file: the plain refusal says enough
            return
    if status == "completed":
        return
    raise UserError(
        f"output: {path} holds a run that {_ENDED.get(status, status)}, with checkpoint "
        f"{newest.name}: continue it with `{invocation.command('run', '--resume', path)}`, or "
        "choose a new --output-dir"
    )


def _check_resumable(path: Path) -> None:
    if not (path / CONFIG).is_file():
        raise UserError(
            f"--resume: {path} holds no {CONFIG}: give the run directory of a stopped run"
        )
    if (path / RESULTS).is_file() and loading.load_results(path, completed_only=False)[
        "status"
    ] == "completed":
        raise UserError(f"--resume: {path} holds a completed run: there is nothing to resume")


def continuing(run_dir: Path, env: DistEnv, resume: bool) -> bool:
    """Whether this process goes on with a run: asked to resume, or started again by torchrun
    after a rank failed (--max-restarts) in a run that wrote its configuration."""
    return resume or (env.attempt > 0 and (run_dir / CONFIG).exists())


def prepare(
    run_dir: Path,
    config: RunConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trained_in: Precision,
) -> None:
    """Create the run directory with the configuration a resume reads, refusing one that is not
    writable or whose disk cannot hold a checkpoint: before training, not hours into it."""
    weights_bytes = checkpoint.tensor_bytes(model.state_dict().values())
    updated = [p for group in optimizer.param_groups for p in group["params"]]
    # SGD keeps one momentum buffer per updated tensor; fp16 also keeps float32 masters.
    copies = 2 if trained_in.policy.half_weights else 1
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.check_space(run_dir, weights_bytes + copies * checkpoint.tensor_bytes(updated))
        files.write_json_atomic(run_dir / CONFIG, config.to_dict())
    except OSError as err:
        files.remove_if_unused(run_dir)
        raise UserError(
            f"output: cannot write in {run_dir} ({err.strerror or err}): choose a writable "
            "--output-dir"
        ) from None
    except UserError:
        files.remove_if_unused(run_dir)
        raise
