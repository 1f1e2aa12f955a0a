"""Training: the step, the loop around it, and the run that builds both and writes the results.

Read top to bottom: `run` sets up (data, weights, model, optimizer, and the checkpoint it resumes
from), `_train` loops over epochs and steps, calling `train_step` inside the meter's core window,
evaluating and writing a checkpoint after every epoch; `_finish` reduces the metrics and writes
the run directory, with the run's status: completed, interrupted (by SIGTERM or SIGINT, after a
checkpoint) or failed (divergence, out of memory, any error once training has started).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from retinaperf import distributed, io
from retinaperf.config import RunConfig, TrainConfig, parse_step_window, workload
from retinaperf.data import coco, sampling, synth
from retinaperf.distributed import DistEnv
from retinaperf.errors import UserError
from retinaperf.measure import energy, environment, monitor, scoring, utilization
from retinaperf.measure.memory import device_uuid, driver_peak, memory_peak
from retinaperf.measure.memory import memory as job_memory
from retinaperf.measure.meter import EvalRecord, Meter, device_events, summarize
from retinaperf.measure.monitor import Monitor
from retinaperf.measure.profiling import StepProfiler
from retinaperf.model import precision, weights
from retinaperf.model.network import build_model
from retinaperf.model.precision import Precision
from retinaperf.report import plots, tables
from retinaperf.report.events import (
    EVENTS,
    MONITOR,
    EventLog,
    TensorBoardSink,
    read_events,
    require_tensorboard,
)
from retinaperf.run import checkpoint, evaluation, signals
from retinaperf.run.checkpoint import Position
from retinaperf.run.health import LossWatch


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


def use_cudnn_benchmark(cfg: TrainConfig, device: torch.device) -> bool:
    """`cudnn_benchmark` resolved: never with deterministic kernels (its choice may differ from
    run to run) nor off CUDA; `auto` is off, as in torchvision's detection references, where
    each new input shape (tens per epoch of COCO) is timed anew."""
    return device.type == "cuda" and not cfg.deterministic and cfg.cudnn_benchmark == "on"


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
    train_sampler: sampling.GroupedBatchSampler
    val_loader: torch.utils.data.DataLoader
    evaluator: scoring.CocoEvaluator
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
    meter: Meter
    monitor: Monitor | None  # local rank 0 of each node only
    profiler: StepProfiler
    flops_per_image: float | None  # rank 0 only
    events: EventLog
    run_dir: Path
    facts: dict  # dataset and weight facts that go into the results
    stop: signals.StopRequest
    watch: LossWatch
    energy: energy.RunEnergy
    resumed: Resumed
    poll_every: int
    """Steps between the points where ranks agree to stop or checkpoint (every step alone)."""
    writer: checkpoint.Writer
    last_checkpoint: float = 0.0  # monotonic clock
    checkpointed: Position | None = None


@dataclass
class Resumed:
    """Where this segment of the run starts: at the beginning, or from a checkpoint."""

    position: Position
    segments: list[dict]
    """Every segment of the run; the last one is this process's."""
    rank_state: dict | None = None  # this rank's meter, generators and loss watch
    checkpoint: Path | None = None


class Interrupted(Exception):
    """A signal stopped the run at a step every rank agreed on, after a checkpoint."""


CONFIG = "config.json"


def run(config: RunConfig, command_start: float, resume: bool = False) -> dict:
    """Run the benchmark (or, with `resume`, continue the run in `config.output_dir` from its
    newest checkpoint); returns the results written to `<run_dir>/results.json` on rank 0, and
    {"status": ...} on the other ranks."""
    env = distributed.setup(config.device, config.dist_timeout)
    events = EventLog(None, command_start)
    setup = None
    with signals.StopRequest() as stop:
        try:
            setup = _set_up(config, env, command_start, resume, stop)
            events = setup.events
            _train(setup)
            return _finish(setup, "completed")
        except Interrupted:
            results = _finish(setup, "interrupted", f"stopped by {stop.name}")
            return {**results, "signal": stop.name}
        except BaseException as err:
            events.emit("run_failed", error=f"{type(err).__name__}: {err}")
            if setup is not None:
                _record_failure(setup, err)
            raise
        finally:
            if setup is not None:
                coco.shut_down(setup.loaders.train_loader)
                coco.shut_down(setup.loaders.val_loader)
                setup.writer.close()
                setup.energy.close()
                setup.profiler.close()  # writes what a window cut short recorded
                if setup.monitor is not None:
                    setup.monitor.stop()  # its thread must not outlive the run
            events.close()
            distributed.teardown()


def _set_up(
    config: RunConfig,
    env: DistEnv,
    command_start: float,
    resume: bool,
    stop: signals.StopRequest,
) -> Setup:
    _check_topology(config, env)
    # torchrun starts the workers again after a rank failed (--max-restarts): they go on from
    # the run's newest checkpoint.
    run_dir = _run_dir(config, env, resume)
    continuing = resume or (env.attempt > 0 and (run_dir / CONFIG).exists())
    if config.tensorboard:
        require_tensorboard()
    # Rank 0 decides, so that every rank trains in the same precision.
    chosen, reason = env.broadcast(precision.choose(config.train.precision, env.device))
    trained_in = Precision(chosen, env.device, reason)
    torch.manual_seed(config.train.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = use_cudnn_benchmark(config.train, env.device)
    cache_dir = _cache_dir(config)
    loaders = _build_data(config, env, cache_dir)
    backbone = _load_weights(config, env, cache_dir)
    model = build_model(config.model, backbone.state_dict if backbone else None).to(env.device)
    channels_last = use_channels_last(config.model.channels_last, env.device)
    if channels_last:
        model.use_channels_last()
    model = trained_in.prepare(model)
    optimizer = build_optimizer(trained_in.optimizer_params(model), config.train, env.device)
    meter = Meter(
        command_start,
        env.device,
        timing_warmup_steps=config.train.timing_warmup_steps,
        events=device_events(env.device),
    )
    # The padded batch shapes of the training steps (cuDNN's benchmark mode and CUDA graphs
    # work per shape): the model's transform makes them.
    model.transform.register_forward_hook(
        lambda module, args, out: meter.saw_batch(out[0].tensors.shape) if module.training else None
    )
    watch = LossWatch(env.device)
    # Each rank reads its own device's counter; one rank per node reads the CPU packages.
    run_energy = energy.RunEnergy(
        device_uuid(env.device), env.local_rank == 0, meter.clock, command_start
    )
    resumed = _resume(config, env, run_dir, continuing, model, optimizer, trained_in, meter)
    # Counted before compiling (compiled kernels bypass the FLOP counter) and before DDP wraps the
    # model (so that no gradient hook fires).
    flops = _count_flops(model, loaders, env, trained_in) if env.is_main else None
    if config.model.compile:
        model.compile_parts(config.model.compile_mode)
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
            "compile_mode": config.model.compile_mode if config.model.compile else None,
            "transform": config.model.transform,
            "reuse_constants": config.model.reuse_constants,
            "optimizer": _optimizer_kind(optimizer),
            "ddp": ddp,
        },
        **trained_in.record(),  # read last: every math flag of the run is set by now
    }
    if env.is_main:
        _claim_run_dir(run_dir, config, model, optimizer, trained_in)
    events = EventLog(None, command_start)  # other ranks write no log
    if env.is_main:
        tensorboard = config.tensorboard
        sinks = (TensorBoardSink(run_dir / "tensorboard"),) if tensorboard else ()
        events = EventLog(run_dir / EVENTS, command_start, sinks)
    events.emit(
        "run_start",
        config=config.to_dict(),
        world_size=env.world_size,
        segment=resumed.segments[-1],
        **facts,
    )
    return Setup(
        config=config,
        env=env,
        precision=trained_in,
        model=trained,
        inference_model=model,
        optimizer=optimizer,
        loaders=loaders,
        meter=meter,
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
        stop=stop,
        watch=watch,
        energy=run_energy,
        resumed=resumed,
        # One rank polls its own flag at every step; several agree at logged steps, where the
        # loop already waits for the device.
        poll_every=1 if env.world_size == 1 else config.train.log_every,
        writer=checkpoint.Writer(run_dir, config.keep_checkpoints, resumed.checkpoint),
        checkpointed=resumed.position if resumed.checkpoint else None,
    )


def _resume(
    config: RunConfig,
    env: DistEnv,
    run_dir: Path,
    continuing: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trained_in: Precision,
    meter: Meter,
) -> Resumed:
    """Load the newest checkpoint of a run that goes on into the model, optimizer, precision
    and meter; the segments of the run, this one last."""
    started = time.time() - (time.perf_counter() - meter.command_start)
    segment = {
        "started_at": _iso(started),
        "start_step": 0,
        "resumed_from": None,
        "time_lost_s": None,
        "elastic_restart": env.attempt,
        "ended": "running",
    }
    path = checkpoint.newest(run_dir) if continuing else None
    if path is None:
        return Resumed(Position(), [segment])
    state = checkpoint.load(path, workload(config), env.world_size)
    model.load_state_dict(state["model"])
    trained_in.load_state_dict(state["precision"])  # fp16's masters, after the model
    optimizer.load_state_dict(state["optimizer"])
    rank_state = state["ranks"][env.rank]
    meter.load_state_dict(rank_state["meter"])
    position = Position(**state["position"])
    earlier = [dict(s) for s in state["segments"]]
    if earlier[-1]["ended"] == "running":
        # That process died after this checkpoint without a stop of its own (killed, crashed):
        # what it trained after it is trained again, and counted once.
        earlier[-1].update(ended="crashed", end_step=position.step)
    segment.update(
        start_step=position.step,
        resumed_from=path.name,
        # From the state this segment goes on from, to its start: the work lost, the previous
        # process's end, the wait in a queue, this process's start-up.
        time_lost_s=started - state["saved_at"],
    )
    return Resumed(position, [*earlier, segment], rank_state, path)


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")


def _claim_run_dir(
    run_dir: Path,
    config: RunConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trained_in: Precision,
) -> None:
    """Create the run directory with the configuration a resume reads, refusing one that is not
    writable or whose disk cannot hold a checkpoint: before training, not hours into it."""
    created = not run_dir.exists()
    weights_bytes = checkpoint.tensor_bytes(model.state_dict().values())
    updated = [p for group in optimizer.param_groups for p in group["params"]]
    # SGD keeps one momentum buffer per updated tensor; fp16 also keeps float32 masters.
    copies = 2 if trained_in.policy.half_weights else 1
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.check_space(run_dir, weights_bytes + copies * checkpoint.tensor_bytes(updated))
        io.write_json_atomic(run_dir / CONFIG, config.to_dict())
    except OSError as err:
        _remove_if_created(run_dir, created)
        raise UserError(
            f"output: cannot write in {run_dir} ({err.strerror or err}): choose a writable "
            "--output-dir"
        ) from None
    except UserError:
        _remove_if_created(run_dir, created)
        raise


def _remove_if_created(run_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)


def _build_data(config: RunConfig, env: DistEnv, cache_dir: Path) -> Loaders:
    """Index both splits (with SPEC §1's filtering) and build this rank's loaders."""
    root, label = _dataset_root(config, env, cache_dir)
    coco.check_root(root)
    train_records = _train_records(root, env, cache_dir)
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


def _train_records(root: Path, env: DistEnv, cache_dir: Path) -> list[coco.ImageRecord]:
    """train2017's records, from its index (see `coco_index`). As for the dataset and the
    weights, one process per node reads the annotation file, or finds its index in the cache, and
    scans the image folder; the others wait for it, then load the index it cached."""
    if env.local_rank == 0:
        records = coco.index_split(root, "train", drop_empty=True, cache_dir=cache_dir)
    env.barrier()
    if env.local_rank != 0:
        records = coco.index_split(
            root, "train", drop_empty=True, cache_dir=cache_dir, check_files=False
        )
    return records


def _train(s: Setup) -> None:
    cfg, meter, start = s.config.train, s.meter, s.resumed.position
    warmup_iters = min(cfg.warmup_iters, len(s.loaders.train_loader) - 1)
    s.env.barrier()  # every rank is built and ready: training time starts now
    if s.resumed.rank_state is not None:
        # Set last: building the model and counting FLOPs draw from the generators too.
        checkpoint.set_rng_state(s.resumed.rank_state["rng"], s.env.device)
        s.watch.load_state_dict(s.resumed.rank_state["watch"])
        s.energy.load_state_dict(s.resumed.rank_state["energy"])
    meter.train_started()
    s.energy.mark(None)
    s.last_checkpoint = time.monotonic()
    if s.monitor is not None:
        s.monitor.start()
    for epoch in range(start.epoch, cfg.epochs):
        if _finished(s):  # a resumed run whose last evaluation ended it
            break
        _train_epoch(s, epoch, start.step_in_epoch if epoch == start.epoch else 0, warmup_iters)
        _evaluate(s, epoch)
        _checkpoint(s, Position(epoch + 1, 0, meter.steps))
        _poll(s, Position(epoch + 1, 0, meter.steps))  # a signal during the evaluation


def _finished(s: Setup) -> bool:
    """Whether the last evaluation reached the target, or the step budget is spent."""
    cfg, meter = s.config.train, s.meter
    if not meter.evals:
        return False
    reached = cfg.target_map > 0 and meter.evals[-1].stats["AP"] >= cfg.target_map
    return reached or bool(cfg.max_steps and meter.steps >= cfg.max_steps)


def _train_epoch(s: Setup, epoch: int, start: int, warmup_iters: int) -> None:
    cfg, meter = s.config.train, s.meter
    if cfg.max_steps and meter.steps >= cfg.max_steps:
        return  # resumed after the last step, before its evaluation
    s.loaders.train_sampler.set_epoch(epoch, start)
    s.model.train()
    bar = tqdm(
        total=len(s.loaders.train_loader),
        initial=start,
        desc=f"epoch {epoch}",
        unit="step",
        disable=not s.env.is_main,
    )
    with bar:  # closed on error too, so the error starts on a line of its own
        for step_in_epoch, batch in enumerate(s.loaders.train_loader, start):
            lr = cfg.lr * lr_factor(
                step_in_epoch, epoch, warmup_iters, cfg.warmup_factor, cfg.lr_steps, cfg.lr_gamma
            )
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            images, targets = coco.check_batch(batch)
            images, targets = coco.to_device(images, targets, s.env.device)
            step = meter.steps + 1
            s.profiler.before_step(step)
            with meter.core_step(len(images)):
                try:
                    losses = train_step(
                        s.model, images, targets, s.optimizer, s.precision, cfg.clip_grad_norm
                    )
                except torch.OutOfMemoryError as err:
                    raise UserError(_out_of_memory(s, step, images, err)) from None
                s.watch.update(losses)
            s.profiler.after_step(step)
            bar.update()
            if meter.steps % cfg.log_every == 0:
                _log_step(s, epoch, lr, losses, bar)
            if meter.steps % s.poll_every == 0:
                _poll(s, Position(epoch, step_in_epoch + 1, meter.steps))
            if cfg.max_steps and meter.steps >= cfg.max_steps:
                return


def _out_of_memory(s: Setup, step: int, images: list[torch.Tensor], err: Exception) -> str:
    largest = max(images, key=lambda image: image.shape[1] * image.shape[2])
    model = s.config.model
    return (
        f"out of {s.env.device} memory at step {step}: local batch {len(images)}, images up to "
        f"{largest.shape[2]}x{largest.shape[1]} px resized to short side {model.min_size} "
        f"(long side at most {model.max_size}), precision {s.precision.name}: lower batch_size "
        f"(and lr with it), min_size/max_size, or use bf16/amp ({str(err).splitlines()[0]})"
    )


def _poll(s: Setup, position: Position) -> None:
    """Where the ranks agree whether to checkpoint (the timed one is due) and whether to stop
    (a signal reached one of them); a stop writes a checkpoint first."""
    minutes = s.config.checkpoint_minutes
    due = minutes > 0 and time.monotonic() - s.last_checkpoint >= 60 * minutes
    stop, due = (flag > 0 for flag in s.env.all_reduce([s.stop.requested, due], "max"))
    if stop:
        _checkpoint(s, position, ended="interrupted")
        raise Interrupted
    if due:
        _checkpoint(s, position)


def _checkpoint(s: Setup, position: Position, ended: str = "running") -> None:
    """Write the whole training state (rank 0; every rank gives its part), saying whether this
    segment of the run goes on or ends here. A failed write (a full disk) is reported and the run
    goes on, with the previous checkpoints intact."""
    if s.checkpointed == position and ended == "running":
        return
    s.checkpointed, s.last_checkpoint = position, time.monotonic()
    # A state whose loss has stopped being finite is not kept over the last good one.
    if s.env.all_reduce([s.watch.streak.item()], "max")[0] > 0:
        return
    s.energy.mark("train")  # so that the checkpoint holds the energy so far
    with s.meter.checkpointing():  # the time training waits: the host copy, a previous write
        ranks = s.env.gather(
            {
                "meter": s.meter.state_dict(),
                "rng": checkpoint.rng_state(s.env.device),
                "watch": s.watch.state_dict(),
                "energy": s.energy.state_dict(),
            }
        )
        if not s.env.is_main:
            return
        state = {
            "format": checkpoint.FORMAT,
            "workload": workload(s.config),
            "world_size": s.env.world_size,
            "position": dataclasses.asdict(position),
            "model": s.inference_model.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "precision": s.precision.state_dict(),
            "ranks": ranks,
            "segments": _segments(s, ended, position.step),
            "saved_at": time.time(),
        }
        _report_write(s, s.writer.submit(checkpoint.snapshot(state), position.step))


def _report_write(s: Setup, outcome: checkpoint.Outcome | None) -> None:
    """The event of a finished checkpoint write; a failed one (a full disk) is warned about and
    the run goes on, with the previous checkpoints intact."""
    if outcome is None:
        return
    if outcome.error is not None:
        kept = s.writer.newest.name if s.writer.newest else "none yet"
        warnings.warn(
            f"checkpoint: cannot write step {outcome.step} into {checkpoint.folder(s.run_dir)} "
            f"({outcome.error.strerror or outcome.error}): the run goes on; the newest "
            f"checkpoint is still {kept}",
            stacklevel=1,
        )
        s.events.emit("checkpoint_failed", step=outcome.step, error=str(outcome.error))
        return
    s.events.emit("checkpoint", step=outcome.step, path=str(outcome.path), seconds=outcome.seconds)


def _segments(s: Setup, ended: str, end_step: int) -> list[dict]:
    """The run's segments, this one ending (or, in a checkpoint, still running) at end_step."""
    current = {**s.resumed.segments[-1], "ended": ended, "end_step": end_step}
    if ended != "running":
        current["ended_at"] = _iso(time.time())
    return [*s.resumed.segments[:-1], current]


def _log_step(
    s: Setup, epoch: int, lr: float, losses: dict[str, torch.Tensor], progress: tqdm
) -> None:
    names = sorted(losses)
    # The global batch's loss: the mean over ranks of each rank's mean (.item() waits for the GPU)
    totals = s.env.all_reduce([losses[name].item() for name in names], "sum")
    parts = {name: total / s.env.world_size for name, total in zip(names, totals, strict=True)}
    loss = sum(parts.values())
    longest, skipped = s.env.all_reduce(
        [s.watch.longest.item(), s.precision.skipped_steps().item()], "max"
    )
    limit = s.config.train.max_bad_steps
    if limit and longest >= limit:
        _report_write(s, s.writer.finish())
        kept = s.writer.newest.name if s.writer.newest else "none was written"
        shown = ", ".join(f"{name} {value:.4g}" for name, value in parts.items())
        raise UserError(
            f"training diverged: the loss was not finite for {int(longest)} consecutive steps "
            f"(limit max_bad_steps={limit}); at step {s.meter.steps}: {shown}, lr {lr:g}; the "
            f"last good checkpoint is {kept}: lower lr, raise clip_grad_norm's protection, or use "
            "another precision"
        )
    # Every rank trains the same batch size, so the global rate is the local one x world size.
    rate = s.meter.interval_rate() * s.env.world_size
    s.energy.mark("train")  # often enough that a RAPL counter cannot wrap twice unseen
    s.events.emit(
        "step",
        epoch=epoch,
        step=s.meter.steps,
        loss=loss,
        **parts,
        lr=lr,
        images_per_s=rate,
        skipped_steps=int(skipped),
    )
    progress.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}", lr=f"{lr:.3g}")


def _evaluate(s: Setup, epoch: int) -> EvalRecord:
    s.energy.mark("train")
    with s.meter.evaluation():
        stats, detections = evaluation.evaluate_model(
            s.inference_model,
            s.loaders.val_loader,
            s.loaders.evaluator,
            s.precision.autocast,
            s.env.is_main,
        )
    s.energy.mark("eval")
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


def _finish(s: Setup, status: str, reason: str | None = None) -> dict:
    """Reduce the metrics and write results.json with the run's status (and, for a completed
    run, the report and plots). Collectives run unless the run failed: then the other ranks may
    be gone, and rank 0's own view stands for the job."""
    cfg, env = s.config, s.env
    reduce = status != "failed"
    if status != "completed":
        s.meter.stopped()
        s.energy.mark("train")
    _report_write(s, s.writer.finish())  # the newest checkpoint is on disk before results say so
    # One gather of what only each rank knows: its host, device, memory peak, monitor samples.
    mine = {
        "host": environment.hostname(),
        "uuid": device_uuid(env.device),
        "memory": memory_peak(env.device),
        "samples": s.monitor.stop() if s.monitor else [],
        "energy": s.energy.summary(),
        "batch_shapes": sorted(s.meter.batch_shapes),
    }
    ranks = env.gather(mine) if reduce else [mine]
    summary = summarize(s.meter, env, cfg.train.target_map, reduce=reduce)
    if not env.is_main:
        return {"status": status}
    samples = [sample for rank in ranks for sample in rank["samples"]]
    monitored = monitor.summarize(samples) if samples else None
    uuids = [rank["uuid"] for rank in ranks]
    driver = driver_peak(monitored["devices"], uuids) if monitored else None
    memory = job_memory([rank["memory"] for rank in ranks], driver)
    device_name = environment.device_name(env.device)
    segments = _segments(s, status, s.meter.steps)
    batch_shapes = sorted({tuple(shape) for rank in ranks for shape in rank["batch_shapes"]})
    spent = energy.job_energy(
        ranks,
        samples,
        env.device.type,
        summary["trained_images"],
        summary["train_time"] - summary["eval_time"],
        len(segments),
        env.nodes if env.device.type == "cpu" else env.world_size,
    )
    results = {
        "status": status,
        "reason": reason,
        "metrics": {
            **summary,
            **memory,
            **s.facts,
            "epochs": s.meter.evals[-1].epoch + 1 if s.meter.evals else 0,
            "world_size": env.world_size,
            "nodes": env.nodes,
            "devices_per_node": env.local_world_size,
            "local_batch": cfg.train.batch_size,
            "global_batch": cfg.train.batch_size * env.world_size,
            "lr": cfg.train.lr,
            "seed": cfg.train.seed,
            "device_name": device_name,
            "skipped_steps": int(s.precision.skipped_steps().item()),
            "batch_shapes": len(batch_shapes),
            "segments": len(segments),
            "time_between_segments": sum(seg["time_lost_s"] or 0.0 for seg in segments),
            "checkpoint_failures": s.writer.failures,
            **{key: value for key, value in spent.items() if key != "energy"},
            **utilization.utilization(
                s.flops_per_image,
                summary["p_core"],
                device_name,
                s.precision.peak_math(),
                env.world_size,
            ),
        },
        "segments": segments,
        "batch_shapes": [list(shape) for shape in batch_shapes],
        "energy": spent["energy"],
        # A completed run has nothing left to resume: its checkpoints go (see below).
        "checkpoint": str(s.writer.newest) if s.writer.newest and status != "completed" else None,
        "monitor": monitored,
        "config": cfg.to_dict(),
        "environment": environment.capture(env.device, [rank["host"] for rank in ranks]),
        "run_dir": str(s.run_dir),
    }
    if samples:
        io.write_jsonl(s.run_dir / MONITOR, samples)
    completed = status == "completed"
    if completed and cfg.save_model:
        path = s.run_dir / "model.pt"
        torch.save(s.precision.float32_state_dict(s.inference_model), path)
    # e2e_time ends here, as results.json is written (over every segment of the run).
    results["metrics"]["e2e_time"] = s.meter.e2e_time()
    io.write_json_atomic(s.run_dir / tables.RESULTS, results)
    s.events.emit(
        "run_end",
        status=status,
        reason=reason,
        **{k: v for k, v in results["metrics"].items() if k != "evaluations"},
    )
    if completed:
        io.write_text_atomic(s.run_dir / tables.REPORT, tables.render_report(results))
        plots.write_plots(read_events(s.run_dir / EVENTS), samples, s.run_dir / tables.PLOTS)
        # Checkpoints are for going on, and cost hundreds of MB each; only once results.json
        # is written (save_model=true keeps the trained weights).
        shutil.rmtree(checkpoint.folder(s.run_dir), ignore_errors=True)
    return results


def _record_failure(s: Setup, err: BaseException) -> None:
    """results.json of a run that failed once set up, saying why; never masks the error."""
    reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    try:
        _finish(s, "failed", reason)
    except Exception as secondary:  # the run is failing already: say so, keep the first error
        warnings.warn(f"could not write the failed run's results.json: {secondary}", stacklevel=1)


def _count_flops(model: nn.Module, loaders: Loaders, env: DistEnv, trained_in: Precision) -> float:
    """Training FLOPs per image on the run's first batch (see utilization.py), once per run."""
    dataset = loaders.train_loader.dataset
    keys = next(iter(loaders.train_sampler))  # epoch 0's first batch: the sampler is pure
    images, targets = coco.check_batch([dataset[key] for key in keys])
    images, targets = coco.to_device(images, targets, env.device)
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


def _run_dir(config: RunConfig, env: DistEnv, resume: bool) -> Path:
    """The run directory (rank 0's choice, shared with every rank). A new run's must be new or
    empty; a resumed run's must hold a run that has not completed; workers that torchrun started
    again after a failure take the directory as they find it."""
    if config.output_dir:
        path = Path(config.output_dir)
    elif env.job_id:
        # Named after the torchrun job, so that its restarted workers find it again.
        path = Path("runs") / f"torchrun-{env.job_id}"
    else:
        path = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if env.is_main and resume:
        if not (path / CONFIG).is_file():
            raise UserError(
                f"--resume: {path} holds no {CONFIG}: give the run directory of a stopped run"
            )
        previous = path / tables.RESULTS
        if (
            previous.is_file()
            and tables.load_results(path, completed_only=False).get("status", "completed")
            == "completed"
        ):
            raise UserError(f"--resume: {path} holds a completed run: there is nothing to resume")
    elif env.is_main and not env.attempt and path.exists() and any(path.iterdir()):
        raise UserError(f"output: {path} is not empty: choose a new --output-dir")
    return Path(env.broadcast(str(path)))
