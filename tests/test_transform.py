"""The batched input transform gives torchvision's batch, sizes and boxes bit for bit.

The reference is torchvision's own `GeneralizedRCNNTransform` on the same images as floats in
[0, 1] (what our uint8 conversion gives), image by image.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from retinaperf.model.network import IMAGENET_MEAN, IMAGENET_STD
from retinaperf.model.transform import Uint8Transform

MIN_SIZE, MAX_SIZE = 96, 160


def transforms() -> tuple[Uint8Transform, GeneralizedRCNNTransform]:
    args = (MIN_SIZE, MAX_SIZE, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return Uint8Transform(*args), GeneralizedRCNNTransform(*args)


def batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[list[Tensor], list[dict]]:
    """uint8 images of the given (h, w) with 0-5 boxes each (an image without boxes too)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i, (h, w) in enumerate(sizes):
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        count = i % 6
        corner = torch.rand(count, 2, generator=g) * torch.tensor([w, h]) * 0.6
        size = torch.rand(count, 2, generator=g) * 20 + 1
        targets.append(
            {
                "boxes": torch.cat([corner, corner + size], 1),
                "labels": torch.randint(1, 91, (count,), generator=g),
                "image_id": i,
            }
        )
    return images, targets


# Sizes in an order that interleaves their groups, as a batch from the loader does.
MIXED = [(60, 80), (53, 80), (60, 80), (80, 60), (53, 80), (60, 80), (41, 97)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sizes", [MIXED, [(60, 80)] * 4, [(45, 70), (60, 80)]])
def test_batched_transform_is_torchvisions(training: bool, sizes: list[tuple[int, int]]) -> None:
    ours, reference = transforms()
    ours.train(training)
    reference.train(training)
    images, targets = batch(sizes)
    got, got_targets = ours(images, targets if training else None)
    expected, expected_targets = reference(
        [image.float() / 255 for image in images], targets if training else None
    )
    assert got.image_sizes == expected.image_sizes
    assert got.tensors.shape == expected.tensors.shape
    assert torch.equal(got.tensors, expected.tensors)
    if training:
        for a, b in zip(got_targets, expected_targets, strict=True):
            assert a.keys() == b.keys()
            assert torch.equal(a["boxes"], b["boxes"])
            assert torch.equal(a["labels"], b["labels"])
            assert a["image_id"] == b["image_id"]
    else:
        assert got_targets is None


def test_batched_transform_leaves_the_callers_targets_alone() -> None:
    ours, _ = transforms()
    images, targets = batch(MIXED)
    before = [t["boxes"].clone() for t in targets]
    ours(images, targets)
    for t, boxes in zip(targets, before, strict=True):
        assert torch.equal(t["boxes"], boxes)


def test_batched_transform_takes_the_networks_memory_format() -> None:
    ours, _ = transforms()
    ours.memory_format = torch.channels_last
    images, _ = batch(MIXED)
    got, _ = ours(images)
    assert got.tensors.is_contiguous(memory_format=torch.channels_last)
    ours.batched = False
    assert torch.equal(ours(images)[0].tensors, got.tensors)


def test_multi_scale_training_draws_a_size_per_image_as_torchvision() -> None:
    """With several training sizes torchvision draws one per image from torch's generator: the
    batched path steps aside, so the draws (and the sizes) are torchvision's."""
    args = ((64, 96), MAX_SIZE, list(IMAGENET_MEAN), list(IMAGENET_STD))
    ours, reference = Uint8Transform(*args), GeneralizedRCNNTransform(*args)
    images, targets = batch(MIXED)
    torch.manual_seed(7)
    got, _ = ours(images, targets)
    torch.manual_seed(7)
    expected, _ = reference([image.float() / 255 for image in images], targets)
    assert got.image_sizes == expected.image_sizes
    assert torch.equal(got.tensors, expected.tensors)


@pytest.mark.gpu
def test_batched_transform_is_torchvisions_on_cuda() -> None:
    """The same on CUDA (its bilinear kernel over a stacked group; boxes through pinned memory),
    without a synchronising call once the mean and std are on the device."""
    ours, reference = transforms()
    images, targets = batch(MIXED)
    cuda_images = [image.cuda() for image in images]
    cuda_targets = [{**t, "boxes": t["boxes"].cuda()} for t in targets]
    ours(cuda_images, cuda_targets)  # copies the mean and std once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, got_targets = ours(cuda_images, cuda_targets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected, expected_targets = reference([image.float() / 255 for image in cuda_images], targets)
    assert got.image_sizes == expected.image_sizes
    assert torch.equal(got.tensors, expected.tensors)
    for a, b in zip(got_targets, expected_targets, strict=True):
        assert torch.equal(a["boxes"].cpu(), b["boxes"])
