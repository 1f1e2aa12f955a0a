"""What a run says as it goes: the header before training (what runs where), a logged step's
figures (the global batch's loss parts, the images per second, the lr) on the console's progress
bar and as the event log's `step` record, and each evaluation's line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from retinaperf.config import RunConfig
from retinaperf.distributed import DistEnv
from retinaperf.measure.meter import Meter
from retinaperf.model.precision import Precision
from retinaperf.report.events import EventLog
from retinaperf.run.checkpoint import Position
from retinaperf.run.health import LossWatch

THROUGHPUT_MODE = "throughput mode: speed and memory, mAP not reported"


def header(
    config: RunConfig,
    env: DistEnv,
    device_name: str,
    precision: Precision,
    data: dict,
    run_dir: Path,
    resumed: tuple[Position, Path | None] | None,
) -> str:
    """What runs where, printed by rank 0 before training: the preset, the device and the job's
    shape, the precision as resolved (why, where `auto` chose it), the dataset and its image
    counts (`data`: the loaders' facts), the run directory; for a run that goes on (`resumed`:
    the position and the checkpoint it goes on from), from where."""
    mode = f" ({THROUGHPUT_MODE})" if config.throughput_only else ""
    processes = f"{env.world_size} process{'es' if env.world_size > 1 else ''}"
    nodes = f"{env.nodes} node{'s' if env.nodes > 1 else ''}"
    chosen = precision.name
    if chosen != config.train.precision:
        chosen += f" ({precision.reason})"
    lines = [
        f"retinaperf run: preset {config.preset}{mode}",
        f"  device     {env.device.type} ({device_name}), {processes} ({nodes} x "
        f"{env.local_world_size} per node)",
        f"  precision  {chosen}",
        f"  dataset    {data['dataset']}: {data['train_images']} training images, "
        f"{data['val_images']} validation images",
        f"  run dir    {run_dir}",
    ]
    if resumed is not None:
        position, path = resumed
        lines.append(
            f"  resumed    from step {position.step} (epoch {position.epoch}, batch "
            f"{position.step_in_epoch}), checkpoint {path}"
            if path is not None
            else f"  resumed    from step 0: {run_dir} holds no checkpoint yet"
        )
    return "\n".join(lines)


def eval_line(epoch: int, stats: dict[str, float], seconds: float, throughput_only: bool) -> str:
    """An evaluation's console line. A throughput-only run evaluates as the recipe does (its time
    counts in p_whole) but its mAP means nothing: the line says so rather than show a number."""
    if throughput_only:
        return f"epoch {epoch}: evaluated in {seconds:.1f} s; mAP not reported (throughput mode)"
    return f"epoch {epoch}: mAP {stats['AP']:.4f} (AP50 {stats['AP50']:.4f})"


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
