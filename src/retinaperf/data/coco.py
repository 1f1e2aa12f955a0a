"""COCO2017 detection data: the annotation index, filtering, sampling and loading.

Filtering (docs/metrics.md, "The workload"): a box is dropped from the training targets when it
is a crowd box or has no area once clamped to the image (x1 > x0 and y1 > y0 must hold); a
training image is dropped when no box is left. Validation images are all kept: COCO scoring sees
every one.

Images are decoded to uint8 CHW tensors; conversion to float and normalisation happen on the
device, inside the model (see `model/transform.py`), so workers and host-to-device copies move 4x
fewer bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from retinaperf import files
from retinaperf.data import coco_index
from retinaperf.errors import UserError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the index; boxes are xyxy in pixels, labels are COCO category ids."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class LoadFailure:
    """An image that could not be read. Returned rather than raised so that it crosses the worker
    process boundary as data; `check_batch` turns it into a UserError in the training process."""

    path: str
    reason: str


def annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}2017.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / f"{split}2017"


def check_root(root: Path) -> None:
    """Fail early, with one clear line, when `root` is not a COCO2017 folder."""
    root = Path(root)
    layout = (
        "a COCO2017 root holds train2017/, val2017/ and annotations/instances_{train,val}2017.json"
    )
    if not root.is_dir():
        raise UserError(f"data: {root} does not exist or is not a folder: {layout}")
    for split in SPLITS:
        if not annotation_file(root, split).is_file():
            raise UserError(f"data: {annotation_file(root, split)} is missing: {layout}")
        if not image_dir(root, split).is_dir():
            raise UserError(f"data: {image_dir(root, split)} is missing: {layout}")


def read_annotations(path: Path, what: str = "data") -> dict:
    """The instances JSON, with a clear error for a missing, unreadable or malformed file; `what`
    begins the error: the command or part that reads it."""
    # msgspec: COCO's files are large, and it decodes them faster than json (1.3 s, not 2.1 s, for
    # 120 MB on this project's CPU).
    data = files.read_json(path, what, if_invalid=coco_index.REEXTRACT, decode=msgspec.json.decode)
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} is not a COCO instances file: it holds no JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{what}: {path} has no list {key!r}: it is not a COCO instances file")
    return data


def load_split(root: Path, split: str, *, drop_empty: bool) -> tuple[list[ImageRecord], dict]:
    """The images of a split with their kept boxes (images left without a box dropped if asked),
    and the annotation file's content (the ground truth of evaluation), from one reading.

    Every annotation, crowd or not, must name a listed image and category and have a box of no
    negative size; every image's file must lie in the split's image folder (see `coco_index`)."""
    path = annotation_file(root, split)
    content = read_annotations(path)
    index = coco_index.from_content(content, path)
    return _split_records(root, split, index, drop_empty=drop_empty), content


def index_split(
    root: Path,
    split: str,
    *,
    drop_empty: bool,
    cache_dir: Path | None,
    check_files: bool = True,
) -> list[ImageRecord]:
    """The images of a split as `load_split` gives them, without the file's content: from the
    index cached under `cache_dir` when it matches the annotation file, else read (and cached,
    unless `cache_dir` is None). `check_files=False` skips the scan of the image folder, for a
    process whose node has just scanned it."""
    path = annotation_file(root, split)
    index = coco_index.build(path) if cache_dir is None else coco_index.cached(path, cache_dir)
    return _split_records(root, split, index, drop_empty=drop_empty, check_files=check_files)


def _split_records(
    root: Path,
    split: str,
    index: coco_index.CocoIndex,
    *,
    drop_empty: bool,
    check_files: bool = True,
) -> list[ImageRecord]:
    """The records of a split's index (the workload's filtering, see the module docstring), after
    checking that its image files are in the split's folder."""
    path = annotation_file(root, split)
    if check_files:
        _check_image_files(
            image_dir(root, split),
            path,
            dict(zip(index.image_ids.tolist(), index.file_names, strict=True)),
        )
    records = _records(index, drop_empty)
    if not records:
        raise UserError(f"data: {path} has no usable image (every image lacks a usable box)")
    return records


def _records(index: coco_index.CocoIndex, drop_empty: bool) -> list[ImageRecord]:
    """COCO xywh -> xyxy clamped to the image; crowd boxes and boxes with no area dropped. Each
    image's boxes keep the file's order; the records share two read-only arrays."""
    xywh, owner = index.ann_boxes, index.ann_images
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    # Each box clamped to its own image's size (float32, the boxes' type).
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, index.widths.astype(np.float32)[owner, None])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, index.heights.astype(np.float32)[owner, None])
    keep = ~index.ann_crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(owner[kept], kind="stable")]  # grouped by image, in file order
    boxes, labels = boxes[kept], index.ann_categories[kept].astype(np.int64)
    boxes.flags.writeable = labels.flags.writeable = False
    ends = np.cumsum(np.bincount(owner[kept], minlength=len(index.image_ids))).tolist()
    records = []
    for i, (image_id, name, width, height) in enumerate(
        zip(
            index.image_ids.tolist(),
            index.file_names,
            index.widths.tolist(),
            index.heights.tolist(),
            strict=True,
        )
    ):
        start, end = ends[i - 1] if i else 0, ends[i]
        if drop_empty and start == end:
            continue
        records.append(
            ImageRecord(image_id, name, width, height, boxes[start:end], labels[start:end])
        )
    return records


def _check_image_files(folder: Path, annotations: Path, names: dict[int, str]) -> None:
    """Every image's file (`names`: image id -> file_name) is in `folder` and stays there: no
    empty name, absolute path, `..`, or link to somewhere outside.

    COCO's train2017 holds 118k files, so the folder is read in one scandir pass: is_symlink()
    of its entries needs no system call, only links are resolved, and only names with a folder
    in them are looked up one by one.
    """
    try:
        with os.scandir(folder) as listing:
            entries = {entry.name: entry for entry in listing}
        # Resolved first: a whole image folder linked elsewhere is fine (a common layout); what
        # must not leave it is where its names lead.
        inside = Path(os.path.realpath(folder))
    except OSError as err:
        raise UserError(f"data: cannot list {folder}: {err.strerror}") from None
    separators = os.sep + (os.altsep or "")
    missing = []
    for image_id, name in names.items():
        entry = entries.get(name)
        if entry is not None and not entry.is_symlink():
            continue  # the common case: a plain entry of the folder
        if not name or os.path.isabs(name) or ".." in Path(name).parts:
            where = f"leaves {folder}" if name else "names no file"
            raise UserError(
                f"data: {annotations}: image {image_id} has file_name {name!r}, which {where}: "
                f"file names must name files inside {folder}"
            )
        if entry is None and not any(sep in name for sep in separators):
            missing.append(name)
            continue
        # A link, or a name through a subfolder (which may be a link): where it leads decides.
        try:
            real = Path(os.path.realpath(folder / name))
        except (OSError, ValueError):  # ValueError: a NUL in the name
            missing.append(name)
            continue
        if not real.is_relative_to(inside):
            raise UserError(
                f"data: {annotations}: image {image_id} has file_name {name!r}, which leads to "
                f"{real}, outside {folder}: file names must name files inside {folder} (link "
                "the whole image folder rather than single files)"
            )
        if not real.exists():
            missing.append(name)
    if missing:
        raise UserError(
            f"data: {len(missing)} image(s) listed in {annotations} are missing from {folder}, "
            f"e.g. {missing[0]}: restore them or use the matching annotation file"
        )


class CocoDetection(Dataset):
    """Decoded images and targets of one split, addressed by (epoch, index) keys.

    The key carries the epoch so that the flip of an image is a pure function of
    (seed, epoch, index): the same run gives the same augmentation whatever the number of
    workers, and each epoch flips differently.
    """

    def __init__(
        self, root: Path, split: str, records: Sequence[ImageRecord], hflip_prob: float, seed: int
    ) -> None:
        self.folder = image_dir(root, split)
        self.records = list(records)
        self.hflip_prob = hflip_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict] | LoadFailure:
        epoch, index = key
        record = self.records[index]
        path = self.folder / record.file_name
        try:
            image = _decode_rgb(path)  # uint8 [3, H, W]
        except UnidentifiedImageError:
            return LoadFailure(
                str(path), "not a decodable image (corrupt, truncated or not a JPEG)"
            )
        except (OSError, ValueError) as err:
            return LoadFailure(str(path), str(err).splitlines()[0] or type(err).__name__)
        if tuple(image.shape[1:]) != (record.height, record.width):
            return LoadFailure(
                str(path),
                f"is {image.shape[2]}x{image.shape[1]} but the annotations say "
                f"{record.width}x{record.height}",
            )
        boxes = torch.from_numpy(record.boxes.copy())
        if self.hflip_prob > 0 and self._flip(epoch, index):
            image = image.flip(-1)
            boxes = torch.stack(
                [record.width - boxes[:, 2], boxes[:, 1], record.width - boxes[:, 0], boxes[:, 3]],
                dim=1,
            )
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": record.image_id,
        }
        return image, target

    def _flip(self, epoch: int, index: int) -> bool:
        return np.random.default_rng([self.seed, epoch, index]).random() < self.hflip_prob


def _decode_rgb(path: Path) -> torch.Tensor:
    """JPEG (or any Pillow format; grey and CMYK too) -> uint8 RGB [3, H, W].

    Pillow rather than torchvision.io, whose decoders are deprecated since 0.29; both use
    libjpeg-turbo.
    """
    with Image.open(path) as picture:
        rgb = np.array(picture.convert("RGB"))  # [H, W, 3], writable for torch
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def collate(batch: list) -> list:
    """Keep images as a list: the model batches and pads them itself."""
    return batch


def check_batch(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Split a collated batch into images and targets; raise for an image that failed to load."""
    for item in batch:
        if isinstance(item, LoadFailure):
            raise UserError(
                f"data: cannot read image {item.path}: {item.reason}: replace the file "
                "(or remove it and its annotations)"
            )
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def make_loader(
    dataset: CocoDetection,
    batch_sampler: Sampler | list,
    num_workers: int,
    pin_memory: bool,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """`worker_init_fn`: what each worker process runs first (the run's signal policy)."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate,
        worker_init_fn=worker_init_fn,
        # Workers live across epochs: forking them again each epoch costs seconds on COCO.
        persistent_workers=num_workers > 0,
    )


def to_device(
    images: list[torch.Tensor], targets: list[dict], device: torch.device
) -> tuple[list[torch.Tensor], list[dict]]:
    """Host-to-device copy; asynchronous from pinned memory."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {
            "boxes": t["boxes"].to(device, non_blocking=True),
            "labels": t["labels"].to(device, non_blocking=True),
        }
        for t in targets
    ]
    return images, targets
