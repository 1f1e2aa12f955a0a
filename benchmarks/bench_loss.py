"""The training loss: retinaperf's batched `retinanet_loss` against torchvision's
`RetinaNet.compute_loss`, forward + backward, on a COCO-like batch at the recipe's resolution.

Both get the same inputs: the anchors RetinaNet's AnchorGenerator makes for a batch padded to
800×1344 (images of 800×1333), random logits and box deltas, and COCO-like targets (0 to 30
boxes an image, about 7 on average, sizes from 8 to 700 px, random labels 1..90). torchvision's
takes tens of seconds on a CPU, so it is timed once; ours is the best of a few runs after a
warmup. Goal: 10× faster.

    .venv/bin/python benchmarks/bench_loss.py [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen

from common import Comparison, best_time, print_comparisons, speedup
from retinaperf.model.loss import retinanet_loss

IMAGE = (800, 1333)  # the recipe's resize of a 4:3 COCO photo
PADDED = (800, 1344)  # batched to a multiple of 32
STRIDES = (8, 16, 32, 64, 128)  # P3-P7
NUM_CLASSES = 91
GOAL = 10.0


def make_anchors(batch: int) -> list[Tensor]:
    """RetinaNet's anchors for a batch padded to PADDED: B tensors [A, 4]."""
    height, width = PADDED
    sizes = [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]
    features = [torch.empty(batch, 1, h, w) for h, w in sizes]
    images = ImageList(torch.empty(batch, 3, height, width), [IMAGE] * batch)
    return _default_anchorgen()(images, features)


def make_targets(batch: int, generator: torch.Generator) -> list[dict[str, Tensor]]:
    """COCO-like boxes: counts from a geometric-like law (mean ≈ 7.5, at most 30), square-root
    areas log-uniform in [8, 700] px, aspect ratios log-uniform in [1/3, 3], inside the image."""
    height, width = IMAGE
    targets = []
    for _ in range(batch):
        count = min(30, int(torch.empty(1).exponential_(1 / 8, generator=generator).item()))
        side = torch.empty(count).uniform_(math.log(8), math.log(700), generator=generator).exp()
        aspect = torch.empty(count).uniform_(-math.log(3), math.log(3), generator=generator).exp()
        w = (side * aspect.sqrt()).clamp(max=width)
        h = (side / aspect.sqrt()).clamp(max=height)
        x1 = torch.rand(count, generator=generator) * (width - w)
        y1 = torch.rand(count, generator=generator) * (height - h)
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
        labels = torch.randint(1, NUM_CLASSES, (count,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def make_step(
    compute: Callable[..., dict[str, Tensor]], targets, head_outputs, anchors, results: dict
) -> Callable[[], None]:
    """One forward + backward of `compute`, gradients cleared first; the losses of the last call
    are left in `results`."""

    def step() -> None:
        for tensor in head_outputs.values():
            tensor.grad = None
        losses = compute(targets, head_outputs, anchors)
        sum(losses.values()).backward()
        results.update({k: v.item() for k, v in losses.items()})

    return step


def benchmark(batch: int = 16, repeats: int = 3) -> list[Comparison]:
    generator = torch.Generator().manual_seed(4)  # a batch of 6.9 boxes an image, 0 to 26
    anchors = make_anchors(batch)
    num_anchors = anchors[0].shape[0]
    targets = make_targets(batch, generator)
    head_outputs = {  # logits around -4.6: the head's initial prior, p = 0.01
        "cls_logits": torch.randn(batch, num_anchors, NUM_CLASSES, generator=generator) - 4.6,
        "bbox_regression": torch.randn(batch, num_anchors, 4, generator=generator),
    }
    for tensor in head_outputs.values():
        tensor.requires_grad_()

    # torchvision's method needs only these two attributes of the model.
    head = RetinaNetHead(8, 9, NUM_CLASSES)
    model = SimpleNamespace(proposal_matcher=Matcher(0.5, 0.4, True), head=head)

    def reference(targets, head_outputs, anchors):
        return RetinaNet.compute_loss(model, targets, head_outputs, anchors)

    def ours(targets, head_outputs, anchors):
        return retinanet_loss(
            targets,
            head_outputs,
            anchors,
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.4,
            box_coder=head.regression_head.box_coder,
        )

    ours_losses, reference_losses = {}, {}
    step = make_step(ours, targets, head_outputs, anchors, ours_losses)
    ours_s = best_time(step, repeats, warmup=1)
    step = make_step(reference, targets, head_outputs, anchors, reference_losses)
    baseline_s = best_time(step, 1, warmup=0)
    counts = [len(t["boxes"]) for t in targets]
    difference = max(abs(ours_losses[k] / reference_losses[k] - 1) for k in reference_losses)
    return [
        speedup(
            "loss",
            f"forward + backward, batch {batch}, anchors of 800×1333 ({num_anchors} an image), "
            f"~{sum(counts) / batch:.0f} boxes/image",
            "torchvision RetinaNet.compute_loss",
            baseline_s,
            "retinaperf retinanet_loss",
            ours_s,
            GOAL,
            notes=f"box counts {counts}; {torch.get_num_threads()} CPU threads; torchvision timed "
            f"once, ours best of {repeats} after a warmup; losses agree to {difference:.1e} "
            "(relative)",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_comparisons(benchmark(args.batch, args.repeats))


if __name__ == "__main__":
    main()
