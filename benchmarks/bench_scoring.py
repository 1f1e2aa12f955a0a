"""COCO scoring at the end of an evaluation pass: retinaperf's `CocoEvaluator.score` against
pycocotools, on a COCO val2017-sized pass of RetinaNet's output.

The workload (fixed seed): 5000 images of COCO's sizes with about 7 ground-truth boxes each (80
categories with COCO's ids, person the most frequent, about 1% crowd boxes, COCO's mix of small,
medium and large areas, segment areas below the box areas) and 100 detections an image, as
RetinaNet keeps: one to three near each box (mostly the right category) and false positives,
float32 xyxy boxes, scores and int64 labels, added to a `CocoEvaluator` in batches of 16.

Timed, from the detections in memory to the 12 stats:
- ours: `CocoEvaluator.score()` on one rank, what rank 0 does: the rank's detections array, the
  gather, the results built from the array and faster-coco-eval's COCOeval.
- baseline: pycocotools, given the same detections as result dicts (what retinaperf kept before):
  `loadRes`, `COCOeval` evaluate / accumulate / summarize, stdout silenced.
The ground truth is indexed once beforehand for both, as training does. The 12 stats must be
equal (1e-12); the script fails otherwise. pycocotools takes about half a minute on a CPU, so it
is timed once; ours is the best of a few runs after a warmup. Goal: 3× faster.

    .venv/bin/python benchmarks/bench_scoring.py [--images 5000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import math
import time

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common import Comparison, best_time, print_comparisons, speedup
from retinaperf.distributed import DistEnv
from retinaperf.measure.scoring import STAT_NAMES, CocoEvaluator, load_ground_truth

# COCO's 80 category ids: 1..90 without the 10 that were never annotated.
COCO_CATEGORY_IDS = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (640, 426), (500, 375))
DETECTIONS_PER_IMAGE = 100  # RetinaNet's detections_per_img
EVAL_BATCH = 16
GOAL = 3.0
TOLERANCE = 1e-12


def category_weights() -> np.ndarray:
    """Person (id 1) about a quarter of the boxes, as in COCO; the rest alike."""
    weights = np.ones(len(COCO_CATEGORY_IDS))
    weights[0] = 0.25 / 0.75 * (len(weights) - 1)
    return weights / weights.sum()


def random_boxes(
    rng: np.random.Generator, count: int, width: int, height: int, median_side: float
) -> np.ndarray:
    """[count, 4] xywh inside the image: sqrt(area) log-normal around `median_side`, aspect ratio
    log-uniform in [1/3, 3]. With 52 px and segments of 40-95% of their box, the annotated areas
    are 41% small, 34% medium and 25% large, as COCO's."""
    side = np.exp(rng.normal(math.log(median_side), 1.2, count)).clip(4, 600)
    aspect = np.exp(rng.uniform(-math.log(3), math.log(3), count))
    w = np.minimum(side * np.sqrt(aspect), width - 1)
    h = np.minimum(side / np.sqrt(aspect), height - 1)
    x = rng.uniform(0, width - w)
    y = rng.uniform(0, height - h)
    return np.stack([x, y, w, h], axis=1)


def make_workload(
    images: int, seed: int = 0
) -> tuple[dict, list[int], list[dict[str, torch.Tensor]]]:
    """The ground truth (a COCO instances dict), the image ids and the model outputs of each."""
    rng = np.random.default_rng(seed)
    categories = np.array(COCO_CATEGORY_IDS)
    weights = category_weights()
    image_ids = sorted(int(i) for i in rng.choice(np.arange(1, 581_930), images, replace=False))
    gt: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": int(c), "name": f"c{c}", "supercategory": "s"} for c in categories],
    }
    outputs = []
    for image_id in image_ids:
        width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        gt["images"].append(
            {"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"}
        )
        # About 7.3 boxes an image (geometric, at most 50); 1% of the images have none.
        count = 0 if rng.random() < 0.01 else min(50, int(rng.geometric(1 / 7.3)))
        boxes = random_boxes(rng, count, width, height, 52.0)
        labels = rng.choice(categories, count, p=weights)
        crowd = rng.random(count) < 0.01
        areas = boxes[:, 2] * boxes[:, 3] * rng.uniform(0.4, 0.95, count)  # segments < boxes
        for box, label, is_crowd, area in zip(boxes, labels, crowd, areas, strict=True):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(v) for v in box],
                    "area": float(area),
                    "iscrowd": int(is_crowd),
                }
            )
        # One to three detections near each box, mostly of its category, scored high-ish ...
        near = np.repeat(np.arange(count), rng.integers(1, 4, count))[:DETECTIONS_PER_IMAGE]
        noise = rng.normal(0.0, 0.08, (len(near), 4))
        found = boxes[near].copy()
        found[:, :2] += noise[:, :2] * found[:, 2:]
        found[:, 2:] *= np.exp(noise[:, 2:])
        found_labels = np.where(
            rng.random(len(near)) < 0.85, labels[near], rng.choice(categories, len(near))
        )
        found_scores = rng.beta(4, 2, len(near))
        # ... and false positives up to 100, scored low-ish.
        extra = DETECTIONS_PER_IMAGE - len(near)
        false = random_boxes(rng, extra, width, height, 30.0)
        false_labels = rng.choice(categories, extra, p=weights)
        false_scores = rng.beta(1, 5, extra)
        xywh = np.concatenate([found, false])
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        xyxy = xyxy.clip(0, [width, height, width, height])
        scores = np.concatenate([found_scores, false_scores]).clip(0.05, 1.0)
        outputs.append(
            {
                "boxes": torch.tensor(xyxy, dtype=torch.float32),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(np.concatenate([found_labels, false_labels])),
            }
        )
    return gt, image_ids, outputs


def pycocotools_stats(gt: COCO, detections: list[dict]) -> list[float]:
    """pycocotools' 12 stats; it writes ids, areas and polygons into the dicts it gets."""
    with contextlib.redirect_stdout(io.StringIO()):
        results = gt.loadRes(detections)
        evaluator = COCOeval(gt, results, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def as_result_dicts(detections: np.ndarray) -> list[dict]:
    """The rows of a detections array as COCO result dicts, as retinaperf used to keep them."""
    return [
        {"image_id": int(row[0]), "category_id": int(row[6]), "bbox": row[1:5], "score": row[5]}
        for row in detections.tolist()
    ]


def benchmark(images: int = 5000, repeats: int = 2, baseline_repeats: int = 1) -> list[Comparison]:
    gt_dict, image_ids, outputs = make_workload(images)
    env = DistEnv(
        rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu")
    )
    evaluator = CocoEvaluator(load_ground_truth(copy.deepcopy(gt_dict)), env)
    for start in range(0, images, EVAL_BATCH):
        end = start + EVAL_BATCH
        evaluator.add(image_ids[start:end], outputs[start:end])
    detections = evaluator.detections()

    found: dict[str, object] = {}

    def ours() -> None:
        found["ours"] = evaluator.score()

    ours_s = best_time(ours, repeats)
    ours_stats, count = found["ours"]

    with contextlib.redirect_stdout(io.StringIO()):
        reference_gt = COCO()
    reference_gt.dataset = copy.deepcopy(gt_dict)
    with contextlib.redirect_stdout(io.StringIO()):
        reference_gt.createIndex()
    dicts = as_result_dicts(detections)
    baseline_s = math.inf
    for _ in range(baseline_repeats):
        fresh = [{**d, "bbox": list(d["bbox"])} for d in dicts]  # loadRes writes into them
        gc.collect()
        start = time.perf_counter()
        reference = pycocotools_stats(reference_gt, fresh)
        baseline_s = min(baseline_s, time.perf_counter() - start)
        del fresh

    if count != len(dicts):
        raise RuntimeError(f"scoring: {count} detections scored, {len(dicts)} added")
    unequal = [
        f"{name} {ours_stats[name]!r} != {expected!r}"
        for name, expected in zip(STAT_NAMES, reference, strict=True)
        if not abs(ours_stats[name] - expected) <= TOLERANCE
    ]
    if unequal:
        raise RuntimeError("scoring: stats differ from pycocotools: " + "; ".join(unequal))

    boxes = len(gt_dict["annotations"])
    return [
        speedup(
            "scoring",
            f"COCO mAP of {images} images: {boxes} boxes, {count} detections",
            "pycocotools",
            baseline_s,
            "retinaperf",
            ours_s,
            GOAL,
            notes=(
                f"the 12 stats equal pycocotools' to {TOLERANCE:g} (AP {ours_stats['AP']:.4f}); "
                f"pycocotools best of {baseline_repeats}, ours best of {repeats} after a warmup"
            ),
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of ours")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="of pycocotools")
    args = parser.parse_args()
    print_comparisons(benchmark(args.images, args.repeats, args.baseline_repeats))


if __name__ == "__main__":
    main()
