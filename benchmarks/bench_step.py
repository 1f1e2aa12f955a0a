"""The training step: retinaperf's against a plain torchvision training loop, and `auto` against
fp32.

Both train the same network (RetinaNet ResNet-50-FPN, random initialisation, torchvision's
builder for the baseline) on the same batch: 4 images of 512×512 with COCO-like boxes. The
baseline is the loop anyone would write: `loss = sum(model(images, targets).values())`,
`backward()`, `SGD.step()`, with images already float32 (its loader's work). Ours is
`retinaperf.train.train_step` as a run calls it, with the model, precision and optimizer a run
builds. Goals: ours at least as fast as the plain loop (the harness costs nothing) and
`precision=auto` at least as fast as fp32.

    .venv/bin/python benchmarks/bench_step.py [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable

import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from common import Comparison, best_time, print_comparisons, speedup
from retinaperf.config import ModelConfig, TrainConfig
from retinaperf.model import precision
from retinaperf.model.network import build_model
from retinaperf.model.precision import Precision
from retinaperf.run.step import build_optimizer, train_step, use_channels_last

SIZE, BATCH = 512, 4
CPU = torch.device("cpu")


def make_batch(seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """`BATCH` uint8 images of SIZE×SIZE and 3–12 boxes each of COCO-like sizes."""
    g = torch.Generator().manual_seed(seed)
    images = [
        torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8) for _ in range(BATCH)
    ]
    targets = []
    for _ in images:
        count = int(torch.randint(3, 13, (), generator=g))
        size = SIZE * torch.exp(torch.empty(count, 2).uniform_(-3.5, -0.5, generator=g))
        corner = (SIZE - size) * torch.rand(count, 2, generator=g)
        boxes = torch.cat([corner, corner + size], dim=1)
        labels = torch.randint(1, 91, (count,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def plain_loop_step(batch: tuple[list, list]) -> Callable[[], None]:
    """One step of the plain torchvision loop, ready to time."""
    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=SIZE, max_size=SIZE
    ).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = [image.float() / 255 for image in batch[0]]

    def step() -> None:
        losses = model(images, copy.deepcopy(batch[1]))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return step


def our_step(batch: tuple[list, list], precision_name: str) -> Callable[[], None]:
    """One step of retinaperf's step, set up as `run` sets it up on the CPU, ready to time."""
    torch.manual_seed(0)
    config = ModelConfig(min_size=SIZE, max_size=SIZE, backbone_weights="none")
    model = build_model(config, None).train()
    if use_channels_last(config.channels_last, CPU):
        model.use_channels_last()
    chosen = Precision(precision_name, CPU)
    model = chosen.prepare(model)
    optimizer = build_optimizer(chosen.optimizer_params(model), TrainConfig(lr=0.01), CPU)
    images, targets = batch
    return lambda: train_step(model, images, copy.deepcopy(targets), optimizer, chosen)


def alternating_best(steps: list[Callable[[], None]], rounds: int) -> list[float]:
    """The best time of each step, in rounds that take them in turn (after one warm-up call
    each), so that all meet the same moments of a shared machine's load."""
    best = [math.inf] * len(steps)
    for step in steps:
        step()
    for _ in range(rounds):
        for i, step in enumerate(steps):
            best[i] = min(best[i], best_time(step, 1, warmup=0))
    return best


def benchmark(steps: int = 3) -> list[Comparison]:
    batch = make_batch()
    workload = f"training step, batch {BATCH} at {SIZE}×{SIZE}, random init, CPU"
    auto, reason = precision.choose("auto", CPU)
    # auto is fp32 on some CPUs: then there is nothing to compare it with
    timed = [plain_loop_step(batch), our_step(batch, "fp32")]
    if auto != "fp32":
        timed.append(our_step(batch, auto))
    plain, fp32, *ours_auto = alternating_best(timed, steps)
    rounds = f"best of {steps} rounds that take the steps in turn"
    comparisons = [
        speedup(
            "step",
            workload + ", fp32",
            "plain torchvision loop",
            plain,
            "retinaperf",
            fp32,
            1.0,
            notes=rounds,
        )
    ]
    if ours_auto:
        comparisons.append(
            speedup(
                "auto precision",
                workload,
                "retinaperf fp32",
                fp32,
                f"retinaperf auto ({auto})",
                ours_auto[0],
                1.0,
                notes=f"auto chose {auto} ({reason}); {rounds}",
            )
        )
    return comparisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="alternating rounds (best of)")
    print_comparisons(benchmark(parser.parse_args().steps))


if __name__ == "__main__":
    main()
