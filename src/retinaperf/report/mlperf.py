"""The MLPerf-format logs of a run: `:::MLLOG {json}` lines written by the mlperf-logging
package's `mllog`, another view of the event log (a sink of it, so rank 0 only), one file per
process segment, each a whole MLPerf run that mlperf-logging's compliance checker takes
(`--usage training --ruleset 5.1.0`, the last ruleset with RetinaNet).

Files: MLPerf has no resume, so a run's segments do not share a file (the checker refuses a file
with two `run_start`s). The first segment writes `<run dir>/mlperf.log`; each later one (a
`--resume`, or workers torchrun started again) writes the next free `mlperf-segment-<n>.log`,
n = 2, 3, ...: the order the processes logged in (`log_files` lists them in it).

What a process segment writes, from the event log's records:

- `run_start`: `init_start` (timed at the command's start), then `cache_clear` (false: the
  benchmark does not drop the OS page cache), `submission_org`, `submission_platform`,
  `submission_division` (the keys mlperf_org, mlperf_platform, mlperf_division; the platform's
  default is the devices, see `platform`) and the settings:
  `submission_benchmark` (retinanet), `global_batch_size` (batch_size x ranks),
  `opt_base_learning_rate` (lr), the warm-up factor, the decay's boundary epochs (lr_steps) and
  factor (lr_gamma), the weight decay, the seed, `train_samples` and `eval_samples` (the images
  the run trains on and scores);
- `train_start`: the warm-up steps in force (warmup_iters, capped at an epoch's steps - 1), then
  `init_stop` and `run_start`: where training time starts;
- `epoch_start` / `epoch_end`: `epoch_start` / `epoch_stop`, `epoch_num` the epoch (from 0);
- `eval`: `eval_start` (timed when the evaluation began), `eval_accuracy` (the mAP, with
  `epoch_num`), `eval_stop`;
- `run_end` or `run_failed`, whichever comes first: the intervals still open (an epoch cut
  short) end, then exactly one `run_stop`, `status` success for a completed run and aborted for
  an interrupted or failed one (the checker takes either).

The values are those of results.json (metrics `global_batch`, `lr`, `evaluations`' mAP,
`train_images`, `val_images`). A segment's `run_stop` says how that segment ended, so the last
file's says how the run ended. The checker refuses a file whose segment ran no evaluation (it
requires an `eval_accuracy`, which cannot be logged without one) and one a process killed
outright left without its `run_stop`.

The logger is this log's own (not mllog's module-wide one): a `logging.Logger` outside logging's
registry with one file handler, closed with the sink, so that nothing outlives the run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from mlperf_logging.mllog import constants as mlc
from mlperf_logging.mllog.mllog import LOG_TEMPLATE, MLLogger

from retinaperf import clock

MLPERF_LOG = "mlperf.log"  # the first segment's
LATER_SEGMENT = "mlperf-segment-{}.log"  # the n-th's, n >= 2

PREFIX = LOG_TEMPLATE.split("{")[0]  # ":::MLLOG "

# Each interval's start key and the key that ends it.
INTERVALS = {
    mlc.INIT_START: mlc.INIT_STOP,
    mlc.RUN_START: mlc.RUN_STOP,
    mlc.EPOCH_START: mlc.EPOCH_STOP,
    mlc.EVAL_START: mlc.EVAL_STOP,
}


class MlperfLog:
    """An event log sink (`report.events.EventSink`) that writes the MLPerf-format log."""

    def __init__(self, path: Path, command_start: float) -> None:
        # The records' `time` is seconds since command_start (perf_counter): on the wall clock,
        # they are seconds since this moment.
        self._wall_start = clock.wall_time_at(command_start)
        self._handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        self._logger = logging.Logger("retinaperf.mlperf", logging.INFO)  # not in the registry
        self._logger.propagate = False
        self._logger.addHandler(self._handler)
        self._mllog = MLLogger(self._logger)
        self._open: list[tuple[str, dict]] = []  # started intervals: (start key, metadata)
        self._stopped = False

    def write(self, record: dict) -> None:
        at = self._ms(record["time"])
        kind = record["event"]
        if kind == "run_start":
            self._start(mlc.INIT_START, self._ms(0.0))
            for key, value in settings(record).items():
                self._mllog.event(key, value, time_ms=at)
        elif kind == "train_start":
            self._mllog.event(mlc.OPT_LR_WARMUP_STEPS, record["warmup_steps"], time_ms=at)
            self._end(mlc.INIT_START, at)
            self._start(mlc.RUN_START, at)
        elif kind == "epoch_start":
            self._start(mlc.EPOCH_START, at, {mlc.EPOCH_NUM: record["epoch"]})
        elif kind == "epoch_end":
            self._end(mlc.EPOCH_START, at)
        elif kind == "eval":
            epoch = {mlc.EPOCH_NUM: record["epoch"]}
            self._start(mlc.EVAL_START, self._ms(record["time"] - record["seconds"]), epoch)
            self._mllog.event(mlc.EVAL_ACCURACY, record["mAP"], metadata=epoch, time_ms=at)
            self._end(mlc.EVAL_START, at)
        elif kind == "run_end":
            self._stop(mlc.SUCCESS if record["status"] == "completed" else mlc.ABORTED, at)
        elif kind == "run_failed":
            self._stop(mlc.ABORTED, at)

    def close(self) -> None:
        if self._open and not self._stopped:  # ended without a run_end or run_failed record
            self._stop(mlc.ABORTED, self._ms(time.time() - self._wall_start))
        self._logger.removeHandler(self._handler)
        self._handler.close()

    def _ms(self, seconds: float) -> int:
        """Wall-clock milliseconds of `seconds` after the command's start."""
        return round((self._wall_start + seconds) * 1000)

    def _start(self, key: str, at: int, metadata: dict | None = None) -> None:
        self._mllog.start(key, metadata=metadata, time_ms=at)
        self._open.append((key, metadata or {}))

    def _end(self, key: str, at: int, extra: dict | None = None) -> None:
        """End the interval `key` opened, if it is open."""
        for i, (opened, metadata) in enumerate(self._open):
            if opened == key:
                del self._open[i]
                self._mllog.end(INTERVALS[key], metadata={**metadata, **(extra or {})}, time_ms=at)
                return

    def _stop(self, status: str, at: int) -> None:
        """This segment's one run_stop, after whatever is still open (innermost first)."""
        if self._stopped:
            return
        self._stopped = True
        for key, _ in reversed(list(self._open)):
            if key != mlc.RUN_START:
                self._end(key, at)
        if self._open:  # the run had started
            self._end(mlc.RUN_START, at, {mlc.STATUS: status})
        else:  # it failed before training began: the outcome is still said
            self._mllog.end(mlc.RUN_STOP, metadata={mlc.STATUS: status}, time_ms=at)


def segment_log(run_dir: Path) -> Path:
    """The file a new segment of the run in `run_dir` writes: the first one not yet written."""
    return run_dir / _file_name(len(log_files(run_dir)) + 1)


def log_files(run_dir: Path) -> list[Path]:
    """The MLPerf logs of the run in `run_dir`, one per segment, in the order they were written
    (numbered without a gap, as `segment_log` names them)."""
    found: list[Path] = []
    while (path := run_dir / _file_name(len(found) + 1)).is_file():
        found.append(path)
    return found


def _file_name(segment: int) -> str:
    """The name of the `segment`-th file (from 1)."""
    return MLPERF_LOG if segment == 1 else LATER_SEGMENT.format(segment)


def platform(run_start: dict) -> str:
    """The system of the run, as MLPerf names platforms (nodes x system): `mlperf_platform`, or
    its devices as `<devices>x<device name>` on one node, `<nodes>x<devices per node>x<device
    name>` on several."""
    configured = run_start["config"]["mlperf_platform"].strip()
    if configured:
        return configured
    node = f"{run_start['devices_per_node']}x{run_start['device_name']}"
    return node if run_start["nodes"] == 1 else f"{run_start['nodes']}x{node}"


def settings(run_start: dict) -> dict[str, Any]:
    """The MLPerf keys of a run's settings, from the event log's `run_start` record."""
    config = run_start["config"]
    train = config["train"]
    return {
        # MLPerf's rules ask for the cache to be flushed (or the system restarted) before a
        # run; this benchmark drops no cache, and says so.
        mlc.CACHE_CLEAR: False,
        mlc.SUBMISSION_ORG: config["mlperf_org"],
        mlc.SUBMISSION_PLATFORM: platform(run_start),
        mlc.SUBMISSION_DIVISION: config["mlperf_division"],
        mlc.SUBMISSION_BENCHMARK: mlc.RETINANET,
        mlc.GLOBAL_BATCH_SIZE: train["batch_size"] * run_start["world_size"],
        mlc.OPT_BASE_LR: train["lr"],
        mlc.OPT_LR_WARMUP_FACTOR: train["warmup_factor"],
        # The lr is multiplied by lr_gamma at the start of each epoch of lr_steps.
        mlc.OPT_LR_DECAY_BOUNDARY_EPOCHS: list(train["lr_steps"]),
        mlc.OPT_LR_DECAY_FACTOR: train["lr_gamma"],
        mlc.OPT_WEIGHT_DECAY: train["weight_decay"],
        mlc.SEED: train["seed"],
        mlc.TRAIN_SAMPLES: run_start["train_images"],
        mlc.EVAL_SAMPLES: run_start["val_images"],
    }


def read_log(path: Path) -> list[dict]:
    """The entries of an MLPerf-format log (the JSON after each `:::MLLOG ` prefix), in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line[len(PREFIX) :]) for line in f if line.startswith(PREFIX)]
