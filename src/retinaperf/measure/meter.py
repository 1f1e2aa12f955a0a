"""All timing, counting and memory of a run, and the metrics of docs/metrics.md computed from them.

The training loop tells the `Meter` what happened (a core step with its images, an evaluation
with its stats); nothing else touches its counters. Its windows are the run's phases: it tells
the energy accounting (`phases`, a `RunEnergy`) where each begins, so that the joules of training
and of evaluation are those of the times of docs/metrics.md.

Windows (seconds):
    command start ... train start | step: [wait for data, copy] [core] ... | eval | ... | end
    e2e_time   = results written - command start
    train_time = end of the last evaluation - train start
    eval_time  = sum of evaluation windows
    core time  = sum of core windows (forward + loss + backward + optimizer step)
    steady core time = the same without the first `timing_warmup_steps` steps
    data time = sum of [wait for data, copy] (`batches`, `copying`): the breakdown's (breakdown.py)

How device work is timed:
- Evaluations and checkpoints: the host clock between two device synchronizes.
- Core windows on an accelerator: two timing events recorded on the device's stream around each
  step, so that the host never waits for the device in the step: it enqueues step k+1 while the
  device still runs step k. Each step's time is the device's time from its start event (reached
  once the step's host-to-device copy is done) to its end event (its optimizer step done); the
  pairs are read once the device has passed them, without waiting, and the rest at the end
  (`settle`). The wait for data falls between windows, where the device idles.
- Core windows on the CPU, whose operations complete before they return: the host clock.

A resumed run (see checkpoint.py) carries the totals of the segments before it (`state_dict` /
`load_state_dict`): counts and times add up over the segments, and the time between segments
counts in none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from retinaperf.distributed import DistEnv, synchronize
from retinaperf.measure.breakdown import CommTimer, breakdown
from retinaperf.measure.energy import Phase


class Phases(Protocol):
    """What follows the run's phases (`energy.RunEnergy`)."""

    def enter(self, phase: Phase | None) -> None: ...


@dataclass
class EvalRecord:
    epoch: int
    step: int
    stats: dict[str, float]
    seconds: float
    train_time: float
    """Seconds from train start to the end of this evaluation."""


# The spans of time that a resumed run adds up over its segments (`Meter.prior_seconds`).
_SPANS = ("train", "init", "e2e")
# The running totals that a checkpoint carries as they are: counts and times that add up.
_TOTALS = (
    "images", "steps", "core_seconds", "steady_images", "steady_core_seconds", "eval_seconds",
    "checkpoint_seconds",
)  # fmt: skip
# The seconds of the time breakdown: a checkpoint written before they were counted has none, and
# a run resumed from it counts them from then on.
_BREAKDOWN_TOTALS = ("data_seconds", "comm_seconds", "host_bound_seconds")

T = TypeVar("T")


@dataclass
class Meter:
    command_start: float
    device: torch.device
    clock: Callable[[], float] = time.perf_counter
    synchronize: Callable[[torch.device], None] = synchronize
    timing_warmup_steps: int = 0
    """Steps left out of the steady core time and images (p_core_steady)."""
    events: Callable[[], Any] | None = None
    """Makes a timing event on the device's current stream (`device_events`); None: core windows
    on the host clock between synchronizes (the CPU)."""
    phases: Phases | None = None
    """Told where training, each evaluation and a stop begin; None: nothing follows them."""
    comm: CommTimer | None = None
    """Times DDP's all-reduce (the hook `step.wrap_ddp` registers; `comm_timer`); None: one
    rank."""
    train_start: float | None = None
    train_end: float | None = None
    images: int = 0
    steps: int = 0
    core_seconds: float = 0.0
    steady_images: int = 0
    steady_core_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    data_seconds: float = 0.0
    """Waiting for the next training batch and copying it to the device (`batches`, `copying`)."""
    comm_seconds: float = 0.0
    """The exposed part of DDP's all-reduce, inside the core windows (`CommTimer`)."""
    host_bound_seconds: float = 0.0
    """On an accelerator: the device time of the core windows that the host took at least as long
    to enqueue (the device could only follow the host)."""
    evals: list[EvalRecord] = field(default_factory=list)
    prior_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SPANS, 0.0))
    """Each span's seconds in the segments before this one (a resumed run)."""
    _interval_start: float = 0.0
    _interval_images: int = 0
    _last_eval_seconds: float = 0.0
    batch_shapes: set[tuple[int, ...]] = field(default_factory=set)
    """The distinct padded batch shapes the training steps saw."""
    _pending: deque = field(default_factory=deque)
    """Core windows whose events the device may not have reached: (start, end, steady, the
    host's seconds enqueuing the step, the step's all-reduce stamps or None)."""
    _checkpoints: list[tuple[float, float]] = field(default_factory=list)
    """This segment's checkpoints: (start, seconds)."""

    def train_started(self) -> None:
        """Call after the barrier that has every rank ready."""
        self.train_start = self.train_end = self._interval_start = self.clock()
        self._enter(Phase.TRAIN)

    def train_time(self) -> float:
        """Seconds of training up to the last evaluation (or `stopped`), over all segments."""
        assert self.train_start is not None and self.train_end is not None
        return self._over_segments("train", self.train_start, self.train_end)

    def checkpoint_time(self) -> float:
        """Seconds training waited for checkpoints, over all segments: those inside `train_time`.
        The checkpoint written after the last evaluation, where `train_time` ends, is not."""
        after_end = sum(
            seconds for start, seconds in self._checkpoints if start >= (self.train_end or 0.0)
        )
        return self.checkpoint_seconds - after_end

    def init_time(self) -> float:
        """Seconds from command start to train start, over all segments."""
        assert self.train_start is not None
        return self._over_segments("init", self.command_start, self.train_start)

    def e2e_time(self) -> float:
        """Seconds from command start to now, over all segments."""
        return self._over_segments("e2e", self.command_start, self.clock())

    def _over_segments(self, span: str, start: float, end: float) -> float:
        """This segment's `span` (from `start` to `end`) with the segments' before it: every span
        adds up over segments in the same way, and none counts the time between them."""
        return self.prior_seconds[span] + end - start

    def stopped(self) -> None:
        """A run cut short (interrupted, failed): its training time ends now; one cut short
        before training started (out of memory counting its FLOPs) trained for no time."""
        self.train_end = self.clock()
        if self.train_start is None:
            self.train_start = self._interval_start = self.train_end
        self._enter(None)

    def _enter(self, phase: Phase | None) -> None:
        if self.phases is not None:
            self.phases.enter(phase)

    @contextlib.contextmanager
    def core_step(self, images: int) -> Iterator[None]:
        """Times forward + loss + backward + optimizer step of one step of `images` local images."""
        steady = self.steps + 1 > self.timing_warmup_steps
        if self.events is None:
            self.synchronize(self.device)  # the host-to-device copy stays outside the window
            start = self.clock()
            yield
            self.synchronize(self.device)  # the step's kernels are queued, not done: wait
            self._add_core(self.clock() - start, steady)
        else:
            # Recorded on the stream: the device stamps them as it reaches them, the host goes on.
            start = self.events()
            start.record()
            enqueue_start = self.clock()  # the host's own time for the step: a read, no wait
            yield
            enqueued = self.clock() - enqueue_start
            end = self.events()
            end.record()
            comm = self.comm.step_done() if self.comm is not None else None
            self._pending.append((start, end, steady, enqueued, comm))
            self.settle(wait=False)
        if self.events is None and self.comm is not None and (comm := self.comm.step_done()):
            ready, done = comm  # host clock readings: the CPU's all-reduce runs on the host
            self.comm_seconds += max(0.0, done - ready)
        self.images += images
        self.steps += 1
        if steady:
            self.steady_images += images
        self._interval_images += images

    def batches(self, loader: Iterable[T]) -> Iterator[T]:
        """The items of `loader`, the wait for each added to the data time."""
        items = iter(loader)
        while True:
            start = self.clock()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.data_seconds += self.clock() - start
            yield item

    @contextlib.contextmanager
    def copying(self) -> Iterator[None]:
        """Times a batch's checks and its copy to the device, part of the data time."""
        start = self.clock()
        yield
        self.data_seconds += self.clock() - start

    def saw_batch(self, shape: tuple[int, ...]) -> None:
        """A training step's padded batch shape (N, C, H, W)."""
        self.batch_shapes.add(tuple(shape))

    def settle(self, wait: bool = True) -> None:
        """Add the device times of the core windows the device has finished; with `wait`, wait
        for the device to finish them all (before the totals are read)."""
        while self._pending:
            start, end, steady, enqueued, comm = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            seconds = start.elapsed_time(end) / 1000  # elapsed_time is in ms
            self._add_core(seconds, steady)
            if enqueued >= seconds:
                self.host_bound_seconds += seconds
            if comm is not None:
                # The step's stream waited for the all-reduce before `end`: both are stamped.
                ready, done = comm
                self.comm_seconds += max(0.0, ready.elapsed_time(done) / 1000)
            self._pending.popleft()

    def _add_core(self, seconds: float, steady: bool) -> None:
        self.core_seconds += seconds
        if steady:
            self.steady_core_seconds += seconds

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Times an evaluation; one cut short (abandoned at a stop, failed) counts as evaluation
        time too, for the time it took."""
        self.synchronize(self.device)
        start = self.clock()
        self._enter(Phase.EVAL)
        try:
            yield
        finally:
            self.synchronize(self.device)
            end = self.clock()
            self._enter(Phase.TRAIN)
            self._last_eval_seconds = end - start
            self.eval_seconds += self._last_eval_seconds
            self.train_end = end
            self._interval_start, self._interval_images = end, 0

    @contextlib.contextmanager
    def checkpointing(self) -> Iterator[None]:
        """Times writing a checkpoint (inside train_time, as evaluation is)."""
        self.synchronize(self.device)
        start = self.clock()
        yield
        seconds = self.clock() - start
        self.checkpoint_seconds += seconds
        self._checkpoints.append((start, seconds))

    def eval_done(self, epoch: int, stats: dict[str, float]) -> EvalRecord:
        """Record the stats of the evaluation that just ended."""
        record = EvalRecord(
            epoch=epoch,
            step=self.steps,
            stats=dict(stats),
            seconds=self._last_eval_seconds,
            train_time=self.train_time(),
        )
        self.evals.append(record)
        return record

    def state_dict(self) -> dict:
        """The running totals as of now, for a checkpoint."""
        assert self.train_start is not None
        self.settle()
        now = self.clock()
        return {
            **{name: getattr(self, name) for name in _TOTALS + _BREAKDOWN_TOTALS},
            "evals": [dataclasses.asdict(record) for record in self.evals],
            "batch_shapes": sorted(self.batch_shapes),
            "train_seconds": self._over_segments("train", self.train_start, now),
            "init_seconds": self.init_time(),
            "e2e_seconds": self._over_segments("e2e", self.command_start, now),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's totals (before `train_started`)."""
        for name in _TOTALS:
            setattr(self, name, state[name])
        for name in _BREAKDOWN_TOTALS:
            setattr(self, name, state.get(name, 0.0))
        self.evals = [EvalRecord(**record) for record in state["evals"]]
        self.batch_shapes = {tuple(shape) for shape in state["batch_shapes"]}
        self.prior_seconds = {span: state[f"{span}_seconds"] for span in _SPANS}

    def interval_rate(self) -> float:
        """Local images per second since the last call (or train start, or the last evaluation)."""
        now = self.clock()
        rate = self._interval_images / max(now - self._interval_start, 1e-9)
        self._interval_start, self._interval_images = now, 0
        return rate


def device_events(device: torch.device) -> Callable[[], Any] | None:
    """A maker of timing events on `device`'s current stream, for the Meter's core windows; None
    for the CPU, whose host clock is exact."""
    if device.type == "cpu":
        return None
    return lambda: torch.Event(device=device, enable_timing=True)


def comm_timer(device: torch.device, world_size: int) -> CommTimer | None:
    """The timer of DDP's exposed all-reduce for a Meter on `device`: host clock readings on the
    CPU, timing events on an accelerator's streams; None for one rank (no all-reduce)."""
    if world_size == 1:
        return None
    events = device_events(device)
    if events is None:
        return CommTimer(time.perf_counter)

    def stamp() -> Any:
        event = events()
        event.record()
        return event

    return CommTimer(stamp)


def summarize(meter: Meter, env: DistEnv, target_map: float, reduce: bool = True) -> dict:
    """docs/metrics.md's times, throughputs and accuracy (e2e_time ends when results.json is
    written, so the writer adds it; memory comes from `memory`), reduced over ranks: images
    summed, core time maxed. With `reduce` every rank must call this (it runs collectives);
    without it (a failing run, whose other ranks may be gone) this rank's view stands for the
    job: every rank trains the same images per step."""
    meter.settle()
    if reduce:
        images, steps, steady_images = env.all_reduce(
            [meter.images, meter.steps, meter.steady_images], "sum"
        )
        core_max, steady_core_max = env.all_reduce(
            [meter.core_seconds, meter.steady_core_seconds], "max"
        )
    else:
        images, steps, steady_images = (
            env.world_size * value for value in (meter.images, meter.steps, meter.steady_images)
        )
        core_max, steady_core_max = meter.core_seconds, meter.steady_core_seconds

    train_time = meter.train_time()
    train_minus_eval = train_time - meter.eval_seconds
    checkpoint_time = meter.checkpoint_time()
    return {
        "init_time": meter.init_time(),
        "train_time": train_time,
        "eval_time": meter.eval_seconds,
        "checkpoint_time": checkpoint_time,
        "core_time": core_max,
        "trained_images": int(images),
        "steps": int(steps / env.world_size),
        "p_whole": _ratio(images, train_time),
        "p_train": _ratio(images, train_minus_eval),
        "p_core": _ratio(images, core_max),
        # None when the run had no step after the timing warm-up
        "p_core_steady": _ratio(steady_images, steady_core_max),
        "timing_warmup_steps": meter.timing_warmup_steps,
        # Rank 0's own view, as train_time is: its parts add up to its training time.
        "breakdown": breakdown(
            train_minus_eval - checkpoint_time,
            meter.data_seconds,
            meter.core_seconds,
            meter.comm_seconds,
            None if meter.events is None else meter.host_bound_seconds,
        ),
        "breakdown_note": None,
        **_accuracy(meter.evals, target_map),
    }


def _ratio(count: float, seconds: float) -> float | None:
    return count / seconds if count and seconds > 0 else None


def _accuracy(evals: list[EvalRecord], target_map: float) -> dict:
    """mAP and convergence from the evaluations (None where a stopped run has none)."""
    last = evals[-1] if evals else None
    best = max(evals, key=lambda e: e.stats["AP"]) if evals else None
    reached = next((e for e in evals if e.stats["AP"] >= target_map), None)
    return {
        "mAP": last.stats["AP"] if last else None,
        "best_mAP": best.stats["AP"] if best else None,
        "best_epoch": best.epoch if best else None,
        "best_step": best.step if best else None,
        "converged": reached is not None,
        "target_mAP": target_map,
        "time_to_target": reached.train_time if reached else None,
        "evaluations": [
            {"epoch": e.epoch, "step": e.step, "mAP": e.stats["AP"], "seconds": e.seconds}
            for e in evals
        ],
    }
