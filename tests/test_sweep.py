"""`retinaperf sweep`: its axes, the lr rule, the batch search, the saturation point, and a grid
end to end (points in their own processes, sweep.json, report.md, sweep.png, `report`)."""

import json

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
