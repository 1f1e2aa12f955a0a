"""Checkpoints: the whole state of a run, so that a stopped run goes on as if it had not stopped.

A checkpoint holds (checkpointer.py assembles it from the run's parts):
- the model, the optimizer, and the precision's state (the loss scaler, fp16's float32 masters);
- where training stands (`Position`);
- each rank's random number generators and meter totals (images, steps, core, evaluation and
  train time so far, the evaluations);
- the run's segments so far, and the workload it belongs to.
The data order and the flips are pure functions of (seed, epoch, index): nothing of the loader
is kept, the sampler skips the batches already trained.

Everything in it is tensors, numbers and strings, so it loads with `weights_only=True` and a file
that carries pickled code is refused. Rank 0 writes `<run dir>/checkpoints/step-<step>.pt`
atomically (`files.atomic_file`: temporary file, fsync, rename, fsync of the folder) and keeps
the newest `keep`; every rank reads it (on several nodes the run directory must be on storage
they share). The `Writer` does that on a background thread from a host copy of the state, so that
training goes on while the bytes reach the disk.
"""

from __future__ import annotations

import random
import re
import shutil
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinaperf import files, invocation
from retinaperf.errors import UserError
from retinaperf.model import weights

FOLDER = "checkpoints"
FORMAT = 2  # 2: the meter keeps the batch shapes
_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass(frozen=True)
class Position:
    """Where training stands: `step_in_epoch` batches of `epoch` are trained, `step` in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def saved(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    found = []
    if folder(run_dir).is_dir():
        for entry in folder(run_dir).iterdir():
            match = _NAME.match(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def newest(run_dir: Path) -> Path | None:
    paths = saved(run_dir)
    return paths[-1] if paths else None


def digest_file(path: Path) -> Path:
    """Where the sha256 of checkpoint `path` is recorded (`sha256sum -c` reads it)."""
    return path.with_name(path.name + ".sha256")


def save(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, atomically, with its digest, then delete all
    but the newest `keep`. On failure (a full disk) nothing half-written is left and older
    checkpoints stay.

    The digest is of the bytes the rename publishes, recorded (durably) before the rename: a
    checkpoint never appears without it."""
    target = folder(run_dir) / f"step-{step:08d}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(target, "wb", durable=True) as f:
        torch.save(state, f)
        f.flush()
        digest = files.sha256_of(Path(f.name))
        with files.atomic_file(digest_file(target), "w", durable=True) as record:
            record.write(f"{digest}  {target.name}\n")
    for old in saved(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        digest_file(old).unlink(missing_ok=True)
    return target


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (its digest is missing, or its bytes are not those
    written: truncated, overwritten), or None when it is intact."""
    try:
        recorded = digest_file(path).read_text(encoding="ascii").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return "no digest was recorded with it"
    try:
        actual = files.sha256_of(path)
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if actual != recorded:
        return f"its bytes are not those written (sha256 {actual[:12]}…, recorded {recorded[:12]}…)"
    return None


def newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint whose bytes are those written. Each newer one that is not is moved
    aside (renamed `*.damaged`, never deleted) and named in a warning with the reason; with some
    but none intact, a UserError says what to do. None when the run wrote none."""
    candidates = saved(run_dir)
    for path in reversed(candidates):
        reason = damage(path)
        if reason is None:
            return path
        aside = path.with_name(path.name + ".damaged")
        path.rename(aside)
        if digest_file(path).exists():
            digest_file(path).rename(digest_file(aside))
        warnings.warn(
            f"checkpoint: {path.name} is damaged ({reason}): moved aside as {aside.name}; "
            "going on from the newest intact one",
            stacklevel=1,
        )
    if candidates:
        raise UserError(
            f"checkpoint: no intact checkpoint in {folder(run_dir)} (each was moved aside as "
            "*.damaged): the run cannot go on; start it again in a new --output-dir"
        )
    return None


def snapshot(value: Any) -> Any:
    """`value` with every tensor copied to host memory: what a background write may save while
    training goes on changing the originals."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return value


@dataclass(frozen=True)
class Outcome:
    """How a write ended: `path` written, or the `error` that stopped it (a full disk)."""

    step: int
    seconds: float
    path: Path | None = None
    error: OSError | None = None


class Writer:
    """Saves checkpoints on one background thread, one at a time; the newest written and the
    failures are kept here."""

    def __init__(self, run_dir: Path, keep: int, newest: Path | None = None) -> None:
        self.run_dir = run_dir
        self.keep = keep
        self.newest = newest
        self.failures = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retinaperf-checkpoint")
        self._pending: Future[Outcome] | None = None

    def submit(self, state: dict[str, Any], step: int) -> Outcome | None:
        """Start writing `state` (a `snapshot`); returns the outcome of the write before it."""
        previous = self.finish()
        self._pending = self._pool.submit(self._write, state, step)
        return previous

    def _write(self, state: dict[str, Any], step: int) -> Outcome:
        started = time.perf_counter()
        try:
            path = save(self.run_dir, state, step, self.keep)
        except OSError as err:
            return Outcome(step, time.perf_counter() - started, error=err)
        return Outcome(step, time.perf_counter() - started, path=path)

    def finish(self) -> Outcome | None:
        """Wait for the write under way, if any, and return its outcome."""
        if self._pending is None:
            return None
        outcome = self._pending.result()
        self._pending = None
        if outcome.error is not None:
            self.failures += 1
        else:
            self.newest = outcome.path
        return outcome

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def load(path: Path, workload: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A checkpoint's content, checked to belong to this workload and job shape."""
    state = weights.load_tensors(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(
            f"checkpoint: {path} is not a retinaperf checkpoint (format {FORMAT}): remove it, or "
            "resume from a run directory this version wrote"
        )
    theirs = state["workload"]
    for key in sorted(set(theirs) | set(workload)):
        if _normal(theirs.get(key)) != _normal(workload.get(key)):
            raise UserError(
                f"checkpoint: {path} belongs to another configuration ({key} is "
                f"{theirs.get(key)!r} there, {workload.get(key)!r} in this run): resume a run "
                f"with `{invocation.command('run', '--resume', 'RUN_DIR')}`, which takes the "
                "configuration saved with it, or start a new run in a new --output-dir"
            )
    if state["world_size"] != world_size:
        raise UserError(
            f"checkpoint: {path} was written by a job of {state['world_size']} process(es), "
            f"this job has {world_size}: the global batch, and so the workload, would change; "
            f"resume it with {state['world_size']} process(es)"
        )
    return state


def _normal(value: Any) -> Any:
    # A checkpoint stores tuples as tuples, a config.json as lists.
    return list(value) if isinstance(value, tuple) else value


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_space(run_dir: Path, needed: int) -> None:
    """Refuse a run whose checkpoint would not fit on the disk of its run directory."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UserError(
            f"output: {run_dir} has {free / 1e9:.2f} GB free, but one checkpoint of this run "
            f"needs {needed / 1e9:.2f} GB: free space, or choose an --output-dir on another disk"
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator this process draws from (the model's training-time resize draws from
    torch's), in types that load with weights_only."""
    legacy = np.random.get_state()  # legacy=True (the default): the tuple, not the dict
    assert isinstance(legacy, tuple)
    kind, keys, position, has_gauss, gauss = legacy
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu":
        torch.get_device_module(device).set_rng_state(state["device"], device)


def _tuples(value: Any) -> Any:
    """random.setstate wants the tuples it gave, and pickling keeps them, but be lenient."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_tuples(v) for v in value)
    return value
