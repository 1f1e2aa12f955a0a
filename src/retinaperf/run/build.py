"""Building a run's parts from its configuration: the data and loaders, the backbone weights, the
FLOP count. Work that writes a node's cache (generating the dataset, indexing COCO, downloading
weights) runs on one process per node first; the others wait for it, then read what it wrote.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from retinaperf import distributed, torch_compat
from retinaperf.config import ModelConfig, RunConfig
from retinaperf.data import coco, sampling, synth
from retinaperf.distributed import DistEnv
from retinaperf.errors import OutOfMemory, UserError
from retinaperf.measure import scoring, utilization
from retinaperf.model import weights
from retinaperf.model.precision import Precision
from retinaperf.report import results
from retinaperf.run import signals, step


@dataclass
class Loaders:
    """The data side of a run, on this rank."""

    train_loader: torch.utils.data.DataLoader
    train_sampler: sampling.GroupedBatchSampler
    val_loader: torch.utils.data.DataLoader
    evaluator: scoring.CocoEvaluator
    facts: dict
    """What the results say of the data: its label and sizes."""

    def shut_down(self) -> None:
        """Stop both loaders' workers now (they ignore SIGTERM: see torch_compat)."""
        torch_compat.shut_down_workers(self.train_loader)
        torch_compat.shut_down_workers(self.val_loader)


def check_topology(config: RunConfig, env: DistEnv) -> None:
    expected = (config.nodes, config.devices_per_node)
    actual = (env.nodes, env.local_world_size)
    if any(want and want != got for want, got in zip(expected, actual, strict=True)):
        raise UserError(
            f"preset {config.preset} is for {expected[0]} node(s) x {expected[1]} device(s), but "
            f"this job has {actual[0]} x {actual[1]} process(es): start it with torchrun "
            f"--nnodes {expected[0]} --nproc-per-node {expected[1]}, or set "
            f"nodes={actual[0]} devices_per_node={actual[1]} to run the preset's recipe as is"
        )


def cache_dir(config: RunConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("RETINAPERF_CACHE", Path.home() / ".cache" / "retinaperf"))


def build_data(config: RunConfig, env: DistEnv, cache: Path) -> Loaders:
    """Index both splits (with the workload's filtering, `data.coco`) and build this rank's
    loaders."""
    root, label = dataset_root(config, env, cache)
    coco.check_root(root)
    train_records = train_index(root, env, cache)
    # Rank 0 scores the evaluations: it reads val2017 whole, once, for its records and the ground
    # truth. The others need the records alone; the file is small, so they read it uncached.
    if env.is_main:
        val_records, val_annotations = coco.load_split(root, "val", drop_empty=False)
        gt = scoring.load_ground_truth(val_annotations)
    else:
        val_records = coco.index_split(root, "val", drop_empty=False, cache_dir=None)
        gt = None
    train_sampler = sampling.GroupedBatchSampler(
        sampling.aspect_ratio_groups(train_records, config.data.aspect_ratio_group_factor),
        config.train.batch_size,
        config.train.seed,
        env.rank,
        env.world_size,
    )
    val_batches = sampling.eval_batches(
        val_records, config.eval.eval_batch_size, env.rank, env.world_size
    )
    train_set = coco.CocoDetection(
        root, "train", train_records, config.data.hflip_prob, config.train.seed
    )
    val_set = coco.CocoDetection(root, "val", val_records, hflip_prob=0.0, seed=0)
    workers, pin = config.data.num_workers, env.device.type != "cpu"
    check_workers(workers, env)
    return Loaders(
        train_loader=coco.make_loader(
            train_set, train_sampler, workers, pin, signals.ignore_in_worker
        ),
        train_sampler=train_sampler,
        val_loader=coco.make_loader(val_set, val_batches, workers, pin, signals.ignore_in_worker),
        evaluator=scoring.CocoEvaluator(gt, env),
        facts={
            "dataset": label,
            "train_images": len(train_records),
            "val_images": len(val_records),
        },
    )


# PyTorch's warning of each loader whose workers outnumber the CPUs (torch 2.14's words).
TORCH_WORKERS_WARNING = r"This DataLoader will create \d+ worker processes in total"


def check_workers(num_workers: int, env: DistEnv) -> None:
    """Loader workers (per loader, per rank) beyond the CPUs this process may use: one line of
    our own naming the key to set, once per node, in place of PyTorch's paragraph, which names
    none and would come once per loader."""
    cpus = distributed.cpu_count()
    if num_workers <= cpus:
        return
    # For this process's life: DataLoader warns again when its workers start.
    warnings.filterwarnings("ignore", message=TORCH_WORKERS_WARNING, category=UserWarning)
    if env.local_rank == 0:
        warnings.warn(
            f"num_workers={num_workers}: more loader worker processes than the {cpus} CPUs "
            f"this process may use, which slows data loading or stalls it: set --set "
            f"num_workers={cpus} or fewer",
            stacklevel=1,
        )


def train_index(root: Path, env: DistEnv, cache: Path) -> list[coco.ImageRecord]:
    """train2017's records, from its index (see `coco_index`). As for the dataset and the
    weights, one process per node reads the annotation file, or finds its index in the cache, and
    scans the image folder; the others load the index it cached."""
    return env.node_first(
        lambda: coco.index_split(root, "train", drop_empty=True, cache_dir=cache),
        lambda: coco.index_split(
            root, "train", drop_empty=True, cache_dir=cache, check_files=False
        ),
    )


def dataset_root(config: RunConfig, env: DistEnv, cache: Path) -> tuple[Path, str]:
    """The COCO2017 root to train on and its label: the given folder, or the generated dataset
    (made on first use, once per node, on every core it has)."""
    if config.data.data_dir:
        return Path(config.data.data_dir), config.data.data_dir
    spec = synth.SynthSpec(
        seed=0,
        train_images=config.data.synth_train_images,
        val_images=config.data.synth_val_images,
        image_size=config.data.synth_image_size,
        profile=config.data.synth_profile,
    )
    root = env.node_first(
        lambda: synth.cached(spec, cache, workers=synth.default_workers()),
        lambda: synth.cached(spec, cache),
    )
    size = "long side" if spec.profile == "coco" else "short side"
    return root, (
        f"generated, profile {spec.profile} ({spec.train_images}+{spec.val_images} images, "
        f"{size} {spec.image_size} px)"
    )


def load_weights(config: RunConfig, env: DistEnv, cache: Path) -> weights.LoadedWeights | None:
    """The backbone's weights: downloaded once per node, then read by every rank."""
    return env.node_first(lambda: weights.load(config.model.backbone_weights, cache))


def backbone_init(config: RunConfig, backbone: weights.LoadedWeights | None) -> str:
    """How the backbone started, in words for the results."""
    if backbone is not None:
        return results.imagenet_init(backbone.path)
    if config.model.random_backbone == "random":
        return results.RANDOM_IN_STRUCTURE
    return results.RANDOM_INIT


def count_flops(
    model: nn.Module, loaders: Loaders, env: DistEnv, trained_in: Precision, cfg: ModelConfig
) -> tuple[float | None, OutOfMemory | None]:
    """Training FLOPs per image on the run's first batch (see utilization.py), once per run, on
    rank 0 (None elsewhere). The count runs a step's forward and backward on that batch: where
    it runs out of memory, the count is None and the error, to be raised as the run's failure."""
    if not env.is_main:
        return None, None
    dataset = loaders.train_loader.dataset
    keys = next(iter(loaders.train_sampler))  # epoch 0's first batch: the sampler is pure
    images, targets = coco.check_batch([dataset[key] for key in keys])
    images, targets = coco.to_device(images, targets, env.device)
    try:
        return utilization.train_flops_per_image(model, images, targets, trained_in.autocast), None
    except Exception as err:
        where = "counting the FLOPs of the first batch (a training step's forward and backward)"
        oom = step.out_of_memory(err, env.device, where, images, cfg, trained_in)
        if oom is None:
            raise
    return None, oom  # outside the handler: its frames (and tensors) are gone
