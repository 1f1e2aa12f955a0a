"""Evaluate a saved model on a dataset's val split, on as many ranks as torchrun starts.

Used by test_distributed.py: `torchrun --nproc-per-node N tests/dist_eval.py DATA MODEL OUT`.
Rank 0 writes the 12 stats and the number of detections to OUT.
"""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from retinaperf import distributed
from retinaperf.config import ModelConfig
from retinaperf.data import coco, sampling
from retinaperf.measure import scoring
from retinaperf.model.network import build_model
from retinaperf.run import evaluation


def main(root: Path, checkpoint: Path, out: Path) -> None:
    env = distributed.setup(torch.device("cpu"), timeout_s=120)
    try:
        records, annotations = coco.load_split(root, "val", drop_empty=False)
        gt = scoring.load_ground_truth(annotations) if env.is_main else None
        model = build_model(ModelConfig(min_size=64, max_size=86), None)
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        dataset = coco.CocoDetection(root, "val", records, hflip_prob=0.0, seed=0)
        batches = sampling.eval_batches(records, 4, env.rank, env.world_size)
        loader = coco.make_loader(dataset, batches, num_workers=0, pin_memory=False)
        evaluator = scoring.CocoEvaluator(gt, env)
        stats, count = evaluation.evaluate_model(model, loader, evaluator, nullcontext, False)
        if env.is_main:
            out.write_text(json.dumps({"stats": stats, "detections": count}))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
