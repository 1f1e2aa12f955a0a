"""The trainer: a run's parts built once, and the loop over epochs and steps.

Read top to bottom: `Trainer.__init__` builds the run's parts in order (precision, data,
weights, model and optimizer, the run directory and its event log, the meter and energy
counters, the checkpoint it goes on from, FLOPs, compile, DDP, the monitor and profiler), each
thread, worker process and file registered to be closed as it is opened; `Trainer.train` loops
over epochs and steps, each step inside the meter's core window, with an evaluation and a
checkpoint after every epoch. What hangs around the step (logging, the divergence guard,
checkpoints, the profiler) is called from the loop, never from inside the step. How a run
begins and ends (its status, results.json) is `job.py`'s.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from retinaperf import clock
from retinaperf.config import RunConfig, parse_step_window, workload
from retinaperf.data import coco
from retinaperf.distributed import DistEnv
from retinaperf.errors import UserError
from retinaperf.measure import energy
from retinaperf.measure.devices import registry
from retinaperf.measure.devices.base import DevicePlugin
from retinaperf.measure.meter import EvalRecord, Meter, comm_timer, device_events
from retinaperf.measure.monitor import HostSampler, Monitor
from retinaperf.measure.profiling import StepProfiler
from retinaperf.model import precision, weights
from retinaperf.model.network import RetinaPerfNet, build_model
from retinaperf.model.precision import Precision
from retinaperf.report.events import EVENTS, EventLog, TensorBoardSink, require_tensorboard
from retinaperf.report.flagperf import FLAGPERF_LOG, FlagperfLog
from retinaperf.report.mlperf import MlperfLog, segment_log
from retinaperf.run import build, evaluation, progress, rundir, signals, step
from retinaperf.run.checkpoint import Position
from retinaperf.run.checkpointer import Checkpointer, Generators
from retinaperf.run.health import LossWatch, diverged, divergence_message

StepFn = Callable[..., dict[str, torch.Tensor]]
EvaluateFn = Callable[..., tuple[dict[str, float], int]]


class Interrupted(Exception):
    """A signal stopped the run at a step every rank agreed on, after a checkpoint."""


class Trainer:
    """Everything a run trains with, built once; the loop over epochs and steps."""

    def __init__(
        self,
        config: RunConfig,
        env: DistEnv,
        device_plugin: DevicePlugin,
        run_dir: Path,
        events: EventLog,
        command_start: float,
        resume: bool,
        stop: signals.StopRequest,
        step_fn: StepFn = step.train_step,
        evaluate_fn: EvaluateFn = evaluation.evaluate_model,
    ) -> None:
        self.config, self.env, self.run_dir, self.stop = config, env, run_dir, stop
        # What is read of the device (samples, energy, peak FLOP/s) comes from its plug-in.
        self.device_plugin, self.events = device_plugin, events
        self.step_fn, self.evaluate_fn = step_fn, evaluate_fn
        self.command_start = command_start
        # Each worker process, thread and file below is registered here as it is opened: a
        # failure anywhere in the set-up closes what was opened so far, as `close` does later.
        self._owned = contextlib.ExitStack()
        try:
            # Asked before this run writes its configuration, which would make a restarted
            # rank 0 answer otherwise than the others.
            continuing = rundir.continuing(run_dir, env, resume)
            model, backbone = self._build_model()
            self._open_run_dir(model)
            self._build_meters(model)
            self._restore(model, continuing)
            self._wrap(model, backbone)
            self._open_watchers()
        except BaseException:
            self.close()
            raise

    def _build_model(self) -> tuple[RetinaPerfNet, weights.LoadedWeights | None]:
        """The precision, the data, the backbone's weights, the model and its optimizer."""
        config, env = self.config, self.env
        if config.tensorboard:
            require_tensorboard()
        # Rank 0 decides, so that every rank trains in the same precision.
        chosen, reason = env.broadcast(precision.choose(config.train.precision, env.device))
        self.precision = Precision(chosen, env.device, reason)
        torch.manual_seed(config.train.seed)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = step.use_cudnn_benchmark(config.train, env.device)
        cache = build.cache_dir(config)
        self.loaders = build.build_data(config, env, cache)
        self._owned.callback(self.loaders.shut_down)
        backbone = build.load_weights(config, env, cache)
        model = build_model(config.model, backbone.state_dict if backbone else None)
        model = model.to(env.device)
        self.channels_last = step.use_channels_last(config.model.channels_last, env.device)
        if self.channels_last:
            model.use_channels_last()
        self.inference_model = model = self.precision.prepare(model)
        self.optimizer = step.build_optimizer(
            self.precision.optimizer_params(model), config.train, env.device
        )
        return model, backbone

    def _open_run_dir(self, model: RetinaPerfNet) -> None:
        """On rank 0: the run directory with the configuration, and the event log's file and
        sinks in it. From here on, a failure is recorded there."""
        if not self.env.is_main:
            return
        rundir.prepare(self.run_dir, self.config, model, self.optimizer, self.precision)
        self.events.attach(self.run_dir / EVENTS)
        # A file of its own for each segment: MLPerf has no resume (see report/mlperf.py).
        self.events.add_sink(MlperfLog(segment_log(self.run_dir), self.command_start))
        # FlagPerf's harness reads rank 0's console; an ordinary run's console stays clean.
        console = sys.stdout if self.config.perflog_console else None
        self.events.add_sink(FlagperfLog(self.run_dir / FLAGPERF_LOG, self.command_start, console))
        if self.config.tensorboard:
            self.events.add_sink(TensorBoardSink(self.run_dir / "tensorboard"))

    def _build_meters(self, model: RetinaPerfNet) -> None:
        """The energy counters, the meter (whose windows are the energy's phases, on the
        meter's clock) and the loss watch."""
        env, plugin = self.env, self.device_plugin
        # Each rank reads its own device's counter; one rank per node reads the CPU packages.
        self.energy = energy.RunEnergy(
            *plugin.energy_counter(env.device),
            read_host=env.local_rank == 0,
            clock=time.perf_counter,
            command_start=self.command_start,
            sampled_by=plugin.source,
        )
        self._owned.callback(self.energy.close)
        self.meter = Meter(
            self.command_start,
            env.device,
            clock=time.perf_counter,
            timing_warmup_steps=self.config.train.timing_warmup_steps,
            events=device_events(env.device),
            phases=self.energy,
            comm=comm_timer(env.device, env.world_size),
        )
        # The padded batch shapes of the training steps (cuDNN's benchmark mode and CUDA
        # graphs work per shape): the model's transform makes them.
        model.transform.register_forward_hook(_batch_shapes_to(self.meter))
        self.watch = LossWatch(env.device)

    def _restore(self, model: RetinaPerfNet, continuing: bool) -> None:
        """The checkpointer, and the state of the checkpoint this run goes on from; then what
        runs where, before the progress bars."""
        config, env = self.config, self.env
        self.checkpointer = Checkpointer(
            self.run_dir,
            env,
            self.events,
            workload(config),
            config.keep_checkpoints,
            config.checkpoint_minutes,
            # Loaded in this order: fp16's float32 masters after the model.
            job_parts={"model": model, "precision": self.precision, "optimizer": self.optimizer},
            # Loaded at train start, the generators last (see restore_rank_parts).
            rank_parts={
                "meter": self.meter,
                "watch": self.watch,
                "energy": self.energy,
                "rng": Generators(env.device),
            },
        )
        self._owned.callback(self.checkpointer.close)
        self.checkpointer.restore(continuing, clock.wall_time_at(self.command_start))
        if env.is_main:
            went_on_from = self.checkpointer.position, self.checkpointer.resumed_from
            text = progress.header(
                config,
                env,
                self.device_plugin.device_name(env.device),
                self.precision,
                self.loaders.facts,
                self.run_dir,
                went_on_from if continuing else None,
            )
            print(text, flush=True)

    def _wrap(self, model: RetinaPerfNet, backbone: weights.LoadedWeights | None) -> None:
        """FLOPs counted, the model compiled and wrapped in DDP; the run's facts and its start
        in the event log."""
        config, env = self.config, self.env
        # Counted before compiling (compiled kernels bypass the FLOP counter) and before DDP
        # wraps the model (no gradient hook fires); out of memory there fails the run once the
        # trainer is whole (job.py), so that results.json records it.
        counted = build.count_flops(model, self.loaders, env, self.precision, config.model)
        self.flops_per_image, self.setup_failure = counted
        if config.model.compile:
            model.compile_parts(config.model.compile_mode)
        self.model, ddp = step.wrap_ddp(model, env, self.meter.comm)
        implementation = step.implementation(config.model, self.channels_last, self.optimizer, ddp)
        self.facts = {
            **self.loaders.facts,
            "backbone_weights": config.model.backbone_weights,
            "backbone_sha256": backbone.sha256 if backbone else None,
            "backbone_init": build.backbone_init(config, backbone),
            "throughput_only": config.throughput_only,
            "precision_requested": config.train.precision,
            "implementation": implementation,
            **self.precision.record(),  # read last: every math flag of the run is set by now
        }
        self.events.emit(
            "run_start",
            config=config.to_dict(),
            world_size=env.world_size,
            # The devices the run trains on: the MLPerf log's platform.
            device_name=self.device_plugin.device_name(env.device),
            nodes=env.nodes,
            devices_per_node=env.local_world_size,
            segment=self.checkpointer.segments.current,
            **self.facts,
        )

    def _open_watchers(self) -> None:
        """The monitor (its thread starts with training), the profiler, and when the ranks
        agree on stopping."""
        config, env = self.config, self.env
        self.monitor: Monitor | None = None
        self.readings_note: str | None = "the monitor was off (monitor_interval = 0)"
        if env.local_rank == 0 and config.monitor_interval > 0:
            sampler, self.readings_note = registry.open_sampler(self.device_plugin)
            samplers = [HostSampler()] + ([sampler] if sampler is not None else [])
            self.monitor = Monitor(config.monitor_interval, self.command_start, samplers)
            self._owned.callback(self.monitor.stop)  # its thread must not outlive the run
        self.profiler = StepProfiler(
            parse_step_window(config.train.profile_steps),
            self.run_dir,
            env.device,
            enabled=env.is_main,
            events=self.events,
        )
        self._owned.callback(self.profiler.close)  # writes what a window cut short recorded
        # One rank polls its own flag at every step; several agree at logged steps, where the
        # loop already waits for the device.
        self.poll_every = 1 if env.world_size == 1 else config.train.log_every
        self.eval_batches_everywhere = int(env.all_reduce([len(self.loaders.val_loader)], "min")[0])

    def train(self) -> None:
        """Every epoch from where the run stands: its steps, its evaluation, its checkpoint."""
        cfg, start = self.config.train, self.checkpointer.position
        warmup_iters = min(cfg.warmup_iters, len(self.loaders.train_loader) - 1)
        self.env.barrier()  # every rank is built and ready: training time starts now
        self.checkpointer.restore_rank_parts()
        self.meter.train_started()
        self.events.emit("train_start", step=self.meter.steps, warmup_steps=warmup_iters)
        if self.monitor is not None:
            self.monitor.start()
        for epoch in range(start.epoch, cfg.epochs):
            if self.finished():  # a resumed run whose last evaluation ended it
                break
            first = start.step_in_epoch if epoch == start.epoch else 0
            self.events.emit("epoch_start", epoch=epoch, step=self.meter.steps)
            trained = self.train_epoch(epoch, first, warmup_iters)
            self.events.emit("epoch_end", epoch=epoch, step=self.meter.steps)
            self.evaluate(epoch, trained)
            after = Position(epoch + 1, 0, self.meter.steps)
            self.save_checkpoint(after)
            self.poll(after)  # a signal during the evaluation

    def finished(self) -> bool:
        """Whether the last evaluation, of the last step trained, reached the target, or the
        step budget is spent (a run stopped during that evaluation has it still to do)."""
        cfg, meter = self.config.train, self.meter
        if not meter.evals or meter.evals[-1].step != meter.steps:
            return False
        reached = cfg.target_map > 0 and meter.evals[-1].stats["AP"] >= cfg.target_map
        return reached or self.out_of_steps()

    def out_of_steps(self) -> bool:
        """Whether the step budget (`max_steps`, 0: none) is spent."""
        max_steps = self.config.train.max_steps
        return bool(max_steps) and self.meter.steps >= max_steps

    def train_epoch(self, epoch: int, start: int, warmup_iters: int) -> Position:
        """The steps of `epoch` from batch `start` on: the timed windows of the run. Returns
        where training stands after them."""
        cfg, meter = self.config.train, self.meter
        trained = Position(epoch, start, meter.steps)
        if self.out_of_steps():
            return trained  # resumed after the last step, before its evaluation
        self.loaders.train_sampler.set_epoch(epoch, start)
        self.model.train()
        bar = tqdm(
            total=len(self.loaders.train_loader),
            initial=start,
            desc=f"epoch {epoch}",
            unit="step",
            disable=not self.env.is_main,
        )
        with bar:  # closed on error too, so the error starts on a line of its own
            for step_in_epoch, batch in enumerate(meter.batches(self.loaders.train_loader), start):
                lr = cfg.lr * step.lr_factor(
                    step_in_epoch, epoch, warmup_iters, cfg.warmup_factor, cfg.lr_steps,
                    cfg.lr_gamma,
                )  # fmt: skip
                step.set_lr(self.optimizer, lr)
                with meter.copying():  # outside the core window, as the wait for the batch
                    images, targets = coco.check_batch(batch)
                    images, targets = coco.to_device(images, targets, self.env.device)
                number = meter.steps + 1
                self.profiler.before_step(number)
                with meter.core_step(len(images)):
                    losses = self.step(number, images, targets)
                self.profiler.after_step(number)
                bar.update()
                if meter.steps % cfg.log_every == 0:
                    self.log_step(epoch, lr, losses, bar)
                trained = Position(epoch, step_in_epoch + 1, meter.steps)
                if meter.steps % self.poll_every == 0:
                    self.poll(trained)
                if self.out_of_steps():
                    break
        return trained

    def step(
        self, number: int, images: list[torch.Tensor], targets: list[dict]
    ) -> dict[str, torch.Tensor]:
        """One optimizer step, and the loss watch's update (on the device, no synchronisation)."""
        try:
            losses = self.step_fn(
                self.model,
                images,
                targets,
                self.optimizer,
                self.precision,
                self.config.train.clip_grad_norm,
            )
        except Exception as err:  # out of memory told with its batch; anything else as it is
            model, where = self.config.model, f"at step {number}"
            oom = step.out_of_memory(err, self.env.device, where, images, model, self.precision)
            if oom is None:
                raise
            raise oom from None
        self.watch.update(losses)
        return losses

    def log_step(self, epoch: int, lr: float, losses: dict[str, torch.Tensor], bar: tqdm) -> None:
        """A logged step: its figures over the ranks, the divergence guard, the record."""
        figures = progress.reduce_step(self.env, losses, self.watch, self.precision)
        limit = self.config.train.max_bad_steps
        if diverged(figures.longest_bad_run, limit):
            self.checkpointer.finish()  # so that the message names the newest good one
            newest = self.checkpointer.newest
            kept = newest.name if newest else None
            message = divergence_message(
                figures.longest_bad_run, limit, self.meter.steps, figures.parts, lr, kept
            )
            raise UserError(message)
        self.energy.read()  # often enough that a RAPL counter cannot wrap twice unseen
        progress.log_step(self.events, bar, self.meter, self.env, epoch, lr, figures)

    def poll(self, position: Position) -> None:
        """Where the ranks agree whether to stop (a signal reached one of them) and whether the
        timed checkpoint is due; a stop writes a checkpoint first."""
        stop, due = (
            flag > 0
            for flag in self.env.all_reduce([self.stop.requested, self.checkpointer.due()], "max")
        )
        if stop:
            self.save_checkpoint(position, ended="interrupted")
            raise Interrupted
        if due:
            self.save_checkpoint(position)

    def stop_in_evaluation(self, batches_done: int) -> bool:
        """Whether the ranks agree to abandon the evaluation under way, asked after each of its
        batches, as `poll` is at steps: every `poll_every` batches, at the batches every rank
        reaches (their shares of the validation set differ by one batch at most), so that the
        collective is the same on all of them; one rank reads its own flag at every batch."""
        if batches_done % self.poll_every or batches_done > self.eval_batches_everywhere:
            return False
        return self.env.all_reduce([self.stop.requested], "max")[0] > 0

    def save_checkpoint(self, position: Position, ended: str = "running") -> None:
        # A state whose loss has stopped being finite is not kept over the last good one.
        healthy = self.env.all_reduce([self.watch.streak.item()], "max")[0] == 0
        self.energy.read()  # so that the checkpoint holds the energy so far
        self.checkpointer.save(position, healthy, self.meter.checkpointing, ended)

    def evaluate(self, epoch: int, trained: Position) -> EvalRecord:
        """The evaluation after `trained`; a stop asked for during it abandons it, checkpoints
        at `trained` (so that the run goes on with this evaluation) and ends the run."""
        try:
            with self.meter.evaluation():
                stats, detections = self.evaluate_fn(
                    self.inference_model,
                    self.loaders.val_loader,
                    self.loaders.evaluator,
                    self.precision.autocast,
                    self.env.is_main,
                    self.stop_in_evaluation,
                )
        except evaluation.Abandoned:
            self.save_checkpoint(trained, ended="interrupted")
            raise Interrupted from None
        record = self.meter.eval_done(epoch, stats)
        self.events.emit(
            "eval",
            epoch=epoch,
            step=record.step,
            mAP=stats["AP"],
            **stats,
            detections=detections,
            seconds=record.seconds,
        )
        if self.env.is_main:
            throughput_only = self.config.throughput_only
            tqdm.write(progress.eval_line(epoch, stats, record.seconds, throughput_only))
        return record

    def close(self) -> None:
        """Close what the set-up opened, last first, whatever happened. Lets go of the DDP
        wrapper, whose reducer holds the process group: the trainer may outlive the run (a
        library's reference cycle can keep a frame that holds it); the group must not."""
        self._owned.close()
        if hasattr(self, "inference_model"):  # built: the DDP wrapper, if any, goes
            self.model = self.inference_model


def _batch_shapes_to(meter: Meter) -> Callable[..., None]:
    """A forward hook of the model's transform that tells `meter` each training batch's padded
    shape. It holds the meter alone: a hook that held the trainer would make a reference cycle
    (trainer -> model -> hook -> trainer) that keeps the model, its DDP reducer and so the
    process group alive until the cyclic collector runs, at interpreter exit."""

    def hook(module: torch.nn.Module, args: object, out: tuple) -> None:
        if module.training:
            meter.saw_batch(out[0].tensors.shape)

    return hook
