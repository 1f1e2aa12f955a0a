"""COCO bbox evaluation: reset / add detections / score, the same on one rank or many.

Detections live as numpy arrays from the device to the score: `add` copies each batch to the
host in one transfer, ranks exchange one array each, and rank 0 scores the concatenation. The
array is pycocotools' result-array layout (`loadNumpyAnnotations`): one float64 row per detection,

    image_id, x, y, w, h, score, category_id        (xywh in original image pixels)

Scoring is faster-coco-eval's C++ port of pycocotools' COCOeval (the tests hold it to pycocotools
on the cases that matter: crowd boxes, images without boxes or detections, more than 100
detections per image, categories without ground truth).
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

from retinaperf import files
from retinaperf.data.coco import read_annotations
from retinaperf.distributed import DistEnv, synchronize
from retinaperf.errors import UserError

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

# Columns of a detections array.
IMAGE_ID, X, Y, W, H, SCORE, CATEGORY_ID = range(7)
COLUMNS = 7


def _quiet(*_args: object) -> None:
    """faster-coco-eval reports progress through a print function; we keep the console clean."""


def load_ground_truth(annotations: dict) -> COCO:
    gt = COCO(print_function=_quiet)
    gt.dataset = annotations
    gt.createIndex()
    return gt


def empty_detections() -> np.ndarray:
    return np.zeros((0, COLUMNS), dtype=np.float64)


def detections_to_array(detections: Iterable[Mapping]) -> np.ndarray:
    """COCO result dicts (image_id, category_id, bbox [x, y, w, h], score) as a detections array.

    float64 holds every coordinate and score a JSON file or a float32 model output can give, and
    integer ids below 2**53, exactly."""
    rows = [(d["image_id"], *d["bbox"], d["score"], d["category_id"]) for d in detections]
    return np.array(rows, dtype=np.float64).reshape(-1, COLUMNS)


def score(gt: COCO, detections: np.ndarray) -> dict[str, float]:
    """The 12 COCO bbox stats of a detections array (see the module docstring) against `gt`."""
    with _gc_paused():
        results = _load_results(gt, detections)
        evaluator = COCOeval_faster(gt, results, iouType="bbox", print_function=_quiet)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats = [float(value) for value in evaluator.stats[:12]]
        # Freed now (reference counting), not tracked by the collector once it is back on.
        del results, evaluator
    return dict(zip(STAT_NAMES, stats, strict=True))


def _load_results(gt: COCO, detections: np.ndarray) -> COCO:
    """What `gt.loadRes(detections)` gives for bbox results, from the array directly.

    loadRes converts the array one row at a time through numpy scalars and adds a polygon per
    detection that bbox scoring never reads; building the dicts from `tolist()` rows takes half
    the time. Every field the scoring reads is as loadRes (and pycocotools') sets it:
    ids 1.. in array order (equal scores rank in that order), area w * h in float64, iscrowd 0,
    integer image and category ids.
    """
    if detections.ndim != 2 or detections.shape[1] != COLUMNS:
        raise ValueError(f"detections must be an [N, {COLUMNS}] array, not {detections.shape}")
    known = np.asarray(gt.getImgIds(), dtype=np.float64)
    strangers = np.setdiff1d(detections[:, IMAGE_ID], known)
    if strangers.size:
        raise ValueError(
            f"{strangers.size} image id(s) of the detections are not in the ground truth, "
            f"e.g. {strangers[0]:.15g}"
        )
    annotations = [
        {
            "id": index,
            "image_id": int(row[IMAGE_ID]),
            "category_id": int(row[CATEGORY_ID]),
            "bbox": row[X : H + 1],
            "score": row[SCORE],
            "area": row[W] * row[H],
            "iscrowd": 0,
        }
        for index, row in enumerate(detections.tolist(), start=1)
    ]
    results = COCO(print_function=_quiet)
    results.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset.get("categories", [])),
        "annotations": annotations,
    }
    results.createIndex()
    return results


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Scoring allocates millions of dicts and lists that live until it ends; each allocation
    burst sets off a full collection that walks all of them (and the training process's objects)
    and frees nothing, which took a third of the scoring time. Nothing here makes cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class CocoEvaluator:
    """reset / add / score for one evaluation pass, the same on one rank or many.

    Each rank adds the detections of its own images; `score` gathers one detections array per
    rank on rank 0, which holds the ground truth and scores every image once, and hands the stats
    to every rank.
    """

    def __init__(self, gt: COCO | None, env: DistEnv) -> None:
        if env.is_main and gt is None:
            raise ValueError("rank 0 scores, so it needs the ground truth")
        self.gt = gt
        self.env = env
        # Per batch: the image id of each detection, and [n, 6] float32 host rows (x, y, w, h,
        # score, category_id), which asynchronous copies from `_in_flight` may still be filling.
        self._batches: list[tuple[np.ndarray, torch.Tensor]] = []
        self._in_flight: torch.device | None = None

    def reset(self) -> None:
        self._batches = []
        self._in_flight = None

    def add(self, image_ids: Sequence[int], outputs: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Model outputs (xyxy boxes in original image pixels) of the images `image_ids`.

        The batch leaves the device in one copy: packed there into [n, 6] float32 rows. On CUDA
        the copy is asynchronous into pinned memory, so adding never waits for the device; `score`
        waits once for all of them. Tensor shapes are known on the host: counting is free.
        """
        if len(image_ids) != len(outputs):
            raise ValueError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
        counts = [len(output["scores"]) for output in outputs]
        if sum(counts) == 0:
            return
        boxes = torch.cat([output["boxes"] for output in outputs]).float()
        scores = torch.cat([output["scores"] for output in outputs]).float()
        labels = torch.cat([output["labels"] for output in outputs])
        # xywh computed in float32 as before (and as torchvision's reference evaluation does),
        # so the numbers are those the per-image dicts held. Labels are category ids (< 2**24),
        # exact in float32; float64 is no option on the device (MPS lacks it).
        packed = torch.cat(
            [boxes[:, :2], boxes[:, 2:] - boxes[:, :2], scores[:, None], labels[:, None].float()],
            dim=1,
        )
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            self._in_flight = packed.device
        else:
            host = packed.cpu()
        ids = np.repeat(np.asarray(image_ids, dtype=np.float64), counts)
        self._batches.append((ids, host))

    def detections(self) -> np.ndarray:
        """This rank's detections so far, as one [N, 7] float64 detections array."""
        if self._in_flight is not None:
            synchronize(self._in_flight)  # the asynchronous copies have landed
            self._in_flight = None
        if not self._batches:
            return empty_detections()
        ids = np.concatenate([ids for ids, _ in self._batches])
        rows = np.concatenate([host.numpy() for _, host in self._batches])
        return np.concatenate([ids[:, None], rows.astype(np.float64)], axis=1)

    def score(self) -> tuple[dict[str, float], int]:
        """The 12 stats over every rank's detections, and how many detections there were."""
        # One array per rank: pickled as one buffer by gather_object.
        gathered = self.env.gather(self.detections())
        result = None
        if gathered is not None:  # rank 0
            everything = np.concatenate(gathered)
            result = (score(self.gt, everything), len(everything))
        return self.env.broadcast(result)


def evaluate_files(annotations_path: Path, detections_path: Path) -> dict[str, float]:
    """`retinaperf evaluate`: score a COCO results file against an instances file."""
    gt = load_ground_truth(read_annotations(Path(annotations_path), "evaluate"))
    detections = _read_detections(Path(detections_path))
    known = set(gt.getImgIds())
    strangers = [d["image_id"] for d in detections if d["image_id"] not in known]
    if strangers:
        raise UserError(
            f"evaluate: {len(strangers)} detection(s) in {detections_path} are for images not in "
            f"{annotations_path}, e.g. image_id {strangers[0]}: score against the matching "
            "annotation file"
        )
    # Detections of categories the ground truth does not list are never scored (COCOeval
    # evaluates the ground truth's categories only): leaving them out changes nothing, and keeps
    # ids too large for a float out of the array. A file of such ids is usually a label mapping
    # gone wrong (contiguous 1..80 for COCO's 1..90), so the user is told.
    categories = set(gt.getCatIds())
    unknown = Counter(d["category_id"] for d in detections if d["category_id"] not in categories)
    if unknown:
        warnings.warn(_unknown_categories(unknown, detections_path, annotations_path), stacklevel=2)
    scored = (d for d in detections if d["category_id"] in categories)
    return score(gt, detections_to_array(scored))


UNKNOWN_IDS_SHOWN = 10


def _unknown_categories(unknown: Counter, detections_path: Path, annotations_path: Path) -> str:
    """One line: how many detections have a category id the ground truth lacks, and which ids."""
    ids = sorted(unknown)
    shown = ", ".join(map(str, ids[:UNKNOWN_IDS_SHOWN]))
    more = f" and {len(ids) - UNKNOWN_IDS_SHOWN} more" if len(ids) > UNKNOWN_IDS_SHOWN else ""
    return (
        f"evaluate: {sum(unknown.values())} detection(s) in {detections_path} have a category_id "
        f"that {annotations_path} does not list ({shown}{more}): they count for no category and "
        "are left out of the scores; check the detections' label mapping"
    )


def _read_detections(path: Path) -> list[dict]:
    detections = files.read_json(path, "evaluate")
    if not isinstance(detections, list):
        raise UserError(f"evaluate: {path} must hold a JSON list of detections")
    for i, d in enumerate(detections):
        if not _is_detection(d):
            raise UserError(
                f"evaluate: {path}: entry {i} is not a detection; each needs image_id (int), "
                "category_id (int), bbox ([x, y, w, h] numbers) and score (number)"
            )
    return detections


def _is_detection(d: object) -> bool:
    def number(v: object) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        try:
            return math.isfinite(v)
        except OverflowError:  # an integer beyond float's range
            return False

    return (
        isinstance(d, dict)
        and isinstance(d.get("image_id"), int)
        and isinstance(d.get("category_id"), int)
        and isinstance(d.get("bbox"), list)
        and len(d["bbox"]) == 4
        and all(number(v) for v in d["bbox"])
        and number(d.get("score"))
    )
