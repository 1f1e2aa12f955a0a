"""FlagPerf's `[PerfLog]` lines: read back from a real run and compared with results.json, on the
console only when asked; and the sink's ending and resumed segments from synthetic records (no
training). FlagPerf has no reader of its own for these lines (its harness and CI grep them), so
they are parsed here as its driver writes them: `[PerfLog] ` and `json.dumps` of {event, value or
other, metadata: {file, lineno, time_ms, rank}}."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from retinaperf.report.events import EventLog
from retinaperf.report.flagperf import FINISHED_KEYS, FLAGPERF_LOG, FlagperfLog, read_log

# The RetinaNet case's FINISHED keys, in its order (run_pretraining's finished_info).
FLAGPERF_FINISHED = [
    "e2e_time",
    "train_time",
    "train_no_eval_time",
    "pure_training_computing_time",
    "throughput(ips)_raw",
    "throughput(ips)_no_eval",
    "throughput(ips)_pure_compute",
    "converged",
    "final_mAP",
    "raw_train_time",
    "init_time",
]


def parse(lines: list[str]) -> list[dict]:
    """FlagPerf's messages, read without the module's reader: `[PerfLog] {json}` each."""
    assert lines and all(line.startswith("[PerfLog] {") for line in lines)
    messages = [json.loads(line.removeprefix("[PerfLog] ")) for line in lines]
    for m in messages:
        keys = list(m)  # in FlagPerf's order: event, value or other, metadata
        assert keys[0] == "event" and keys[-1] == "metadata"
        assert set(keys) <= {"event", "value", "other", "metadata"}
        assert list(m["metadata"]) == ["file", "lineno", "time_ms", "rank"]
        assert isinstance(m["metadata"]["time_ms"], int) and m["metadata"]["rank"] == 0
        assert isinstance(m["metadata"]["lineno"], int) and Path(m["metadata"]["file"]).is_file()
    times = [m["metadata"]["time_ms"] for m in messages]
    assert times == sorted(times)
    return messages


def log_lines(run_dir: Path) -> list[str]:
    return (run_dir / FLAGPERF_LOG).read_text(encoding="utf-8").splitlines()


def events(messages: list[dict]) -> list[str]:
    return [m["event"] for m in messages]


# A real run: the log beside results.json.


def test_a_runs_flagperf_log_holds_the_values_of_its_results(one_run):
    out, results = one_run
    m = results["metrics"]
    messages = parse(log_lines(out))
    assert read_log(out / FLAGPERF_LOG) == messages
    # One epoch cut short by max_steps, then its evaluation: FlagPerf's order.
    assert events(messages) == [
        "INIT_START",
        "INIT_END",
        "TRAIN_START",
        "EPOCH_BEGIN",
        "EPOCH_END",
        "EVALUATE",
        "TRAIN_END",
        "FINISHED",
    ]
    by_event = {message["event"]: message for message in messages}
    assert by_event["INIT_END"]["other"] == "Finish initialization"
    assert by_event["EPOCH_BEGIN"]["value"] == by_event["EPOCH_END"]["value"] == {"epoch": 0}
    (evaluation,) = m["evaluations"]
    assert by_event["EVALUATE"]["value"] == {
        "epoch": evaluation["epoch"],
        "global_steps": evaluation["step"],
        "mAP": evaluation["mAP"],
        "time": evaluation["seconds"],
    }
    finished = by_event["FINISHED"]["value"]
    assert list(finished) == FLAGPERF_FINISHED == list(FINISHED_KEYS)
    assert finished["throughput(ips)_raw"] == m["p_whole"]
    assert finished["throughput(ips)_no_eval"] == m["p_train"]
    assert finished["throughput(ips)_pure_compute"] == m["p_core"]
    assert finished["e2e_time"] == m["e2e_time"]
    assert finished["init_time"] == m["init_time"]
    assert finished["train_time"] == finished["raw_train_time"] == m["train_time"] > 0
    assert finished["train_no_eval_time"] == pytest.approx(m["train_time"] - m["eval_time"])
    assert finished["pure_training_computing_time"] == m["core_time"]
    assert (finished["converged"], finished["final_mAP"]) == (m["converged"], m["mAP"])
    # The throughputs are FlagPerf's ratios of its times.
    images = m["trained_images"]
    assert images / finished["train_no_eval_time"] == pytest.approx(m["p_train"])
    assert images / finished["pure_training_computing_time"] == pytest.approx(m["p_core"])
    # The times are where FlagPerf stamps its events: init from the command's start.
    at = {event: message["metadata"]["time_ms"] for event, message in by_event.items()}
    assert (at["TRAIN_START"] - at["INIT_START"]) / 1000 == pytest.approx(m["init_time"], abs=0.05)
    assert (at["TRAIN_END"] - at["TRAIN_START"]) / 1000 == pytest.approx(m["train_time"], abs=0.05)
    # Each line names the code that emitted its event, as FlagPerf's name their caller.
    assert Path(by_event["FINISHED"]["metadata"]["file"]).name == "finish.py"
    assert Path(by_event["EPOCH_BEGIN"]["metadata"]["file"]).name == "trainer.py"
    # What FlagPerf's CI greps for in rank 0's log.
    assert sum('"event": "FINISHED"' in line for line in log_lines(out)) == 1


@pytest.mark.parametrize("console", [True, False])
def test_the_lines_reach_the_console_only_when_asked(
    console, tiny_run_args, tiny_dataset, tmp_path, capsys
):
    from cli_helpers import run_cli  # imports the trainer: only where a run is wanted

    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, perflog_console=str(console).lower())
    assert run_cli(args) == 0
    printed = capsys.readouterr()
    written = log_lines(out)
    assert "FINISHED" in events(parse(written))  # the file, always
    assert "[PerfLog]" not in printed.err
    shown = [line for line in printed.out.splitlines() if "[PerfLog]" in line]
    assert shown == (written if console else [])


# The sink alone, fed records as the trainer emits them.

METRICS = {
    "e2e_time": 20.0,
    "init_time": 4.0,
    "train_time": 15.0,
    "eval_time": 3.0,
    "core_time": 10.0,
    "p_whole": 6.4,
    "p_train": 8.0,
    "p_core": 9.6,
    "converged": False,
    "mAP": 0.2,
}


class Segment:
    """One process's event log with the FlagPerf sink, in `run_dir`."""

    def __init__(self, run_dir: Path, started_ago: float = 0.0) -> None:
        command_start = time.perf_counter() - started_ago
        self.events = EventLog(command_start)
        self.events.attach(run_dir / "events.jsonl")
        self.events.add_sink(FlagperfLog(run_dir / FLAGPERF_LOG, command_start))
        self.events.emit("run_start", config={}, world_size=1)

    def train(self, epochs: range, evaluate: bool = True) -> None:
        self.events.emit("train_start", step=0, warmup_steps=7)
        for epoch in epochs:
            self.events.emit("epoch_start", epoch=epoch, step=epoch * 10)
            self.events.emit("step", epoch=epoch, step=epoch * 10 + 5, loss=1.0)
            if not evaluate:
                return  # stopped inside the epoch
            self.events.emit("epoch_end", epoch=epoch, step=epoch * 10 + 10)
            self.events.emit("eval", epoch=epoch, step=epoch * 10 + 10, mAP=0.1, seconds=1.5)

    def end(self, status: str) -> None:
        self.events.emit("run_end", status=status, reason=None, **METRICS)
        self.events.close()


@pytest.mark.parametrize("status", ["interrupted", "failed"])
def test_a_run_that_did_not_complete_writes_no_train_end_or_finished(status, tmp_path):
    run = Segment(tmp_path)
    run.train(range(2), evaluate=status == "interrupted")
    if status == "failed":
        run.events.emit("run_failed", error="RuntimeError: boom")
    run.end(status)
    written = events(parse(log_lines(tmp_path)))
    assert written[:3] == ["INIT_START", "INIT_END", "TRAIN_START"]
    assert "TRAIN_END" not in written and "FINISHED" not in written


def test_finished_maps_the_metrics_and_writes_the_true_train_time(tmp_path):
    run = Segment(tmp_path, started_ago=5.0)
    now_ms = time.time() * 1000
    run.train(range(1))
    run.end("completed")
    messages = parse(log_lines(tmp_path))
    assert messages[0]["metadata"]["time_ms"] == pytest.approx(now_ms - 5000, abs=200)
    assert messages[-1]["value"] == {
        "e2e_time": 20.0,
        "train_time": 15.0,  # FlagPerf's case writes 0 here
        "train_no_eval_time": 12.0,
        "pure_training_computing_time": 10.0,
        "throughput(ips)_raw": 6.4,
        "throughput(ips)_no_eval": 8.0,
        "throughput(ips)_pure_compute": 9.6,
        "converged": False,
        "final_mAP": 0.2,
        "raw_train_time": 15.0,  # and here
        "init_time": 4.0,
    }
    # This file emitted the records: the metadata name it.
    assert {Path(m["metadata"]["file"]).name for m in messages} == {"test_flagperf.py"}
    train_end, evaluate = messages[-2], messages[-3]
    assert (train_end["event"], evaluate["event"]) == ("TRAIN_END", "EVALUATE")
    assert train_end["metadata"]["time_ms"] == evaluate["metadata"]["time_ms"]


def test_a_resumed_run_appends_and_finishes_once(tmp_path, capsys):
    first = Segment(tmp_path)
    first.train(range(1))
    first.end("interrupted")
    second = Segment(tmp_path)
    second.train(range(1, 2))
    second.end("completed")
    written = events(parse(log_lines(tmp_path)))
    assert written.count("INIT_START") == 2 and written.count("FINISHED") == 1
    assert written[-2:] == ["TRAIN_END", "FINISHED"]
    assert capsys.readouterr() == ("", "")  # no console given: nothing printed
