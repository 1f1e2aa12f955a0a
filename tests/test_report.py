"""The report: the seed's table from results.json, runs side by side with scaling efficiency and
the ratio to the seed's A100 numbers, in markdown, CSV and JSON; and the TensorBoard view."""

import csv
import io
import json
from pathlib import Path

import pytest
from test_results import made_results

from retinaperf import cli
from retinaperf.errors import UserError
from retinaperf.files import write_json_atomic
from retinaperf.report.comparison import (
    COMPARISON_COLUMNS,
    compare,
    render_comparison,
    run_labels,
    seed_reference,
)
from retinaperf.report.events import EventLog, TensorBoardSink
from retinaperf.report.loading import load_results
from retinaperf.report.tables import (
    ADDED_COLUMNS_NOTE,
    PROFILED_MARK,
    PROFILED_NOTE,
    format_cells,
    render_report,
)
from retinaperf.units import NO_VALUE


def results(run_dir: str, nodes: int, devices: int, p: tuple[float, float, float], **extra) -> dict:
    """A results.json object of a run on COCO2017 at 800/1333 px with these numbers."""
    world = nodes * devices
    made = made_results(
        device_name="NVIDIA A100-SXM4-40GB",
        nodes=nodes,
        devices_per_node=devices,
        world_size=world,
        precision="fp32",
        local_batch=16,
        lr=0.04 if world == 1 else 0.08,
        e2e_time=1234.4,
        p_whole=p[0],
        p_train=p[1],
        p_core=p[2],
        mAP=0.35012,
        mem="38.1/40.0",
        **{"images_per_joule": None, **extra},
    )
    return {**made, "run_dir": run_dir}


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    """Three run directories: 1x1, 1x8 and 2x8 on the same device, like the seed's table."""
    made = []
    for name, nodes, devices, p in [
        ("one", 1, 1, (20.0, 22.0, 25.0)),
        ("eight", 1, 8, (140.0, 160.0, 180.0)),
        ("sixteen", 2, 8, (250.0, 300.0, 350.0)),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        # Only the 1x8 run read an energy counter.
        energy = {"images_per_joule": 0.041234} if name == "eight" else {}
        made_results = results(str(folder), nodes, devices, p, **energy)
        write_json_atomic(folder / "results.json", made_results)
        made.append(folder)
    return made


def test_scaling_efficiency_is_against_the_one_device_run(runs):
    rows = compare([load_results(r) for r in runs])
    one, eight, sixteen = rows
    assert one["scaling_train"] is None  # a run of one device: no scaling to show
    assert eight["scaling_whole"] == pytest.approx(140 / (8 * 20))
    assert eight["scaling_train"] == pytest.approx(160 / (8 * 22))
    assert sixteen["scaling_core"] == pytest.approx(350 / (16 * 25))


def test_no_scaling_without_a_matching_one_device_run(runs):
    loaded = [load_results(r) for r in runs[1:]]  # no 1x1 run
    assert all(row["scaling_train"] is None for row in compare(loaded))
    other = results("x", 1, 1, (20.0, 22.0, 25.0))
    other["metrics"]["precision"] = "amp"  # a 1x1 run of another precision does not count
    assert compare([load_results(runs[1]), other])[0]["scaling_train"] is None
    smaller = results("y", 1, 1, (20.0, 22.0, 25.0))
    smaller["config"]["model"]["min_size"] = 64  # another workload per image: does not count
    assert compare([load_results(runs[1]), smaller])[0]["scaling_train"] is None


def test_runs_of_one_device_count_have_no_scaling_and_several_one_device_runs_their_mean():
    # two rounds of one 1x1 configuration: their ratio is noise, not scaling (was 115.7 %)
    first, second = results("a", 1, 1, (20.0, 22.0, 25.0)), results("b", 1, 1, (23.0, 25.0, 29.0))
    rows = compare([first, second])
    assert [row[f"scaling_{p}"] for row in rows for p in ("whole", "train", "core")] == [None] * 6
    table = render_comparison(rows, "md").splitlines()
    assert all(line.split("|")[-3].strip() == NO_VALUE for line in table[2:4])  # scaling column
    eight = results("c", 1, 8, (140.0, 160.0, 180.0))
    assert compare([first, second, eight])[2]["scaling_train"] == pytest.approx(160 / (8 * 23.5))


def test_run_column_names_each_run_by_its_directory_and_preset(tmp_path):
    smoke_dir = str(tmp_path / "runs" / "smoke-try")
    smoke = results(smoke_dir, 1, 1, (2.0, 3.0, 4.0), images_per_joule=1.0)
    smoke["config"]["preset"] = "smoke"
    a100 = results(str(tmp_path / "runs" / "a100-try"), 1, 1, (20.0, 22.0, 25.0))
    for run in (smoke, a100):  # the same device: only the run column tells them apart
        run["metrics"]["device_name"] = "AMD EPYC 7B13"
    rows = compare([smoke, a100])
    assert [(row["run"], row["preset"]) for row in rows] == [
        ("smoke-try", "smoke"),
        ("a100-try", "A100-1x1"),
    ]
    lines = render_comparison(rows, "md").splitlines()
    assert lines[0].startswith("| run | 配置 |")
    assert [line.split("|")[1:3] for line in lines[2:4]] == [
        [" smoke-try (smoke) ", " AMD EPYC 7B13 1x1 "],
        [" a100-try (A100-1x1) ", " AMD EPYC 7B13 1x1 "],
    ]
    assert [row["run"] for row in json.loads(render_comparison(rows, "json"))] == [
        "smoke-try",
        "a100-try",
    ]
    assert "| smoke-try (smoke) |" in render_report(smoke)  # a run's own report.md too


def test_run_labels_take_parent_folders_only_where_names_repeat():
    assert run_labels(["runs/a", "runs/b"]) == ["a", "b"]
    assert run_labels(["x/rep/round-1", "y/rep2/round-1", "y/rep2/round-2"]) == [
        "rep/round-1",
        "rep2/round-1",
        "rep2/round-2",
    ]


def test_a_profiled_run_is_marked_and_the_mark_explained(runs):
    plain = load_results(runs[1])  # the run that read energy: its report.md has a figure
    profiled = results("prof", 1, 8, (140.0, 160.0, 180.0), images_per_joule=0.04)
    profiled["config"]["train"]["profile_steps"] = "2:3"
    rows = compare([plain, profiled])
    text = render_comparison(rows, "md")
    lines = text.splitlines()
    assert lines[2].split("|")[1].strip() == "eight (A100-1x1)"
    assert lines[3].split("|")[1].strip() == f"prof (A100-1x1){PROFILED_MARK}"
    assert PROFILED_NOTE in text and PROFILED_NOTE in render_report(profiled)
    assert PROFILED_NOTE not in render_comparison(rows[:1], "md")
    assert PROFILED_NOTE not in render_report(plain)
    assert [row["profiled"] for row in json.loads(render_comparison(rows, "json"))] == [
        False,
        True,
    ]


def test_every_missing_value_has_one_mark():
    # throughput-only (no mAP), no energy, no one-device run, a topology FlagPerf lacks
    run = results("x", 1, 4, (1.0, 2.0, 3.0))
    run["metrics"]["throughput_only"] = True
    text = render_comparison(compare([run]), "md")
    header, _, row = (line.strip("|").split("|") for line in text.splitlines()[:3])
    cells = dict(zip((c.strip() for c in header), (c.strip() for c in row), strict=True))
    assert [cells[c] for c in ("mAP", "img/J*", "scaling", "vs A100 ref")] == [NO_VALUE] * 4
    assert NO_VALUE == "–" and "-" not in cells.values()  # an en dash, never a hyphen
    assert f"{NO_VALUE} where no device's energy" in text


def test_ratio_to_the_seed_reference_row_of_the_same_topology(runs):
    reference = json.loads(
        (Path(cli.__file__).parent / "reference" / "flagperf_a100.json").read_text()
    )["rows"]
    one, eight, sixteen = compare([load_results(r) for r in runs])
    assert one["ref_whole"] == pytest.approx(20.0 / reference["1x1"]["p_whole"])
    assert eight["ref_train"] == pytest.approx(160.0 / reference["1x8"]["p_train"])
    assert sixteen["ref_core"] == pytest.approx(350.0 / reference["2x8"]["p_core"])
    # and the shipped numbers are the seed's table
    assert (reference["1x8"]["p_whole"], reference["1x8"]["mAP"]) == (138, 0.3529)
    assert reference["1x1"]["mem"] == "39.5/40.0"
    assert seed_reference()["rows"] == reference


def test_no_reference_ratio_for_a_topology_the_seed_lacks():
    row = compare([results("x", 1, 4, (1.0, 2.0, 3.0))])[0]
    assert row["ref_whole"] is None and row["ref_core"] is None


def test_no_reference_ratio_for_another_workload():
    generated = results("x", 1, 1, (1.0, 2.0, 3.0))
    generated["config"]["data"]["data_dir"] = ""  # the embedded dataset
    small = results("y", 1, 1, (1.0, 2.0, 3.0))
    small["config"]["model"]["min_size"] = 64
    for row in compare([generated, small]):
        assert row["ref_whole"] is None and row["ref_train"] is None and row["ref_core"] is None
    assert render_comparison(compare([generated]), "md").splitlines()[2].endswith(f"| {NO_VALUE} |")


def test_markdown_table_has_the_seed_layout_and_the_computed_values(runs):
    text = render_comparison(compare([load_results(r) for r in runs]), "md")
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "run", "配置", "precision", "fix_hp", "e2e_time", "p_whole", "p_train", "p_core", "mAP",
        "mem", "img/J*", "scaling", "vs A100 ref",
    ]  # fmt: skip
    eight = [c.strip() for c in lines[3].strip("|").split("|")][1:]  # after the run column
    assert eight[0] == "NVIDIA A100-SXM4-40GB 1x8"
    assert eight[2] == "bs=16,lr=0.08"
    assert eight[3:9] == ["1234", "140", "160", "180", "0.3501", "38.1/40.0"]
    assert eight[9] == "0.0412"  # an addition to the seed's columns, explained under the table
    assert [c.strip() for c in lines[2].strip("|").split("|")][10] == "–"  # none read: not 0
    assert ADDED_COLUMNS_NOTE in text
    assert eight[10] == f"{100 * 160 / (8 * 22):.1f}%"
    assert eight[11] == f"{140 / 138:.2f}/{160 / 152:.2f}/{180 / 164:.2f}"


def test_csv_and_json_carry_the_same_numbers(runs):
    rows = compare([load_results(r) for r in runs])
    parsed = list(csv.DictReader(io.StringIO(render_comparison(rows, "csv"))))
    assert [float(r["p_core"]) for r in parsed] == [25.0, 180.0, 350.0]
    assert float(parsed[1]["scaling_train"]) == pytest.approx(160 / (8 * 22))
    as_json = json.loads(render_comparison(rows, "json"))
    assert as_json == json.loads(json.dumps(rows))
    assert as_json[2]["ref_whole"] == pytest.approx(250 / 258)


def test_csv_and_json_have_ascii_keys_and_numbers_for_scripts(runs):
    rows = compare([load_results(r) for r in runs])
    as_json = json.loads(render_comparison(rows, "json"))
    parsed = list(csv.DictReader(io.StringIO(render_comparison(rows, "csv"))))
    for keys in (list(as_json[0]), list(parsed[0])):
        assert all(key.isascii() for key in keys)
        assert {"config", "local_batch", "lr", "mem_used_gib", "mem_total_gib", "img_per_j"} <= set(
            keys
        )
        assert not {"配置", "fix_hp", "mem", "img/J*"} & set(keys)
    eight = as_json[1]
    assert eight["config"] == "NVIDIA A100-SXM4-40GB 1x8"
    assert (eight["local_batch"], eight["lr"], eight["img_per_j"]) == (16, 0.08, 0.041234)
    assert (eight["mem_used_gib"], eight["mem_total_gib"]) == (38.1, 40.0)  # was "38.1/40.0"
    assert as_json[0]["img_per_j"] is None and parsed[0]["img_per_j"] == ""  # none read
    assert float(parsed[1]["mem_total_gib"]) == 40.0


def test_every_column_and_key_is_explained_for_users(runs):
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text("utf-8")
    measures = readme.split("## What it measures", 1)[1].split("\n## ", 1)[0]
    assert "*the seed*" in measures  # defined once, where the columns are
    for column in COMPARISON_COLUMNS:
        assert f"\n| `{column}` |" in measures, column
    metrics = (root / "docs" / "metrics.md").read_text("utf-8")
    section = metrics.split("## Comparing runs", 1)[1].split("\n## ", 1)[0]
    for key in compare([load_results(r) for r in runs])[0]:
        assert f"`{key}`" in section, key


def test_significant_figures_like_the_seed():
    cells = format_cells(
        {
            "run": "r", "preset": "p", "profiled": False, "config": "x", "precision": "fp32",
            "local_batch": 1, "lr": 1.0, "e2e_time": 15252.6, "p_whole": 138.44, "p_train": 22.349,
            "p_core": 0.41234, "mAP": 0.35294, "mem_used_gib": 1.44, "mem_total_gib": 23.46,
            "img_per_j": None,
        }
    )  # fmt: skip
    assert (cells["e2e_time"], cells["p_whole"], cells["p_train"]) == ("15253", "138", "22.3")
    assert (cells["p_core"], cells["mAP"]) == ("0.412", "0.3529")
    assert (cells["fix_hp"], cells["mem"], cells["img/J*"]) == ("bs=1,lr=1", "1.4/23.5", NO_VALUE)


def test_report_command_prints_the_table(runs, capsys):
    assert cli.main(["report", *map(str, runs), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [row["p_whole"] for row in printed] == [20.0, 140.0, 250.0]


def test_report_names_a_moved_run_where_it_is_now(tmp_path, capsys):
    moved = tmp_path / "kept" / "a100-try"
    moved.mkdir(parents=True)
    write_json_atomic(moved / "results.json", results("runs/20261130-1015", 1, 1, (1.0, 2.0, 3.0)))
    assert cli.main(["report", str(moved), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["run"], row["run_dir"]) == ("a100-try", str(moved))


def test_report_of_a_folder_without_results_fails_cleanly(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "results.json" in err and str(tmp_path) in err and "Traceback" not in err
    assert "run --repeat" in err  # the other kind of folder `report` takes
    with pytest.raises(UserError):
        load_results(tmp_path / "missing")


def test_tensorboard_gets_the_event_log_numbers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = EventLog(0.0)
    log.attach(tmp_path / "events.jsonl")
    log.add_sink(TensorBoardSink(tmp_path / "tb"))
    log.emit("run_start", config={})
    for step, loss in [(5, 1.5), (10, 0.75)]:
        log.emit("step", epoch=0, step=step, loss=loss, classification=loss / 3, lr=0.01)
    log.emit("eval", epoch=0, step=10, mAP=0.25, AP50=0.5, seconds=3.0, detections=7)
    log.close()
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/classification", "train/lr", "eval/mAP", "eval/AP50"} <= set(
        scalars
    )
    assert "eval/seconds" not in scalars and "train/epoch" not in scalars
    assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == [(5, 1.5), (10, 0.75)]
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/mAP")] == [(10, 0.25)]


def test_report_plots_draws_each_runs_plots_from_its_logs(runs, capsys):
    from retinaperf.files import write_jsonl

    folder = runs[0]
    write_jsonl(
        folder / "events.jsonl",
        [
            {
                "event": "step",
                "time": 1.0,
                "step": 5,
                "loss": 2.0,
                "classification": 1.5,
                "bbox_regression": 0.5,
                "lr": 0.01,
                "images_per_s": 6.0,
            },
            {
                "event": "step",
                "time": 2.0,
                "step": 10,
                "loss": 1.0,
                "classification": 0.7,
                "bbox_regression": 0.3,
                "lr": 0.01,
                "images_per_s": 7.0,
            },
            {"event": "eval", "time": 3.0, "step": 10, "mAP": 0.2, "AP50": 0.4, "AP75": 0.1},
        ],
    )
    write_jsonl(
        folder / "monitor.jsonl",
        [
            {
                "time": t,
                "host": "n1",
                "cpu_util": 50.0 + t,
                "mem_used_gib": 2.0,
                "mem_total_gib": 8.0,
                "devices": [],
            }
            for t in (0.0, 5.0)
        ],
    )
    assert cli.main(["report", str(folder), "--plots"]) == 0
    drawn = sorted(p.name for p in (folder / "plots").iterdir())
    assert drawn == ["host.png", "loss.png", "map.png", "throughput.png"]
    assert str(folder / "plots" / "loss.png") in capsys.readouterr().err
