"""The SPEC §3 arithmetic, driven by a fake clock so every window has a known length."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retinaperf.distributed import DistEnv
from retinaperf.measure.devices.cpu import Cpu
from retinaperf.measure.devices.nvidia import Nvidia
from retinaperf.measure.memory import driver_peak, memory, memory_peak
from retinaperf.measure.meter import Meter, summarize

CPU = torch.device("cpu")


class FakeClock:
    """A clock that moves only when told; records when the device was synchronized."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.log: list[tuple[str, float]] = []

    def __call__(self) -> float:
        self.log.append(("read", self.now))
        return self.now

    def sync(self, device: torch.device) -> None:
        self.log.append(("sync", self.now))

    def advance(self, seconds: float) -> None:
        self.now += seconds


def clocked_meter(start: float) -> tuple[FakeClock, Meter]:
    """A meter on the CPU whose command started at `start`, read from a clock that stands there
    until a test advances it."""
    clock = FakeClock(start)
    return clock, Meter(command_start=start, device=CPU, clock=clock, synchronize=clock.sync)


def single() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=CPU)


def stats(ap: float) -> dict[str, float]:
    return {"AP": ap, "AP50": ap}


def scripted_run(clock: FakeClock) -> Meter:
    """Command at t=100; training starts at 103; two epochs of 2 steps and an eval each.

    step: 0.5 s waiting for data, then 2 s of core; eval: 4 s (first), 6 s (second).
    """
    meter = Meter(command_start=100.0, device=CPU, clock=clock, synchronize=clock.sync)
    clock.advance(3.0)
    meter.train_started()
    for epoch, (eval_seconds, ap) in enumerate([(4.0, 0.2), (6.0, 0.4)]):
        for _ in range(2):
            clock.advance(0.5)
            with meter.core_step(images=8):
                clock.advance(2.0)
        with meter.evaluation():
            clock.advance(eval_seconds)
        meter.eval_done(epoch, stats(ap))
    return meter


def test_windows_and_throughputs_follow_the_definitions():
    clock = FakeClock(100.0)
    meter = scripted_run(clock)
    m = summarize(meter, single(), target_map=0.35)
    # train: 2 epochs x (2 x 2.5 s) + 4 s + 6 s = 20 s; eval 10 s; core 4 x 2 s = 8 s; 32 images.
    assert m["init_time"] == pytest.approx(3.0)
    assert m["train_time"] == pytest.approx(20.0)
    assert m["eval_time"] == pytest.approx(10.0)
    assert m["core_time"] == pytest.approx(8.0)
    assert m["trained_images"] == 32
    assert m["steps"] == 4
    assert m["p_whole"] == pytest.approx(32 / 20)
    assert m["p_train"] == pytest.approx(32 / 10)
    assert m["p_core"] == pytest.approx(32 / 8)
    assert m["p_core"] >= m["p_train"] >= m["p_whole"]


def test_checkpoint_time_counts_the_checkpoints_inside_train_time_only():
    """An epoch's checkpoint before the next epoch's training is inside train_time; the one after
    the last evaluation, where train_time ends, is not (docs/metrics.md), unless a stop ends the
    training time after it."""
    clock, meter = clocked_meter(100.0)
    meter.train_started()
    for epoch in range(2):
        with meter.core_step(images=2):
            clock.advance(1.0)
        with meter.evaluation():
            clock.advance(2.0)
        meter.eval_done(epoch, stats(0.1))
        with meter.checkpointing():
            clock.advance(0.25 * (epoch + 1))  # 0.25 s inside, then 0.5 s after the end
    m = summarize(meter, single(), target_map=0.0)
    assert m["train_time"] == pytest.approx(1 + 2 + 0.25 + 1 + 2)
    assert m["checkpoint_time"] == pytest.approx(0.25)
    assert m["breakdown"]["total"] == pytest.approx(2.0)  # the two core windows
    meter.stopped()  # a run stopped after its last checkpoint: it is inside the training time
    assert meter.checkpoint_time() == pytest.approx(0.75)


def test_a_resumed_meter_adds_every_span_to_the_segments_before_it():
    clock = FakeClock(100.0)
    first = scripted_run(clock)  # init 3 s, train 20 s, e2e 23 s
    clock.advance(1.0)  # the checkpoint is taken 1 s after the last evaluation
    state = first.state_dict()
    assert (state["init_seconds"], state["train_seconds"], state["e2e_seconds"]) == (3, 21, 24)

    later = FakeClock(500.0)  # another process, its command started at 500
    resumed = Meter(command_start=500.0, device=CPU, clock=later, synchronize=later.sync)
    resumed.load_state_dict(state)
    later.advance(2.0)
    resumed.train_started()
    later.advance(5.0)
    resumed.stopped()
    assert (resumed.images, resumed.steps, resumed.eval_seconds) == (32, 4, 10)
    assert resumed.init_time() == pytest.approx(3 + 2)
    assert resumed.train_time() == pytest.approx(21 + 5)
    assert resumed.e2e_time() == pytest.approx(24 + 7)  # the time between segments counts nowhere


def test_accuracy_fields_track_last_best_and_target():
    clock = FakeClock(100.0)
    meter = scripted_run(clock)
    m = summarize(meter, single(), target_map=0.35)
    assert m["mAP"] == 0.4
    assert (m["best_mAP"], m["best_epoch"], m["best_step"]) == (0.4, 1, 4)
    assert m["converged"] is True
    assert m["time_to_target"] == pytest.approx(20.0)  # train_time at the end of eval 2
    assert [e["seconds"] for e in m["evaluations"]] == pytest.approx([4.0, 6.0])

    never = summarize(meter, single(), target_map=0.9)
    assert never["converged"] is False and never["time_to_target"] is None


def test_best_map_is_not_the_last_when_accuracy_drops():
    clock, meter = clocked_meter(0.0)
    meter.train_started()
    for epoch, ap in enumerate([0.3, 0.5, 0.45]):
        with meter.core_step(images=2):
            clock.advance(1.0)
        with meter.evaluation():
            clock.advance(1.0)
        meter.eval_done(epoch, stats(ap))
    m = summarize(meter, single(), target_map=0.0 + 0.49)
    assert (m["mAP"], m["best_mAP"], m["best_epoch"]) == (0.45, 0.5, 1)
    assert m["time_to_target"] == pytest.approx(4.0)  # end of the second evaluation


def test_core_window_is_bracketed_by_device_synchronizes():
    clock, meter = clocked_meter(0.0)
    meter.train_started()
    clock.log.clear()
    with meter.core_step(images=1):
        clock.advance(1.0)
    kinds = [kind for kind, _ in clock.log]
    # sync before the start is read (the copy stays out), sync before the end is read
    assert kinds == ["sync", "read", "sync", "read"]


class FakeDevice:
    """A device timeline the test moves by hand, and timing events that it stamps when it
    reaches them; records every host wait."""

    def __init__(self) -> None:
        self.queued = 0.0  # device time of the work enqueued so far
        self.reached = 0.0  # device time the device has reached
        self.waits: list[str] = []

    def enqueue(self, seconds: float) -> None:
        self.queued += seconds

    def run_until(self, time: float) -> None:
        self.reached = time

    def event(self) -> "FakeEvent":
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.stamp: float | None = None

    def record(self) -> None:
        self.stamp = self.device.queued

    def query(self) -> bool:
        return self.device.reached >= self.stamp

    def synchronize(self) -> None:
        self.device.waits.append("event")
        self.device.reached = max(self.device.reached, self.stamp)

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.query() and end.query(), "read before the device reached both events"
        return (end.stamp - self.stamp) * 1000


def test_accelerator_core_windows_are_device_events_read_without_waiting():
    """On an accelerator the step never waits for the device: each step's core time is the
    device's time between its two events, added once the device has passed them, the rest at
    the end. The wait for data between steps (device idle) counts in no window."""
    clock, device = FakeClock(0.0), FakeDevice()
    meter = Meter(
        command_start=0.0,
        device=torch.device("cuda"),
        clock=clock,
        synchronize=lambda d: device.waits.append("synchronize"),
        timing_warmup_steps=1,
        events=device.event,
    )
    meter.train_started()
    device_seconds = [3.0, 2.0, 2.5, 1.5]
    for seconds in device_seconds:
        device.enqueue(0.25)  # the data's copy: before the start event
        with meter.core_step(images=4):
            device.enqueue(seconds)
        device.enqueue(0.5)  # idle: waiting for the next batch
        clock.advance(0.1)  # the host runs ahead of the device
    assert device.waits == []  # no synchronize, no event waited on
    assert meter.steps == 4 and meter.images == 16
    assert meter.core_seconds == 0.0  # the device has reached none of the end events

    device.run_until(0.25 + 3.0 + 0.5 + 0.25 + 2.0)  # through step 2's end event
    with meter.core_step(images=4):  # reading happens as steps go, without waiting
        device.enqueue(1.0)
    assert device.waits == []
    assert meter.core_seconds == pytest.approx(5.0)

    m = summarize(meter, single(), target_map=0.0)  # the end: waits for the rest
    assert device.waits == ["event"] * 3
    assert m["core_time"] == pytest.approx(sum(device_seconds) + 1.0)
    assert m["p_core"] == pytest.approx(20 / 10.0)
    assert m["p_core_steady"] == pytest.approx(16 / 7.0)  # step 1 is the warm-up


def test_interval_rate_counts_images_since_last_call():
    clock, meter = clocked_meter(0.0)
    meter.train_started()
    for _ in range(3):
        with meter.core_step(images=4):
            clock.advance(1.0)
    assert meter.interval_rate() == pytest.approx(12 / 3.0)
    with meter.core_step(images=4):
        clock.advance(0.5)
    clock.advance(0.5)
    assert meter.interval_rate() == pytest.approx(4 / 1.0)


class FakeWorld(DistEnv):
    """Rank 0 of a world of two; the other rank's values of each reduction are given, in the
    order `summarize` reduces them."""

    def __init__(self, other_sums: list[float], other_maxima: list[float]) -> None:
        super().__init__(rank=0, world_size=2, local_rank=0, local_world_size=2, device=CPU)
        object.__setattr__(self, "other", {"sum": other_sums, "max": other_maxima})

    def all_reduce(self, values, op):
        combine = sum if op == "sum" else max
        return [combine(pair) for pair in zip(values, self.other[op], strict=True)]


def test_multi_rank_sums_images_and_takes_the_slowest_core():
    clock = FakeClock(100.0)
    meter = scripted_run(clock)  # this rank: 32 images, 8 s core
    # the other rank: 32 images (all steady: no timing warm-up), 4 steps; 9 s core, all steady
    world = FakeWorld(other_sums=[32, 4, 32], other_maxima=[9.0, 9.0])
    m = summarize(meter, world, target_map=0.35)
    assert m["trained_images"] == 64
    assert m["steps"] == 4  # per rank: steps are global steps, not summed
    assert m["core_time"] == pytest.approx(9.0)
    assert m["p_core"] == pytest.approx(64 / 9.0)
    assert m["p_core_steady"] == pytest.approx(64 / 9.0)


def test_p_core_steady_leaves_out_the_first_steps():
    clock = FakeClock(0.0)
    meter = Meter(
        command_start=0.0, device=CPU, clock=clock, synchronize=clock.sync, timing_warmup_steps=2
    )
    meter.train_started()
    for seconds in (10.0, 4.0, 1.0, 1.0, 1.0):  # kernel selection makes the first steps slow
        with meter.core_step(images=4):
            clock.advance(seconds)
    with meter.evaluation():
        clock.advance(1.0)
    meter.eval_done(0, stats(0.1))
    m = summarize(meter, single(), target_map=0.35)
    assert m["p_core"] == pytest.approx(20 / 17.0)
    assert m["p_core_steady"] == pytest.approx(12 / 3.0)
    assert m["timing_warmup_steps"] == 2

    short = Meter(0.0, CPU, clock=clock, synchronize=clock.sync, timing_warmup_steps=5)
    short.train_started()
    with short.core_step(images=4):
        clock.advance(1.0)
    with short.evaluation():
        clock.advance(1.0)
    short.eval_done(0, stats(0.1))
    assert summarize(short, single(), target_map=0.35)["p_core_steady"] is None


def test_memory_is_the_largest_rank_and_labels_its_view():
    mine = memory_peak(CPU)
    m = memory([mine, {**mine, "used": 1e6}], driver=None)
    assert m["mem_used_gib"] == 1e6
    assert m["mem"].startswith("1000000.0/") and m["mem"] == m["mem_process"]
    assert m["mem_source"] == m["mem_process_source"] == "peak resident set / RAM"
    assert m["mem_driver"] is None
    assert len(m["mem_per_rank_gib"]) == 2 and max(m["mem_per_rank_gib"]) == 1e6


def test_the_table_shows_the_driver_view_when_the_monitor_read_it():
    m = memory([memory_peak(CPU)], driver=(38.84, 40.0), driver_view=Nvidia.memory_view)
    assert (m["mem"], m["mem_driver"]) == ("38.8/40.0", "38.8/40.0")
    assert m["mem_source"] == "driver peak used / device total (NVML, as nvidia-smi shows)"
    assert m["mem_process"] != m["mem"]  # the process's own view is kept beside it


def test_driver_peak_takes_the_jobs_devices_only_matched_by_their_ids():
    devices = [
        {"uuid": "GPU-aaaa", "mem_used_peak_gib": 30.0, "mem_total_gib": 40.0},
        {"uuid": "GPU-bbbb", "mem_used_peak_gib": 39.0, "mem_total_gib": 40.0},  # not ours
        {"uuid": "GPU-cccc", "mem_used_peak_gib": 35.5, "mem_total_gib": 40.0},
        {"uuid": "GPU-dddd", "mem_used_peak_gib": None, "mem_total_gib": 40.0},
    ]
    # the ids are the plug-in's (`DevicePlugin.device_id`), spelled as its sampler spells them
    assert driver_peak(devices, ["GPU-aaaa", "GPU-cccc", "GPU-dddd", None]) == (35.5, 40.0)
    assert driver_peak(devices, ["GPU-eeee"]) is None
    assert driver_peak([], ["GPU-aaaa"]) is None


def test_cpu_has_no_device_id():
    assert Cpu().device_id(CPU) is None


def _proc_kib(path: str, field: str) -> int:
    with open(path) as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def test_cpu_memory_is_peak_resident_set_over_ram():
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched: the resident set grows
    current = _proc_kib("/proc/self/status", "VmRSS") / 1024**2
    peak = _proc_kib("/proc/self/status", "VmHWM") / 1024**2  # the kernel's high-water mark
    reading = memory_peak(CPU)
    del block
    assert reading["used"] >= 0.99 * current
    assert reading["used"] == pytest.approx(peak, rel=0.05)
    assert reading["total"] == pytest.approx(
        _proc_kib("/proc/meminfo", "MemTotal") / 1024**2, rel=0.01
    )


def test_a_process_started_by_a_large_one_reports_its_own_peak():
    """getrusage's ru_maxrss survives exec on Linux: a run launched by a process that holds
    gigabytes (a launcher, a benchmark) would report at least the parent's resident set."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc")
    block = torch.ones(2 * 1024**3 // 4)  # 2 GiB, touched: resident in this process
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from retinaperf.measure import memory; print(memory.peak_resident_bytes())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    del block
    assert int(child.stdout) < 1.5 * 1024**3  # torch's import, not the parent's 2 GiB
