"""The host's cost of a training step at the real size: operators dispatched and host time.

An accelerator computes a step of RetinaNet in tens of milliseconds (a batch of 16 at 300
images/s: 53 ms); the host must enqueue it faster, or the accelerator waits. Here the step runs on
the `meta` device, where every operator is dispatched (shapes computed, outputs allocated as
shapes only) but no kernel computes: what remains is the host's work, and each code path takes
the branch an accelerator takes (anything but the CPU). Counted with a TorchDispatchMode, by part
of the step, and timed (best of N).

Workload: the model in its pretrained structure (frozen batch norm, 3 trainable stages;
channels-last, as CUDA runs it), fp32, a batch of 16 COCO-sized uint8 images (640×480 and 640×427
alternating, 7 boxes each) resized to 800/1333. The step is `retinaperf.train.train_step`; the
update is SGD's multi-tensor (foreach) form, as fused kernels do not run on `meta` (on CUDA the
fused update is one kernel per dtype group).

Baseline: the step as it was before issue 15, reconstructed: torchvision's input transform and
its per-call frozen batch norm and anchors (`transform=torchvision`, `reuse_constants=false`),
and the batched loss matching image by image in chunks of 2**24 elements (torchvision's own loss
cannot run here: it reads device values). Its targets are padded as now, one copy for the batch:
before, three pads per image cost ~50 operators more (4,607 in all, measured on 2026-11-30).
Goals: at most 1,500 operators for forward + loss + backward (the goal ratio is the baseline's
count / 1,500), and a third of the baseline's host time.

    .venv/bin/python benchmarks/bench_host.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import Comparison, best_time, print_comparisons, speedup
from retinaperf.config import ModelConfig
from retinaperf.model import loss
from retinaperf.model.network import build_model
from retinaperf.model.precision import Precision
from retinaperf.run.step import train_step

META = torch.device("meta")
BATCH, BOXES = 16, 7
SIZES = ((480, 640), (427, 640))  # (h, w): COCO's two commonest image sizes
OPERATOR_BUDGET = 1500
REFERENCE = {"transform": "torchvision", "reuse_constants": False}
PARTS = ("transform", "backbone", "head", "anchors", "loss", "backward", "update")


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched, by the part of the step that `part` names."""

    def __init__(self) -> None:
        super().__init__()
        self.part = "loss"
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.part] += 1
        return func(*args, **(kwargs or {}))


def make_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(BATCH):
        height, width = SIZES[i % 2]
        images.append(torch.empty(3, height, width, dtype=torch.uint8, device=META))
        corner = torch.rand(BOXES, 2, generator=g) * torch.tensor([width, height]) * 0.7
        size = torch.rand(BOXES, 2, generator=g) * 150 + 8
        boxes = torch.cat([corner, corner + size], 1)
        labels = torch.randint(1, 91, (BOXES,), generator=g)
        targets.append({"boxes": boxes.to(META), "labels": labels.to(META)})
    return images, targets


@contextlib.contextmanager
def legacy_loss() -> Iterator[None]:
    """The batched loss as it ran on accelerators before issue 15: matched image by image, the
    logits in chunks of 2**24 elements."""
    saved = loss.match_per_image, loss.DEVICE_CHUNK
    loss.match_per_image = lambda device: not torch.compiler.is_compiling()
    loss.DEVICE_CHUNK = 2**24
    try:
        yield
    finally:
        loss.match_per_image, loss.DEVICE_CHUNK = saved


@dataclass
class HostCost:
    operators: dict[str, int]  # by part
    step_s: float  # forward + loss + backward + update
    update_s: float

    @property
    def forward_backward(self) -> int:
        return sum(n for part, n in self.operators.items() if part != "update")


def measure(settings: dict, repeats: int) -> HostCost:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone_weights="random", **settings), None)
    model = model.to(META).train()
    model.use_channels_last()
    precision = Precision("fp32", META)
    model = precision.prepare(model)
    params = precision.optimizer_params(model)
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)
    images, targets = make_batch()

    def step() -> None:
        train_step(model, images, targets, optimizer, precision)

    counter = OperatorCount()
    _label_parts(model, optimizer, counter)
    step()  # warm: caches filled, as from the second step of a run
    with counter:
        step()
    step_s = best_time(step, repeats)
    update_s = best_time(optimizer.step, repeats)
    return HostCost(dict(counter.counts), step_s, update_s)


def _label_parts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, counter: OperatorCount
) -> None:
    """Hooks that tell the counter which part of the step runs: the model's parts, the loss
    (the forward's own code around them), the backward (after the forward), the update."""

    def enter(part: str) -> Callable[..., None]:
        return lambda *args, **kwargs: setattr(counter, "part", part)

    parts = {
        "transform": model.transform,
        "backbone": model.backbone,
        "head": model.head,
        "anchors": model.anchor_generator,
    }
    for part, module in parts.items():
        module.register_forward_pre_hook(enter(part))
        module.register_forward_hook(enter("loss"))
    model.register_forward_pre_hook(enter("loss"))
    model.register_forward_hook(enter("backward"))
    optimizer.register_step_pre_hook(enter("update"))
    optimizer.register_step_post_hook(enter("loss"))


def benchmark(repeats: int = 5) -> list[Comparison]:
    ours = measure({}, repeats)
    with legacy_loss():
        before = measure(REFERENCE, repeats)
    workload = (
        f"host's work for a training step on `meta`: batch {BATCH} of 640×480/640×427 at "
        "800/1333, frozen batch norm, fp32"
    )
    by_part = ", ".join(f"{p} {ours.operators.get(p, 0)}" for p in PARTS)
    before_by_part = ", ".join(f"{p} {before.operators.get(p, 0)}" for p in PARTS)
    operators = Comparison(
        "host operators",
        workload + ", forward + loss + backward",
        "before issue 15",
        before.forward_backward,
        "retinaperf",
        ours.forward_backward,
        "operators",
        before.forward_backward / ours.forward_backward,
        before.forward_backward / OPERATOR_BUDGET,
        f"at most {OPERATOR_BUDGET} operators (goal ratio = the baseline's / {OPERATOR_BUDGET}); "
        f"by part: {by_part} (before: {before_by_part})",
    )
    ours_s, before_s = ours.step_s - ours.update_s, before.step_s - before.update_s
    host_time = speedup(
        "host time",
        workload + ", forward + loss + backward",
        "before issue 15",
        before_s,
        "retinaperf",
        ours_s,
        3.0,
        f"the foreach SGD update adds {1000 * ours.update_s:.1f} ms "
        f"({ours.operators.get('update', 0)} operators)",
    )
    return [operators, host_time]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (best of)")
    print_comparisons(benchmark(parser.parse_args().repeats))


if __name__ == "__main__":
    main()
