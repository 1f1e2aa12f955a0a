"""A run stopped by SIGTERM and resumed equals the run left alone: the smoke preset, end to end.

Runs `retinaperf run` (default: the smoke preset) twice into a new folder: once uninterrupted,
once sent SIGTERM after `--stop-at` logged steps and then continued with `--resume`. Prints both
runs' metrics side by side, and the loss of the first step after the stop in each (equal when the
generators, the device's included, were restored and the kernels are deterministic). Exits 1
unless the trained images, the steps, the final mAP and that loss are equal.
tests/test_checkpoint.py proves bit-exactness on tiny runs; this checks the real command, and the
GPU check runs it on the GPU (`gpu_check.py`).

    .venv/bin/python benchmarks/resume_check.py [--stop-at 25] [--out DIR] [-- RUN ARGS...]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EQUAL = ("trained_images", "steps", "epochs", "mAP", "best_mAP")
SHOWN = (*EQUAL, "p_core", "p_whole", "e2e_time", "train_time", "checkpoint_time")


@dataclass
class ResumeCheck:
    """Both runs' results, and where the stopped one was stopped and went on."""

    whole: dict
    cut: dict
    stopped_with: int  # the stopped run's exit status (143: SIGTERM)
    resumed_with: int
    first_resumed_step: int | None
    losses: tuple[float | None, float | None]  # at that step: uninterrupted, resumed

    @property
    def different(self) -> list[str]:
        """What differs of what must be equal (empty: the check passed)."""
        found = [key for key in EQUAL if self.whole["metrics"][key] != self.cut["metrics"][key]]
        if self.cut["status"] != "completed" or len(self.cut["segments"]) != 2:
            found.append(f"status {self.cut['status']}, {len(self.cut['segments'])} segments")
        if self.losses[0] != self.losses[1]:
            found.append(f"loss at step {self.first_resumed_step}")
        return found

    def table(self) -> str:
        segments = ", ".join(f"{s['ended']} at step {s['end_step']}" for s in self.cut["segments"])
        rows = [
            f"SIGTERM: exit status {self.stopped_with}; resume: {self.resumed_with}; segments: "
            f"{segments}; time between them {self.cut['metrics']['time_between_segments']:.1f} s",
            "",
            "| metric | uninterrupted | stopped and resumed |",
            "| --- | --- | --- |",
            *(
                f"| {key} | {self.whole['metrics'][key]} | {self.cut['metrics'][key]} |"
                for key in SHOWN
            ),
            f"| loss at step {self.first_resumed_step} (the first after the stop) | "
            f"{self.losses[0]} | {self.losses[1]} |",
        ]
        return "\n".join(rows)


def retinaperf(*args: str) -> list[str]:
    return [sys.executable, "-m", "retinaperf", *args]


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of the steps the event log has recorded."""
    log = run_dir / "events.jsonl"
    if not log.exists():
        return {}
    events = [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line]
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def stop_and_resume(
    run_args: list[str], stop_at: int, out: Path, env: dict[str, str] | None = None
) -> ResumeCheck:
    """`retinaperf run RUN_ARGS` into out/whole, and into out/cut stopped after step `stop_at`
    and resumed."""
    whole, cut = out / "whole", out / "cut"
    subprocess.run(retinaperf("run", "--output-dir", str(whole), *run_args), check=True, env=env)
    job = subprocess.Popen(retinaperf("run", "--output-dir", str(cut), *run_args), env=env)
    while max(step_losses(cut), default=0) < stop_at and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    stopped_with = job.wait()
    resumed = subprocess.run(retinaperf("run", "--resume", str(cut)), check=False, env=env)
    first, second = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    segment = second["segments"][-1]
    step = segment["start_step"] + 1 if len(second["segments"]) > 1 else None
    losses = (step_losses(whole).get(step), step_losses(cut).get(step))
    return ResumeCheck(first, second, stopped_with, resumed.returncode, step, losses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop-at", type=int, default=25, help="send SIGTERM after this step")
    parser.add_argument("--out", type=Path, help="new folder for both runs (default: temporary)")
    parser.add_argument("run_args", nargs="*", help="more `retinaperf run` arguments")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="resume-check-"))
    check = stop_and_resume(args.run_args, args.stop_at, out)
    print(f"\n{check.table()}")
    if check.different:
        print(f"\nNOT EQUAL: {', '.join(check.different)}")
        return 1
    print(f"\nequal: {', '.join(EQUAL)}, and the loss of step {check.first_resumed_step}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
