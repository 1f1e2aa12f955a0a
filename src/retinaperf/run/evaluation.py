"""One evaluation of the model over the validation loader: inference in the run's precision,
detections to the evaluator, COCO's stats back (on every rank; scored on the main one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from tqdm import tqdm

from retinaperf.data.coco import check_batch
from retinaperf.measure.scoring import CocoEvaluator


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
