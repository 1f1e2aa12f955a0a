"""FLOP counting checked against hand counts; MFU's arithmetic.

The expected FLOPs below are worked out by hand from the layer shapes, with the counting rules of
`torch.utils.flop_counter`: a convolution or matrix product costs 2 FLOPs per multiply-add; its
backward is a weight gradient (same multiply-adds as the forward) when the weight trains, plus an
input gradient (same again) when its input needs a gradient.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retinaperf.config import ModelConfig
from retinaperf.measure.devices.base import Peak
from retinaperf.measure.devices.nvidia import PEAKS
from retinaperf.measure.utilization import train_flops_per_image, utilization
from retinaperf.model.network import build_model


class Tiny(nn.Module):
    """(images, targets) -> loss dict, like the detector: 3x8x8 uint8 images -> conv 3->4, 3x3,
    padding 1 (4x8x8) -> flatten (256) -> linear 256->5 -> cross-entropy with the labels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.autocast_seen: list[bool] = []

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        x = torch.stack(images).float() / 255  # N x 3 x 8 x 8
        logits = self.fc(self.conv(x).flatten(1))  # N x 5
        labels = torch.cat([t["labels"] for t in targets])
        return {"classification": F.cross_entropy(logits.float(), labels)}


# Multiply-adds per image of each layer's forward.
CONV_MACS = (8 * 8) * 4 * 3 * (3 * 3)  # output positions x c_out x c_in x kernel = 6912
FC_MACS = 256 * 5  # in x out = 1280


def tiny_batch(n: int) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(n)
    images = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.tensor([i % 5])} for i in range(n)]
    return images, targets


def no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@pytest.mark.parametrize("n", [1, 3])
def test_counts_forward_and_backward_per_image(n):
    # conv: forward + weight gradient; no input gradient, as the images need none.
    # fc: forward + weight gradient + input gradient (its input, the conv's output, needs one).
    expected = 2 * (2 * CONV_MACS) + 2 * (3 * FC_MACS)  # 27648 + 7680 = 35328
    flops = train_flops_per_image(Tiny(), *tiny_batch(n), no_autocast)
    assert flops == expected  # the batch's total is n x this: the division by n is exact


def test_frozen_layers_have_no_weight_gradient():
    model = Tiny()
    model.conv.requires_grad_(False)
    # conv: forward only. fc: forward + weight gradient; its input no longer needs a gradient.
    expected = 2 * CONV_MACS + 2 * (2 * FC_MACS)  # 13824 + 5120 = 18944
    assert train_flops_per_image(model, *tiny_batch(2), no_autocast) == expected


def test_runs_under_the_given_autocast_and_precision_does_not_change_the_count():
    model = Tiny()
    flops = train_flops_per_image(
        model, *tiny_batch(2), lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    assert model.autocast_seen == [True]
    assert flops == 2 * (2 * CONV_MACS) + 2 * (3 * FC_MACS)


def test_leaves_no_trace_on_a_model_with_gradients_and_mixed_modes():
    model = Tiny()
    model.train()
    model.conv.eval()  # one submodule in another mode than its parent: each must be restored
    images, targets = tiny_batch(2)
    model(images, targets)["classification"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()

    train_flops_per_image(model, *tiny_batch(3), no_autocast)

    assert model.training and not model.conv.training and model.fc.training
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name  # not accumulated into
        assert torch.equal(p, params[name]), name
    assert torch.equal(torch.get_rng_state(), rng)


# The real model: shapes follow the model's own resize, so the image size is set by its config.


def detection_batch(n: int, size: int) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(size)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)] * n
    box = torch.tensor([[size / 8, size / 8, size / 2, size / 2]])
    targets = [{"boxes": box, "labels": torch.tensor([1])}] * n
    return images, targets


@pytest.fixture(scope="module")
def model_64() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(min_size=64, max_size=64), None)


@pytest.fixture(scope="module")
def flops_64(model_64) -> float:
    return train_flops_per_image(model_64, *detection_batch(2, 64), no_autocast)


def test_real_model_leaves_no_trace(model_64):
    model_64.eval()
    state = {k: v.clone() for k, v in model_64.state_dict().items()}  # batch-norm stats included
    rng = torch.get_rng_state()

    flops = train_flops_per_image(model_64, *detection_batch(2, 64), no_autocast)

    assert flops > 0
    assert not model_64.training and not any(m.training for m in model_64.modules())
    assert all(p.grad is None for p in model_64.parameters())
    after = model_64.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_real_model_per_image_count_does_not_depend_on_batch_size(model_64, flops_64):
    flops_4 = train_flops_per_image(model_64, *detection_batch(4, 64), no_autocast)
    assert flops_4 == pytest.approx(flops_64, rel=0.01)


def test_real_model_count_grows_with_the_area_computed(flops_64):
    # The model resizes every image to its configured size: a 128 px model on 128 px images
    # computes 4x the pixels. Every layer's work scales with area, so the count grows more than
    # 2x (about 4x, less the parts that do not scale, such as the 1x1-sized P7 level).
    torch.manual_seed(0)
    model_128 = build_model(ModelConfig(min_size=128, max_size=128), None)
    flops_128 = train_flops_per_image(model_128, *detection_batch(2, 128), no_autocast)
    assert flops_128 > 2 * flops_64


def test_utilization_arithmetic():
    # 2e11 FLOPs/image x 3000 images/s = 6e14 FLOP/s = 600 TFLOP/s over 8 A100s in bf16
    # (8 x 312 = 2496 TFLOP/s peak): MFU 600 / 2496.
    peak = PEAKS.peak("NVIDIA A100-SXM4-80GB", "bf16")
    result = utilization(2e11, 3000.0, peak, "bf16", devices=8)
    assert result == {
        "flops_per_image": 2e11,
        "achieved_tflops": pytest.approx(600.0),
        "peak_math": "bf16",
        "peak_tflops": pytest.approx(2496.0),
        "peak_source": "NVIDIA datasheet, A100, dense bf16",
        "peak_note": None,
        "mfu": pytest.approx(600 / 2496),
    }


def test_utilization_with_unknown_peak():
    result = utilization(5e10, 40.0, Peak(None, note="no table"), "fp32", devices=1)
    assert result == {
        "flops_per_image": 5e10,
        "achieved_tflops": pytest.approx(2.0),
        "peak_math": "fp32",
        "peak_tflops": None,
        "peak_source": None,
        "peak_note": "no table",
        "mfu": None,
    }
    v100 = PEAKS.peak("Tesla V100-SXM2-16GB", "bf16")
    assert utilization(5e10, 40.0, v100, "bf16", devices=2)["mfu"] is None


def test_a_run_without_a_step_has_no_rate_and_so_no_utilisation():
    """A run that failed before its first step has no p_core: its results still get written."""
    u = utilization(7.1e9, None, PEAKS.peak("NVIDIA H100 80GB HBM3", "bf16"), "bf16", 1)
    assert u["achieved_tflops"] is None and u["mfu"] is None
    assert u["peak_tflops"] is not None and u["flops_per_image"] == 7.1e9
