"""FlagPerf's log of a run: `[PerfLog] {json}` lines, as FlagPerf's driver (its training/benchmarks/
driver/perf_logger module) writes them and its harness greps them from rank 0's log; another view
of the event log (a sink of it, so rank 0 only), in `<run dir>/flagperf.log` and, with
`perflog_console=true`, on rank 0's console too.

Each line is `[PerfLog] ` and one JSON object: `event` (FlagPerf's event name), then `value` (a
dict) or `other` (a string) where the event has one, then `metadata`: `file` and `lineno` (the code
that emitted the event), `time_ms` (wall-clock milliseconds) and `rank` (FlagPerf's local rank).
What a process segment writes, from the event log's records, in FlagPerf's order:

- `run_start`: INIT_START, timed at the command's start (where our init_time starts);
- `train_start`: INIT_END (`other`: "Finish initialization", as FlagPerf's) and TRAIN_START;
- `epoch_start` / `epoch_end`: EPOCH_BEGIN / EPOCH_END, `value` {"epoch": n} (from 0);
- `eval`: EVALUATE, `value` {"epoch", "global_steps", "mAP", "time"} (time: its seconds);
- `run_end` of a completed run: TRAIN_END, timed where training time ended (the end of the last
  evaluation), then FINISHED with the RetinaNet case's keys (`finished`). A run that did not
  complete writes neither, as FlagPerf's case, which exits without them, so that a harness that
  takes FINISHED for success is not misled.

A resumed run appends to the file: each segment writes its own INIT_START ..., and only the one
that completes writes FINISHED, with the whole run's metrics (summed over segments).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import IO, Any

from retinaperf import clock
from retinaperf.files import jsonable
from retinaperf.report.events import EventLog

FLAGPERF_LOG = "flagperf.log"

PREFIX = "[PerfLog] "  # FlagPerf's LogMeta.log_template "[{header}] {message}", header "PerfLog"

# The RetinaNet case's FINISHED keys, in its order, each with the metric of results.json it is
# (docs/metrics.md, "FlagPerf's log"). FlagPerf's train_no_eval_time is train_time - eval_time,
# computed in `finished`; its train_time and raw_train_time, which the case leaves at 0, are the
# true train_time here.
FINISHED_KEYS = {
    "e2e_time": "e2e_time",
    "train_time": "train_time",
    "train_no_eval_time": None,
    "pure_training_computing_time": "core_time",
    "throughput(ips)_raw": "p_whole",
    "throughput(ips)_no_eval": "p_train",
    "throughput(ips)_pure_compute": "p_core",
    "converged": "converged",
    "final_mAP": "mAP",
    "raw_train_time": "train_time",
    "init_time": "init_time",
}

# FlagPerf's `rank` is the process's local rank; only global rank 0, local rank 0, writes here.
RANK = 0


class FlagperfLog:
    """An event log sink (`report.events.EventSink`) that writes FlagPerf's `[PerfLog]` lines to
    `path` and, if given, to `console`."""

    def __init__(self, path: Path, command_start: float, console: IO[str] | None = None) -> None:
        # The records' `time` is seconds since command_start (perf_counter): on the wall clock,
        # they are seconds since this moment.
        self._wall_start = clock.wall_time_at(command_start)
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")
        self._console = console
        self._train_end: float | None = None  # the record time training time ended at, so far

    def write(self, record: dict) -> None:
        kind, at = record["event"], record["time"]
        if kind == "run_start":
            self._log("INIT_START", 0.0)
        elif kind == "train_start":
            self._log("INIT_END", at, other="Finish initialization")
            self._log("TRAIN_START", at)
            self._train_end = at
        elif kind in ("epoch_start", "epoch_end"):
            name = "EPOCH_BEGIN" if kind == "epoch_start" else "EPOCH_END"
            self._log(name, at, value={"epoch": record["epoch"]})
        elif kind == "eval":
            value = {
                "epoch": record["epoch"],
                "global_steps": record["step"],
                "mAP": record["mAP"],
                "time": record["seconds"],
            }
            self._log("EVALUATE", at, value=value)
            self._train_end = at  # training time ends with the last evaluation
        elif kind == "run_end" and record["status"] == "completed":
            if self._train_end is not None:
                self._log("TRAIN_END", self._train_end)
            self._log("FINISHED", at, value=finished(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _log(self, event: str, at: float, value: Any = None, other: str | None = None) -> None:
        """One line, stamped `at` seconds after the command's start, to the file and console."""
        if self._file is None:  # closed: the run is over
            return
        message: dict[str, Any] = {"event": event}
        if value is not None:
            message["value"] = value
        if other is not None:
            message["other"] = other
        file, lineno = _emitter()
        message["metadata"] = {
            "file": file,
            "lineno": lineno,
            "time_ms": round((self._wall_start + at) * 1000),
            "rank": RANK,
        }
        # json.dumps' default separators, as FlagPerf's: its CI greps `"event": "FINISHED"`.
        line = PREFIX + json.dumps(message, default=jsonable) + "\n"
        self._file.write(line)
        self._file.flush()  # a run killed later keeps what was written
        if self._console is not None:
            self._console.write(line)
            self._console.flush()


def finished(run_end: dict) -> dict[str, Any]:
    """FINISHED's value, FlagPerf's RetinaNet keys, from the `run_end` record's metrics."""
    value = {key: run_end[metric] for key, metric in FINISHED_KEYS.items() if metric}
    value["train_no_eval_time"] = run_end["train_time"] - run_end["eval_time"]
    return {key: value[key] for key in FINISHED_KEYS}


def _emitter() -> tuple[str, int]:
    """The file and line of the code that emitted the record being written, as FlagPerf's
    metadata gives the file and line that called its logger."""
    plumbing = {_emitter.__code__.co_filename, EventLog.emit.__code__.co_filename}
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename in plumbing:
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame else ("(unknown file)", -1)


def read_log(path: Path) -> list[dict]:
    """The messages of a FlagPerf log (the JSON after each `[PerfLog] ` prefix), in order; other
    lines (a console's) are skipped."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line[len(PREFIX) :]) for line in f if line.startswith(PREFIX)]
