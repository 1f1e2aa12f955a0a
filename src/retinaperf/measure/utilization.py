"""Model FLOPs utilisation (MFU): the FLOP/s a run achieved as a share of the devices' peak.

FLOPs are counted, not estimated from a formula, by `torch.utils.flop_counter.FlopCounterMode`
over one real training step (forward, loss and backward; not the optimizer update):

- counted: matrix multiplications and convolutions (`mm`, `addmm`, `bmm`, `convolution` and
  `convolution_backward`), 2 FLOPs per multiply-add. The backward of a layer is its weight
  gradient, plus its input gradient where the input needs one (the first convolution's input,
  the image, does not); frozen layers (pretrained backbone stages) have no weight gradient.
- not counted: elementwise and reduction work (normalisation, activations, the focal and box
  losses, anchor matching, bias additions). For RetinaNet these are a small share of the work.
- what the model really computes: the images after the model's own resize, padded into one batch
  tensor (to the largest image, rounded up to a multiple of 32), so padding is counted as work.
  That is why the count needs a real batch, and why it is per image of that batch: a batch of
  mixed aspect ratios costs more per image than one of equal shapes.

A step's FLOPs do not depend on the precision (fp16 work is the same number of FLOPs as fp32);
the math the convolutions run in decides which peak they are compared with: the precision's
(`Precision.peak_math`), which for float32 storage is TF32 or IEEE fp32 as the flags in effect
say (`fp32` on an A100 runs its convolutions in TF32 by PyTorch's default).

Peaks come from the device's plug-in (measure/devices/): vendor datasheet numbers without
structured sparsity. A device the plug-in does not know, or a math it does not have (bf16 on a
V100), gives None and a note: MFU is then reported as unknown, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from retinaperf.measure.devices.base import Peak


def train_flops_per_image(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict],
    autocast: Callable[[], AbstractContextManager],
) -> float:
    """FLOPs of one training step's forward + loss + backward on this batch, per image.

    The model runs for real (RetinaNet's anchor matching depends on the boxes, so shape-only meta
    tensors cannot stand in) and leaves no trace: gradients are computed with `autograd.grad`
    and dropped, so `.grad` is never written; batch-norm statistics, each module's train/eval
    mode and the random number generators are restored; nothing is updated. Pass the model
    itself, not its DistributedDataParallel wrapper, whose backward would all-reduce.
    """
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    buffers = [(b, b.clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    # The model's training-time resize draws from the global generator: put it back afterwards.
    rng = torch.random.fork_rng(
        devices=[device] if device.type != "cpu" else [], device_type=device.type
    )
    counter = FlopCounterMode(display=False)
    try:
        model.train()
        with rng, torch.enable_grad(), counter:
            with autocast():
                losses = model(images, targets)
            torch.autograd.grad(sum(losses.values()), trainable, allow_unused=True)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, training in modes:
            module.training = training
    return counter.get_total_flops() / len(images)


def utilization(
    flops_per_image: float | None,
    images_per_s: float | None,
    peak: Peak,
    math: str,
    devices: int,
) -> dict:
    """The job's achieved TFLOP/s (images_per_s is the whole job's rate), its peak (one device's
    `peak` in `math`, from its plug-in, x devices) and their ratio, MFU; None where a part is
    unknown (no peak for the device: `peak_note` says why; no rate: a run that failed before its
    first step)."""
    achieved = (
        flops_per_image * images_per_s / 1e12
        if flops_per_image is not None and images_per_s is not None
        else None
    )
    total = None if peak.tflops is None else peak.tflops * devices
    return {
        "flops_per_image": flops_per_image,
        "achieved_tflops": achieved,
        "peak_math": math,
        "peak_tflops": total,
        "peak_source": peak.source,
        "peak_note": peak.note,
        "mfu": None if total is None or achieved is None else achieved / total,
    }
