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

Peaks come from `PEAK_TFLOPS`, vendor datasheet numbers without structured sparsity. A device the
table does not know, or a math it does not have (bf16 on a V100), gives None: MFU is then
reported as unknown, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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


# Dense peak TFLOP/s per device (vendor datasheets; their "with sparsity" figures are twice these).
# "fp32" is the non-tensor-core rate, "tf32" the tensor-core rate on float32 inputs. A math the
# device does not have is absent.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA A100 Tensor Core GPU datasheet: SXM4 and PCIe (40 and 80 GB) have the same peaks.
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (sparse 989 / 1979 halved).
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    # The same datasheet, H100 PCIe column (sparse 756 / 1513 halved).
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: the H100 SXM's compute.
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    # NVIDIA Tesla V100 datasheet, SXM2 column ("tensor performance" is fp16); no tf32 nor bf16.
    "V100 SXM2": {"fp32": 15.7, "fp16": 125.0},
    # The same datasheet, PCIe column.
    "V100 PCIe": {"fp32": 14.0, "fp16": 112.0},
    # NVIDIA A10 Tensor Core GPU datasheet.
    "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0},
    # NVIDIA L4 Tensor Core GPU datasheet (sparse 120 / 242 halved).
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0},
    # NVIDIA L40S datasheet (sparse 366 / 733 halved).
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.0, "bf16": 362.0},
}

# How torch names each row's devices, as sets of words once vendor words and memory sizes are
# dropped (see `_words`). A name must be one of these exactly: "NVIDIA A10G", "NVIDIA L40",
# "NVIDIA H100 NVL" or a MIG slice ("... MIG 1g.5gb") are other devices, with other peaks.
_NAMES: dict[frozenset[str], str] = {
    frozenset({"A100", "SXM4"}): "A100",  # NVIDIA A100-SXM4-40GB, NVIDIA A100-SXM4-80GB
    frozenset({"A100", "PCIE"}): "A100",  # NVIDIA A100-PCIE-40GB, NVIDIA A100 80GB PCIe
    frozenset(
        {"H100", "HBM3"}
    ): "H100 SXM",  # NVIDIA H100 80GB HBM3: how the SXM5 part names itself
    frozenset({"H100", "SXM5"}): "H100 SXM",
    frozenset({"H100", "PCIE"}): "H100 PCIe",  # NVIDIA H100 PCIe
    frozenset({"H200"}): "H200",  # NVIDIA H200 (the NVL part, "NVIDIA H200 NVL", is slower)
    frozenset({"V100", "SXM2"}): "V100 SXM2",  # Tesla V100-SXM2-16GB, Tesla V100-SXM2-32GB
    frozenset({"V100", "PCIE"}): "V100 PCIe",  # Tesla V100-PCIE-16GB (not V100S-PCIE-32GB)
    frozenset({"A10"}): "A10",  # NVIDIA A10
    frozenset({"L4"}): "L4",  # NVIDIA L4
    frozenset({"L40S"}): "L40S",  # NVIDIA L40S
}

# The maths a device's peaks are given for: what `Precision.peak_math` answers.
MATHS = ("fp32", "tf32", "fp16", "bf16")


def _words(device_name: str) -> frozenset[str]:
    """'NVIDIA A100-SXM4-40GB' -> {'A100', 'SXM4'}: upper-case words, without vendor words and
    memory sizes, so that whole words are compared ('A10' is not part of 'A100')."""
    words = re.split(r"[^A-Z0-9]+", device_name.upper())
    return frozenset(
        w for w in words if w and w not in ("NVIDIA", "TESLA") and not re.fullmatch(r"\d+GB", w)
    )


def peak_tflops(device_name: str, math: str) -> float | None:
    """Dense peak TFLOP/s of one device of this name in this math (fp32, tf32, fp16, bf16);
    None when the device is not in the table or lacks that math."""
    if math not in MATHS:
        raise ValueError(f"unknown math {math!r}: one of {', '.join(MATHS)}")
    row = _NAMES.get(_words(device_name))
    return None if row is None else PEAK_TFLOPS[row].get(math)


def utilization(
    flops_per_image: float | None,
    images_per_s: float | None,
    device_name: str,
    math: str,
    devices: int,
) -> dict:
    """The job's achieved TFLOP/s (images_per_s is the whole job's rate), its peak (one device's
    peak in `math` x devices) and their ratio, MFU; None where a part is unknown (no peak for
    the device, or no rate: a run that failed before its first step)."""
    known = flops_per_image is not None and images_per_s is not None
    achieved = flops_per_image * images_per_s / 1e12 if known else None
    per_device = peak_tflops(device_name, math)
    peak = None if per_device is None else per_device * devices
    return {
        "flops_per_image": flops_per_image,
        "achieved_tflops": achieved,
        "peak_math": math,
        "peak_tflops": peak,
        "mfu": None if peak is None or achieved is None else achieved / peak,
    }
