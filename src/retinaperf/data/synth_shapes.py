"""The "shapes" profile of the generated dataset: shapes of a few categories on textured
backgrounds, which a detector learns in minutes, with what the real loader must cope with (crowd
regions, boxes of zero area, tiny boxes, images without any object)."""

from __future__ import annotations

import colorsys
import math
from typing import TypedDict

import numpy as np
from PIL import Image, ImageDraw

# Bump when the drawing of a profile changes, so cached datasets of an older generator are not
# reused. GENERATOR_VERSION is the shapes profile's (its name predates the profiles).
GENERATOR_VERSION = 4


class Category(TypedDict):
    """A category as COCO's instances file lists it."""

    id: int
    name: str
    supercategory: str


# COCO category ids are not contiguous; ours skip numbers too so the code never assumes they are.
CATEGORIES: tuple[Category, ...] = (
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


def draw_image(rng: np.random.Generator, short_side: int) -> tuple[Image.Image, list[dict]]:
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
            objects.append(polygon_annotation(category, polygon, crowd=False))
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
            objects.append(polygon_annotation(category, polygon, crowd=False))
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
    base = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.float32
    )
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


def polygon_annotation(category: int, polygon: list[tuple[float, float]], crowd: bool) -> dict:
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
    return polygon_annotation(category, outline, crowd=True)
