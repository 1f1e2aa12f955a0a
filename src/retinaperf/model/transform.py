"""The model's input transform: torchvision's normalisation, resize and batching, on uint8 images.

torchvision's `GeneralizedRCNNTransform` works image by image: per image it copies the mean and
std to the device (a synchronising host-to-device copy on CUDA), normalises, interpolates, scales
the boxes through four more host-made tensors, and copies the image into the padded batch; about
25 dispatched operators per image, 400 per batch of 16. `Uint8Transform` with `batched=True`
does the same arithmetic once per distinct input size instead:

    group the images by (height, width)          (shapes are host facts: no device read)
    per group: stack -> float -> /255 -> -mean -> /std -> one bilinear interpolation -> pad
    concatenate the groups; put the images back in the caller's order (one index_select)
    boxes: each image's times its (w, h, w, h) ratios, a table sent to the device in one copy

Every value is torchvision's bit for bit: the element-wise operations are the same in the same
order, bilinear interpolation computes each (image, channel) plane on its own, so a stacked group
gives each image what a batch of one gives it, and the ratios are float32 quotients of the same
integers. The host-made tensors (the permutation, the ratio table) go to the device from pinned
memory without waiting for it. `batched=False` is torchvision's own code (the reference).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from retinaperf.model.transfer import host_to_device


class Uint8Transform(GeneralizedRCNNTransform):
    """The model's own resize and normalisation, taking uint8 images as they come off the loader.

    Converting here, on the device, keeps decoding workers and host-to-device copies on bytes.
    The batched images take the network's memory format, so that no convolution converts them.
    """

    memory_format: torch.memory_format = torch.contiguous_format
    batched: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # GeneralizedRCNNTransform's
        super().__init__(*args, **kwargs)
        self._mean_std_cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        # torchvision draws the training size per image when there are several (multi-scale
        # training); with one, the draw always gives it, and the batch can share it.
        if not self.batched or (self.training and len(self.min_size) > 1) or self.fixed_size:
            return super().forward(images, targets)
        return self._batched(images, targets)

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            image = image.float().div_(255)
        return super().normalize(image)

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        return (
            super()
            .batch_images(images, size_divisible)
            .contiguous(memory_format=self.memory_format)
        )

    def _batched(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"images must be 3d tensors [C, H, W], got {tuple(image.shape)}")
            groups.setdefault((image.shape[-2], image.shape[-1]), []).append(index)
        short_side = self.min_size[-1]
        device = images[0].device

        resized: list[Tensor] = []  # per group [n, C, h, w]
        new_sizes: list[tuple[int, int]] = [(0, 0)] * len(images)
        for (height, width), members in groups.items():
            # The same Python arithmetic as torchvision's _resize_image_and_masks.
            scale = min(short_side / min(height, width), self.max_size / max(height, width))
            group = self._normalize_group(torch.stack([images[i] for i in members]))
            group = F.interpolate(
                group,
                scale_factor=scale,
                mode="bilinear",
                recompute_scale_factor=True,
                align_corners=False,
            )
            resized.append(group)
            for i in members:
                new_sizes[i] = (group.shape[-2], group.shape[-1])

        stride = self.size_divisible
        height = math.ceil(max(h for h, _ in new_sizes) / stride) * stride
        width = math.ceil(max(w for _, w in new_sizes) / stride) * stride
        padded = [F.pad(g, (0, width - g.shape[-1], 0, height - g.shape[-2])) for g in resized]
        batch = torch.cat(padded) if len(padded) > 1 else padded[0]
        order = [i for members in groups.values() for i in members]  # batch row -> image
        if order != sorted(order):
            position = np.argsort(order)  # image -> batch row
            batch = batch.index_select(0, host_to_device(torch.from_numpy(position), device))
        batch = batch.contiguous(memory_format=self.memory_format)

        if targets is not None:
            targets = self._resize_boxes(images, targets, new_sizes)
        return ImageList(batch, new_sizes), targets

    def _normalize_group(self, group: Tensor) -> Tensor:
        """uint8 [n, C, h, w] -> normalised float32, torchvision's operations in its order."""
        if not group.is_floating_point():
            group = group.float().div_(255)
        mean, std = self._mean_std(group.device, group.dtype)
        return group.sub_(mean).div_(std)  # `group` is a fresh tensor (stacked, converted)

    def _mean_std(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The mean and std as [C, 1, 1] device tensors, made once per device and dtype
        (torchvision makes them from Python lists for every image)."""
        cache = self._mean_std_cache
        if (device, dtype) not in cache:
            with torch.inference_mode(False):  # usable in training when first made in evaluation
                mean, std = (
                    torch.tensor(values, dtype=dtype, device=device)[:, None, None]
                    for values in (self.image_mean, self.image_std)
                )
                cache[device, dtype] = mean, std
        return cache[device, dtype]

    @staticmethod
    def _resize_boxes(
        images: list[Tensor], targets: list[dict[str, Tensor]], new_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Every box times its image's (w, h, w, h) ratios, in one multiplication for the batch;
        torchvision's resize_boxes divides the new size by the old one in float32, as numpy
        does here."""
        counts = [len(t["boxes"]) for t in targets]
        old = np.array([image.shape[-2:] for image in images], dtype=np.float32)  # (h, w)
        ratio = np.array(new_sizes, dtype=np.float32) / old
        per_box = torch.from_numpy(np.repeat(ratio[:, [1, 0, 1, 0]], counts, axis=0))  # [N, 4]
        boxes = torch.cat([t["boxes"] for t in targets])
        boxes = boxes * host_to_device(per_box, boxes.device)
        return [{**t, "boxes": b} for t, b in zip(targets, boxes.split(counts), strict=True)]
