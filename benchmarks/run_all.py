"""`make bench`: every benchmark, one table of ratios, results/latest.json and the README's table.

Each benchmark times a baseline and ours in the same process (see the `bench_*.py` docstrings for
what each compares). This script runs them one after another on this machine, prints the table,
writes `benchmarks/results/latest.json` and regenerates the README's benchmark section from it.
Exits with status 1 when a goal is missed (after writing). `--only NAME` runs some of them and
writes nothing: a partial table must not replace a whole one.

    .venv/bin/python benchmarks/run_all.py [--only loss postprocess ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

from common import Comparison, print_comparisons, readme_section, replace_readme_section
from retinaperf.files import write_text_atomic
from retinaperf.measure import environment
from retinaperf.measure.devices import registry

CPU = torch.device("cpu")

HERE = Path(__file__).parent
LATEST = HERE / "results" / "latest.json"
README = HERE.parent / "README.md"
# name -> module; in the order of the table. Each module has `benchmark() -> list[Comparison]`.
BENCHMARKS = {
    "host": "bench_host",
    "loss": "bench_loss",
    "postprocess": "bench_postprocess",
    "step": "bench_step",
    "data": "bench_data",
    "index": "bench_index",
    "scoring": "bench_scoring",
    "run": "bench_run",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    chosen = args.only or list(BENCHMARKS)
    start = time.perf_counter()
    comparisons: list[Comparison] = []
    seconds: dict[str, float] = {}
    for name in chosen:
        print(f"== {name} ({BENCHMARKS[name]}.py)", flush=True)
        began = time.perf_counter()
        found = importlib.import_module(BENCHMARKS[name]).benchmark()
        seconds[name] = time.perf_counter() - began
        print_comparisons(found)
        print(f"   {seconds[name]:.0f} s", flush=True)
        comparisons += found
    print("\n== all")
    print_comparisons(comparisons)
    missed = [c.name for c in comparisons if not c.met]
    if not args.only:
        latest = {
            "date": date.today().isoformat(),
            "command": "make bench",
            "seconds": time.perf_counter() - start,
            "seconds_per_benchmark": seconds,
            "environment": environment.capture(
                CPU, [environment.hostname()], registry.plugin_for(CPU), "not monitored"
            ),
            "comparisons": [c.to_dict() for c in comparisons],
        }
        LATEST.parent.mkdir(exist_ok=True)
        write_text_atomic(LATEST, json.dumps(latest, indent=2) + "\n")
        readme = replace_readme_section(README.read_text(), readme_section(latest))
        write_text_atomic(README, readme)
        print(f"wrote {LATEST.relative_to(HERE.parent)} and the README's benchmark table")
    if missed:
        print(f"goals missed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
