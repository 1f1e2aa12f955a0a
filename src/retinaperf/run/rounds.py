"""Repeated rounds of one configuration, and the spread of their metrics.

`retinaperf run --repeat N` runs one configuration N times into `<output dir>/round-K/`. Each
round is a command of its own, in a fresh process (through torchrun with `--nproc-per-node`), so
that e2e_time and init_time mean in every round what they mean in a single run: imports, start-up
and data indexing included. Then `summary.json` and `report.md` are written beside the rounds.
`retinaperf report` shows the same table and spread for such a folder (`run_dirs` finds its
rounds), and the spread for any run directories of one configuration.

Spread of a metric over n runs: mean, min, max and cv, the coefficient of variation: the sample
standard deviation (n - 1 in the denominator) over the mean; None for fewer than two values.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from retinaperf import io
from retinaperf.config import PLACE_KEYS
from retinaperf.errors import UserError
from retinaperf.report import tables
from retinaperf.report.results import RESULTS
from retinaperf.run import signals
from retinaperf.units import NO_VALUE

SUMMARY = "summary.json"
ROUND = "round-"  # round K's directory is round-K
# What varies between rounds of one configuration; None values (a metric a run has no figure
# for) are skipped.
SPREAD_METRICS = (
    "e2e_time",
    "init_time",
    "train_time",
    "eval_time",
    "p_whole",
    "p_train",
    "p_core",
    "p_core_steady",
    "mAP",
    "best_mAP",
    "mem_used_gib",
    "images_per_joule",
    "achieved_tflops",
    "mfu",
)


def spread(runs: list[dict]) -> dict[str, dict]:
    """{metric: {n, mean, min, max, cv}} over the results.json objects of `runs`."""
    table = {}
    for name in SPREAD_METRICS:
        values = [r["metrics"][name] for r in runs if r["metrics"][name] is not None]
        if not values:
            continue
        mean = statistics.fmean(values)
        deviation = statistics.stdev(values) if len(values) > 1 else None
        table[name] = {
            "n": len(values),
            "mean": mean,
            "min": min(values),
            "max": max(values),
            "cv": deviation / mean if deviation is not None and mean else None,
        }
    return table


def configuration_key(results: dict) -> str:
    """What must be equal for runs to be rounds of one configuration: the resolved configuration
    (less where it wrote), the device, the job's shape and the precision actually used."""
    config = _less_place(results["config"])
    m = results["metrics"]
    shape = {k: m[k] for k in ("device_name", "world_size", "nodes", "precision")}
    return json.dumps({"config": config, **shape}, sort_keys=True, default=str)


def _less_place(table: dict) -> dict:
    """A run's configuration, sections nested as results.json holds them, less PLACE_KEYS: where
    a run wrote, which neither its numbers nor its speed depend on."""
    return {
        k: _less_place(v) if isinstance(v, dict) else v
        for k, v in table.items()
        if k not in PLACE_KEYS
    }


def groups(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped by configuration, in order of first appearance."""
    grouped: dict[str, list[dict]] = {}
    for results in runs:
        grouped.setdefault(configuration_key(results), []).append(results)
    return list(grouped.values())


def render_spread(runs: list[dict]) -> str:
    """A markdown table of the spread of `runs`, with a line saying which configuration."""
    m, config = runs[0]["metrics"], runs[0]["config"]
    rows = []
    for name, s in spread(runs).items():
        cv = NO_VALUE if s["cv"] is None else f"{100 * s['cv']:.1f}%"
        cells = {k: tables.significant(s[k]) for k in ("mean", "min", "max")}
        rows.append({"metric": name, "n": str(s["n"]), **cells, "cv": cv})
    title = (
        f"Spread over {len(runs)} runs of one configuration: preset {config['preset']}, "
        f"{m['device_name']} {m['nodes']}x{m['devices_per_node']}, {m['precision']}"
    )
    table = tables.format_table(rows, ("metric", "n", "mean", "min", "max", "cv"))
    return f"{title}\n\n{table}\n\ncv: sample standard deviation / mean."


def render_all_spreads(runs: list[dict]) -> str:
    """The spread of every configuration given more than once; empty if there is none."""
    return "\n\n".join(render_spread(group) for group in groups(runs) if len(group) > 1)


def render_runs(runs: list[dict], fmt: str) -> str:
    """Runs side by side in format `fmt` (`tables.render_comparison`); in markdown, then the
    spread of each configuration given more than once: `retinaperf report`'s output, and the
    body of a `--repeat` folder's report.md."""
    text = tables.render_comparison(tables.compare(runs), fmt)
    spreads = render_all_spreads(runs) if fmt == "md" else ""
    return f"{text}\n\n{spreads}" if spreads else text


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
    lock = io.claim_folder(
        out_dir,
        "output",
        "wait for it to end, or choose another --output-dir",
        lambda: io.require_empty(out_dir, "output", "choose a new --output-dir"),
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
    runs = [tables.load_results(d) for d in round_dirs]
    write_summary(out_dir, runs)
    print(render_spread(runs))
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
        "metrics": spread(runs),
        "config": runs[0]["config"],
    }
    io.write_json_atomic(Path(out_dir) / SUMMARY, summary)
    text = (
        f"# retinaperf: {len(runs)} rounds of preset {runs[0]['config']['preset']}\n\n"
        f"{render_runs(runs, 'md')}\n"
    )
    io.write_text_atomic(Path(out_dir) / tables.REPORT, text)
    return summary
