"""Training: the step, the loop around it, and the run that builds both and writes the results.

Read top to bottom: `run` sets up (data, weights, model, optimizer), `_train` loops over epochs
and steps, calling `train_step` inside the meter's core window and evaluating after every epoch;
`_finish` reduces the metrics and writes the run directory.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import (
    data,
    distributed,
    environment,
    evaluate,
    metrics,
    monitor,
    plots,
    precision,
    report,
    synth,
    utilization,
    weights,
)
from .config import RunConfig, TrainConfig
from .distributed import DistEnv
from .errors import UserError
from .model import build_model
from .monitor import Monitor
from .precision import Precision
from .profiling import StepProfiler, parse_step_window


def lr_factor(
    step_in_epoch: int,
    epoch: int,
    warmup_iters: int,
    warmup_factor: float,
    lr_steps: tuple[int, ...],
    gamma: float,
) -> float:
    """Multiplier of the base lr: linear warm-up over the first steps of epoch 0 (from
    warmup_factor to 1), then x gamma at the start of each epoch in lr_steps."""
    factor = gamma ** sum(epoch >= milestone for milestone in lr_steps)
    if epoch == 0 and step_in_epoch < warmup_iters:
        alpha = step_in_epoch / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def train_step(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    clip_grad_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One optimizer step: forward, loss, backward, update. Returns the loss parts (on device)."""
    with precision.autocast():
        losses = model(images, targets)  # {"classification": [], "bbox_regression": []}
    loss = sum(losses.values())
    precision.backward_and_step(loss, optimizer, clip_grad_norm)
    return {name: value.detach() for name, value in losses.items()}


def use_channels_last(setting: str, device: torch.device) -> bool:
    """`channels_last` resolved: `auto` is on for CUDA, whose convolutions (cuDNN, tensor cores)
    run fastest in NHWC, and off elsewhere."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The reference's SGD, updating every tensor in one fused kernel where the device has one
    (which also takes the loss scaler's overflow check without a host synchronisation), else with
    multi-tensor (foreach) kernels."""
    options = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.SGD(params, **options, fused=True)
    except RuntimeError:  # no fused SGD for this device type
        return torch.optim.SGD(params, **options, foreach=True)


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    defaults = optimizer.defaults
    return f"SGD ({'fused' if defaults.get('fused') else 'foreach'})"


def _wrap_ddp(model: nn.Module, env: DistEnv) -> tuple[nn.Module, dict | None]:
    """The model DDP-wrapped when there are several ranks, and how it was wrapped."""
    if env.world_size == 1:
        return model, None
    options = {
        # Batch norm that trains keeps running statistics, which rank 0 must hand to every rank;
        # frozen batch norm (the real recipe) keeps none, and the broadcast is a per-step cost.
        "broadcast_buffers": any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ),
        # Gradients live in DDP's all-reduce buckets: no copy in and out of them each step.
        "gradient_as_bucket_view": True,
    }
    device_ids = [env.device] if env.device.type != "cpu" else None
    return DistributedDataParallel(model, device_ids=device_ids, **options), options


@dataclass
class Loaders:
    """The data side of a run, on this rank."""

    train_loader: torch.utils.data.DataLoader
    train_sampler: data.GroupedBatchSampler
    val_loader: torch.utils.data.DataLoader
    evaluator: evaluate.CocoEvaluator
    facts: dict


@dataclass
class Setup:
    """Everything the loop needs, built once by `run`."""

    config: RunConfig
    env: DistEnv
    precision: Precision
    model: nn.Module  # wrapped in DDP when world_size > 1
    inference_model: nn.Module
    optimizer: torch.optim.Optimizer
    loaders: Loaders
    meter: metrics.Meter
    monitor: Monitor | None  # local rank 0 of each node only
    profiler: StepProfiler
    flops_per_image: float | None  # rank 0 only
    events: report.EventLog
    run_dir: Path
    facts: dict  # dataset and weight facts that go into the results


def run(config: RunConfig, command_start: float) -> dict:
    """Run the benchmark; returns the results written to `<run_dir>/results.json` (on rank 0)."""
    env = distributed.setup(config.device, config.dist_timeout)
    events = report.EventLog(None, command_start)
    setup = None
    try:
        setup = _set_up(config, env, command_start)
        events = setup.events
        _train(setup)
        return _finish(setup)
    except BaseException as err:
        events.emit("run_failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if setup is not None:
            setup.profiler.close()  # writes what a window cut short recorded
            if setup.monitor is not None:
                setup.monitor.stop()  # its thread must not outlive the run
        events.close()
        distributed.teardown()


def _set_up(config: RunConfig, env: DistEnv, command_start: float) -> Setup:
    _check_topology(config, env)
    run_dir = _run_dir(config, env)  # checked now, created once the set-up has succeeded
    if config.tensorboard:
        report.require_tensorboard()
    # Rank 0 decides, so that every rank trains in the same precision.
    chosen, reason = env.broadcast(precision.choose(config.train.precision, env.device))
    trained_in = Precision(chosen, env.device, reason)
    torch.manual_seed(config.train.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    # cuDNN times its algorithms for each new input shape once and keeps the fastest; not when
    # the run asks for reproducible kernels.
    torch.backends.cudnn.benchmark = env.device.type == "cuda" and not config.train.deterministic
    cache_dir = _cache_dir(config)
    loaders = _build_data(config, env, cache_dir)
    backbone = _load_weights(config, env, cache_dir)
    model = build_model(config.model, backbone.state_dict if backbone else None).to(env.device)
    channels_last = use_channels_last(config.model.channels_last, env.device)
    if channels_last:
        model.use_channels_last()
    model = trained_in.prepare(model)
    optimizer = build_optimizer(trained_in.optimizer_params(model), config.train, env.device)
    # Counted before compiling (compiled kernels bypass the FLOP counter) and before DDP wraps the
    # model (so that no gradient hook fires).
    flops = _count_flops(model, loaders, env, trained_in) if env.is_main else None
    if config.model.compile:
        model.compile_parts()
    trained, ddp = _wrap_ddp(model, env)
    facts = {
        **loaders.facts,
        "backbone_weights": config.model.backbone_weights,
        "backbone_sha256": backbone.sha256 if backbone else None,
        "backbone_init": _backbone_init(config, backbone),
        "throughput_only": config.throughput_only,
        "precision_requested": config.train.precision,
        "implementation": {
            "loss": config.model.loss,
            "postprocess": config.model.postprocess,
            "channels_last": channels_last,
            "compile": config.model.compile,
            "optimizer": _optimizer_kind(optimizer),
            "ddp": ddp,
        },
        **trained_in.record(),  # read last: every math flag of the run is set by now
    }
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    events = report.EventLog(None, command_start)  # other ranks write no log
    if env.is_main:
        tensorboard = config.tensorboard
        sinks = (report.TensorBoardSink(run_dir / "tensorboard"),) if tensorboard else ()
        events = report.EventLog(run_dir / report.EVENTS, command_start, sinks)
    events.emit("run_start", config=config.to_dict(), world_size=env.world_size, **facts)
    return Setup(
        config=config,
        env=env,
        precision=trained_in,
        model=trained,
        inference_model=model,
        optimizer=optimizer,
        loaders=loaders,
        meter=metrics.Meter(
            command_start, env.device, timing_warmup_steps=config.train.timing_warmup_steps
        ),
        monitor=(
            Monitor(config.monitor_interval, command_start)
            if env.local_rank == 0 and config.monitor_interval > 0
            else None
        ),
        profiler=StepProfiler(
            parse_step_window(config.train.profile_steps),
            run_dir,
            env.device,
            enabled=env.is_main,
            events=events,
        ),
        flops_per_image=flops,
        events=events,
        run_dir=run_dir,
        facts=facts,
    )


def _build_data(config: RunConfig, env: DistEnv, cache_dir: Path) -> Loaders:
    """Index both splits (with SPEC §1's filtering) and build this rank's loaders."""
    root, label = _dataset_root(config, env, cache_dir)
    data.check_root(root)
    train_records, _ = data.load_split(root, "train", drop_empty=True)
    val_records, val_annotations = data.load_split(root, "val", drop_empty=False)
    gt = evaluate.load_ground_truth(val_annotations) if env.is_main else None
    train_sampler = data.GroupedBatchSampler(
        data.aspect_ratio_groups(train_records, config.data.aspect_ratio_group_factor),
        config.train.batch_size,
        config.train.seed,
        env.rank,
        env.world_size,
    )
    val_batches = data.eval_batches(
        val_records, config.eval.eval_batch_size, env.rank, env.world_size
    )
    train_set = data.CocoDetection(
        root, "train", train_records, config.data.hflip_prob, config.train.seed
    )
    val_set = data.CocoDetection(root, "val", val_records, hflip_prob=0.0, seed=0)
    workers, pin = config.data.num_workers, env.device.type != "cpu"
    return Loaders(
        train_loader=data.make_loader(train_set, train_sampler, workers, pin),
        train_sampler=train_sampler,
        val_loader=data.make_loader(val_set, val_batches, workers, pin),
        evaluator=evaluate.CocoEvaluator(gt, env),
        facts={
            "dataset": label,
            "train_images": len(train_records),
            "val_images": len(val_records),
        },
    )


def _train(s: Setup) -> None:
    cfg, meter = s.config.train, s.meter
    warmup_iters = min(cfg.warmup_iters, len(s.loaders.train_loader) - 1)
    s.env.barrier()  # every rank is built and ready: training time starts now
    meter.train_started()
    if s.monitor is not None:
        s.monitor.start()
    for epoch in range(cfg.epochs):
        _train_epoch(s, epoch, warmup_iters)
        record = _evaluate(s, epoch)
        reached = cfg.target_map > 0 and record.stats["AP"] >= cfg.target_map
        if reached or (cfg.max_steps and meter.steps >= cfg.max_steps):
            break


def _train_epoch(s: Setup, epoch: int, warmup_iters: int) -> None:
    cfg, meter = s.config.train, s.meter
    s.loaders.train_sampler.set_epoch(epoch)
    s.model.train()
    bar = tqdm(
        total=len(s.loaders.train_loader),
        desc=f"epoch {epoch}",
        unit="step",
        disable=not s.env.is_main,
    )
    with bar:  # closed on error too, so the error starts on a line of its own
        for step_in_epoch, batch in enumerate(s.loaders.train_loader):
            lr = cfg.lr * lr_factor(
                step_in_epoch, epoch, warmup_iters, cfg.warmup_factor, cfg.lr_steps, cfg.lr_gamma
            )
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            images, targets = data.check_batch(batch)
            images, targets = data.to_device(images, targets, s.env.device)
            step = meter.steps + 1
            s.profiler.before_step(step)
            with meter.core_step(len(images)):
                losses = train_step(
                    s.model, images, targets, s.optimizer, s.precision, cfg.clip_grad_norm
                )
            s.profiler.after_step(step)
            bar.update()
            if meter.steps % cfg.log_every == 0:
                _log_step(s, epoch, lr, losses, bar)
            if cfg.max_steps and meter.steps >= cfg.max_steps:
                return


def _log_step(
    s: Setup, epoch: int, lr: float, losses: dict[str, torch.Tensor], progress: tqdm
) -> None:
    names = sorted(losses)
    # The global batch's loss: the mean over ranks of each rank's mean (.item() waits for the GPU)
    totals = s.env.all_reduce([losses[name].item() for name in names], "sum")
    parts = {name: total / s.env.world_size for name, total in zip(names, totals, strict=True)}
    loss = sum(parts.values())
    if not math.isfinite(loss) and not s.precision.scaler.is_enabled():
        raise UserError(
            f"training diverged at step {s.meter.steps}: loss is {loss}; lower lr (now {lr:g})"
        )
    # Every rank trains the same batch size, so the global rate is the local one x world size.
    rate = s.meter.interval_rate() * s.env.world_size
    s.events.emit(
        "step", epoch=epoch, step=s.meter.steps, loss=loss, **parts, lr=lr, images_per_s=rate
    )
    progress.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}", lr=f"{lr:.3g}")


def _evaluate(s: Setup, epoch: int) -> metrics.EvalRecord:
    with s.meter.evaluation():
        stats, detections = evaluate.evaluate_model(
            s.inference_model,
            s.loaders.val_loader,
            s.loaders.evaluator,
            s.precision.autocast,
            s.env.is_main,
        )
    record = s.meter.eval_done(epoch, stats)
    s.events.emit(
        "eval",
        epoch=epoch,
        step=record.step,
        mAP=stats["AP"],
        **stats,
        detections=detections,
        seconds=record.seconds,
    )
    if s.env.is_main:
        tqdm.write(f"epoch {epoch}: mAP {stats['AP']:.4f} (AP50 {stats['AP50']:.4f})")
    return record


def _finish(s: Setup) -> dict:
    cfg, env = s.config, s.env
    # One gather of what only each rank knows: its host, device, memory peak, monitor samples.
    ranks = env.gather(
        {
            "host": environment.hostname(),
            "uuid": metrics.device_uuid(env.device),
            "memory": metrics.memory_peak(env.device),
            "samples": s.monitor.stop() if s.monitor else [],
        }
    )
    summary = metrics.summarize(s.meter, env, cfg.train.target_map)
    if not env.is_main:
        return {}
    samples = [sample for rank in ranks for sample in rank["samples"]]
    monitored = monitor.summarize(samples) if samples else None
    uuids = [rank["uuid"] for rank in ranks]
    driver = metrics.driver_peak(monitored["devices"], uuids) if monitored else None
    memory = metrics.memory([rank["memory"] for rank in ranks], driver)
    device_name = environment.device_name(env.device)
    results = {
        "metrics": {
            **summary,
            **memory,
            **s.facts,
            "epochs": s.meter.evals[-1].epoch + 1,
            "world_size": env.world_size,
            "nodes": env.nodes,
            "devices_per_node": env.local_world_size,
            "local_batch": cfg.train.batch_size,
            "global_batch": cfg.train.batch_size * env.world_size,
            "lr": cfg.train.lr,
            "seed": cfg.train.seed,
            "device_name": device_name,
            **utilization.utilization(
                s.flops_per_image,
                summary["p_core"],
                device_name,
                s.precision.peak_math(),
                env.world_size,
            ),
        },
        "monitor": monitored,
        "config": cfg.to_dict(),
        "environment": environment.capture(env.device, [rank["host"] for rank in ranks]),
        "run_dir": str(s.run_dir),
    }
    if samples:
        report.write_jsonl(s.run_dir / report.MONITOR, samples)
    if cfg.save_model:
        torch.save(s.inference_model.state_dict(), s.run_dir / "model.pt")
    # e2e_time ends here, as results.json is written.
    results["metrics"]["e2e_time"] = time.perf_counter() - s.meter.command_start
    report.write_json_atomic(s.run_dir / report.RESULTS, results)
    s.events.emit("run_end", **{k: v for k, v in results["metrics"].items() if k != "evaluations"})
    report.write_text_atomic(s.run_dir / report.REPORT, report.render_report(results))
    plots.write_plots(
        report.read_events(s.run_dir / report.EVENTS), samples, s.run_dir / report.PLOTS
    )
    return results


def _count_flops(model: nn.Module, loaders: Loaders, env: DistEnv, trained_in: Precision) -> float:
    """Training FLOPs per image on the run's first batch (see utilization.py), once per run."""
    dataset = loaders.train_loader.dataset
    keys = next(iter(loaders.train_sampler))  # epoch 0's first batch: the sampler is pure
    images, targets = data.check_batch([dataset[key] for key in keys])
    images, targets = data.to_device(images, targets, env.device)
    return utilization.train_flops_per_image(model, images, targets, trained_in.autocast)


def _check_topology(config: RunConfig, env: DistEnv) -> None:
    expected = (config.nodes, config.devices_per_node)
    actual = (env.nodes, env.local_world_size)
    if any(want and want != got for want, got in zip(expected, actual, strict=True)):
        raise UserError(
            f"preset {config.preset} is for {expected[0]} node(s) x {expected[1]} device(s), but "
            f"this job has {actual[0]} x {actual[1]} process(es): start it with torchrun "
            f"--nnodes {expected[0]} --nproc-per-node {expected[1]}, or set "
            f"nodes={actual[0]} devices_per_node={actual[1]} to run the preset's recipe as is"
        )


def _cache_dir(config: RunConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("RETINAPERF_CACHE", Path.home() / ".cache" / "retinaperf"))


def _dataset_root(config: RunConfig, env: DistEnv, cache_dir: Path) -> tuple[Path, str]:
    if config.data.data_dir:
        return Path(config.data.data_dir), config.data.data_dir
    spec = synth.SynthSpec(
        seed=0,
        train_images=config.data.synth_train_images,
        val_images=config.data.synth_val_images,
        image_size=config.data.synth_image_size,
        profile=config.data.synth_profile,
    )
    # One process per node generates (the cache may be node-local), on every core it has; the
    # others wait for it.
    if env.local_rank == 0:
        root = synth.cached(spec, cache_dir, workers=synth.default_workers())
    env.barrier()
    if env.local_rank != 0:
        root = synth.cached(spec, cache_dir)
    size = "long side" if spec.profile == "coco" else "short side"
    return root, (
        f"generated, profile {spec.profile} ({spec.train_images}+{spec.val_images} images, "
        f"{size} {spec.image_size} px)"
    )


def _backbone_init(config: RunConfig, backbone: weights.LoadedWeights | None) -> str:
    """How the backbone started, in words for the results."""
    if backbone is not None:
        return f"ImageNet weights from {backbone.path}"
    if config.model.random_backbone == "random":
        return "random values in the pretrained structure (frozen batch norm, 3 trainable stages)"
    return "random initialisation (batch norm and every layer trainable)"


def _load_weights(config: RunConfig, env: DistEnv, cache_dir: Path) -> weights.LoadedWeights | None:
    # As for the dataset: one download per node, then every rank reads the cached file.
    if env.local_rank == 0:
        loaded = weights.load(config.model.backbone_weights, cache_dir)
    env.barrier()
    if env.local_rank != 0:
        loaded = weights.load(config.model.backbone_weights, cache_dir)
    return loaded


def _run_dir(config: RunConfig, env: DistEnv) -> Path:
    """The run directory (rank 0's choice, shared with every rank); it must be new or empty."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(config.output_dir) if config.output_dir else Path("runs") / stamp
    if env.is_main and path.exists() and any(path.iterdir()):
        raise UserError(f"output: {path} is not empty: choose a new --output-dir")
    return Path(env.broadcast(str(path)))
