"""One evaluation of the model over the validation loader: inference in the run's precision,
detections to the evaluator, COCO's stats back (on every rank; scored on the main one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from tqdm import tqdm

from retinaperf.data.coco import check_batch
from retinaperf.measure.scoring import CocoEvaluator


class Abandoned(Exception):
    """The evaluation stopped before its last batch: the run was asked to stop (a signal), and
    the evaluation is run again when the run goes on."""


def never(batches_done: int) -> bool:
    return False


@torch.inference_mode()
def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable,
    evaluator: CocoEvaluator,
    autocast: Callable[[], AbstractContextManager],
    show_progress: bool,
    should_stop: Callable[[int], bool] = never,
) -> tuple[dict[str, float], int]:
    """Inference over this rank's share of the validation set, then the 12 stats of every image
    (and the number of detections); every rank returns the same. `should_stop(batches_done)`
    is asked after each batch: True abandons the evaluation (raises `Abandoned`), which on
    COCO2017 can take longer than a scheduler waits between its SIGTERM and its SIGKILL."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    bar = tqdm(loader, desc="eval", unit="batch", disable=not show_progress)
    try:
        with bar:  # closed when abandoned too, so that what follows starts on a line of its own
            for done, batch in enumerate(bar, 1):
                images, targets = check_batch(batch)
                images = [image.to(evaluator.env.device, non_blocking=True) for image in images]
                with autocast():
                    outputs = model(images)
                evaluator.add([t["image_id"] for t in targets], outputs)
                if should_stop(done):
                    raise Abandoned(f"after {done} batches")
    finally:
        model.train(was_training)
    return evaluator.score()
