"""The whole run: how much of the training time is the step itself (p_whole / p_core).

Runs `retinaperf run` with the smoke preset (what `make run` runs) in a fresh process, as a user
would, and reads its results.json. p_core counts forward, loss, backward and update; p_whole
counts everything between the start and the end of training: data waits, logging and every
evaluation. Goal: p_whole ≥ 0.9 p_core, so that the harness around the step stays out of the way.

    .venv/bin/python benchmarks/bench_run.py [--preset smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Comparison, print_comparisons


def benchmark(preset: str = "smoke") -> list[Comparison]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "retinaperf", "run", "--preset", preset]
        done = subprocess.run(
            [*command, "--output-dir", str(out)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:  # its progress bars stay out of the table; its errors do not
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        m = json.loads((out / "results.json").read_text())["metrics"]
    return [
        Comparison(
            name="whole run",
            workload=f"`retinaperf run --preset {preset}` ({m['steps']} steps, {m['epochs']} "
            f"evaluations, {m['device_name']})",
            baseline="p_core",
            baseline_value=m["p_core"],
            ours="p_whole",
            ours_value=m["p_whole"],
            unit="images/s",
            ratio=m["p_whole"] / m["p_core"],
            goal=0.9,
            notes=f"mAP {m['mAP']:.4f}; e2e {m['e2e_time']:.0f} s, of which training "
            f"{m['train_time']:.0f} s (evaluation {m['eval_time']:.1f} s, core "
            f"{m['core_time']:.0f} s)",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    print_comparisons(benchmark(parser.parse_args().preset))


if __name__ == "__main__":
    main()
