"""Which images each step trains and each evaluation batch holds: aspect-ratio groups, the grouped
batch sampler (one shard per rank, pure in (seed, epoch)) and the evaluation batches."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from retinaperf.data.coco import ImageRecord
from retinaperf.errors import UserError


def aspect_ratio_groups(records: Sequence[ImageRecord], group_factor: int) -> list[int]:
    """Group id per image: its width/height ratio binned into 2*factor+1 log-spaced bins.

    The bins are torchvision's reference ones (2**linspace(-1, 1, 2k+1)); a factor of -1 puts
    every image in one group.
    """
    if group_factor < 0:
        return [0] * len(records)
    # As torchvision's reference: factor 0 splits at a ratio of 1 (portrait vs landscape).
    bins = 2 ** np.linspace(-1, 1, 2 * group_factor + 1) if group_factor > 0 else np.array([1.0])
    ratios = np.array([r.width / r.height for r in records])
    return np.digitize(ratios, bins).tolist()


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches whose images share an aspect-ratio group, one shard per rank.

    Each epoch: a permutation from (seed, epoch), padded by repetition to a multiple of the world
    size so every rank gets as many images, taken every world_size-th for this rank; images are
    buffered per group and a batch is emitted when a group has batch_size images. Every rank emits
    exactly len(self) full batches, the leftovers completed from their own group, so DDP steps stay
    in lock-step and every step trains world_size * batch_size images.
    """

    def __init__(
        self,
        group_ids: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self.shard_size = math.ceil(len(self.group_ids) / world_size)
        if self.shard_size < batch_size:
            raise UserError(
                f"data: {len(self.group_ids)} training images cannot fill one batch of "
                f"{batch_size} on each of {world_size} rank(s): lower batch_size or add images"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw, from its batch `start` on (a resumed run skips the batches it
        trained without loading them)."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.shard_size // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return itertools.islice(self._epoch_batches(), self.start, None)

    def _epoch_batches(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.group_ids), generator=generator).tolist()
        padded = (order * math.ceil(self.shard_size * self.world_size / len(order)))[
            : self.shard_size * self.world_size
        ]
        shard = padded[self.rank :: self.world_size]
        buffers: dict[int, list[int]] = {}
        seen: dict[int, list[int]] = {}
        emitted = 0
        for index in shard:
            group = self.group_ids[index]
            buffers.setdefault(group, []).append(index)
            seen.setdefault(group, []).append(index)
            if len(buffers[group]) == self.batch_size:
                yield [(self.epoch, i) for i in buffers.pop(group)]
                emitted += 1
        # Complete the fullest leftover groups with images of the same group seen this epoch.
        for group, rest in sorted(buffers.items(), key=lambda item: -len(item[1])):
            if emitted == len(self):
                break
            pool = seen[group]
            rest = rest + (pool * self.batch_size)[: self.batch_size - len(rest)]
            yield [(self.epoch, i) for i in rest]
            emitted += 1


def eval_batches(
    records: Sequence[ImageRecord], batch_size: int, rank: int = 0, world_size: int = 1
) -> list[list[tuple[int, int]]]:
    """This rank's inference batches: every image exactly once over all ranks, no padding.

    Batches are formed over the whole split (images sorted by aspect ratio, to pad little) and
    then dealt to ranks, so each batch is the same whatever the world size and the detections of a
    distributed evaluation equal those of a single process.
    """
    order = sorted(range(len(records)), key=lambda i: (records[i].width / records[i].height, i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [[(0, i) for i in batch] for batch in batches[rank::world_size]]
