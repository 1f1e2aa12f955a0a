"""A run stopped by SIGTERM and resumed equals the run left alone: the smoke preset, end to end.

Runs `retinaperf run` (default: the smoke preset) twice into a new folder: once uninterrupted,
once sent SIGTERM after `--stop-at` logged steps and then continued with `--resume`. Prints both
runs' metrics side by side and exits 1 unless the trained images, the steps and the final mAP are
equal. tests/test_checkpoint.py proves bit-exactness on tiny runs; this checks the real command.

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
from pathlib import Path

EQUAL = ("trained_images", "steps", "epochs", "mAP", "best_mAP")
SHOWN = (*EQUAL, "p_core", "p_whole", "e2e_time", "train_time", "checkpoint_time")


def retinaperf(*args: str) -> list[str]:
    return [sys.executable, "-m", "retinaperf", *args]


def logged_step(run_dir: Path) -> int:
    """The last step the event log has recorded (0 before the first)."""
    log = run_dir / "events.jsonl"
    if not log.exists():
        return 0
    steps = [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line]
    return max((event["step"] for event in steps if event["event"] == "step"), default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop-at", type=int, default=25, help="send SIGTERM after this step")
    parser.add_argument("--out", type=Path, help="new folder for both runs (default: temporary)")
    parser.add_argument("run_args", nargs="*", help="more `retinaperf run` arguments")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="resume-check-"))
    whole, cut = out / "whole", out / "cut"

    subprocess.run(retinaperf("run", "--output-dir", str(whole), *args.run_args), check=True)
    job = subprocess.Popen(retinaperf("run", "--output-dir", str(cut), *args.run_args))
    while logged_step(cut) < args.stop_at and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    stopped_with = job.wait()
    resumed_with = subprocess.run(retinaperf("run", "--resume", str(cut)), check=False).returncode

    first = json.loads((whole / "results.json").read_text())
    second = json.loads((cut / "results.json").read_text())
    segments = ", ".join(f"{s['ended']} at step {s['end_step']}" for s in second["segments"])
    print(f"\nSIGTERM after step {args.stop_at}: exit status {stopped_with}; resume {resumed_with}")
    print(f"segments: {segments}")
    print(f"time between segments: {second['metrics']['time_between_segments']:.1f} s\n")
    print("| metric | uninterrupted | stopped and resumed |\n| --- | --- | --- |")
    for key in SHOWN:
        print(f"| {key} | {first['metrics'][key]} | {second['metrics'][key]} |")
    different = [key for key in EQUAL if first["metrics"][key] != second["metrics"][key]]
    if different or second["status"] != "completed" or len(second["segments"]) != 2:
        print(f"\nNOT EQUAL: {', '.join(different) or second['status']}")
        return 1
    print(f"\nequal: {', '.join(EQUAL)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
