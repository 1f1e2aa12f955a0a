"""Repeated rounds of one configuration.

`retinaperf run --repeat N` runs one configuration N times into `<output dir>/round-K/`. Each
round is a command of its own, in a fresh process (through torchrun with `--nproc-per-node`), so
that e2e_time and init_time mean in every round what they mean in a single run: imports, start-up
and data indexing included. Then `summary.json` and `report.md` are written beside the rounds.
`retinaperf report` shows the same table and spread (report/spread.py) for such a folder
(`run_dirs` finds its rounds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from retinaperf import files
from retinaperf.errors import UserError
from retinaperf.report import loading, spread, tables
from retinaperf.report.results import RESULTS
from retinaperf.run import signals

SUMMARY = "summary.json"
ROUND = "round-"  # round K's directory is round-K


def round_dir(out_dir: Path, k: int) -> Path:
    """Where round k (from 1) of a `--repeat` into `out_dir` runs."""
    return Path(out_dir) / f"{ROUND}{k}"


def run_dirs(path: Path) -> list[Path]:
    """The run directories a folder given to `retinaperf report` stands for: itself, or the
    rounds of a `--repeat` folder in order; itself where it is neither (the report says what is
    missing)."""
    path = Path(path)
    if (path / RESULTS).exists():
        return [path]
    numbers = sorted(
        int(k) for p in path.glob(f"{ROUND}*") if (k := p.name.removeprefix(ROUND)).isdigit()
    )
    return [round_dir(path, k) for k in numbers] or [path]


def run_rounds(count: int, out_dir: Path, command: list[str], start_variable: str) -> int:
    """Run `command` (a `retinaperf run` that takes `--set output_dir=...` last) `count` times,
    round K into `out_dir/round-K`; then write summary.json and report.md. Returns the exit
    status: a failed round's, at once, with the rounds before it left as they are.

    Each round's e2e_time starts when the round is launched: its wall-clock time goes to the
    round's processes in the environment variable `start_variable`."""
    if count < 1:
        raise UserError(f"--repeat {count}: give 1 or more")
    out_dir = Path(out_dir)
    # One `--repeat` writes in a folder at a time; each round's run locks its own as well.
    lock = files.claim_folder(
        out_dir,
        "output",
        "wait for it to end, or choose another --output-dir",
        lambda: files.require_empty(out_dir, "output", "choose a new --output-dir"),
    )
    try:
        return _rounds(count, out_dir, command, start_variable)
    finally:
        lock.release()


def _rounds(count: int, out_dir: Path, command: list[str], start_variable: str) -> int:
    round_dirs = [round_dir(out_dir, k) for k in range(1, count + 1)]
    for k, folder in enumerate(round_dirs, start=1):
        print(f"retinaperf: round {k} of {count} -> {folder}", flush=True)
        environment = {**os.environ, start_variable: repr(time.time())}
        code = signals.run_child([*command, "--set", f"output_dir={folder}"], environment)
        if code != 0:
            print(
                f"retinaperf: round {k} of {count} failed (exit status {code}); no summary written",
                flush=True,
            )
            return code
    runs = [loading.load_results(d) for d in round_dirs]
    write_summary(out_dir, runs)
    print(spread.render_spread(runs))
    print(f"summary: {out_dir / SUMMARY}")
    return 0


def write_summary(out_dir: Path, runs: list[dict]) -> dict:
    """summary.json (the spread, the rounds, the configuration) and report.md (the table with
    one row per round, then the spread: what `retinaperf report out_dir` prints) in `out_dir`,
    each written atomically."""
    summary = {
        "rounds": len(runs),
        "run_dirs": [r["run_dir"] for r in runs],
        "device_name": runs[0]["metrics"]["device_name"],
        "precision": runs[0]["metrics"]["precision"],
        "metrics": spread.spread(runs),
        "config": runs[0]["config"],
    }
    files.write_json_atomic(Path(out_dir) / SUMMARY, summary)
    text = (
        f"# retinaperf: {len(runs)} rounds of preset {runs[0]['config']['preset']}\n\n"
        f"{spread.render_runs(runs, 'md')}\n"
    )
    files.write_text_atomic(Path(out_dir) / tables.REPORT, text)
    return summary
