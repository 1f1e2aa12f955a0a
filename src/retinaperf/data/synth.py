"""The embedded dataset: a small COCO2017-layout dataset generated deterministically from a seed.

Real JPEG files with `instances_{train,val}2017.json`, in the folder names of COCO2017, in one of
two profiles, each drawn by its own module:

- "shapes" (the default, synth_shapes.py): shapes of a few categories on textured backgrounds,
  which a detector learns in minutes. The annotations include what the real loader must cope with:
  crowd regions, boxes of zero area, tiny boxes, and images without any object, so the same
  reading and filtering code runs on it as on COCO.
- "coco" (synth_coco.py): pictures and annotations whose statistics follow COCO2017 (image sizes
  and aspect ratios, objects per image, box areas, the 80 categories and their frequencies, crowd
  regions, JPEG file sizes), so that a training run costs the data loader and the accelerator what
  real COCO costs. It measures throughput; its pictures teach nothing.

Every image is drawn from its own random stream, seeded by (seed, split, index): the output depends
only on the arguments, not on the order of generation nor on the number of processes drawing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from retinaperf import files
from retinaperf.config import SYNTH_PROFILES as PROFILES
from retinaperf.data.synth_coco import COCO_CATEGORIES, COCO_GENERATOR_VERSION, draw_coco_image
from retinaperf.data.synth_shapes import CATEGORIES, GENERATOR_VERSION, draw_image
from retinaperf.distributed import cpu_count
from retinaperf.errors import UserError

# `image_size` 0 stands for these: the short side of every image for shapes, the long side of most
# images for coco (COCO's images are mostly 640 px on their long side).
DEFAULT_IMAGE_SIZE = {"shapes": 128, "coco": 640}
SPLIT_CODES = {"train": 0, "val": 1}
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SynthSpec:
    """What to generate; the dataset is a pure function of these values."""

    seed: int = 0
    train_images: int = 512
    val_images: int = 96
    image_size: int = 0
    """Typical image size in pixels; 0 stands for the profile's default (DEFAULT_IMAGE_SIZE).
    shapes: the short side of every image, the long side being this or 4/3 of it. coco: the long
    side of most images; every pixel dimension of the profile scales with image_size / 640."""
    profile: str = "shapes"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise UserError(
                f"synth: --profile {self.profile!r} is not a profile: use one of "
                + ", ".join(PROFILES)
            )
        if self.image_size == 0:
            # Resolved here so that the number, not 0, is hashed into the cache key and recorded.
            object.__setattr__(self, "image_size", DEFAULT_IMAGE_SIZE[self.profile])
        if self.seed < 0:
            raise UserError(f"synth: --seed {self.seed} is negative: use 0 or more")
        if self.train_images < 1 or self.val_images < 1:
            raise UserError("synth: --train-images and --val-images must be at least 1")
        if self.image_size < 32:
            raise UserError(f"synth: --image-size {self.image_size} is too small: use 32 or more")

    def cache_key(self) -> str:
        fields = asdict(self)
        if self.profile == "shapes":
            # The shapes keys predate profiles: hashing without the field keeps their caches valid
            # (a coco key, hashed with it, can never equal one of them).
            del fields["profile"]
            version = GENERATOR_VERSION
        else:
            version = COCO_GENERATOR_VERSION
        text = json.dumps({**fields, "version": version}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_workers() -> int:
    """The CLI's number of drawing processes: one per CPU this process may use, at most 8, so that
    generating on a shared login node does not take every core."""
    return max(1, min(8, cpu_count()))


def generate(spec: SynthSpec, out_dir: Path, workers: int = 1) -> Path:
    """Write the dataset into `out_dir` (which must not exist or be empty) and return it.

    `workers` > 1 draws the images in that many processes; the files are the same either way.
    The files are written into a temporary sibling folder and renamed at the end, so an
    interrupted run leaves nothing that looks like a dataset.
    """
    if workers < 1:
        raise UserError(f"synth: --workers {workers}: use 1 or more")
    out_dir = Path(out_dir)
    # One generation into a folder at a time; its lock lies beside it, as the folder itself
    # appears only at the end.
    with _lock(out_dir, wait=False):
        files.require_empty(out_dir, "synth", "give a new or empty folder with --out")
        return _generate(spec, out_dir, workers)


def _lock(out_dir: Path, wait: bool) -> files.FolderLock:
    return files.FolderLock(
        out_dir, "synth", "wait for it to end, or give another folder with --out", beside=True,
        wait=wait,
    )  # fmt: skip


def _generate(spec: SynthSpec, out_dir: Path, workers: int) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_splits(spec, staging, workers)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def cached(spec: SynthSpec, cache_dir: Path, workers: int = 1) -> Path:
    """The dataset for `spec` under `cache_dir`, generated on first use (in `workers` processes)
    and reused afterwards."""
    target = Path(cache_dir) / f"synth-{spec.cache_key()}"
    complete = target / "annotations" / "instances_val2017.json"
    if complete.is_file():
        return target
    # Another run generating it on this node: wait for it, then use its copy.
    with _lock(target, wait=True):
        if complete.is_file():
            return target
        files.require_empty(target, "synth", f"remove {target}: a partial copy of the cache")
        # Seconds to minutes of silence otherwise, on the first run of a configuration.
        print(
            f"retinaperf: generating the {spec.profile} dataset ({spec.train_images} training + "
            f"{spec.val_images} validation images, {spec.image_size} px, {workers} "
            f"process{'es' if workers > 1 else ''}) into {target}; later runs reuse it",
            flush=True,
        )
        try:
            return _generate(spec, target, workers)
        except OSError:
            # Another node sharing the cache renamed its copy into place first: use that one.
            if complete.is_file():
                return target
            raise


def _write_splits(spec: SynthSpec, root: Path, workers: int) -> None:
    """Both splits, images and annotation files, under `root`; image ids run on across splits."""
    # Spawned, not forked: the caller may be a training process with threads (torch's), and a
    # forked child of a multi-threaded process can deadlock on a lock held by another thread.
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else None
    )
    try:
        (root / "annotations").mkdir()
        first_id = 1
        for split, count in (("train", spec.train_images), ("val", spec.val_images)):
            folder = root / f"{split}2017"
            coco = _generate_split(spec, split, count, first_id, folder, pool, workers)
            with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
                json.dump(coco, f)
            first_id += count
    finally:
        if pool is not None:
            # Waits, so that no process still writes into `root` when a failed generation
            # removes it; images not yet started are dropped rather than drawn for nothing.
            pool.shutdown(wait=True, cancel_futures=True)


def _generate_split(
    spec: SynthSpec,
    split: str,
    count: int,
    first_id: int,
    image_dir: Path,
    pool: Executor | None,
    workers: int,
) -> dict:
    image_dir.mkdir()
    image_ids = range(first_id, first_id + count)
    render = partial(_render, spec, split, image_dir)
    drawn: Iterator[tuple[dict, list[dict]]]
    if pool is None:
        drawn = map(render, image_ids, range(count))
    else:
        # Chunks amortise the inter-process round trip; several per process balance the load.
        chunk = max(1, min(64, count // (8 * workers)))
        drawn = pool.map(render, image_ids, range(count), chunksize=chunk)
    images: list[dict] = []
    annotations: list[dict] = []
    for image, objects in drawn:  # in index order, whatever the pool's order of completion
        images.append(image)
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], **obj})
    if spec.profile == "shapes":
        description = f"retinaperf generated dataset ({split}), seed {spec.seed}"
        categories = [dict(c) for c in CATEGORIES]
    else:
        description = f"retinaperf generated COCO-like dataset ({split}), seed {spec.seed}"
        categories = [
            {"id": i, "name": name, "supercategory": sup} for i, name, sup, _ in COCO_CATEGORIES
        ]
    return {
        "info": {"description": description},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _render(
    spec: SynthSpec, split: str, image_dir: Path, image_id: int, index: int
) -> tuple[dict, list[dict]]:
    """Draw and save one image; its image entry and annotations (without ids). Runs in the pool's
    processes, hence a module-level function of picklable arguments."""
    rng = np.random.default_rng([spec.seed, SPLIT_CODES[split], index])
    if spec.profile == "shapes":
        picture, objects = draw_image(rng, spec.image_size)
    else:
        picture, objects = draw_coco_image(rng, spec.image_size)
    file_name = f"{image_id:012d}.jpg"
    picture.save(image_dir / file_name, quality=JPEG_QUALITY)
    image = {
        "id": image_id,
        "file_name": file_name,
        "width": picture.width,
        "height": picture.height,
    }
    return image, objects


# The coco profile. Its numbers are COCO2017's (train2017) at an image_size of 640; every pixel
# dimension scales with image_size / 640.
