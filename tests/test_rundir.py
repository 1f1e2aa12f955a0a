"""One writer per run directory: default names never shared, a folder in use refused naming its
holder (the holder goes on untouched), and a killed run's lock gone with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from retinaperf.run import checkpoint

HERE = Path(__file__).parent


def start(
    args: list[str], cwd: Path, script: tuple[str, ...] = ("-m", "retinaperf")
) -> subprocess.Popen:
    """`retinaperf ARGS` in a process of its own (`script`: what runs it)."""
    return subprocess.Popen(
        [sys.executable, *script, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_held(args: list[str], cwd: Path, at_step: int) -> tuple[subprocess.Popen, Path]:
    """`retinaperf ARGS` in a process of its own that holds before its `at_step`-th step while
    the file returned exists (tests/held_run.py): live for as long as the test needs, however
    slow the machine, without training for that long."""
    hold = cwd / "hold"
    hold.touch()
    return start(args, cwd, (str(HERE / "held_run.py"), str(hold), str(at_step))), hold


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def has_stepped(out: Path) -> bool:
    events = out / "events.jsonl"
    return events.is_file() and '"event": "step"' in events.read_text()


def test_runs_started_together_without_an_output_dir_each_get_their_own(
    tiny_dataset, tiny_run_args, tmp_path
):
    unnamed = tiny_run_args(tiny_dataset, Path("unused"), max_steps=1)
    args = [a for a in unnamed if a != "--output-dir"]
    args.remove("unused")
    runs = [start(args, tmp_path) for _ in range(3)]
    for process in runs:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    made = sorted((tmp_path / "runs").iterdir())
    assert len(made) == 3
    for run_dir in made:
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "completed" and Path(results["run_dir"]).name == run_dir.name


@pytest.mark.parametrize("second", ["same --output-dir", "--resume"])
def test_a_folder_a_live_run_writes_in_is_refused_and_the_live_run_goes_on(
    second, tiny_dataset, tiny_run_args, tmp_path, capsys
):
    out = tmp_path / "run"
    # 2 steps, held before the second while the other run is refused
    live, hold = start_held(tiny_run_args(tiny_dataset, out, monitor_interval=0), tmp_path, 2)
    wait_for(lambda: has_stepped(out), live)
    args = (
        ["run", "--resume", str(out)] if second == "--resume" else tiny_run_args(tiny_dataset, out)
    )
    assert run_cli(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out} is in use by process {live.pid} on " in err[0]
    assert live.poll() is None  # still live, and now let go on
    hold.unlink()
    _, stderr = live.communicate(timeout=600)
    assert live.returncode == 0, stderr
    assert json.loads((out / "results.json").read_text())["status"] == "completed"


def test_a_killed_runs_lock_does_not_block_its_resume(tiny_dataset, tiny_run_args, tmp_path):
    out = tmp_path / "run"
    # A checkpoint at every step; held before the 3rd (for good: it is killed there).
    settings = {"max_steps": 3, "monitor_interval": 0, "checkpoint_minutes": 1e-6}
    live, _ = start_held(tiny_run_args(tiny_dataset, out, **settings), tmp_path, 3)
    wait_for(lambda: len(checkpoint.saved(out)) >= 2, live)
    os.kill(live.pid, signal.SIGKILL)  # no stop of its own: its lock stays on disk
    live.communicate()
    assert run_cli(["run", "--resume", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [s["ended"] for s in results["segments"]] == ["crashed", "completed"]


@pytest.mark.parametrize(
    ("results", "ended"),
    [
        ({"status": "interrupted"}, "was interrupted"),
        (None, "stopped without results (killed or crashed)"),
        ({"status": "failed"}, "failed"),
    ],
)
def test_a_new_run_into_a_run_that_can_go_on_is_offered_its_resume(results, ended, tmp_path):
    from retinaperf import config, invocation
    from retinaperf.distributed import DistEnv
    from retinaperf.errors import UserError
    from retinaperf.run import rundir

    out = tmp_path / "int"
    checkpoint.folder(out).mkdir(parents=True)
    (checkpoint.folder(out) / "step-4.pt").write_bytes(b"state")
    (out / rundir.CONFIG).write_text("{}")
    if results is not None:
        (out / "results.json").write_text(json.dumps(results))
    resolved = config.resolve("smoke", config.parse_overrides([f"output_dir={out}"]))
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    with pytest.raises(UserError) as refused:
        rundir.claim(resolved, env, resume=False)
    assert str(refused.value) == (
        f"output: {out} holds a run that {ended}, with checkpoint step-4.pt: continue it with "
        f"`{invocation.command('run', '--resume', str(out))}`, or choose a new --output-dir"
    )
    # a completed run (its checkpoints gone) or a folder of other files: only not empty
    (out / "results.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(UserError, match=r"is not empty: choose a new --output-dir$"):
        rundir.claim(resolved, env, resume=False)
