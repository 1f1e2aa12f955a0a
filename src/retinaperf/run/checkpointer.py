"""When and what a run checkpoints, and how it goes on from one: a checkpointer over named
stateful parts (each with `state_dict` / `load_state_dict`), as torchtitan's.

Two kinds of parts: the job's (the model, the precision's state, the optimizer: the same on
every rank, saved by rank 0) and each rank's own (its meter, loss watch, energy counters and
random generators: gathered to rank 0 and saved per rank). A new part is one entry in a dict.

A checkpoint is written after every epoch's evaluation, every `checkpoint_minutes`, and when a
signal stops the run; never while the loss is not finite (the kept ones are good). The file's
format and its background writer are `checkpoint.py`'s.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from retinaperf.distributed import DistEnv
from retinaperf.report.events import EventLog
from retinaperf.run import checkpoint
from retinaperf.run.checkpoint import Position


class Generators:
    """Every random generator this process draws from, as a stateful part."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return checkpoint.rng_state(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checkpoint.set_rng_state(state, self.device)


@dataclass
class Segments:
    """The segments of a run (a process each: the first, and each resumed or restarted one); the
    last is this process's, running."""

    earlier: list[dict] = field(default_factory=list)
    current: dict = field(default_factory=dict)

    def until(self, ended: str, end_step: int) -> list[dict]:
        """Every segment, this one ending (or, in a checkpoint, still `running`) at end_step."""
        current = {**self.current, "ended": ended, "end_step": end_step}
        if ended != "running":
            current["ended_at"] = _iso(time.time())
        return [*self.earlier, current]


class Checkpointer:
    """Saves the parts of a run and restores them; says when a timed checkpoint is due."""

    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        events: EventLog,
        workload: dict[str, Any],
        keep: int,
        minutes: float,
        job_parts: dict[str, Stateful],
        rank_parts: dict[str, Stateful],
    ) -> None:
        self.run_dir = run_dir
        self.env = env
        self.workload = workload
        self.minutes = minutes
        self.job_parts = job_parts
        self.rank_parts = rank_parts
        self.events = events  # where writes are reported
        self.writer = checkpoint.Writer(run_dir, keep)
        self.segments = Segments()
        self.position = Position()
        """Where training starts: the beginning, or the checkpoint this run goes on from."""
        self.resumed_from: Path | None = None
        self._rank_state: dict | None = None
        self._saved_at: Position | None = None
        self._last = time.monotonic()

    def restore(self, continuing: bool, started: float) -> None:
        """Load the job's parts from the newest checkpoint of a run that goes on (each rank's
        own wait for `restore_rank_parts`); record this process's segment, started at `started`
        (wall clock)."""
        self.segments.current = {
            "started_at": _iso(started),
            "start_step": 0,
            "resumed_from": None,
            "time_lost_s": None,
            "elastic_restart": self.env.attempt,
            "ended": "running",
        }
        path = None
        if continuing:
            # Rank 0 verifies (moving damaged ones aside); every rank loads the one it chose.
            path = checkpoint.newest_intact(self.run_dir) if self.env.is_main else None
            path = self.env.broadcast(path)
        if path is None:
            return
        state = checkpoint.load(path, self.workload, self.env.world_size)
        for name, part in self.job_parts.items():  # in order: fp16's masters after the model
            part.load_state_dict(state[name])
        self._rank_state = state["ranks"][self.env.rank]
        self.position = Position(**state["position"])
        self.segments.earlier = [dict(s) for s in state["segments"]]
        if self.segments.earlier[-1]["ended"] == "running":
            # That process died after this checkpoint without a stop of its own (killed,
            # crashed): what it trained after it is trained again, and counted once.
            self.segments.earlier[-1].update(ended="crashed", end_step=self.position.step)
        self.segments.current.update(
            start_step=self.position.step,
            resumed_from=path.name,
            # From the state this segment goes on from, to its start: the work lost, the
            # previous process's end, the wait in a queue, this process's start-up.
            time_lost_s=started - state["saved_at"],
        )
        self.resumed_from = path
        self.writer.newest = path
        self._saved_at = self.position

    def restore_rank_parts(self) -> None:
        """Load this rank's parts, at train start: building the model and counting FLOPs draw
        from the generators too, so they are set last."""
        if self._rank_state is not None:
            for name, part in self.rank_parts.items():
                part.load_state_dict(self._rank_state[name])
        self._last = time.monotonic()

    def due(self) -> bool:
        """Whether the timed checkpoint is due on this rank (the ranks agree on it)."""
        return self.minutes > 0 and time.monotonic() - self._last >= 60 * self.minutes

    def save(
        self,
        position: Position,
        healthy: bool,
        window: Callable[[], AbstractContextManager],
        ended: str = "running",
    ) -> None:
        """Write the whole state (rank 0; every rank gives its part), saying whether this
        segment goes on or ends here; not twice at one position, and not while the loss is not
        finite (`healthy`, agreed by the ranks). `window` times what training waits for: the
        gather, the host copy, a previous write still under way."""
        if self._saved_at == position and ended == "running":
            return
        self._saved_at, self._last = position, time.monotonic()
        if not healthy:
            return
        with window():
            ranks = self.env.gather({name: p.state_dict() for name, p in self.rank_parts.items()})
            if not self.env.is_main:
                return
            state = {
                "format": checkpoint.FORMAT,
                "workload": self.workload,
                "world_size": self.env.world_size,
                "position": dataclasses.asdict(position),
                **{name: part.state_dict() for name, part in self.job_parts.items()},
                "ranks": ranks,
                "segments": self.segments.until(ended, position.step),
                "saved_at": time.time(),
            }
            self._report(self.writer.submit(checkpoint.snapshot(state), position.step))

    def finish(self) -> None:
        """Wait for the write under way, and report it: the newest checkpoint is on disk."""
        self._report(self.writer.finish())

    @property
    def newest(self) -> Path | None:
        return self.writer.newest

    def close(self) -> None:
        self.writer.close()

    def _report(self, outcome: checkpoint.Outcome | None) -> None:
        """The event of a finished write; a failed one (a full disk) is warned about and the
        run goes on, with the previous checkpoints intact."""
        if outcome is None:
            return
        if outcome.error is not None:
            kept = self.newest.name if self.newest else "none yet"
            warnings.warn(
                f"checkpoint: cannot write step {outcome.step} into "
                f"{checkpoint.folder(self.run_dir)} ({outcome.error.strerror or outcome.error}): "
                f"the run goes on; the newest checkpoint is still {kept}",
                stacklevel=1,
            )
            self.events.emit("checkpoint_failed", step=outcome.step, error=str(outcome.error))
            return
        self.events.emit(
            "checkpoint", step=outcome.step, path=str(outcome.path), seconds=outcome.seconds
        )


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
