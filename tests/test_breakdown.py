"""Where the training time went: the parts add up to the training time, and each verdict is
steered by slowing its part on purpose (the data loader, the all-reduce of two gloo ranks); a
plain CPU run is bound by the device, which on the CPU is the host: one part, `device`."""

import json
import time

import pytest
import torch
from dist_slow_comm import DELAY_S
from test_distributed import HERE, TORCHRUN, run
from test_metrics import FakeClock, FakeDevice, FakeEvent, single
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from retinaperf.data import coco
from retinaperf.measure.breakdown import CommTimer, breakdown
from retinaperf.measure.meter import Meter, summarize

CPU = torch.device("cpu")
# The least a slowed training image takes to load (seconds); later ones take four times the
# longest step so far, so that the wait outweighs the steps on a machine however loaded: a load
# spike in the last step would have to make it 7 times slower than each step before it.
SLOW_IMAGE_S = 3.0


def _parts(b: dict) -> dict[str, float]:
    return {p["part"]: p["seconds"] for p in b["parts"]}


def _adds_up(b: dict, total: float) -> None:
    """The parts' seconds add up to the training time without evaluation and checkpoints, and
    their shares to 1, within 2 %."""
    assert sum(_parts(b).values()) == pytest.approx(total, rel=0.02)
    assert sum(p["share"] for p in b["parts"]) == pytest.approx(1.0, rel=0.02)


def test_on_the_cpu_the_device_is_the_host_one_part_with_the_cpus_advice():
    b = breakdown(total=10.0, data=2.0, core=7.0, communication=1.0, host_bound=None)
    assert _parts(b) == pytest.approx(
        {"data": 2.0, "device": 6.0, "communication": 1.0, "other": 1.0}
    )
    assert b["device_is_host"] is True
    assert b["bound_by"] == "device" and "device 60% of 10.0 s" in b["evidence"]
    assert "more cores" in b["advice"] and "channels_last" not in b["advice"]
    _adds_up(b, 10.0)


def test_on_an_accelerator_host_bound_windows_are_the_hosts_part():
    b = breakdown(total=10.0, data=1.0, core=8.0, communication=0.5, host_bound=5.0)
    assert _parts(b) == pytest.approx(
        {"data": 1.0, "host": 5.0, "device": 2.5, "communication": 0.5, "other": 1.0}
    )
    assert b["bound_by"] == "host" and "reduce-overhead" in b["advice"]
    assert b["device_is_host"] is False


def test_overlapping_parts_leave_a_negative_other_and_no_step_no_verdict():
    b = breakdown(total=5.0, data=2.0, core=4.0, communication=0.0, host_bound=0.0)
    assert _parts(b)["other"] == pytest.approx(-1.0)  # the host fetched as the device computed
    assert b["bound_by"] == "device"
    none = breakdown(total=0.0, data=0.0, core=0.0, communication=0.0, host_bound=None)
    assert none["bound_by"] is None and none["advice"] is None


def test_the_meter_times_the_wait_for_each_batch_and_its_copy():
    ticks = iter(range(100))
    meter = Meter(0.0, CPU, clock=lambda: float(next(ticks)), synchronize=lambda _: None)
    meter.train_started()
    for _ in meter.batches([1, 2]):  # each next() reads the clock twice: 1 s per batch
        with meter.copying():  # and so does each copy
            pass
    # two batches and the final next() that ends the loop, two copies
    assert meter.data_seconds == 5.0
    assert meter.state_dict()["data_seconds"] == 5.0  # the totals travel in checkpoints


def test_on_an_accelerator_windows_the_host_took_as_long_to_enqueue_are_host_bound():
    """No synchronize: the host's own clock around the step against the device's events."""
    clock, device = FakeClock(0.0), FakeDevice()
    meter = Meter(0.0, torch.device("cuda"), clock=clock, events=device.event)
    meter.train_started()
    for device_s, host_s in [(3.0, 0.1), (1.0, 1.5), (2.0, 0.2)]:
        with meter.core_step(images=2):
            device.enqueue(device_s)
            clock.advance(host_s)  # the host enqueuing the step's work
    assert device.waits == []
    clock.advance(20.0)
    meter.stopped()  # training time ends here (no evaluation)
    m = summarize(meter, single(), target_map=0.0)
    assert meter.host_bound_seconds == pytest.approx(1.0)  # the second step's window
    parts = _parts(m["breakdown"])
    assert parts["host"] == pytest.approx(1.0) and parts["device"] == pytest.approx(5.0)
    assert m["breakdown"]["bound_by"] == "device"


def test_on_an_accelerator_the_exposed_all_reduce_is_read_from_device_events(monkeypatch):
    """The stamps are events on the device's timeline, not the host's clock: the host enqueues
    the all-reduce in no time, and the device runs it later; read without a synchronize."""
    clock, device = FakeClock(0.0), FakeDevice()

    def allreduce(state, bucket) -> torch.futures.Future:
        device.enqueue(0.5)  # the all-reduce, on the device's timeline
        done = torch.futures.Future()
        done.set_result(torch.zeros(1))  # NCCL: done for the host once enqueued
        return done

    monkeypatch.setattr(default_hooks, "allreduce_hook", allreduce)

    def stamp() -> FakeEvent:
        event = device.event()
        event.record()
        return event

    comm = CommTimer(stamp)
    meter = Meter(0.0, torch.device("cuda"), clock=clock, events=device.event, comm=comm)
    meter.train_started()
    for _ in range(2):
        with meter.core_step(images=2):
            device.enqueue(2.0)  # forward and backward
            comm.hook(None, None)  # backward's last bucket is ready
            device.enqueue(0.25)  # the optimizer, after the all-reduce
            clock.advance(0.1)
    assert meter.comm_seconds == 0.0  # the device has reached nothing yet
    device.run_until(device.queued)
    meter.settle(wait=False)
    assert device.waits == []
    assert meter.comm_seconds == pytest.approx(2 * 0.5)
    assert meter.core_seconds == pytest.approx(2 * 2.75)


def test_a_plain_run_shows_the_breakdown_adding_up_and_is_bound_by_the_device(one_run):
    out, results = one_run
    m = results["metrics"]
    b = m["breakdown"]
    _adds_up(b, m["train_time"] - m["eval_time"] - m["checkpoint_time"])
    parts = _parts(b)
    assert set(parts) == {"data", "device", "communication", "other"}
    # The measured parts account for the training time: what none of them measured (the loop's
    # own work) is within 2 % of it, either way.
    assert abs(parts["other"]) <= 0.02 * b["total"]
    assert parts["communication"] == 0.0  # one rank, no all-reduce
    assert b["bound_by"] == "device" and b["device_is_host"]
    report = (out / "report.md").read_text()
    assert "- where the time went, of " in report
    assert "(on the CPU the device is the host: one part, device)" in report
    assert "- bound by: device (device " in report


def test_a_slow_data_loader_makes_the_run_bound_by_data(
    tiny_run_args, tiny_dataset, tmp_path, monkeypatch
):
    from cli_helpers import StepWatch, run_cli

    from retinaperf.run import step

    watch = StepWatch(step.train_step)
    real = coco.CocoDetection.__getitem__

    def slow(self, key):
        if self.folder.name == "train2017":  # evaluation's data is no training time
            # decoding as from a slow disk
            time.sleep(max(SLOW_IMAGE_S, 4 * watch.longest))
        return real(self, key)

    monkeypatch.setattr(coco.CocoDetection, "__getitem__", slow)
    out = tmp_path / "run"
    assert run_cli(tiny_run_args(tiny_dataset, out, max_steps=3), step_fn=watch) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    b = m["breakdown"]
    _adds_up(b, m["train_time"] - m["eval_time"] - m["checkpoint_time"])
    assert _parts(b)["data"] >= 3 * 2 * SLOW_IMAGE_S  # steps x images x sleep
    assert b["bound_by"] == "data" and "num_workers" in b["advice"]


def test_a_slow_all_reduce_of_two_ranks_makes_the_run_bound_by_communication(
    tiny_run_args, tiny_dataset, tmp_path
):
    out = tmp_path / "run"
    rdzv = ["--standalone", "--nproc-per-node", "2"]
    run([*TORCHRUN, *rdzv, str(HERE / "dist_slow_comm.py"), *tiny_run_args(tiny_dataset, out)])
    m = json.loads((out / "results.json").read_text())["metrics"]
    b = m["breakdown"]
    _adds_up(b, m["train_time"] - m["eval_time"] - m["checkpoint_time"])
    assert _parts(b)["communication"] >= 2 * DELAY_S  # two steps, each delayed at least once
    assert b["bound_by"] == "communication" and "NCCL_SOCKET_IFNAME" in b["advice"]
    assert m["implementation"]["ddp"] is not None
