"""Evaluate a saved model on a dataset's val split, on as many ranks as torchrun starts.

Used by test_distributed.py: `torchrun --nproc-per-node N tests/dist_eval.py DATA MODEL OUT`.
Rank 0 writes the 12 stats and the number of detections to OUT.
"""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from retinaperf import data, distributed, evaluate
from retinaperf.config import ModelConfig
from retinaperf.model import build_model


def main(root: Path, checkpoint: Path, out: Path) -> None:
    env = distributed.setup("cpu", timeout_s=120)
    try:
        records, annotations = data.load_split(root, "val", drop_empty=False)
        gt = evaluate.load_ground_truth(annotations) if env.is_main else None
        model = build_model(ModelConfig(min_size=64, max_size=86), None)
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        dataset = data.CocoDetection(root, "val", records, hflip_prob=0.0, seed=0)
        batches = data.eval_batches(records, 4, env.rank, env.world_size)
        loader = data.make_loader(dataset, batches, num_workers=0, pin_memory=False)
        evaluator = evaluate.CocoEvaluator(gt, env)
        stats, count = evaluate.evaluate_model(model, loader, evaluator, nullcontext, False)
        if env.is_main:
            out.write_text(json.dumps({"stats": stats, "detections": count}))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
