"""A run's life (run/job.py): a failure at any stage of the set-up closes everything opened
so far (no thread, worker process or open file is left) and is recorded, in the event log once
the run directory exists, and leaves no folder before then."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psutil
import pytest
from cli_helpers import run_cli

from retinaperf.measure.energy import RunEnergy
from retinaperf.measure.monitor import Monitor
from retinaperf.measure.profiling import StepProfiler
from retinaperf.run import build, step, trainer
from retinaperf.run.build import Loaders
from retinaperf.run.checkpointer import Checkpointer


class Injected(RuntimeError):
    """The failure a test makes one stage of the set-up raise."""


def _fail(stage: str):
    def raising(*args, **kwargs):
        raise Injected(f"injected into {stage}")

    return raising


# (stage, where its failure is injected, whether the run directory exists by then), in the
# order Trainer.__init__ builds: each fails after the stages before it have opened their parts
# (the data loaders' workers, the event log's file, the MLPerf log and TensorBoard's writer
# thread, the energy counters, the checkpoint writer, the monitor's samplers).
STAGES = [
    ("weights", (build, "load_weights"), False),
    ("event log sinks", (trainer, "TensorBoardSink"), True),
    ("meter", (trainer, "Meter"), True),
    ("restore", (Checkpointer, "restore"), True),
    ("ddp", (step, "wrap_ddp"), True),
    ("profiler", (trainer, "StepProfiler"), True),
]


# The trainer's parts that hold something (worker processes, threads, counters, samplers, a
# profiler), each with what closes it. On this CPU most open their threads or files only once
# training runs, so the test also watches that each part made is closed.
PARTS = [
    (Loaders, "shut_down"),
    (RunEnergy, "close"),
    (Checkpointer, "close"),
    (Monitor, "stop"),
    (StepProfiler, "close"),
]


def _watch_parts(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """Record each part as it is made and as it is closed: (made, closed)."""
    made, closed = [], []
    for cls, close in PARTS:
        init, shut = cls.__init__, getattr(cls, close)

        def watched_init(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            made.append(self)

        def watched_close(self, *args, _shut=shut, **kwargs):
            closed.append(self)
            return _shut(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", watched_init)
        monkeypatch.setattr(cls, close, watched_close)
    return made, closed


def _open_under(folder: Path) -> list[str]:
    return [f.path for f in psutil.Process().open_files() if Path(f.path).is_relative_to(folder)]


@pytest.mark.parametrize(("stage", "target", "has_dir"), STAGES, ids=[s[0] for s in STAGES])
def test_a_failure_anywhere_in_the_set_up_closes_what_was_opened_and_is_recorded(
    stage, target, has_dir, tiny_run_args, tiny_dataset, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    made, closed = _watch_parts(monkeypatch)
    monkeypatch.setattr(*target, _fail(stage))
    args = tiny_run_args(tiny_dataset, out, num_workers=1, tensorboard="true", monitor_interval=0.2)
    with pytest.raises(Injected, match=stage):
        run_cli(args)
    assert made, "no part was made before the failure"
    assert [type(p).__name__ for p in made if p not in closed] == []
    left = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    assert left == [], f"threads left after a failure in {stage}: {left}"
    children = [p for p in psutil.Process().children(recursive=True)]
    assert {p.pid for p in children} <= children_before, "a worker process was left"
    assert _open_under(tmp_path) == []
    if not has_dir:  # refused before the run directory was prepared: nothing half-written
        assert not out.exists()
        return
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "run_failed"
    assert f"injected into {stage}" in events[-1]["error"]
    assert (out / "mlperf.log").read_text().rstrip().splitlines()[-1].count("run_stop") == 1
