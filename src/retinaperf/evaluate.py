"""COCO bbox evaluation: reset / add detections / score, the same on one rank or many.

Scoring is faster-coco-eval's C++ port of pycocotools' COCOeval (the tests hold it to
pycocotools on the cases that matter: crowd boxes, images without boxes or detections, more than
100 detections per image, categories without ground truth).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from faster_coco_eval import COCO, COCOeval_faster
from tqdm import tqdm

from .data import check_batch, read_annotations
from .distributed import DistEnv
from .errors import UserError

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


def _quiet(*_args: object) -> None:
    """faster-coco-eval reports progress through a print function; we keep the console clean."""


def load_ground_truth(annotations: dict) -> COCO:
    gt = COCO(print_function=_quiet)
    gt.dataset = annotations
    gt.createIndex()
    return gt


def score(gt: COCO, detections: list[dict]) -> dict[str, float]:
    """The 12 COCO bbox stats of `detections` (COCO result format, xywh boxes) against `gt`."""
    # loadRes writes ids and areas into the dicts it gets: hand it copies.
    results = gt.loadRes([dict(d) for d in detections])
    evaluator = COCOeval_faster(gt, results, iouType="bbox", print_function=_quiet)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = evaluator.stats[:12]
    return {name: float(value) for name, value in zip(STAT_NAMES, stats, strict=True)}


class CocoEvaluator:
    """reset / add / score for one evaluation pass, the same on one rank or many.

    Each rank adds the detections of its own images; `score` gathers them on rank 0, which holds
    the ground truth and scores every image once, and hands the stats to every rank.
    """

    def __init__(self, gt: COCO | None, env: DistEnv) -> None:
        if env.is_main and gt is None:
            raise ValueError("rank 0 scores, so it needs the ground truth")
        self.gt = gt
        self.env = env
        self.detections: list[dict] = []

    def reset(self) -> None:
        self.detections = []

    def add(self, image_ids: list[int], outputs: list[dict[str, torch.Tensor]]) -> None:
        """Model outputs (xyxy boxes in original image pixels) of the images `image_ids`."""
        for image_id, output in zip(image_ids, outputs, strict=True):
            boxes = output["boxes"].float().cpu()  # waits for the device
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            scores = output["scores"].float().cpu().tolist()
            labels = output["labels"].cpu().tolist()
            self.detections.extend(
                {"image_id": image_id, "category_id": label, "bbox": box, "score": s}
                for box, s, label in zip(xywh, scores, labels, strict=True)
            )

    def score(self) -> tuple[dict[str, float], int]:
        """The 12 stats over every rank's detections, and how many detections there were."""
        gathered = self.env.gather(self.detections)
        result = None
        if self.env.is_main:
            everything = [d for part in gathered for d in part]
            result = (score(self.gt, everything), len(everything))
        return self.env.broadcast(result)


@torch.inference_mode()
def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable,
    evaluator: CocoEvaluator,
    autocast: Callable[[], AbstractContextManager],
    show_progress: bool,
) -> tuple[dict[str, float], int]:
    """Inference over this rank's share of the validation set, then the 12 stats of every image
    (and the number of detections); every rank returns the same."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not show_progress):
        images, targets = check_batch(batch)
        images = [image.to(evaluator.env.device, non_blocking=True) for image in images]
        with autocast():
            outputs = model(images)
        evaluator.add([t["image_id"] for t in targets], outputs)
    model.train(was_training)
    return evaluator.score()


def evaluate_files(annotations_path: Path, detections_path: Path) -> dict[str, float]:
    """`retinaperf evaluate`: score a COCO results file against an instances file."""
    gt = load_ground_truth(read_annotations(Path(annotations_path)))
    detections = _read_detections(Path(detections_path))
    known = set(gt.getImgIds())
    strangers = [d["image_id"] for d in detections if d["image_id"] not in known]
    if strangers:
        raise UserError(
            f"evaluate: {len(strangers)} detection(s) in {detections_path} are for images not in "
            f"{annotations_path}, e.g. image_id {strangers[0]}: score against the matching "
            "annotation file"
        )
    return score(gt, detections)


def _read_detections(path: Path) -> list[dict]:
    try:
        with open(path, "rb") as f:
            detections = json.load(f)
    except FileNotFoundError:
        raise UserError(f"evaluate: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"evaluate: {path} is not valid JSON ({err})") from None
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
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return (
        isinstance(d, dict)
        and isinstance(d.get("image_id"), int)
        and isinstance(d.get("category_id"), int)
        and isinstance(d.get("bbox"), list)
        and len(d["bbox"]) == 4
        and all(number(v) for v in d["bbox"])
        and number(d.get("score"))
    )
