"""The "coco" profile of the generated dataset: pictures and annotations whose statistics follow
COCO2017 (image sizes and aspect ratios, objects per image, box areas, the 80 categories and their
frequencies, crowd regions, JPEG file sizes), so that a training run costs the data loader and the
accelerator what real COCO costs. It measures throughput; its pictures teach nothing."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from retinaperf.data.synth_shapes import polygon_annotation

COCO_GENERATOR_VERSION = 1


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


def draw_coco_image(rng: np.random.Generator, long_side: int) -> tuple[Image.Image, list[dict]]:
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
    return polygon_annotation(category, polygon, crowd), polygon


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
    picture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
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
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32) - 128
