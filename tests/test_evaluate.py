"""COCO bbox scoring held to pycocotools (the reference implementation) on the cases that matter.

Every expected number comes from pycocotools' COCOeval on the same ground truth and detections,
given as a list of result dicts; the package scores a detections array with faster-coco-eval, so
these tests compare two implementations and two representations.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import random
import threading
import warnings

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinaperf.cli import main
from retinaperf.distributed import DistEnv
from retinaperf.errors import UserError
from retinaperf.measure.scoring import (
    CocoEvaluator,
    detections_to_array,
    evaluate_files,
    load_ground_truth,
    score,
)

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
TOL = 1e-9
CATEGORIES = (3, 7, 18, 44, 90)  # non-contiguous, like COCO's
NO_GT_CATEGORY = 55  # listed in 'categories', never annotated
IMAGE_W, IMAGE_H = 640, 480
# Box sides by COCO area range: small < 32², medium < 96², large above.
SIDES = {"small": (4, 28), "medium": (36, 90), "large": (100, 300)}


def one_process() -> DistEnv:
    return DistEnv(
        rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu")
    )


# --- the reference ---------------------------------------------------------------------------


def reference(gt: dict, detections: list[dict]) -> dict[str, float]:
    """pycocotools' 12 stats. It mutates what it gets: copies."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        if detections:
            results = coco.loadRes(copy.deepcopy(detections))
        else:  # loadRes cannot take an empty list; what it would build, without annotations
            results = COCO()
            results.dataset = {
                "images": list(coco.dataset["images"]),
                "categories": copy.deepcopy(coco.dataset["categories"]),
                "annotations": [],
            }
            results.createIndex()
        evaluator = COCOeval(coco, results, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STATS, (float(v) for v in evaluator.stats), strict=True))


def ours(gt: dict, detections: list[dict]) -> dict[str, float]:
    return score(load_ground_truth(copy.deepcopy(gt)), detections_to_array(detections))


def assert_stats_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(STATS)
    for name in STATS:
        assert actual[name] == pytest.approx(expected[name], abs=TOL, rel=0), name


# --- building cases --------------------------------------------------------------------------


class Case:
    """A ground-truth dict and detections, built one box at a time."""

    def __init__(self, categories=CATEGORIES, extra_categories=(NO_GT_CATEGORY,)) -> None:
        cats = [*categories, *extra_categories]
        self.gt: dict = {
            "images": [],
            "annotations": [],
            "categories": [{"id": c, "name": f"c{c}", "supercategory": "s"} for c in cats],
        }
        self.detections: list[dict] = []

    def image(self, image_id: int) -> int:
        self.gt["images"].append(
            {"id": image_id, "width": IMAGE_W, "height": IMAGE_H, "file_name": f"{image_id}.jpg"}
        )
        return image_id

    def box(self, image_id, category_id, bbox, *, area=None, iscrowd=0) -> None:
        w, h = bbox[2], bbox[3]
        self.gt["annotations"].append(
            {
                "id": len(self.gt["annotations"]) + 1,  # pycocotools treats id 0 as "no match"
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [float(v) for v in bbox],
                "area": float(w * h if area is None else area),
                "iscrowd": iscrowd,
            }
        )

    def detect(self, image_id, category_id, bbox, score_) -> None:
        self.detections.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [float(v) for v in bbox],
                "score": float(score_),
            }
        )


def random_box(rng: random.Random, size: str) -> list[float]:
    lo, hi = SIDES[size]
    w, h = rng.uniform(lo, hi), rng.uniform(lo, hi)
    return [rng.uniform(0, IMAGE_W - w), rng.uniform(0, IMAGE_H - h), w, h]


def jitter(rng: random.Random, bbox: list[float], amount: float) -> list[float]:
    x, y, w, h = bbox
    return [
        x + rng.gauss(0, amount * w),
        y + rng.gauss(0, amount * h),
        max(1.0, w * (1 + rng.gauss(0, amount))),
        max(1.0, h * (1 + rng.gauss(0, amount))),
    ]


def random_case(seed: int, n_images: int = 12) -> Case:
    """Several images and categories, boxes of every area range, crowd boxes with detections on
    them, an image without boxes (but detections), one without detections, one with neither, and
    detections for a category that has no ground truth."""
    rng = random.Random(seed)
    case = Case()
    image_ids = [case.image(1000 + 7 * i) for i in range(n_images)]
    no_boxes, no_detections, nothing = image_ids[0], image_ids[1], image_ids[2]
    for image_id in image_ids:
        if image_id in (no_boxes, nothing):
            continue
        for _ in range(rng.randint(1, 6)):
            category = rng.choice(CATEGORIES)
            bbox = random_box(rng, rng.choice(list(SIDES)))
            # A segment covers part of its box: the area range follows 'area', not w*h.
            area = bbox[2] * bbox[3] * rng.uniform(0.6, 1.0)
            case.box(image_id, category, bbox, area=area)
            if image_id == no_detections:
                continue
            if rng.random() < 0.85:
                wrong = rng.random() < 0.1
                label = rng.choice(CATEGORIES) if wrong else category
                case.detect(image_id, label, jitter(rng, bbox, 0.08), rng.random())
            if rng.random() < 0.3:  # a duplicate: matched at most once
                case.detect(image_id, category, jitter(rng, bbox, 0.15), rng.random())
        if rng.random() < 0.4:
            crowd = random_box(rng, "large")
            category = rng.choice(CATEGORIES)
            case.box(image_id, category, crowd, iscrowd=1)
            for _ in range(rng.randint(1, 3)):  # inside the crowd region: ignored, not FP
                x, y, w, h = crowd
                dw, dh = rng.uniform(0.2, 0.6) * w, rng.uniform(0.2, 0.6) * h
                inside = [x + rng.uniform(0, w - dw), y + rng.uniform(0, h - dh), dw, dh]
                case.detect(image_id, category, inside, rng.random())
    for image_id in image_ids:
        if image_id in (no_detections, nothing):
            continue
        for _ in range(rng.randint(0, 4)):  # false positives, some on the image without boxes
            category = rng.choice([*CATEGORIES, NO_GT_CATEGORY])
            case.detect(image_id, category, random_box(rng, rng.choice(list(SIDES))), rng.random())
    return case


# --- score() against pycocotools --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_cases_match_pycocotools(seed):
    case = random_case(seed)
    expected = reference(case.gt, case.detections)
    # The case exercises every area range (a range without boxes would read -1).
    assert min(expected.values()) > 0
    assert_stats_equal(ours(case.gt, case.detections), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_tied_scores_match_pycocotools(seed):
    """Equal scores are ranked in input order (a stable sort), as pycocotools does."""
    case = random_case(seed)
    rng = random.Random(seed)
    for d in case.detections:
        d["score"] = rng.choice((0.25, 0.5, 0.75))
    assert_stats_equal(ours(case.gt, case.detections), reference(case.gt, case.detections))


def test_score_leaves_inputs_alone_and_gt_reusable():
    case = random_case(5)
    other = random_case(6)
    detections = detections_to_array(case.detections)
    untouched = detections.copy()
    gt = load_ground_truth(copy.deepcopy(case.gt))
    first = score(gt, detections)
    assert np.array_equal(detections, untouched)
    # The same ground truth object scores every epoch: earlier scoring must not leak into later.
    score(gt, detections_to_array(d for d in other.detections if d["image_id"] in gt.getImgIds()))
    assert score(gt, detections) == first
    assert_stats_equal(first, reference(case.gt, case.detections))


def test_crowd_boxes_ignore_detections_inside_them():
    case = Case()
    image = case.image(42)
    case.box(image, 7, [10, 10, 50, 40])
    case.box(image, 7, [200, 100, 300, 250], iscrowd=1)
    case.detect(image, 7, [11, 10, 49, 41], 0.9)
    for i in range(6):  # many detections in the crowd region, some scoring above the true one
        case.detect(image, 7, [210 + 40 * i, 120 + 20 * i, 45, 60], 0.95 - 0.1 * i)
    case.detect(image, 7, [100, 300, 60, 60], 0.5)  # a plain false positive
    expected = reference(case.gt, case.detections)
    assert_stats_equal(ours(case.gt, case.detections), expected)
    # Without the crowd box the same detections are false positives: AP must drop.
    no_crowd = copy.deepcopy(case.gt)
    no_crowd["annotations"] = [a for a in no_crowd["annotations"] if not a["iscrowd"]]
    assert ours(no_crowd, case.detections)["AP"] < expected["AP"]


def test_crowd_only_image_has_no_positives():
    case = Case()
    crowd_image, plain = case.image(1), case.image(2)
    case.box(crowd_image, 3, [0, 0, 300, 300], iscrowd=1)
    case.box(plain, 3, [20, 20, 60, 60])
    case.detect(crowd_image, 3, [10, 10, 100, 100], 0.99)
    case.detect(plain, 3, [22, 18, 60, 62], 0.4)
    assert_stats_equal(ours(case.gt, case.detections), reference(case.gt, case.detections))


def test_more_than_100_detections_on_an_image():
    rng = random.Random(11)
    case = Case()
    crowded, sparse = case.image(5), case.image(9)
    objects = [random_box(rng, "medium") for _ in range(40)]
    for bbox in objects:
        case.box(crowded, 18, bbox)
    for bbox in objects:  # true positives at every rank, so the cut at 1/10/100 matters
        case.detect(crowded, 18, jitter(rng, bbox, 0.05), rng.random())
    for _ in range(130):
        case.detect(crowded, 18, random_box(rng, rng.choice(list(SIDES))), rng.random())
    for _ in range(120):  # other categories on the same image: each is cut at 100 separately
        case.detect(crowded, rng.choice((3, 44)), random_box(rng, "small"), rng.random())
    case.box(sparse, 3, [5, 5, 20, 20])
    case.detect(sparse, 3, [5, 6, 20, 19], 0.3)
    assert sum(d["image_id"] == crowded for d in case.detections) > 200
    expected = reference(case.gt, case.detections)
    assert expected["AR1"] < expected["AR10"] < expected["AR100"]
    assert_stats_equal(ours(case.gt, case.detections), expected)
    # Dropping detections ranked below 100 must not change anything: they are never seen.
    top = sorted(
        (d for d in case.detections if d["image_id"] == crowded and d["category_id"] == 18),
        key=lambda d: -d["score"],
    )[:100]
    rest = [d for d in case.detections if d["image_id"] != crowded or d["category_id"] != 18]
    assert_stats_equal(ours(case.gt, top + rest), expected)


def test_category_without_ground_truth_does_not_count():
    case = random_case(7)
    extra = {"image_id": 1000, "category_id": NO_GT_CATEGORY, "bbox": [1.0, 2.0, 30.0, 40.0]}
    with_extra = [*case.detections, {**extra, "score": 0.999}]
    assert any(d["category_id"] == NO_GT_CATEGORY for d in case.detections)
    expected = reference(case.gt, with_extra)
    assert_stats_equal(ours(case.gt, with_extra), expected)
    # Only ground-truth categories are averaged: the extra detections change nothing.
    without = [d for d in case.detections if d["category_id"] != NO_GT_CATEGORY]
    assert_stats_equal(ours(case.gt, without), expected)


@pytest.mark.parametrize("size", sorted(SIDES))
def test_one_area_range_only(size):
    """With boxes of one range, the other ranges have no ground truth: -1, like pycocotools."""
    rng = random.Random(len(size))
    case = Case()
    for image_id in (10, 20, 30):
        case.image(image_id)
        for _ in range(3):
            bbox = random_box(rng, size)
            case.box(image_id, rng.choice(CATEGORIES), bbox)
            case.detect(image_id, rng.choice(CATEGORIES), jitter(rng, bbox, 0.1), rng.random())
    expected = reference(case.gt, case.detections)
    assert sorted(k for k, v in expected.items() if v == -1) == sorted(
        k for k in STATS if k[-1] in "sml" and k[-1] != size[0]
    )
    assert_stats_equal(ours(case.gt, case.detections), expected)


def test_area_range_follows_annotation_area_not_box():
    """A 40x40 box (1600 px², medium) whose segment covers 900 px² is a small object."""
    case = Case()
    image = case.image(3)
    case.box(image, 7, [100, 100, 40, 40], area=900)
    case.box(image, 7, [300, 200, 40, 40])
    case.detect(image, 7, [101, 100, 40, 40], 0.8)
    expected = reference(case.gt, case.detections)
    assert expected["APs"] >= 0 and expected["APm"] >= 0
    assert_stats_equal(ours(case.gt, case.detections), expected)


def test_detection_area_is_w_times_h_at_the_range_bounds():
    """A detection's area range follows w * h, bounds included: an unmatched 32x32 (96x96)
    detection is a false positive of both the small and medium (medium and large) ranges."""
    case = Case()
    image = case.image(9)
    case.box(image, 3, [10, 10, 20, 20])
    case.box(image, 3, [300, 200, 60, 60])
    case.box(image, 3, [100, 300, 150, 150])
    for x, y, w, h, s in [
        (10, 10, 20, 20, 0.5),
        (300, 200, 60, 60, 0.5),
        (100, 300, 150, 150, 0.5),
    ]:
        case.detect(image, 3, [x, y, w, h], s)
    case.detect(image, 3, [400, 10, 32, 32], 0.9)
    case.detect(image, 3, [450, 300, 96, 96], 0.8)
    expected = reference(case.gt, case.detections)
    assert expected["APs"] < 1 and expected["APm"] < 1 and expected["APl"] < 1
    assert_stats_equal(ours(case.gt, case.detections), expected)


def test_no_detections_scores_zero():
    case = random_case(8)
    stats = ours(case.gt, [])
    # Ranges with ground truth score 0 (nothing found), not -1 and not a crash.
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    assert_stats_equal(stats, reference(case.gt, []))
    # A range without ground truth reads -1, as in pycocotools.
    one_range = Case()
    one_range.box(one_range.image(5), 7, [10, 10, 20, 20])  # small only
    stats = ours(one_range.gt, [])
    assert stats["APm"] == -1.0 and stats["APs"] == 0.0
    assert_stats_equal(stats, reference(one_range.gt, []))


def test_score_rejects_detections_of_unknown_images():
    case = random_case(3)
    detections = detections_to_array(case.detections)
    detections[-1, 0] = 999_999
    with pytest.raises(ValueError, match="999999"):
        score(load_ground_truth(copy.deepcopy(case.gt)), detections)
    with pytest.raises(ValueError):
        score(load_ground_truth(copy.deepcopy(case.gt)), detections[:, :6])


def test_perfect_detections_score_one():
    rng = random.Random(4)
    case = Case()
    for image_id in (1, 2, 3):
        case.image(image_id)
        for category, size in zip(CATEGORIES, SIDES, strict=False):
            case.box(image_id, category, random_box(rng, size))  # one per category: AR1 = 1
    for ann in case.gt["annotations"]:
        case.detect(ann["image_id"], ann["category_id"], ann["bbox"], rng.random())
    stats = ours(case.gt, case.detections)
    assert all(v == pytest.approx(1.0, abs=TOL) for v in stats.values()), stats
    assert_stats_equal(stats, reference(case.gt, case.detections))


# --- CocoEvaluator ----------------------------------------------------------------------------


def model_outputs(case: Case, rng: random.Random):
    """Model-style outputs for `case`'s images, and the xywh detections they stand for.

    Coordinates are multiples of 1/4 and scores float32 values, so that the xyxy float32 tensors
    and the xywh numbers describe exactly the same boxes.
    """
    image_ids = [im["id"] for im in case.gt["images"]]
    outputs, detections = [], []
    for image_id in image_ids:
        n = rng.choice([0, 1, 3, 8])
        boxes, scores, labels = [], [], []
        for _ in range(n):
            x, y = rng.randrange(0, 2000) / 4, rng.randrange(0, 1500) / 4
            w, h = rng.randrange(8, 600) / 4, rng.randrange(8, 500) / 4
            s = float(torch.tensor(rng.random(), dtype=torch.float32))
            label = rng.choice([*CATEGORIES, NO_GT_CATEGORY])
            boxes.append([x, y, x + w, y + h])
            scores.append(s)
            labels.append(label)
            detections.append(
                {"image_id": image_id, "category_id": label, "bbox": [x, y, w, h], "score": s}
            )
        outputs.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
    return image_ids, outputs, detections


def test_evaluator_matches_scoring_the_same_detections():
    rng = random.Random(21)
    case = random_case(9)
    # Outputs near the ground truth, so the stats are far from 0.
    for ann in case.gt["annotations"]:
        x, y, w, h = (round(v * 4) / 4 for v in ann["bbox"])
        ann["bbox"] = [x, y, w, h]
    image_ids, outputs, detections = model_outputs(case, rng)
    for ann in case.gt["annotations"]:
        if rng.random() < 0.8:
            i = image_ids.index(ann["image_id"])
            x, y, w, h = ann["bbox"]
            s = float(torch.tensor(rng.random(), dtype=torch.float32))
            box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
            outputs[i]["boxes"] = torch.cat([outputs[i]["boxes"], box])
            outputs[i]["scores"] = torch.cat([outputs[i]["scores"], torch.tensor([s])])
            outputs[i]["labels"] = torch.cat(
                [outputs[i]["labels"], torch.tensor([ann["category_id"]])]
            )
            detections.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": ann["category_id"],
                    "bbox": [x, y, w, h],
                    "score": s,
                }
            )
    assert any(len(o["scores"]) == 0 for o in outputs)  # an image without detections

    gt = load_ground_truth(copy.deepcopy(case.gt))
    evaluator = CocoEvaluator(gt, one_process())
    half = len(image_ids) // 2  # added batch by batch
    evaluator.add(image_ids[:half], outputs[:half])
    evaluator.add(image_ids[half:], outputs[half:])
    stats, count = evaluator.score()
    assert count == len(detections)
    expected = reference(case.gt, detections)
    assert expected["AP"] > 0.2
    assert_stats_equal(stats, expected)
    assert_stats_equal(stats, score(gt, detections_to_array(detections)))

    # reset: the next pass starts from nothing.
    evaluator.reset()
    stats, count = evaluator.score()
    assert count == 0 and stats["AP"] == 0.0
    evaluator.add(image_ids[:half], outputs[:half])
    stats, count = evaluator.score()
    first_half = [d for d in detections if d["image_id"] in image_ids[:half]]
    assert count == len(first_half)
    assert_stats_equal(stats, reference(case.gt, first_half))


def test_evaluator_moves_device_tensors_and_other_dtypes():
    case = Case()
    image = case.image(77)
    case.box(image, 44, [10.0, 20.0, 30.0, 40.0])
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]], dtype=torch.float16),
            "scores": torch.tensor([0.5], dtype=torch.bfloat16),
            "labels": torch.tensor([44], dtype=torch.int32),
        }
    ]
    evaluator = CocoEvaluator(load_ground_truth(case.gt), one_process())
    evaluator.add([image], outputs)
    stats, count = evaluator.score()
    assert count == 1
    assert stats["AP"] == pytest.approx(1.0, abs=TOL)
    assert evaluator.detections().tolist() == [[77, 10.0, 20.0, 30.0, 40.0, 0.5, 44]]


def former_add(image_ids: list[int], outputs: list[dict[str, torch.Tensor]]) -> list[dict]:
    """What the evaluator's `add` built before it kept arrays: a host copy per image and field,
    and one result dict per detection."""
    detections = []
    for image_id, output in zip(image_ids, outputs, strict=True):
        boxes = output["boxes"].float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].float().cpu().tolist()
        labels = output["labels"].cpu().tolist()
        detections.extend(
            {"image_id": image_id, "category_id": label, "bbox": box, "score": s}
            for box, s, label in zip(xywh, scores, labels, strict=True)
        )
    return detections


def noisy_outputs(case: Case, seed: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Per image of `case`, model-style outputs near its boxes plus false positives, at arbitrary
    (off-grid) float coordinates: xyxy -> xywh in float32 rounds, as on the device."""
    rng = random.Random(seed)
    outputs = []
    for index, image in enumerate(case.gt["images"]):
        boxes, scores, labels = [], [], []
        for ann in case.gt["annotations"]:
            if index in (1, 2):  # without detections, as in random_case
                break
            if ann["image_id"] == image["id"] and rng.random() < 0.8:
                x, y, w, h = jitter(rng, ann["bbox"], 0.05)
                boxes.append([x, y, x + w, y + h])
                scores.append(rng.random())
                labels.append(ann["category_id"])
        if index not in (1, 2):
            for _ in range(rng.randint(0, 5)):
                x, y, w, h = random_box(rng, rng.choice(list(SIDES)))
                boxes.append([x, y, x + w, y + h])
                scores.append(rng.random())
                labels.append(rng.choice([*CATEGORIES, NO_GT_CATEGORY]))
        outputs.append(
            {
                "boxes": torch.tensor(boxes, dtype=dtype).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=dtype),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_add_equals_the_former_per_image_dicts(dtype):
    case = random_case(14, n_images=20)
    image_ids = [im["id"] for im in case.gt["images"]]
    outputs = noisy_outputs(case, 15, dtype)
    assert any(len(o["scores"]) == 0 for o in outputs)
    evaluator = CocoEvaluator(load_ground_truth(copy.deepcopy(case.gt)), one_process())
    former = []
    for start in range(0, len(image_ids), 6):  # batches of 6, the last one shorter
        batch = slice(start, start + 6)
        evaluator.add(image_ids[batch], outputs[batch])
        former += former_add(image_ids[batch], outputs[batch])
    # The same numbers, bit for bit, in the same order (equal scores rank in input order) ...
    assert np.array_equal(evaluator.detections(), detections_to_array(former))
    # ... and so the same stats as pycocotools on the dicts the evaluator used to build.
    stats, count = evaluator.score()
    assert count == len(former)
    expected = reference(case.gt, former)
    assert expected["AP"] > 0.3
    assert_stats_equal(stats, expected)


class ThreadRanks:
    """Ranks as threads of this process, with DistEnv's collectives: what travels is pickled, as
    torch.distributed's gather_object and broadcast_object_list do."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list[bytes | None] = [None] * world_size

    def env(self, rank: int) -> ThreadEnv:
        return ThreadEnv(self, rank)


class ThreadEnv:
    device = torch.device("cpu")

    def __init__(self, group: ThreadRanks, rank: int) -> None:
        self.group, self.rank = group, rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: object) -> list | None:
        self.group.slots[self.rank] = pickle.dumps(obj)
        self.group.barrier.wait()
        gathered = [pickle.loads(b) for b in self.group.slots] if self.is_main else None
        self.group.barrier.wait()  # read before anyone writes the slots again
        return gathered

    def broadcast(self, obj: object) -> object:
        if self.is_main:
            self.group.slots[0] = pickle.dumps(obj)
        self.group.barrier.wait()
        value = pickle.loads(self.group.slots[0])
        self.group.barrier.wait()
        return value


def test_ranks_arrays_combine_into_one_score():
    case = random_case(16, n_images=24)
    image_ids = [im["id"] for im in case.gt["images"]]
    outputs = noisy_outputs(case, 17)
    empty = [i for i, o in enumerate(outputs) if len(o["scores"]) == 0]
    assert empty
    # Rank 2 holds only images without detections: an empty array travels.
    others = [i for i in range(len(outputs)) if i not in empty]
    shares = {0: others[1::2], 1: others[0::2], 2: empty}
    group = ThreadRanks(3)
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        try:
            gt = load_ground_truth(copy.deepcopy(case.gt)) if rank == 0 else None
            evaluator = CocoEvaluator(gt, group.env(rank))
            mine = shares[rank]
            for start in range(0, len(mine), 4):
                batch = mine[start : start + 4]
                evaluator.add([image_ids[i] for i in batch], [outputs[i] for i in batch])
            results[rank] = evaluator.score()
        except BaseException as err:  # reported by the main thread
            results[rank] = err
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for rank in range(3):
        if isinstance(results.get(rank), BaseException):
            raise results[rank]

    single = CocoEvaluator(load_ground_truth(copy.deepcopy(case.gt)), one_process())
    single.add(image_ids, outputs)
    expected = single.score()
    assert results[0] == results[1] == results[2] == expected  # every rank, exactly equal
    detections = former_add(image_ids, outputs)
    assert expected[1] == len(detections)
    assert_stats_equal(expected[0], reference(case.gt, detections))


def test_evaluator_without_detections_scores_like_pycocotools():
    case = random_case(13)
    evaluator = CocoEvaluator(load_ground_truth(copy.deepcopy(case.gt)), one_process())
    stats, count = evaluator.score()  # nothing added
    assert count == 0
    expected = reference(case.gt, [])
    assert_stats_equal(stats, expected)
    assert set(expected.values()) == {0.0}  # every range has ground truth: 0, not -1
    first, second = (im["id"] for im in case.gt["images"][:2])
    evaluator.add([first, second], [EMPTY_OUTPUT, EMPTY_OUTPUT])  # images without detections
    assert evaluator.detections().shape == (0, 7)
    assert evaluator.score() == (stats, 0)


def test_evaluator_on_rank_0_needs_ground_truth():
    with pytest.raises(ValueError):
        CocoEvaluator(None, one_process())


EMPTY_OUTPUT = {
    "boxes": torch.zeros(0, 4),
    "scores": torch.zeros(0),
    "labels": torch.zeros(0, dtype=torch.int64),
}


def test_add_rejects_mismatched_lengths():
    evaluator = CocoEvaluator(load_ground_truth(Case().gt), one_process())
    with pytest.raises(ValueError):
        evaluator.add([1, 2], [EMPTY_OUTPUT])


# --- evaluate_files and the CLI ----------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `retinaperf ...`; returns (status, stdout, stderr). The CLI installs its own warning
    printer: put the original back afterwards."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def run(*argv: str):
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def files(tmp_path):
    case = random_case(12)
    gt_path, dets_path = tmp_path / "instances_val.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(case.gt))
    dets_path.write_text(json.dumps(case.detections))
    return case, gt_path, dets_path


def test_cli_evaluate_prints_the_12_stats_as_json(cli, files):
    case, gt_path, dets_path = files
    status, out, err = cli(
        "evaluate", "--annotations", str(gt_path), "--detections", str(dets_path)
    )
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    printed = json.loads(lines[0])
    assert list(printed) == list(STATS)
    assert_stats_equal(printed, reference(case.gt, case.detections))
    assert evaluate_files(gt_path, dets_path) == printed


def test_cli_evaluate_empty_detections_list(cli, files):
    _, gt_path, dets_path = files
    dets_path.write_text("[]")
    status, out, _ = cli("evaluate", "--annotations", str(gt_path), "--detections", str(dets_path))
    assert status == 0
    assert json.loads(out)["AP"] == 0.0


def test_evaluate_files_ignores_detections_of_unknown_categories(files):
    """As pycocotools does, however large the category id; saying how many and which."""
    case, gt_path, dets_path = files
    extra = [{**d, "category_id": 10**30 + i % 2} for i, d in enumerate(case.detections[:5])]
    dets_path.write_text(json.dumps(case.detections + extra))
    expected = reference(case.gt, case.detections + extra)
    with pytest.warns(UserWarning) as caught:
        assert_stats_equal(evaluate_files(gt_path, dets_path), expected)
    assert_stats_equal(expected, reference(case.gt, case.detections))
    (warning,) = caught
    assert str(warning.message).startswith(
        f"evaluate: 5 detection(s) in {dets_path} have a category_id that {gt_path} does not "
        f"list ({10**30}, {10**30 + 1}): "
    )


def test_cli_evaluate_names_unknown_category_ids_in_one_warning_and_scores(cli, files):
    case, gt_path, dets_path = files
    extra = [{**d, "category_id": 1000 + i} for i, d in enumerate(case.detections[:13])]
    dets_path.write_text(json.dumps(case.detections + extra))
    status, out, err = cli(
        "evaluate", "--annotations", str(gt_path), "--detections", str(dets_path)
    )
    assert status == 0
    assert_stats_equal(json.loads(out), reference(case.gt, case.detections))
    (line,) = err.strip().splitlines()
    assert line.startswith("retinaperf: warning: evaluate: 13 detection(s) in ")
    assert "(1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009 and 3 more)" in line


def test_cli_evaluate_known_categories_only_warns_nothing(cli, files):
    _, gt_path, dets_path = files
    status, _, err = cli("evaluate", "--annotations", str(gt_path), "--detections", str(dets_path))
    assert status == 0 and err == ""


def bad_detections(case: Case):
    """(name, content of the detections file, what the message must name)."""
    good = case.detections[0]
    no_bbox = {k: v for k, v in good.items() if k != "bbox"}
    no_score = {k: v for k, v in good.items() if k != "score"}
    stranger = {**good, "image_id": 999_999}
    return [
        ("stranger", json.dumps([*case.detections, stranger]), ["999999"]),
        ("malformed", '[{"image_id": 1, ', []),
        ("not a list", json.dumps({"annotations": case.detections}), ["list"]),
        ("no bbox", json.dumps([good, no_bbox]), ["entry 1", "bbox"]),
        ("no score", json.dumps([no_score, good]), ["entry 0", "score"]),
        ("string score", json.dumps([{**good, "score": "0.5"}]), ["entry 0", "score"]),
        ("short bbox", json.dumps([{**good, "bbox": [1, 2, 3]}]), ["entry 0", "bbox"]),
        ("nan bbox", json.dumps([{**good, "bbox": [1, 2, float("nan"), 4]}]), ["entry 0"]),
        ("huge bbox", json.dumps([{**good, "bbox": [1, 2, 10**400, 4]}]), ["entry 0"]),
        ("not utf-8", b"\xff\xfe\x00garbage", []),
    ]


@pytest.mark.parametrize("kind", [b[0] for b in bad_detections(random_case(12))])
def test_cli_evaluate_bad_detections(cli, files, kind):
    case, gt_path, dets_path = files
    _, content, names = next(b for b in bad_detections(case) if b[0] == kind)
    if isinstance(content, bytes):
        dets_path.write_bytes(content)
    else:
        dets_path.write_text(content)
    status, out, err = cli(
        "evaluate", "--annotations", str(gt_path), "--detections", str(dets_path)
    )
    assert_one_line_error(status, out, err, [str(dets_path), *names])
    with pytest.raises(UserError):
        evaluate_files(gt_path, dets_path)


def test_cli_evaluate_missing_detections_file(cli, files, tmp_path):
    _, gt_path, _ = files
    missing = tmp_path / "nowhere" / "dets.json"
    status, out, err = cli("evaluate", "--annotations", str(gt_path), "--detections", str(missing))
    assert_one_line_error(status, out, err, [str(missing)])


@pytest.mark.parametrize("content", [None, "{not json", "[]", '{"images": []}'])
def test_cli_evaluate_bad_annotations_file(cli, files, tmp_path, content):
    _, _, dets_path = files
    gt_path = tmp_path / "instances_missing.json"
    if content is not None:
        gt_path.write_text(content)
    status, out, err = cli(
        "evaluate", "--annotations", str(gt_path), "--detections", str(dets_path)
    )
    assert_one_line_error(status, out, err, [str(gt_path)])
    assert err.startswith("retinaperf: error: evaluate: ")  # the command's, not the run's "data:"


def assert_one_line_error(status: int, out: str, err: str, names: list[str]) -> None:
    assert status == 1
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("retinaperf: error: ")
    for name in names:
        assert name in lines[0], (name, lines[0])
