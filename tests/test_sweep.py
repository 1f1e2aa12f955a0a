"""`retinaperf sweep`: its axes, the lr rule, the batch search, the saturation point, and a grid
end to end (points in their own processes, sweep.json, report.md, sweep.png, `report`)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from retinaperf import cli
from retinaperf.errors import UserError
from retinaperf.report.sweep_report import SATURATION, summarize
from retinaperf.run import batch_search
from retinaperf.run.sweep import SWEEP, Base, parse_axes, point_lr


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


@pytest.fixture(scope="module")
def grid(tiny_run_args, tiny_dataset, tmp_path_factory):
    """`sweep --vary batch_size=2,4 --vary precision=fp32,bf16` on the tiny dataset, one step a
    point: its folder, sweep.json and exit status."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    # Its --set batch_size=2 and precision=fp32 are the base; each point's values replace them.
    args = ["sweep", *tiny_run_args(tiny_dataset, out, max_steps=1)[1:]]
    code = cli.main([*args, "--vary", "batch_size=2,4", "--vary", "precision=fp32,bf16"])
    return out, json.loads((out / SWEEP).read_text()), code


def test_grid_runs_every_point_in_its_own_run_directory(grid):
    out, sweep, code = grid
    assert code == 0 and sweep["status"] == "completed"
    names = [p["name"] for p in sweep["points"]]
    assert len(names) == 4 and all((out / n / "results.json").exists() for n in names)
    for point in sweep["points"]:
        results = json.loads((out / point["name"] / "results.json").read_text())
        m = results["metrics"]
        assert (m["local_batch"], m["precision"]) == (point["batch_size"], point["precision"])
        # the linear rule, from the configuration's batch and lr recorded in sweep.json
        base = sweep["base"]
        assert m["lr"] == pytest.approx(base["lr"] * point["batch_size"] / base["batch_size"])
        assert point["p_core"] == m["p_core"]


def test_grid_report_has_every_point_a_row_saturation_and_plot(grid, capsys):
    out, sweep, _ = grid
    report = (out / "report.md").read_text()
    for point in sweep["points"]:
        assert f"| {point['name']} (smoke) |" in report
        assert f"bs={point['batch_size']},lr={point['lr']:g}" in report
    assert {g["group"] for g in sweep["groups"]} == {"fp32", "bf16"}
    assert "## Saturation and memory" in report and (out / "sweep.png").stat().st_size > 0
    assert cli.main(["report", str(out)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == report.rstrip("\n")
    assert cli.main(["report", str(out), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


# 256 px (fp32): a training image's memory is clear beside the model's (about 0.1 GiB; at 64 px it
# is lost in the noise).
SIZE = {"min_size": 256, "max_size": 256}


@pytest.fixture(scope="module")
def found(tiny_run_args, tiny_dataset, tmp_path_factory):
    """`sweep --find-batch` from the tiny batch 2 under a memory_limit_gib chosen, as a user
    would, from a first sweep's memory: at batch 2 plus 2.5 times what batch 4 added, room for
    about 5 more images less what the run reserves untouched (measured: about 2), so that batch 2
    fits by a wide margin and batch 8 does not (a search of 5 points: 2, 4, 8, 6, then 5 or 7)."""
    first = tmp_path_factory.mktemp("sweep") / "measured"
    args = tiny_run_args(tiny_dataset, first, max_steps=1, **SIZE)
    assert cli.main(["sweep", *args[1:], "--vary", "batch_size=2,4"]) == 0
    measured = json.loads((first / SWEEP).read_text())["points"]
    mem = {p["batch_size"]: p["mem_used_gib"] for p in measured}
    assert mem[4] - mem[2] > 0.05, mem  # the batch's share is clear at this size
    limit = round(mem[2] + 2.5 * (mem[4] - mem[2]), 3)
    out = tmp_path_factory.mktemp("sweep") / "found"
    args = tiny_run_args(tiny_dataset, out, max_steps=1, memory_limit_gib=limit, **SIZE)
    code = cli.main(["sweep", *args[1:], "--find-batch"])
    return out, json.loads((out / SWEEP).read_text()), code, limit


def test_find_batch_records_the_out_of_memory_point_as_the_boundary(found):
    out, sweep, code, limit = found
    assert code == 0 and sweep["status"] == "completed" and sweep["find_batch"]
    points = sweep["points"]
    assert points[0]["batch_size"] == 2 and points[0]["status"] == "completed"
    assert {p["status"] for p in points} == {"completed", "out_of_memory"}
    fitted = [p["batch_size"] for p in points if p["status"] == "completed"]
    failed = [p["batch_size"] for p in points if p["status"] == "out_of_memory"]
    # The search ends where the largest batch that fits and the smallest that does not meet.
    assert min(failed) == max(fitted) + 1 and max(fitted) < min(failed) and len(points) <= 6
    for point in points:
        results = json.loads((out / point["name"] / "results.json").read_text())
        assert results["config"]["memory_limit_gib"] == point["memory_limit_gib"] == limit
        if point["status"] == "out_of_memory":
            assert results["failure"] == "out_of_memory" and "out of cpu memory" in point["reason"]
        else:
            assert results["status"] == "completed" and point["mem_used_gib"] < limit
    (group,) = sweep["groups"]
    assert (group["largest_fit"], group["out_of_memory_at"]) == (max(fitted), min(failed))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert group["out_of_memory_device_gib"] == pytest.approx(ram)
    assert group["out_of_memory_limit_gib"] == limit
    report = (out / "report.md").read_text()
    boundary = f"| {min(failed)} ({ram:.1f} GiB device, limit {limit:g} GiB) |"
    assert "| fp32 | " in report and boundary in report
    assert all(f"| batch_size-{b} (smoke) |" in report for b in fitted)
    assert all(f"- batch_size-{b}: out_of_memory: out of cpu memory" in report for b in failed)
    assert (out / "sweep.png").stat().st_size > 0


def test_ctrl_c_stops_the_sweep_and_reports_the_points_that_finished(
    tiny_run_args, tiny_dataset, tmp_path
):
    """SIGINT to the sweep's process group, as a terminal's Ctrl-C sends it, once its first
    point has written its results: exit 130, sweep.json interrupted with that point."""
    out = tmp_path / "sweep"
    args = ["sweep", *tiny_run_args(tiny_dataset, out, max_steps=1)[1:], "--vary", "batch_size=2,4"]
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
