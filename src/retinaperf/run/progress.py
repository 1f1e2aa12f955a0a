"""What a logged step says: the global batch's loss parts, the images per second, the lr, on the
console's progress bar and as the event log's `step` record."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from retinaperf.distributed import DistEnv
from retinaperf.measure.meter import Meter
from retinaperf.model.precision import Precision
from retinaperf.report.events import EventLog
from retinaperf.run.health import LossWatch


@dataclass(frozen=True)
class StepFigures:
    """A logged step's figures, the same on every rank."""

    parts: dict[str, float]  # the global batch's loss parts
    longest_bad_run: int  # the longest run of steps with a non-finite loss, on any rank
    skipped_steps: int  # updates the loss scaler skipped, on any rank

    @property
    def loss(self) -> float:
        return sum(self.parts.values())


def reduce_step(
    env: DistEnv, losses: dict[str, torch.Tensor], watch: LossWatch, precision: Precision
) -> StepFigures:
    """The step's figures over the ranks (collectives; `.item()` waits for the device)."""
    names = sorted(losses)
    # The global batch's loss: the mean over ranks of each rank's mean.
    totals = env.all_reduce([losses[name].item() for name in names], "sum")
    parts = {name: total / env.world_size for name, total in zip(names, totals, strict=True)}
    longest, skipped = env.all_reduce(
        [watch.longest.item(), precision.skipped_steps().item()], "max"
    )
    return StepFigures(parts, int(longest), int(skipped))


def log_step(
    events: EventLog,
    bar: tqdm,
    meter: Meter,
    env: DistEnv,
    epoch: int,
    lr: float,
    figures: StepFigures,
) -> None:
    """The step record and the progress bar's figures; images/s since the last logged step."""
    # Every rank trains the same batch size, so the global rate is the local one x world size.
    rate = meter.interval_rate() * env.world_size
    events.emit(
        "step",
        epoch=epoch,
        step=meter.steps,
        loss=figures.loss,
        **figures.parts,
        lr=lr,
        images_per_s=rate,
        skipped_steps=figures.skipped_steps,
    )
    bar.set_postfix(loss=f"{figures.loss:.3f}", img_s=f"{rate:.1f}", lr=f"{lr:.3g}")
