"""`retinaperf sweep`: its axes, the lr rule, the batch search, the saturation point, and a grid
end to end (points in their own processes, sweep.json, report.md, sweep.png, `report`)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_results import made_results

from retinaperf import cli
from retinaperf.data.synth import SynthSpec, generate
from retinaperf.errors import UserError
from retinaperf.files import write_json_atomic
from retinaperf.report.results import RESULTS
from retinaperf.report.sweep_report import SATURATION, summarize
from retinaperf.run import batch_search, sweep
from retinaperf.run.sweep import SWEEP, Base, SweepPlan, parse_axes, point_lr


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        ("foo=1,2", "--vary foo: unknown key"),
        ("batch_size=2,x", "--vary: batch_size='x' is not valid"),
        ("lr_steps=4,5", "--vary lr_steps: cannot be varied"),
        ("output_dir=a,b", "--vary output_dir: cannot be varied"),
        ("batch_size=2,2", "a value given twice"),
        ("batch_size", "write KEY=V1,V2"),
        ("nproc_per_node=1,0", "--vary nproc_per_node=0: give a number of processes"),
    ],
)
def test_axes_are_checked_as_set_checks_keys(vary, message):
    with pytest.raises(UserError, match=message):
        parse_axes([vary])


def test_an_axis_is_given_once_and_by_its_bare_name():
    (axis,) = parse_axes(["train.batch_size=2,4"])
    assert (axis.key, axis.values) == ("batch_size", ("2", "4"))
    with pytest.raises(UserError, match="given twice"):
        parse_axes(["batch_size=2", "train.batch_size=4"])


def test_linear_rule_scales_lr_with_the_global_batch():
    base = Base("A100-1x1", 16, 0.04, 1, "fp32", 0.0, True)
    assert point_lr(base, 16, 1, "linear") == pytest.approx(0.04)
    assert point_lr(base, 32, 1, "linear") == pytest.approx(0.08)
    assert point_lr(base, 16, 8, "linear") == pytest.approx(0.32)  # 8 processes of 16
    assert point_lr(base, 64, 8, "none") == 0.04


@pytest.mark.parametrize("start", [1, 2, 3, 8])
@pytest.mark.parametrize("capacity", [1, 5, 8, 13])
def test_batch_search_finds_the_largest_batch_that_fits(start, capacity):
    result = batch_search.search(
        start, lambda batch: "fits" if batch <= capacity else "out_of_memory"
    )
    assert (result.largest_fit, result.smallest_out_of_memory) == (capacity, capacity + 1)
    assert result.tried[0] == start and len(set(result.tried)) == len(result.tried)
    if start <= capacity:  # doubling first, while it fits
        doubled = [start * 2**k for k in range(len(result.tried)) if start * 2**k <= capacity]
        assert result.tried[: len(doubled)] == doubled


def test_batch_search_stops_at_a_failure_and_when_nothing_fits():
    failed = batch_search.search(2, lambda batch: "fits" if batch < 8 else "stop")
    assert (failed.largest_fit, failed.stopped_at, failed.tried) == (4, 8, [2, 4, 8])
    none = batch_search.search(4, lambda batch: "out_of_memory")
    assert (none.largest_fit, none.smallest_out_of_memory, none.tried) == (None, 1, [4, 2, 1])


@pytest.mark.parametrize("max_trials", [1, 2, 3, 4, 5])
def test_batch_search_runs_at_most_max_trials_batches_and_brackets_the_boundary(max_trials):
    """Capacity 37 from 16: the whole search is 16, 32, 64, 48, 40, 36, 38, 37 (8 batches)."""
    whole = batch_search.search(16, lambda batch: "fits" if batch <= 37 else "out_of_memory")
    limited = batch_search.search(
        16, lambda batch: "fits" if batch <= 37 else "out_of_memory", max_trials
    )
    assert limited.tried == whole.tried[:max_trials] and limited.out_of_trials
    assert limited.stopped_at is None
    fitted = [b for b in limited.tried if b <= 37]
    too_large = [b for b in limited.tried if b > 37]
    assert limited.largest_fit == max(fitted)
    assert limited.smallest_out_of_memory == (min(too_large) if too_large else None)
    exact = batch_search.search(16, lambda batch: "fits" if batch <= 37 else "out_of_memory", 8)
    assert exact.tried == whole.tried and not exact.out_of_trials


@pytest.mark.parametrize(
    ("find_batch", "max_trials", "message"),
    [
        (False, 3, "--max-trials: it limits --find-batch's search; add --find-batch"),
        (True, -1, "--max-trials -1: give 0 .no limit. or a number of batches"),
    ],
)
def test_max_trials_needs_a_search_and_a_count(find_batch, max_trials, message):
    axes = parse_axes(["precision=fp32,bf16"])
    with pytest.raises(UserError, match=message):
        sweep.check_plan(axes, find_batch, "linear", max_trials)


def _point(batch, p_core, status="completed", precision="fp32"):
    return {
        "name": f"b{batch}",
        "values": {"batch_size": str(batch), "precision": precision},
        "batch_size": batch,
        "status": status,
        "precision": precision,
        "p_core": p_core if status == "completed" else None,
        "mem_used_gib": batch / 4,
        "mem_total_gib": 24.0,
        "memory_limit_gib": 3.0,
    }


def test_saturation_is_the_smallest_batch_within_5_percent_of_the_best_per_precision():
    speeds = {2: 10.0, 4: 18.0, 8: 19.5, 16: 20.0}
    points = [_point(b, p) for b, p in speeds.items()] + [_point(32, None, "out_of_memory")]
    points += [_point(b, 30.0 - b, precision="bf16") for b in (2, 4)]
    groups = {g["group"]: g for g in summarize(points)["groups"]}
    fp32 = groups["fp32"]
    best = max(speeds.values())
    within = [b for b, p in speeds.items() if p >= (1 - SATURATION) * best]
    assert fp32["saturation_batch"] == min(within) and fp32["best_batch"] == 16
    assert (fp32["largest_fit"], fp32["out_of_memory_at"]) == (16, 32)
    assert (fp32["out_of_memory_device_gib"], fp32["out_of_memory_limit_gib"]) == (24.0, 3.0)
    bf16 = groups["bf16"]
    assert (bf16["saturation_batch"], bf16["largest_fit"], bf16["out_of_memory_at"]) == (2, 4, None)


def test_report_of_two_precisions_has_every_point_a_row_and_a_group_per_precision(tmp_path, capsys):
    """sweep.json, report.md and sweep.png as a sweep writes them (`write_outputs`) of points of
    fp32 and bf16 whose runs' results are made, not run (run, the grid of both precisions at 64 px,
    batch 2 and 4 took 172 s on a 2-core CPU; the fp32 `grid` below takes 28 s): every completed
    point a row with the lr rule's lr in fix_hp, a saturation row per precision, the plot, and
    `retinaperf report` printing report.md."""
    base = Base("A100-1x1", 16, 0.04, 1, "fp32", 0.0, True)
    axes = parse_axes(["batch_size=16,32,64", "precision=fp32,bf16"])
    plan = SweepPlan(tmp_path, axes, False, "linear", base, None, lambda n, pairs: [], "START")
    speeds = {("fp32", 16): 100.0, ("fp32", 32): 190.0, ("fp32", 64): 195.0}
    speeds |= {("bf16", 16): 300.0, ("bf16", 32): 310.0}
    records = []
    for precision in ("fp32", "bf16"):
        for batch in (16, 32, 64):
            name = f"batch_size-{batch}_precision-{precision}"
            folder = tmp_path / name
            folder.mkdir()
            lr = point_lr(base, batch, 1, "linear")
            set_pairs = {"batch_size": batch, "precision": precision, "lr": lr}
            made = made_results(set_pairs, local_batch=batch, precision=precision, lr=lr)
            made["metrics"]["p_core"] = speeds.get((precision, batch))
            if (precision, batch) == ("bf16", 64):  # out of memory in its first step
                made |= {"status": "failed", "failure": "out_of_memory", "reason": "out of memory"}
            write_json_atomic(folder / RESULTS, {**made, "run_dir": str(folder)})
            values = {"batch_size": str(batch), "precision": precision}
            record = {"name": name, "run_dir": str(folder), "values": values, "batch_size": batch}
            record |= {"nproc_per_node": 1, "lr": lr, "memory_limit_gib": 0.0, "exit_status": 0}
            records.append({**record, **sweep._outcome(folder, 0, precision)})
    written = sweep.write_outputs(plan, records, None)
    capsys.readouterr()
    assert json.loads((tmp_path / SWEEP).read_text()) == json.loads(json.dumps(written))
    report = (tmp_path / "report.md").read_text()
    completed = [p for p in written["points"] if p["status"] == "completed"]
    assert len(completed) == 5
    for point in completed:
        assert f"| {point['name']} (A100-1x1) | " in report
        row = next(line for line in report.splitlines() if f"| {point['name']} " in line)
        assert f"| {point['precision']} | bs={point['batch_size']},lr={point['lr']:g} |" in row
    assert "lr rule: linear: lr = 0.04 x global batch / 16" in report
    assert "- batch_size-64_precision-bf16: out_of_memory: out of memory" in report
    rows = {g["group"]: g for g in written["groups"]}
    assert (rows["fp32"]["saturation_batch"], rows["fp32"]["largest_fit"]) == (32, 64)
    assert (rows["bf16"]["saturation_batch"], rows["bf16"]["out_of_memory_at"]) == (16, 64)
    assert "| fp32 | 195 (64) | 32 | 64 | – |" in report
    assert "| bf16 | 310 (32) | 16 | 32 | 64 (40.0 GiB device) |" in report
    assert "(sweep.png)" in report and (tmp_path / "sweep.png").stat().st_size > 0
    assert cli.main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out == report


# What a sweep's points run: one step at 256 px (fp32), where a training image's memory shows
# beside what does not depend on the batch (measured on a 2-core CPU in four runs: mem 1.44-1.48
# GiB at batch 2, 1.58-1.74 at batch 4), on a dataset of one validation image (each point ends
# with an evaluation), with the system monitor off (no sweep reads it).
POINT = {"max_steps": 1, "min_size": 256, "max_size": 256, "monitor_interval": 0}


@pytest.fixture(scope="module")
def sweep_dataset(tmp_path_factory) -> Path:
    """The tiny dataset's 24 training images with one validation image."""
    root = tmp_path_factory.mktemp("data") / "coco"
    return generate(SynthSpec(seed=3, train_images=24, val_images=1, image_size=64), root)


@pytest.fixture(scope="module")
def grid(tiny_run_args, sweep_dataset, tmp_path_factory):
    """`sweep --vary batch_size=2,4` (fp32, `POINT`): its folder, sweep.json and exit status.
    Its memory at batch 2 and 4 is also what `found` chooses its limit from. (Points of other
    precisions, grouped apart: test_report_of_two_precisions_....)"""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    # Its --set batch_size=2 is the base; each point's batch replaces it.
    args = ["sweep", *tiny_run_args(sweep_dataset, out, **POINT)[1:]]
    code = cli.main([*args, "--vary", "batch_size=2,4"])
    return out, json.loads((out / SWEEP).read_text()), code


def test_grid_runs_every_point_in_its_own_run_directory(grid):
    out, sweep, code = grid
    assert code == 0 and sweep["status"] == "completed"
    names = [p["name"] for p in sweep["points"]]
    assert names == ["batch_size-2", "batch_size-4"]
    assert all((out / n / "results.json").exists() for n in names)
    for point in sweep["points"]:
        results = json.loads((out / point["name"] / "results.json").read_text())
        m = results["metrics"]
        assert (m["local_batch"], m["precision"]) == (point["batch_size"], point["precision"])
        # the linear rule, from the configuration's batch and lr recorded in sweep.json
        base = sweep["base"]
        assert m["lr"] == pytest.approx(base["lr"] * point["batch_size"] / base["batch_size"])
        assert point["p_core"] == m["p_core"] and point["mem_used_gib"] == m["mem_used_gib"]


def test_grid_report_has_every_point_a_row_saturation_and_plot(grid, capsys):
    out, sweep, _ = grid
    report = (out / "report.md").read_text()
    for point in sweep["points"]:
        assert f"| {point['name']} (smoke) |" in report
        assert f"bs={point['batch_size']},lr={point['lr']:g}" in report
    (group,) = sweep["groups"]  # one precision: one group
    speeds = {p["batch_size"]: p["p_core"] for p in sweep["points"]}
    best = max(speeds.values())
    within = [b for b, p in speeds.items() if p >= (1 - SATURATION) * best]
    assert group["group"] == "fp32" and group["saturation_batch"] == min(within)
    assert (group["largest_fit"], group["out_of_memory_at"]) == (4, None)
    assert "## Saturation and memory" in report and "| fp32 | " in report
    assert (out / "sweep.png").stat().st_size > 0
    assert cli.main(["report", str(out)]) == 0
    assert capsys.readouterr().out == report
    assert cli.main(["report", str(out), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


# What a CPU run reserves and never touches counts against memory_limit_gib (docs/metrics.md,
# Sweeps): in four runs on a 2-core CPU, points out of memory peaked 0.004 to 0.07 GiB under the
# limit.
RESERVE_GIB = 0.1


@pytest.fixture(scope="module")
def found(grid, tiny_run_args, sweep_dataset, tmp_path_factory):
    """`sweep --find-batch` from batch 4 (the configuration's batch) under a memory_limit_gib
    chosen, as a user would, from the grid's memory: halfway from batch 4 to batch 8 at the
    grid's cost per image, d = (mem(4) - mem(2)) / 2, so mem(4) + 2d, plus what the run reserves
    untouched. A peak varies from run to run (batch 4: 1.58-1.74 GiB in four runs here), so
    where the search ends is not asserted, only how: by the search's own rule, where a batch
    that fits and one out of memory meet, below 16 (the limit leaves batch 4 room for 2d and
    the reserve; batch 16 needs 12 images more). In four runs it tried 4, 8, 6, then 5 or 7."""
    mem = {p["batch_size"]: p["mem_used_gib"] for p in grid[1]["points"]}
    assert mem[4] - mem[2] > 0.05, mem  # the batch's share is clear at this size
    limit = round(mem[4] + (mem[4] - mem[2]) + RESERVE_GIB, 3)
    out = tmp_path_factory.mktemp("sweep") / "found"
    settings = {**POINT, "batch_size": 4, "memory_limit_gib": limit}
    args = tiny_run_args(sweep_dataset, out, **settings)
    code = cli.main(["sweep", *args[1:], "--find-batch"])
    return out, json.loads((out / SWEEP).read_text()), code, limit


def test_find_batch_records_the_out_of_memory_point_as_the_boundary(found):
    out, sweep, code, limit = found
    assert code == 0 and sweep["status"] == "completed" and sweep["find_batch"]
    points = sweep["points"]
    assert points[0]["batch_size"] == 4
    assert {p["status"] for p in points} == {"completed", "out_of_memory"}
    fitted = [p["batch_size"] for p in points if p["status"] == "completed"]
    failed = [p["batch_size"] for p in points if p["status"] == "out_of_memory"]
    (group,) = sweep["groups"]
    largest = group["largest_fit"]
    assert 2 <= largest < 16
    # Every batch that fitted is at most the largest, every one out of memory above it, and the
    # search ran the batches the search runs where exactly those up to the largest fit.
    assert all(b <= largest for b in fitted) and all(b >= largest + 1 for b in failed)
    assert largest + 1 in failed
    capacity = batch_search.search(4, lambda b: "fits" if b <= largest else "out_of_memory")
    assert [p["batch_size"] for p in points] == capacity.tried
    for point in points:
        results = json.loads((out / point["name"] / "results.json").read_text())
        assert results["config"]["memory_limit_gib"] == point["memory_limit_gib"] == limit
        if point["status"] == "out_of_memory":
            assert results["failure"] == "out_of_memory" and "out of cpu memory" in point["reason"]
        else:
            assert results["status"] == "completed" and point["mem_used_gib"] < limit
    assert group["out_of_memory_at"] == largest + 1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert group["out_of_memory_device_gib"] == pytest.approx(ram)
    assert group["out_of_memory_limit_gib"] == limit
    report = (out / "report.md").read_text()
    boundary = f"| {largest} | {largest + 1} ({ram:.1f} GiB device, limit {limit:g} GiB) |"
    assert "| fp32 | " in report and boundary in report
    assert all(f"| batch_size-{b} (smoke) |" in report for b in fitted)
    assert all(f"- batch_size-{b}: out_of_memory: out of cpu memory" in report for b in failed)
    assert (out / "sweep.png").stat().st_size > 0


def test_ctrl_c_stops_the_sweep_and_reports_the_points_that_finished(
    tiny_run_args, sweep_dataset, tmp_path
):
    """SIGINT to the sweep's process group, as a terminal's Ctrl-C sends it, once its first
    point has written its results: exit 130, sweep.json interrupted with that point."""
    out = tmp_path / "sweep"
    # the cheapest points: 64 px, batch 2 (and 4, stopped), one step, one validation image
    settings = {"max_steps": 1, "monitor_interval": 0}
    args = ["sweep", *tiny_run_args(sweep_dataset, out, **settings)[1:], "--vary", "batch_size=2,4"]
    with open(tmp_path / "console.txt", "w") as console:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "retinaperf", *args],
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's job has
        )
        try:
            first = out / "batch_size-2" / "results.json"
            deadline = time.monotonic() + 600
            while not first.exists():
                assert sweep.poll() is None, (tmp_path / "console.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "the first point wrote no results in 600 s"
                time.sleep(0.1)
            os.killpg(sweep.pid, signal.SIGINT)
            code = sweep.wait(timeout=600)
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
    assert code == 130, (tmp_path / "console.txt").read_text()[-3000:]
    written = json.loads((out / SWEEP).read_text())
    assert written["status"] == "interrupted"
    first_point, *rest = written["points"]
    assert (first_point["name"], first_point["status"]) == ("batch_size-2", "completed")
    assert all(p["status"] == "interrupted" for p in rest)  # the second, if it had started
    report = (out / "report.md").read_text()
    assert "then the sweep was interrupted" in report and "| batch_size-2 (smoke) |" in report


def test_nproc_axis_runs_each_point_on_its_processes_and_reports_scaling(
    tiny_run_args, sweep_dataset, tmp_path
):
    """`--vary nproc_per_node=1,2`, the seed's 1x1 and 1xN rows: the 2-process point runs two
    ranks (torchrun, gloo) at twice the global batch and, by the linear rule, twice the lr; the
    report's row for it has the scaling figure against the 1-process point."""
    out = tmp_path / "sweep"
    args = ["sweep", *tiny_run_args(sweep_dataset, out, max_steps=1, monitor_interval=0)[1:]]
    assert cli.main([*args, "--vary", "nproc_per_node=1,2"]) == 0
    points = json.loads((out / SWEEP).read_text())["points"]
    assert [(p["name"], p["nproc_per_node"]) for p in points] == [
        ("nproc_per_node-1", 1),
        ("nproc_per_node-2", 2),
    ]
    one, two = (json.loads((out / p["name"] / RESULTS).read_text())["metrics"] for p in points)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["global_batch"] == 2 * one["global_batch"]
    assert two["lr"] == pytest.approx(2 * one["lr"]) and two["lr"] == points[1]["lr"]
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if "| nproc_per_node-2 (smoke) |" in line)
    scaling = two["p_train"] / (2 * one["p_train"])
    assert f"| {100 * scaling:.1f}% |" in row


def test_a_limited_search_says_so_in_sweep_json_and_the_report(tmp_path, capsys):
    base = Base("A100-1x1", 16, 0.04, 1, "bf16", 0.0, True)
    plan = SweepPlan(tmp_path, (), True, "linear", base, None, lambda n, pairs: [], "START", 3)
    written = sweep.write_outputs(plan, [], None)
    capsys.readouterr()
    assert json.loads((tmp_path / SWEEP).read_text())["max_trials"] == written["max_trials"] == 3
    report = (tmp_path / "report.md").read_text()
    assert "the largest batch searched (--find-batch, at most 3 batches a search)" in report
