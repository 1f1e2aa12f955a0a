"""The MLPerf-format logs: their lines read back and compared with results.json (a real run);
mlperf-logging's compliance checker run on the logs of real runs (completed, failed, stopped and
resumed); the sink's ending, settings, times and resumed segments from synthetic records (no
training)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli, signal_at
from mlperf_logging.mllog import constants as mlc

from retinaperf.config import RunConfig
from retinaperf.report.events import EventLog
from retinaperf.report.mlperf import (
    MLPERF_LOG,
    MlperfLog,
    log_files,
    platform,
    read_log,
    segment_log,
)
from retinaperf.run import step


def parse(path: Path) -> list[dict]:
    """The log's entries, read here without the module's reader: every line is `:::MLLOG {json}`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and all(line.startswith(":::MLLOG {") for line in lines)
    return [json.loads(line.removeprefix(":::MLLOG ")) for line in lines]


def segments(entries: list[dict]) -> list[list[dict]]:
    """The entries of each process segment: each begins with init_start."""
    split: list[list[dict]] = []
    for entry in entries:
        if entry["key"] == mlc.INIT_START:
            split.append([])
        split[-1].append(entry)
    return split


def values(entries: list[dict], key: str) -> list:
    return [e["value"] for e in entries if e["key"] == key]


def only(entries: list[dict], key: str) -> dict:
    (entry,) = [e for e in entries if e["key"] == key]
    return entry


def check_pairs(segment: list[dict]) -> None:
    """Every interval of a segment starts before it ends, once, nested, and run_stop is last."""
    open_keys = []
    for e in segment:
        if e["event_type"] == mlc.INTERVAL_START:
            open_keys.append(e["key"].removesuffix("_start"))
        elif e["event_type"] == mlc.INTERVAL_END:
            assert open_keys.pop() == e["key"].removesuffix("_stop"), e
    assert open_keys == []
    assert segment[-1]["key"] == mlc.RUN_STOP
    times = [e["time_ms"] for e in segment]
    assert times[1:] == sorted(times[1:]) and times[0] <= times[1]  # init_start: the command's


def mlperf_check(log: Path, tmp_path: Path) -> tuple[int, str]:
    """mlperf-logging's compliance checker on `log` at ruleset 5.1.0 (the last with RetinaNet), as
    a submitter runs it: its exit status and what it printed."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlperf_logging.compliance_checker",
            "--usage",
            "training",
            "--ruleset",
            "5.1.0",
            "--log_output",
            str(tmp_path / f"{log.name}.checker"),  # not in the run directory
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def assert_accepted(log: Path, tmp_path: Path) -> None:
    """The checker accepts `log` without a warning, having applied the open RetinaNet rules."""
    status, output = mlperf_check(log, tmp_path)
    assert status == 0, output
    assert output.rstrip().endswith("INFO - SUCCESS"), output
    assert "WARNING" not in output and "ERROR" not in output, output
    assert "Compliance checks: training_5.1.0/open_retinanet.yaml" in output, output


# A real run: the log beside results.json.


def test_a_runs_mlperf_log_holds_the_values_of_its_results(one_run):
    out, results = one_run
    m = results["metrics"]
    entries = parse(out / MLPERF_LOG)
    assert read_log(out / MLPERF_LOG) == entries
    (segment,) = segments(entries)
    check_pairs(segment)
    assert values(segment, mlc.SUBMISSION_BENCHMARK) == [mlc.RETINANET]
    assert values(segment, mlc.GLOBAL_BATCH_SIZE) == [m["global_batch"]] == [2]
    assert values(segment, mlc.OPT_BASE_LR) == [m["lr"]] == [results["config"]["train"]["lr"]]
    assert values(segment, mlc.TRAIN_SAMPLES) == [m["train_images"]]
    assert values(segment, mlc.EVAL_SAMPLES) == [m["val_images"]]
    assert values(segment, mlc.OPT_LR_DECAY_FACTOR) == [results["config"]["train"]["lr_gamma"]]
    # warmup_iters capped at an epoch's steps - 1: 10 steps of 2 images here.
    assert values(segment, mlc.OPT_LR_WARMUP_STEPS) == [9]
    accuracy = [e for e in segment if e["key"] == mlc.EVAL_ACCURACY]
    assert [e["value"] for e in accuracy] == [e["mAP"] for e in m["evaluations"]]
    assert [e["metadata"][mlc.EPOCH_NUM] for e in accuracy] == [
        e["epoch"] for e in m["evaluations"]
    ]
    assert only(segment, mlc.RUN_STOP)["metadata"][mlc.STATUS] == mlc.SUCCESS
    keys = [e["key"] for e in segment]
    assert keys.index(mlc.INIT_STOP) < keys.index(mlc.RUN_START) < keys.index(mlc.EPOCH_START)
    assert keys.index(mlc.EPOCH_STOP) < keys.index(mlc.EVAL_START) < keys.index(mlc.EVAL_ACCURACY)
    # init_start is the command's start: init_time before run_start.
    init = only(segment, mlc.RUN_START)["time_ms"] - only(segment, mlc.INIT_START)["time_ms"]
    assert init / 1000 == pytest.approx(m["init_time"], abs=0.05)
    # What a submission says of itself: the keys' defaults, the platform its devices.
    assert values(segment, mlc.SUBMISSION_ORG) == ["retinaperf"]
    assert values(segment, mlc.SUBMISSION_DIVISION) == [mlc.OPEN]
    assert values(segment, mlc.SUBMISSION_PLATFORM) == [f"1x{m['device_name']}"]
    assert values(segment, mlc.CACHE_CLEAR) == [False]  # no cache is dropped
    assert log_files(out) == [out / MLPERF_LOG]


# mlperf-logging's checker on the logs real runs leave.


def test_mlperfs_checker_accepts_a_completed_runs_log(one_run, tmp_path):
    out, _ = one_run
    assert_accepted(out / MLPERF_LOG, tmp_path)


# Two epochs of 2 steps (the 20 of 24 images that have boxes, batch 10): an evaluation ends the
# first, so that a run stopped or failed in the second (at its step 3) has one, as the checker
# requires.
TWO_EPOCHS = {"batch_size": 10, "epochs": 2, "max_steps": 0, "target_map": 0, "monitor_interval": 0}


def test_a_stopped_and_resumed_run_leaves_a_log_per_segment_each_accepted(
    tiny_dataset, tiny_run_args, tmp_path
):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, **TWO_EPOCHS)
    assert run_cli(args, step_fn=signal_at(step.train_step, 3)) != 0  # SIGTERM in epoch 1
    assert run_cli(["run", "--resume", str(out)]) == 0
    first, second = log_files(out)
    assert (first.name, second.name) == (MLPERF_LOG, "mlperf-segment-2.log")
    for log in (first, second):
        assert_accepted(log, tmp_path)
    one, two = read_log(first), read_log(second)
    assert only(one, mlc.RUN_STOP)["metadata"][mlc.STATUS] == mlc.ABORTED
    assert only(two, mlc.RUN_STOP)["metadata"][mlc.STATUS] == mlc.SUCCESS
    # Each segment's epochs and evaluations; together, the run's.
    assert [e["metadata"][mlc.EPOCH_NUM] for e in one if e["key"] == mlc.EVAL_ACCURACY] == [0]
    assert [e["metadata"][mlc.EPOCH_NUM] for e in two if e["key"] == mlc.EPOCH_START] == [1]
    evaluations = json.loads((out / "results.json").read_text())["metrics"]["evaluations"]
    assert values(one + two, mlc.EVAL_ACCURACY) == [e["mAP"] for e in evaluations]


def test_a_failed_runs_log_is_accepted_aborted(tiny_dataset, tiny_run_args, tmp_path):
    def fails_in_epoch_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return step.train_step(*args, **kwargs)

    calls: list[int] = []
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        run_cli(tiny_run_args(tiny_dataset, out, **TWO_EPOCHS), step_fn=fails_in_epoch_1)
    assert log_files(out) == [out / MLPERF_LOG]
    assert_accepted(out / MLPERF_LOG, tmp_path)  # the checker does not require success
    assert only(read_log(out / MLPERF_LOG), mlc.RUN_STOP)["metadata"][mlc.STATUS] == mlc.ABORTED


# The sink alone, fed records as the trainer emits them.

CONFIG = RunConfig().to_dict()


class Segment:
    """One process's event log with the MLPerf sink, in `run_dir`."""

    def __init__(self, run_dir: Path, started_ago: float = 0.0) -> None:
        command_start = time.perf_counter() - started_ago
        self.events = EventLog(command_start)
        self.events.attach(run_dir / "events.jsonl")
        self.log = segment_log(run_dir)
        self.events.add_sink(MlperfLog(self.log, command_start))
        self.events.emit(
            "run_start",
            config=CONFIG,
            world_size=4,
            device_name="NVIDIA H100 80GB HBM3",
            nodes=1,
            devices_per_node=4,
            segment={},
            train_images=64,
            val_images=8,
        )

    def train(self, epochs: range, evaluate: bool = True) -> None:
        self.events.emit("train_start", step=0, warmup_steps=7)
        for epoch in epochs:
            self.events.emit("epoch_start", epoch=epoch, step=epoch * 10)
            self.events.emit("step", epoch=epoch, step=epoch * 10 + 5, loss=1.0)
            if not evaluate:
                return  # stopped inside the epoch
            self.events.emit("epoch_end", epoch=epoch, step=epoch * 10 + 10)
            self.events.emit("eval", epoch=epoch, step=epoch * 10 + 10, mAP=0.1 * epoch, seconds=0)


def test_a_failed_run_ends_its_epoch_and_stops_once_aborted(tmp_path):
    run = Segment(tmp_path)
    run.train(range(2), evaluate=False)
    # As job.run does on an error: run_failed, then the failed run's results (run_end).
    run.events.emit("run_failed", error="RuntimeError: boom")
    run.events.emit("run_end", status="failed", reason="RuntimeError: boom")
    run.events.close()
    (segment,) = segments(parse(tmp_path / MLPERF_LOG))
    check_pairs(segment)  # the epoch cut short ends before run_stop
    stops = [e for e in segment if e["key"] == mlc.RUN_STOP]
    assert [e["metadata"][mlc.STATUS] for e in stops] == [mlc.ABORTED]
    assert only(segment, mlc.EPOCH_STOP)["metadata"][mlc.EPOCH_NUM] == 0
    assert values(segment, mlc.EVAL_ACCURACY) == []


@pytest.mark.parametrize(
    ("status", "expected"), [("completed", "success"), ("interrupted", "aborted")]
)
def test_run_stop_says_success_only_for_a_completed_run(status, expected, tmp_path):
    run = Segment(tmp_path)
    run.train(range(2))
    run.events.emit("run_end", status=status, reason=None)
    run.events.emit("run_failed", error="after the end")  # too late: run_stop is written once
    run.events.close()
    (segment,) = segments(parse(tmp_path / MLPERF_LOG))
    check_pairs(segment)
    assert [e["metadata"][mlc.STATUS] for e in segment if e["key"] == mlc.RUN_STOP] == [expected]
    assert mlc.SUCCESS == "success" and mlc.ABORTED == "aborted"


def test_the_settings_are_the_configurations_and_init_starts_with_the_command(tmp_path):
    run = Segment(tmp_path, started_ago=5.0)
    now_ms = time.time() * 1000
    run.train(range(2))
    run.events.emit("run_end", status="completed", reason=None)
    run.events.close()
    (segment,) = segments(parse(tmp_path / MLPERF_LOG))
    train = CONFIG["train"]
    assert values(segment, mlc.GLOBAL_BATCH_SIZE) == [train["batch_size"] * 4]
    assert values(segment, mlc.OPT_BASE_LR) == [train["lr"]]
    assert values(segment, mlc.OPT_LR_WARMUP_FACTOR) == [train["warmup_factor"]]
    assert values(segment, mlc.OPT_LR_DECAY_BOUNDARY_EPOCHS) == [list(train["lr_steps"])]
    assert values(segment, mlc.OPT_LR_WARMUP_STEPS) == [7]
    assert values(segment, mlc.TRAIN_SAMPLES) == [64] and values(segment, mlc.EVAL_SAMPLES) == [8]
    assert values(segment, mlc.EVAL_ACCURACY) == [0.0, 0.1]
    assert [e["metadata"][mlc.EPOCH_NUM] for e in segment if e["key"] == mlc.EPOCH_START] == [0, 1]
    # init_start is stamped at the command's start, 5 s before the sink was made.
    assert only(segment, mlc.INIT_START)["time_ms"] == pytest.approx(now_ms - 5000, abs=200)
    assert only(segment, mlc.RUN_START)["time_ms"] == pytest.approx(now_ms, abs=200)


def test_a_resumed_run_writes_a_file_of_its_own_per_segment(tmp_path):
    first = Segment(tmp_path)
    first.train(range(1))
    first.events.emit("run_end", status="interrupted", reason="stopped by SIGTERM")
    first.events.close()
    second = Segment(tmp_path)
    second.train(range(1, 2))
    second.events.emit("run_end", status="completed", reason=None)
    second.events.close()
    assert (first.log.name, second.log.name) == (MLPERF_LOG, "mlperf-segment-2.log")
    assert log_files(tmp_path) == [first.log, second.log]
    assert segment_log(tmp_path).name == "mlperf-segment-3.log"  # the next one's
    (one,) = segments(parse(first.log))
    (two,) = segments(parse(second.log))
    for segment in (one, two):
        check_pairs(segment)
        # Each file a whole MLPerf run: what the checker wants once is there once.
        for key in (mlc.SUBMISSION_ORG, mlc.CACHE_CLEAR, mlc.INIT_STOP, mlc.TRAIN_SAMPLES):
            only(segment, key)
    assert only(one, mlc.RUN_STOP)["metadata"][mlc.STATUS] == mlc.ABORTED
    assert only(two, mlc.RUN_STOP)["metadata"][mlc.STATUS] == mlc.SUCCESS
    assert values(one + two, mlc.EVAL_ACCURACY) == [0.0, 0.1]


def test_the_platform_is_the_devices_unless_configured():
    record = {"config": CONFIG, "device_name": "NVIDIA A100", "nodes": 2, "devices_per_node": 8}
    assert platform(record) == "2x8xNVIDIA A100"
    assert platform({**record, "nodes": 1, "devices_per_node": 1}) == "1xNVIDIA A100"
    assert platform({**record, "config": {**CONFIG, "mlperf_platform": "DGX-A100"}}) == "DGX-A100"


def test_the_checker_refuses_a_segment_that_ended_before_its_first_evaluation(tmp_path):
    """An MLPerf run must log an accuracy: a segment stopped (or failed) before its first
    evaluation has none to log, and its file is refused for that alone."""
    run = Segment(tmp_path)
    run.train(range(1), evaluate=False)
    run.events.emit("run_end", status="interrupted", reason="stopped by SIGTERM")
    run.events.close()
    status, output = mlperf_check(run.log, tmp_path)
    assert status == 1, output
    # What it misses: the evaluation's keys, nothing else (each alternative in either order).
    refused = [
        set(re.findall(r"'(\w+)'", line)) for line in output.splitlines() if "Required" in line
    ]
    assert sorted(refused, key=sorted) == [
        {"block_start", "eval_start"},
        {"block_stop", "eval_stop"},
        {"eval_accuracy"},
    ], output


def test_the_sink_leaves_no_logging_handler_and_prints_nothing(tmp_path, capsys):
    before = logging.root.manager.loggerDict.copy(), list(logging.root.handlers)
    run = Segment(tmp_path)
    run.events.emit("run_end", status="completed", reason=None)
    run.events.close()
    assert (logging.root.manager.loggerDict.copy(), list(logging.root.handlers)) == before
    assert capsys.readouterr() == ("", "")
    # Its handler is closed with it: a record written after close goes nowhere.
    sink = MlperfLog(tmp_path / "other.log", time.perf_counter())
    sink.write({"event": "run_failed", "time": 0.0, "error": "x"})
    sink.close()
    written = (tmp_path / "other.log").read_text()
    assert written.count(":::MLLOG") == 1 and mlc.RUN_STOP in written
    sink.write({"event": "epoch_start", "time": 1.0, "epoch": 3})
    assert (tmp_path / "other.log").read_text() == written
    assert capsys.readouterr() == ("", "")
