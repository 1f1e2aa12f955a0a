"""Repeated rounds: the spread of each metric, which runs count as one configuration, and
`run --repeat N` end to end (rounds in their own processes, summary.json, report.md)."""

import json
import math

import pytest
from test_results import made_results

from retinaperf import cli
from retinaperf.files import write_json_atomic
from retinaperf.report.loading import load_results
from retinaperf.report.spread import configuration_key, groups, render_spread, spread
from retinaperf.report.tables import REPORT
from retinaperf.run.rounds import SUMMARY, round_dir, run_dirs, write_summary


def results(p_core: float, precision: str = "fp32", **metrics) -> dict:
    """A results.json object of preset A100-1x1 with these numbers; its output_dir per p_core."""
    return made_results(
        {"output_dir": f"runs/{p_core}"},
        device_name="NVIDIA H100 80GB HBM3",
        precision=precision,
        p_core=p_core,
        p_core_steady=None,
        **metrics,
    )


def test_spread_is_mean_min_max_and_sample_cv():
    runs = [results(10.0, mAP=0.30), results(12.0, mAP=0.31), results(14.0, mAP=0.29)]
    s = spread(runs)
    assert s["p_core"]["n"] == 3
    assert (s["p_core"]["mean"], s["p_core"]["min"], s["p_core"]["max"]) == (12.0, 10.0, 14.0)
    # sample standard deviation of 10, 12, 14: sqrt((4 + 0 + 4) / 2) = 2, over the mean 12
    assert s["p_core"]["cv"] == pytest.approx(2 / 12)
    assert s["mAP"]["mean"] == pytest.approx(0.30)
    assert "p_core_steady" not in s  # no run had it: no row rather than a made-up one


def test_one_run_has_no_cv():
    assert spread([results(10.0)])["p_core"]["cv"] is None


def test_one_configuration_ignores_where_runs_wrote_but_not_what_they_ran():
    a, b = results(10.0), results(11.0)
    assert a["config"]["output_dir"] != b["config"]["output_dir"]
    assert configuration_key(a) == configuration_key(b)
    other = results(10.0, precision="bf16")
    assert configuration_key(other) != configuration_key(a)
    assert [len(g) for g in groups([a, other, b])] == [2, 1]


def test_spread_table_names_the_configuration_and_formats_cv_in_percent():
    text = render_spread([results(10.0), results(12.0), results(14.0)])
    assert "3 runs of one configuration: preset A100-1x1" in text
    row = next(line for line in text.splitlines() if line.startswith("| p_core |"))
    assert row.split("|")[2:7] == [" 3 ", " 12.0 ", " 10.0 ", " 14.0 ", " 16.7% "]


def test_report_shows_the_spread_of_runs_of_one_configuration(tmp_path, capsys):
    dirs = []
    for p in (10.0, 12.0):
        folder = tmp_path / f"run{p}"
        folder.mkdir()
        full = results(
            p,
            e2e_time=100.0,
            p_whole=p / 2,
            p_train=p * 0.9,
            mAP=0.3,
            mem="1/2",
            local_batch=16,
            lr=0.04,
        )
        write_json_atomic(folder / "results.json", full)
        dirs.append(str(folder))
    assert cli.main(["report", *dirs]) == 0
    out = capsys.readouterr().out
    assert "Spread over 2 runs of one configuration" in out
    assert "| p_core | 2 | 11.0 | 10.0 | 12.0 |" in out


def test_report_of_a_repeat_folder_shows_its_rounds_and_their_spread(tmp_path, capsys):
    rep = tmp_path / "rep"
    for k, p in ((1, 10.0), (2, 12.0), (10, 14.0)):  # round 10 comes after round 2
        folder = round_dir(rep, k)
        folder.mkdir(parents=True)
        full = results(p, p_whole=p / 2, p_train=p * 0.9, mAP=0.3, local_batch=16, lr=0.04)
        write_json_atomic(folder / "results.json", {**full, "run_dir": str(folder)})
    assert run_dirs(rep) == [rep / "round-1", rep / "round-2", rep / "round-10"]
    assert run_dirs(rep / "round-2") == [rep / "round-2"]  # a run directory stands for itself
    write_summary(rep, [load_results(d) for d in run_dirs(rep)])
    assert cli.main(["report", str(rep)]) == 0
    out = capsys.readouterr().out
    runs = [line.split("|")[1].strip() for line in out.splitlines()[2:5]]
    assert runs == ["round-1 (A100-1x1)", "round-2 (A100-1x1)", "round-10 (A100-1x1)"]
    assert "| p_core | 3 | 12.0 | 10.0 | 14.0 |" in out
    # what `run --repeat` wrote beside the rounds is the same text, under its title
    title, body = (rep / REPORT).read_text().split("\n\n", 1)
    assert title == "# retinaperf: 3 rounds of preset A100-1x1" and body == out
    assert cli.main(["report", str(rep), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["run"] for row in rows] == ["round-1", "round-2", "round-10"]


def test_run_repeat_runs_rounds_in_their_own_processes_and_summarizes(
    tiny_run_args, tiny_dataset, tmp_path, capsys
):
    out = tmp_path / "rounds"
    assert cli.main([*tiny_run_args(tiny_dataset, out, max_steps=2), "--repeat", "2"]) == 0
    rounds = [json.loads((out / f"round-{k}" / "results.json").read_text()) for k in (1, 2)]
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["rounds"] == 2
    assert summary["run_dirs"] == [str(out / "round-1"), str(out / "round-2")]
    values = [r["metrics"]["p_core"] for r in rounds]
    p_core = summary["metrics"]["p_core"]
    assert (p_core["min"], p_core["max"]) == (min(values), max(values))
    mean = sum(values) / 2
    assert p_core["mean"] == pytest.approx(mean)
    assert p_core["cv"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values)) / mean)
    for r in rounds:
        m = r["metrics"]
        # each round is a command of its own: its e2e covers its own start-up, not the first's
        assert m["init_time"] < m["e2e_time"] < m["init_time"] + m["train_time"] + 30
    report = (out / "report.md").read_text()
    assert report.count("bs=2,lr=") == 2  # one row per round, then the spread
    assert "Spread over 2 runs" in report
    assert str(out / SUMMARY) in capsys.readouterr().out


def test_a_failing_round_stops_the_rounds_without_a_summary(
    tiny_run_args, tiny_dataset, tmp_path, capsys
):
    import shutil

    data = tmp_path / "coco"
    shutil.copytree(tiny_dataset, data)
    for victim in (data / "train2017").iterdir():
        victim.write_bytes(b"not a JPEG")
    out = tmp_path / "rounds"
    assert cli.main([*tiny_run_args(data, out), "--repeat", "3"]) == 1
    assert not (out / SUMMARY).exists() and not (out / "round-2").exists()
    assert "round 1 of 3 failed" in capsys.readouterr().out


def test_repeat_refuses_a_used_output_dir_and_zero_rounds(tiny_run_args, tiny_dataset, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "note").write_text("keep")
    assert cli.main([*tiny_run_args(tiny_dataset, used), "--repeat", "2"]) == 1
    assert cli.main([*tiny_run_args(tiny_dataset, tmp_path / "new"), "--repeat", "0"]) == 1
    assert sorted(p.name for p in used.iterdir()) == ["note"]


def test_images_per_joule_spreads_over_the_runs_that_read_energy():
    runs = [
        results(10.0, images_per_joule=0.40),
        results(12.0, images_per_joule=0.44),
        results(14.0, images_per_joule=None),  # no counter readable: left out, not a 0
    ]
    s = spread(runs)["images_per_joule"]
    assert (s["n"], s["min"], s["max"]) == (2, 0.40, 0.44)
    assert s["mean"] == pytest.approx(0.42)
    assert s["cv"] == pytest.approx((0.02 * 2**0.5) / 0.42)
