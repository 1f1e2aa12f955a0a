"""The embedded dataset: a small COCO2017-layout dataset generated deterministically from a seed.

Real JPEG files with `instances_{train,val}2017.json`, in the folder names of COCO2017, in one of
two profiles:

- "shapes" (the default): shapes of a few categories on textured backgrounds, which a detector
  learns in minutes. The annotations include what the real loader must cope with: crowd regions,
  boxes of zero area, tiny boxes, and images without any object, so the same reading and filtering
  code runs on it as on COCO.
- "coco": pictures and annotations whose statistics follow COCO2017 (image sizes and aspect
  ratios, objects per image, box areas, the 80 categories and their frequencies, crowd regions,
  JPEG file sizes), so that a training run costs the data loader and the accelerator what real COCO
  costs. It measures throughput; its pictures teach nothing.

Every image is drawn from its own random stream, seeded by (seed, split, index): the output depends
only on the arguments, not on the order of generation nor on the number of processes drawing.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
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
from PIL import Image, ImageDraw

from retinaperf import io
from retinaperf.config import SYNTH_PROFILES as PROFILES
from retinaperf.distributed import cpu_count
from retinaperf.errors import UserError

# Bump when the drawing of a profile changes, so cached datasets of an older generator are not
# reused. GENERATOR_VERSION is the shapes profile's (its name predates the profiles).
GENERATOR_VERSION = 4
COCO_GENERATOR_VERSION = 1

# `image_size` 0 stands for these: the short side of every image for shapes, the long side of most
# images for coco (COCO's images are mostly 640 px on their long side).
DEFAULT_IMAGE_SIZE = {"shapes": 128, "coco": 640}
SPLIT_CODES = {"train": 0, "val": 1}
JPEG_QUALITY = 90

# COCO category ids are not contiguous; ours skip numbers too so the code never assumes they are.
CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "cross", "supercategory": "shape"},
)
# Each category has its own hue (degrees) as well as its own shape, on low-saturation
# backgrounds: a detector learns it in a few hundred steps from scratch, which the smoke preset
# needs, while boxes must still be found and fitted precisely to score well on AP@[.5:.95].
HUES = {1: 0.0, 3: 120.0, 7: 230.0, 12: 55.0}

# Share of images with each special case (drawn independently per image).
P_EMPTY = 0.06  # no object at all
P_CROWD = 0.12  # one crowd region (many tiny shapes under one iscrowd box)
P_DEGENERATE = 0.06  # one annotation of zero width or height
P_TINY = 0.08  # one valid but tiny shape (a few pixels)
# Shares of square, landscape (4:3) and portrait (3:4) images. Mostly square: a batch is padded
# to a multiple of 32 px, so at the smoke run's 64 px a 4:3 image costs as much as a 64x96 one.
SHAPE_SHARES = (0.6, 0.2, 0.2)
# Smallest side of an ordinary object, pixels: RetinaNet's smallest anchor is 32 px, and objects
# much smaller than that overlap no anchor enough to be learnt quickly.
MIN_OBJECT = 24


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
    io.require_empty(out_dir, "synth", "give a new or empty folder with --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
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
    try:
        return generate(spec, target, workers)
    except (OSError, UserError):
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
    images, annotations = [], []
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
        picture, objects = _draw_image(rng, spec.image_size)
    else:
        picture, objects = _draw_coco_image(rng, spec.image_size)
    file_name = f"{image_id:012d}.jpg"
    picture.save(image_dir / file_name, quality=JPEG_QUALITY)
    image = {
        "id": image_id,
        "file_name": file_name,
        "width": picture.width,
        "height": picture.height,
    }
    return image, objects


def _draw_image(rng: np.random.Generator, short_side: int) -> tuple[Image.Image, list[dict]]:
    long_side = round(short_side * 4 / 3)
    shapes = [(short_side, short_side), (long_side, short_side), (short_side, long_side)]
    width, height = shapes[rng.choice(3, p=SHAPE_SHARES)]
    picture = _background(rng, width, height)
    draw = ImageDraw.Draw(picture)
    objects: list[dict] = []
    if rng.random() >= P_EMPTY:
        placed: list[tuple[float, float, float]] = []
        for _ in range(rng.integers(2, 5)):  # attempts; a shape that finds no room is skipped
            largest = 0.6 * short_side
            size = rng.uniform(min(max(0.25 * short_side, MIN_OBJECT), largest), largest)
            spot = _free_spot(rng, width, height, size, placed)
            if spot is None:
                continue
            category = CATEGORIES[rng.integers(len(CATEGORIES))]["id"]
            polygon = _shape(category, spot, size, rng)
            draw.polygon(polygon, fill=_colour(rng, category))
            objects.append(_annotation(category, polygon, crowd=False))
            placed.append((*spot, size))
        if rng.random() < P_CROWD:
            crowd = _crowd(rng, draw, width, height, short_side, placed)
            objects.extend([crowd] if crowd else [])
        if rng.random() < P_TINY:
            size = rng.uniform(3, 6)
            x, y = rng.uniform(0, width - size), rng.uniform(0, height - size)
            category = CATEGORIES[rng.integers(len(CATEGORIES))]["id"]
            polygon = [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
            draw.polygon(polygon, fill=_colour(rng, category))
            objects.append(_annotation(category, polygon, crowd=False))
        if rng.random() < P_DEGENERATE:
            # A zero-width box, as COCO has a few: the loader must drop it from the targets.
            x, y = float(rng.integers(0, width)), float(rng.integers(0, height - 8))
            category = CATEGORIES[rng.integers(len(CATEGORIES))]["id"]
            objects.append(
                {
                    "category_id": category,
                    "bbox": [x, y, 0.0, 8.0],
                    "area": 0.0,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x, y + 8.0, x, y + 8.0]],
                }
            )
    return picture, objects


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth, faintly tinted grey noise with stripes: texture that edges must stand out from."""
    grey = rng.uniform(50, 210, size=(4, 4, 1))
    tint = rng.uniform(-12, 12, size=(4, 4, 3))
    coarse = np.clip(grey + tint, 0, 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 20)
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    texture = base + stripes[..., None] * rng.uniform(5, 25) + rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator, category: int) -> tuple[int, int, int]:
    """A saturated colour near the category's hue, of varying brightness."""
    hue = (HUES[category] + rng.uniform(-12, 12)) % 360 / 360
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.55, 1.0))
    return round(red * 255), round(green * 255), round(blue * 255)


def _free_spot(
    rng: np.random.Generator,
    width: int,
    height: int,
    size: float,
    placed: list[tuple[float, float, float]],
) -> tuple[float, float] | None:
    """Top-left corner for a shape of `size` that overlaps no placed shape, if one is found."""
    for _ in range(20):
        x, y = rng.uniform(0, width - size), rng.uniform(0, height - size)
        if all(
            x + size <= px or px + psize <= x or y + size <= py or py + psize <= y
            for px, py, psize in placed
        ):
            return x, y
    return None


def _shape(
    category: int, spot: tuple[float, float], size: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """The outline of a shape of `category` filling the square at `spot` with side `size`."""
    x, y = spot
    cx, cy, r = x + size / 2, y + size / 2, size / 2
    if category == 1:  # circle, as a 32-gon so that the polygon is the segmentation
        return [
            (cx + r * math.cos(2 * math.pi * k / 32), cy + r * math.sin(2 * math.pi * k / 32))
            for k in range(32)
        ]
    if category == 3:  # square, possibly squashed into a rectangle
        h = size * rng.uniform(0.6, 1.0)
        return [(x, y), (x + size, y), (x + size, y + h), (x, y + h)]
    if category == 7:  # triangle
        return [(cx, y), (x + size, y + size), (x, y + size)]
    arm = size / 3  # cross
    return [
        (x + arm, y), (x + 2 * arm, y), (x + 2 * arm, y + arm), (x + size, y + arm),
        (x + size, y + 2 * arm), (x + 2 * arm, y + 2 * arm), (x + 2 * arm, y + size),
        (x + arm, y + size), (x + arm, y + 2 * arm), (x, y + 2 * arm), (x, y + arm),
        (x + arm, y + arm),
    ]  # fmt: skip


def _annotation(category: int, polygon: list[tuple[float, float]], crowd: bool) -> dict:
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    # Shoelace formula: the polygon's own area, as COCO's `area` is the segment's area.
    area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
    return {
        "category_id": category,
        "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        "area": round(area, 2),
        "iscrowd": int(crowd),
        "segmentation": [[round(v, 2) for p in polygon for v in p]],
    }


def _crowd(
    rng: np.random.Generator,
    draw: ImageDraw.ImageDraw,
    width: int,
    height: int,
    short_side: int,
    placed: list[tuple[float, float, float]],
) -> dict | None:
    """Many small shapes of one category in a free region, annotated once with iscrowd=1."""
    category = CATEGORIES[rng.integers(len(CATEGORIES))]["id"]
    region = rng.uniform(0.25, 0.4) * short_side
    spot = _free_spot(rng, width, height, region, placed)
    if spot is None:
        return None
    x, y = spot
    dot = region / 5
    for gx in range(4):
        for gy in range(4):
            corner = (x + gx * region / 4 + dot / 8, y + gy * region / 4 + dot / 8)
            draw.polygon(_shape(category, corner, dot, rng), fill=_colour(rng, category))
    outline = [(x, y), (x + region, y), (x + region, y + region), (x, y + region)]
    return _annotation(category, outline, crowd=True)


# The coco profile. Its numbers are COCO2017's (train2017) at an image_size of 640; every pixel
# dimension scales with image_size / 640.

# (id, name, supercategory, instances in train2017, rounded to hundreds): the 80 categories with
# COCO's ids, names and supercategories; the counts weight the category of each object, so that
# person is ~30 % of the instances and the rest long-tailed, as in COCO.
COCO_CATEGORIES = (
    (1, "person", "person", 262500), (2, "bicycle", "vehicle", 7100),
    (3, "car", "vehicle", 43900), (4, "motorcycle", "vehicle", 8700),
    (5, "airplane", "vehicle", 5100), (6, "bus", "vehicle", 6100),
    (7, "train", "vehicle", 4600), (8, "truck", "vehicle", 10000),
    (9, "boat", "vehicle", 10800), (10, "traffic light", "outdoor", 12900),
    (11, "fire hydrant", "outdoor", 1900), (13, "stop sign", "outdoor", 2000),
    (14, "parking meter", "outdoor", 1300), (15, "bench", "outdoor", 9800),
    (16, "bird", "animal", 10800), (17, "cat", "animal", 4800),
    (18, "dog", "animal", 5500), (19, "horse", "animal", 6600),
    (20, "sheep", "animal", 9500), (21, "cow", "animal", 8100),
    (22, "elephant", "animal", 5500), (23, "bear", "animal", 1300),
    (24, "zebra", "animal", 5300), (25, "giraffe", "animal", 5100),
    (27, "backpack", "accessory", 8700), (28, "umbrella", "accessory", 11400),
    (31, "handbag", "accessory", 12400), (32, "tie", "accessory", 6500),
    (33, "suitcase", "accessory", 6200), (34, "frisbee", "sports", 2700),
    (35, "skis", "sports", 6600), (36, "snowboard", "sports", 2700),
    (37, "sports ball", "sports", 6300), (38, "kite", "sports", 9100),
    (39, "baseball bat", "sports", 3300), (40, "baseball glove", "sports", 3700),
    (41, "skateboard", "sports", 5500), (42, "surfboard", "sports", 6100),
    (43, "tennis racket", "sports", 4800), (44, "bottle", "kitchen", 24300),
    (46, "wine glass", "kitchen", 7900), (47, "cup", "kitchen", 20700),
    (48, "fork", "kitchen", 5500), (49, "knife", "kitchen", 7800),
    (50, "spoon", "kitchen", 6200), (51, "bowl", "kitchen", 14400),
    (52, "banana", "food", 9500), (53, "apple", "food", 5900),
    (54, "sandwich", "food", 4400), (55, "orange", "food", 6400),
    (56, "broccoli", "food", 7300), (57, "carrot", "food", 7900),
    (58, "hot dog", "food", 2900), (59, "pizza", "food", 5800),
    (60, "donut", "food", 7200), (61, "cake", "food", 6400),
    (62, "chair", "furniture", 38500), (63, "couch", "furniture", 5800),
    (64, "potted plant", "furniture", 8700), (65, "bed", "furniture", 4200),
    (67, "dining table", "furniture", 15700), (70, "toilet", "furniture", 4200),
    (72, "tv", "electronic", 5800), (73, "laptop", "electronic", 5000),
    (74, "mouse", "electronic", 2300), (75, "remote", "electronic", 5700),
    (76, "keyboard", "electronic", 2900), (77, "cell phone", "electronic", 6400),
    (78, "microwave", "appliance", 1700), (79, "oven", "appliance", 3300),
    (80, "toaster", "appliance", 200), (81, "sink", "appliance", 5600),
    (82, "refrigerator", "appliance", 2600), (84, "book", "indoor", 24700),
    (85, "clock", "indoor", 6300), (86, "vase", "indoor", 6600),
    (87, "scissors", "indoor", 1500), (88, "teddy bear", "indoor", 4800),
    (89, "hair drier", "indoor", 200), (90, "toothbrush", "indoor", 1900),
)  # fmt: skip
COCO_IDS = np.array([c[0] for c in COCO_CATEGORIES])
COCO_WEIGHTS = np.array([c[3] for c in COCO_CATEGORIES]) / sum(c[3] for c in COCO_CATEGORIES)

# (width, height, share) at 640: most of COCO's images are 640 px on the long side, about 2/3
# landscape (mostly 4:3, also 3:2, 16:9, 5:4, 16:10, 5:3), 1/4 portrait and a few square; 7 % are
# smaller, from other sources (500 px photos, 612x612 from phones).
COCO_IMAGE_SIZES = (
    (640, 480, 0.43), (640, 427, 0.14), (640, 360, 0.03), (640, 512, 0.02), (640, 400, 0.02),
    (640, 383, 0.02),
    (480, 640, 0.13), (427, 640, 0.07), (400, 640, 0.02), (360, 640, 0.01), (512, 640, 0.01),
    (640, 640, 0.03),
    (500, 375, 0.02), (500, 333, 0.01), (612, 612, 0.02), (375, 500, 0.01), (333, 500, 0.01),
)  # fmt: skip
COCO_SIZE_SHARES = np.array([share for _, _, share in COCO_IMAGE_SIZES])

# Objects per image: none on 1 % of the images, else 1 + a negative binomial of this dispersion,
# which gives COCO's mean of 7.3, median of 4 and long tail (0.4 % above 50), capped at COCO's
# maximum of 93.
P_COCO_EMPTY = 0.01
MEAN_OBJECTS = 7.3
COUNT_DISPERSION = 0.6
MAX_OBJECTS = 93
# The square root of an object's area is log-normal: median and spread (of its log) chosen so
# that, as in COCO, ~41 % of the objects are small (area < 32², COCOeval's bounds), 34 % medium
# (< 96²) and 24 % large, once the objects cut by the image border are clipped.
AREA_SIDE_MEDIAN = 42.0
AREA_SIDE_SIGMA = 1.22
SMALLEST_SIDE = 2.0  # at 640: COCO's smallest objects are a few pixels
# log(width / height) of an object before clipping: normal, bounded to 1:5 .. 5:1.
OBJECT_ASPECT_SIGMA = 0.6
P_COCO_CROWD = 0.01  # share of annotations that are crowd regions (iscrowd=1), as in COCO
# Luminance noise of the pictures, +- NOISE_MIN .. NOISE_MIN + NOISE_SPAN grey levels: it decides
# the JPEG file sizes, tuned to COCO's mean of ~160 KB at 640x480 (and a spread around it).
NOISE_MIN = 12
NOISE_SPAN = 30

# Unit outlines, as polygons so that what is drawn is also the segmentation and its area.
_ANGLES = np.arange(24) * 2 * math.pi / 24
_ELLIPSE = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)
_RECTANGLE = np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])


def _draw_coco_image(rng: np.random.Generator, long_side: int) -> tuple[Image.Image, list[dict]]:
    """A picture whose size, objects and JPEG cost follow COCO's statistics, and its annotations."""
    scale = long_side / 640
    width, height, _ = COCO_IMAGE_SIZES[rng.choice(len(COCO_IMAGE_SIZES), p=COCO_SIZE_SHARES)]
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
    picture = _scenery(rng, width, height)
    draw = ImageDraw.Draw(picture)
    objects = [_coco_object(rng, width, height, scale) for _ in range(_object_counts(rng, 1)[0])]
    # Largest first: objects overlap, but a large one drawn last would hide the small ones under
    # it, which are then annotated yet invisible.
    for annotation, polygon in sorted(objects, key=lambda obj: -obj[0]["area"]):
        if annotation["iscrowd"]:
            _draw_crowd(rng, draw, polygon)
        else:
            draw.polygon(polygon, fill=_photo_colour(rng))
    return _grain(rng, picture), [annotation for annotation, _ in objects]


def _object_counts(rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` draws of the number of objects of an image (a function of its own so that the
    distribution can be checked on many draws without drawing pictures)."""
    rest_mean = MEAN_OBJECTS / (1 - P_COCO_EMPTY) - 1
    counts = 1 + rng.negative_binomial(
        COUNT_DISPERSION, COUNT_DISPERSION / (COUNT_DISPERSION + rest_mean), size
    )
    counts[rng.random(size) < P_COCO_EMPTY] = 0
    return np.minimum(counts, MAX_OBJECTS)


def _coco_object(
    rng: np.random.Generator, width: int, height: int, scale: float
) -> tuple[dict, list[tuple[float, float]]]:
    """One object anywhere in the image (it may overlap others and be cut by the border, as in
    COCO): its annotation, whose `area` is the clipped outline's and box its bounds, and outline."""
    category = int(COCO_IDS[rng.choice(len(COCO_IDS), p=COCO_WEIGHTS)])
    crowd = bool(rng.random() < P_COCO_CROWD)
    side = scale * float(
        np.clip(rng.lognormal(math.log(AREA_SIDE_MEDIAN), AREA_SIDE_SIGMA), SMALLEST_SIDE, 640)
    )
    stretch = math.exp(float(np.clip(rng.normal(0, OBJECT_ASPECT_SIGMA), -1.6, 1.6)) / 2)
    unit = _RECTANGLE if crowd else _unit_outline(rng)
    size = side / math.sqrt(_area(unit))  # the outline's area is then side²
    centre = rng.uniform((0, 0), (width, height))
    outline = centre + unit * (size * stretch, size / stretch)
    polygon = _clip_polygon([(x, y) for x, y in outline.tolist()], width, height)
    return _annotation(category, polygon, crowd), polygon


def _unit_outline(rng: np.random.Generator) -> np.ndarray:
    """An outline [N, 2] around the origin, within [-1, 1]²: an ellipse, a rectangle or a blob."""
    kind = rng.integers(3)
    if kind == 0:
        return _ELLIPSE
    if kind == 1:
        return _RECTANGLE
    count = int(rng.integers(5, 11))
    # One vertex per sector, so no gap between vertices reaches 180°: the blob is star-shaped
    # around the origin, never self-intersecting, and contains the origin.
    angles = (np.arange(count) + rng.uniform(0, 0.8, count)) * 2 * math.pi / count
    radii = rng.uniform(0.45, 1.0, count)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _area(outline: np.ndarray) -> float:
    """Area of a simple polygon [N, 2] (shoelace formula)."""
    x, y = outline[:, 0], outline[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(np.roll(x, 1), y)))


def _clip_polygon(
    polygon: list[tuple[float, float]], width: int, height: int
) -> list[tuple[float, float]]:
    """The part of `polygon` inside the image (Sutherland-Hodgman clipping to each border).

    The outlines drawn contain their centre, which lies in the image, so something is left.
    """
    # (axis, limit, sign): a point is on the inner side when sign * (coordinate - limit) <= 0.
    borders = ((0, 0.0, -1), (0, float(width), 1), (1, 0.0, -1), (1, float(height), 1))
    for axis, limit, sign in borders:
        inside = [sign * (p[axis] - limit) <= 0 for p in polygon]
        if all(inside):
            continue  # the common case: nothing beyond this border
        clipped = []
        for i, current in enumerate(polygon):
            previous = polygon[i - 1]
            if inside[i] != inside[i - 1]:
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                crossing = [previous[k] + t * (current[k] - previous[k]) for k in (0, 1)]
                crossing[axis] = limit  # exactly on the border, whatever the rounding
                clipped.append((crossing[0], crossing[1]))
            if inside[i]:
                clipped.append(current)
        polygon = clipped
    return polygon


def _draw_crowd(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, region: list[tuple[float, float]]
) -> None:
    """Many small blobs of one colour family in the region: a crowd, as COCO annotates one."""
    xs, ys = [p[0] for p in region], [p[1] for p in region]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    count = int(rng.integers(8, 25))
    centres_x, centres_y = rng.uniform(x0, x1, count), rng.uniform(y0, y1, count)
    radii_x = rng.uniform(0.04, 0.1, count) * (x1 - x0)
    radii_y = rng.uniform(0.06, 0.15, count) * (y1 - y0)
    hue = rng.random()
    for cx, cy, rx, ry in zip(centres_x, centres_y, radii_x, radii_y, strict=True):
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_photo_colour(rng, hue))


def _photo_colour(rng: np.random.Generator, hue: float | None = None) -> tuple[int, int, int]:
    """A colour of any hue (or near `hue`), from muted to saturated, dark to bright."""
    hue = rng.random() if hue is None else (hue + rng.uniform(-0.05, 0.05)) % 1
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(0.1, 0.9), rng.uniform(0.15, 1.0))
    return round(red * 255), round(green * 255), round(blue * 255)


def _scenery(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """The background: a smooth field of muted colours (sky, walls, ground) with a few unannotated
    things in it, which a detector must learn to leave alone, as in a photograph."""
    columns, rows = rng.integers(2, 6, size=2)
    grey = rng.uniform(30, 225, size=(rows, columns, 1))
    tint = rng.uniform(-40, 40, size=(rows, columns, 3))
    coarse = np.clip(grey + tint, 0, 255).astype(np.uint8)
    picture = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(2, 8)):
        size = rng.uniform(0.05, 0.5) * min(width, height)
        outline = rng.uniform((0, 0), (width, height)) + _unit_outline(rng) * size
        draw.polygon([(x, y) for x, y in outline.tolist()], fill=_photo_colour(rng))
    return picture


def _grain(rng: np.random.Generator, picture: Image.Image) -> Image.Image:
    """Texture and sensor-like noise over everything, objects included: what makes a photograph's
    JPEG large and slow to decode. Each image has its own level of detail, so that file sizes
    spread around their mean as COCO's do."""
    width, height = picture.size
    detail = rng.random()
    # Luminance only: a photograph's fine texture is mostly light and shade.
    blotches = _texture(rng, width, height, int(rng.integers(4, 12)))
    fine = _texture(rng, width, height, 2)
    amplitude = int(NOISE_MIN + NOISE_SPAN * detail)
    noise = rng.integers(-amplitude, amplitude + 1, size=(height, width), dtype=np.int16)
    luma = (blotches * (0.3 + 0.6 * detail) + fine * (0.6 * detail)).astype(np.int16) + noise
    pixels = np.asarray(picture, dtype=np.int16) + luma[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _texture(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    """Random values -128..127 every `cell` pixels, interpolated: blotches about `cell` px wide."""
    coarse = rng.integers(0, 256, size=(height // cell + 2, width // cell + 2), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    return np.asarray(smooth, dtype=np.float32) - 128
