"""Runs of one configuration side by side, and the spread of their metrics.

Spread of a metric over n runs: mean, min, max and cv, the coefficient of variation: the sample
standard deviation (n - 1 in the denominator) over the mean; None for fewer than two values.
"""

from __future__ import annotations

import json
import statistics

from retinaperf.config import PLACE_KEYS
from retinaperf.report import comparison, tables
from retinaperf.units import NO_VALUE, significant

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
        cells = {k: significant(s[k]) for k in ("mean", "min", "max")}
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
    """Runs side by side in format `fmt` (`comparison.render_comparison`); in markdown, then the
    spread of each configuration given more than once: `retinaperf report`'s output, and the
    body of a `--repeat` folder's report.md."""
    text = comparison.render_comparison(comparison.compare(runs), fmt)
    spreads = render_all_spreads(runs) if fmt == "md" else ""
    return f"{text}\n\n{spreads}" if spreads else text
