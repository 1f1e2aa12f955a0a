"""Where the training time went: the parts add up to the training time, and each verdict is
steered by slowing its part on purpose (the data loader, the all-reduce of two gloo ranks); a
plain CPU run is bound by compute, the CPU's one part for host and device."""

import json
import time

import pytest
import torch
from test_distributed import HERE, TORCHRUN, run
from test_metrics import FakeClock, FakeDevice, single

from retinaperf.data import coco
from retinaperf.measure.breakdown import breakdown
from retinaperf.measure.meter import Meter, summarize

CPU = torch.device("cpu")
# Slow enough that the wait outweighs a tiny step on a loaded 2-core CI machine (seconds).
SLOW_IMAGE_S = 3.0


def _parts(b: dict) -> dict[str, float]:
    return {p["part"]: p["seconds"] for p in b["parts"]}


def _adds_up(b: dict, total: float) -> None:
    """The parts' seconds add up to the training time without evaluation and checkpoints, and
    their shares to 1, within 2 %."""
    assert sum(_parts(b).values()) == pytest.approx(total, rel=0.02)
    assert sum(p["share"] for p in b["parts"]) == pytest.approx(1.0, rel=0.02)


def test_on_the_cpu_host_and_device_are_one_part_compute():
    b = breakdown(total=10.0, data=2.0, core=7.0, communication=1.0, host_bound=None)
    assert _parts(b) == pytest.approx(
        {"data": 2.0, "compute": 6.0, "communication": 1.0, "other": 1.0}
    )
    assert b["bound_by"] == "compute" and "compute 60% of 10.0 s" in b["evidence"]
    _adds_up(b, 10.0)


def test_on_an_accelerator_host_bound_windows_are_the_hosts_part():
    b = breakdown(total=10.0, data=1.0, core=8.0, communication=0.5, host_bound=5.0)
    assert _parts(b) == pytest.approx(
        {"data": 1.0, "host": 5.0, "device": 2.5, "communication": 0.5, "other": 1.0}
    )
    assert b["bound_by"] == "host" and "reduce-overhead" in b["advice"]


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


def test_a_plain_run_shows_the_breakdown_adding_up_and_is_bound_by_compute(one_run):
    out, results = one_run
    m = results["metrics"]
    b = m["breakdown"]
    _adds_up(b, m["train_time"] - m["eval_time"] - m["checkpoint_time"])
    parts = _parts(b)
    assert set(parts) == {"data", "compute", "communication", "other"}
    assert parts["communication"] == 0.0  # one rank, no all-reduce
    assert b["bound_by"] == "compute"
    report = (out / "report.md").read_text()
    assert "- where the time went, of " in report
    assert "(on the CPU host and device are one part: compute)" in report
    assert "- bound by: compute (compute " in report


def test_a_slow_data_loader_makes_the_run_bound_by_data(
    tiny_run_args, tiny_dataset, tmp_path, monkeypatch
):
    from cli_helpers import run_cli

    real = coco.CocoDetection.__getitem__

    def slow(self, key):
        if self.folder.name == "train2017":  # evaluation's data is no training time
            time.sleep(SLOW_IMAGE_S)  # decoding as from a slow disk
        return real(self, key)

    monkeypatch.setattr(coco.CocoDetection, "__getitem__", slow)
    out = tmp_path / "run"
    assert run_cli(tiny_run_args(tiny_dataset, out, max_steps=2)) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    b = m["breakdown"]
    _adds_up(b, m["train_time"] - m["eval_time"] - m["checkpoint_time"])
    assert _parts(b)["data"] >= 2 * 2 * SLOW_IMAGE_S  # steps x images x sleep
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
    assert _parts(b)["communication"] >= 2 * 4.0  # two steps, each delayed at least once
    assert b["bound_by"] == "communication" and "NCCL_SOCKET_IFNAME" in b["advice"]
    assert m["implementation"]["ddp"] is not None
