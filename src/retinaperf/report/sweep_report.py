"""A sweep's report (`retinaperf sweep`, run/sweep.py): the seed's table with every completed point
a row, then per group of points (one precision, and one value of every other axis but the batch)
the saturation point, the largest batch that fits and where memory ran out.

Saturation point: the smallest local batch whose p_core is within SATURATION of the group's best
p_core (at least (1 - SATURATION) x the best): past it a larger batch buys little speed.
Largest batch that fits: the largest local batch of the group whose run completed. Out of memory
at: the smallest batch above it whose run ran out of memory, with its device's memory and the
memory_limit_gib it ran under.
"""

from __future__ import annotations

from typing import Any

from retinaperf.report import spread, tables
from retinaperf.units import NO_VALUE, significant

SATURATION = 0.05
BATCH = "batch_size"


def group_label(point: dict[str, Any]) -> str:
    """A point's group: its precision (as it ran) and its values of the axes other than batch
    and precision."""
    others = [f"{k}={v}" for k, v in point["values"].items() if k not in (BATCH, "precision")]
    return ", ".join([point["precision"], *others])


def _groups(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        grouped.setdefault(group_label(point), []).append(point)
    return grouped


def summarize(points: list[dict[str, Any]]) -> dict[str, Any]:
    """{"groups": [...]}: each group's best p_core, saturation point, largest batch that fits
    and the out-of-memory boundary above it (None where the points do not tell)."""
    summary = []
    for label, members in _groups(points).items():
        done = [p for p in members if p["status"] == "completed" and p["p_core"] is not None]
        best = max(done, key=lambda p: p["p_core"], default=None)
        saturated = [p for p in done if best and p["p_core"] >= (1 - SATURATION) * best["p_core"]]
        fits = max((p["batch_size"] for p in members if p["status"] == "completed"), default=None)
        above = [
            p
            for p in members
            if p["status"] == "out_of_memory" and (fits is None or p["batch_size"] > fits)
        ]
        boundary = min(above, key=lambda p: p["batch_size"], default=None)
        summary.append(
            {
                "group": label,
                "best_p_core": best["p_core"] if best else None,
                "best_batch": best["batch_size"] if best else None,
                "saturation_batch": min(p["batch_size"] for p in saturated) if saturated else None,
                "largest_fit": fits,
                "out_of_memory_at": boundary["batch_size"] if boundary else None,
                "out_of_memory_device_gib": boundary["mem_total_gib"] if boundary else None,
                "out_of_memory_limit_gib": boundary["memory_limit_gib"] if boundary else None,
            }
        )
    return {"groups": summary}


def plot_series(points: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per group with a completed point: batch, p_core and peak memory (GiB) of its completed
    points in order of batch, and the batches that ran out of memory; {} when none completed."""
    series = {}
    for label, members in _groups(points).items():
        done = sorted(
            (p for p in members if p["status"] == "completed" and p["p_core"] is not None),
            key=lambda p: p["batch_size"],
        )
        if done:
            series[label] = {
                "batch": [p["batch_size"] for p in done],
                "p_core": [p["p_core"] for p in done],
                "mem_used_gib": [p["mem_used_gib"] for p in done],
                "out_of_memory": sorted(
                    p["batch_size"] for p in members if p["status"] == "out_of_memory"
                ),
            }
    return series


def render(sweep: dict[str, Any], runs: list[dict], plot: str | None) -> str:
    """report.md of a sweep: sweep.json's points and summary, the completed points' results."""
    base = sweep["base"]
    axes = "; ".join(f"{k}={','.join(v)}" for k, v in sweep["axes"].items())
    trials = f", at most {sweep['max_trials']} batches a search" if sweep["max_trials"] else ""
    searched = f"; the largest batch searched (--find-batch{trials})" if sweep["find_batch"] else ""
    lines = [
        f"# retinaperf sweep: preset {base['preset']}",
        "",
        f"Axes: {axes or 'none'}{searched}. {len(sweep['points'])} points ran"
        + (", then the sweep was interrupted." if sweep["status"] == "interrupted" else "."),
        "",
        spread.render_runs(runs, "md") if runs else "No point completed: no table.",
        "",
        f"lr rule: {_lr_rule(sweep)}",
        "",
        "## Saturation and memory",
        "",
        tables.format_table([_group_cells(g) for g in sweep["groups"]], GROUP_COLUMNS),
        "",
        f"saturation: the smallest batch whose p_core is within {SATURATION:.0%} of the "
        "group's best. fits: the largest batch that completed. out of memory: the smallest "
        "larger batch that ran out of memory, at the device's memory (and memory_limit_gib, "
        f"where set); {NO_VALUE}: no such point.",
    ]
    unfinished = [p for p in sweep["points"] if p["status"] != "completed"]
    if unfinished:
        lines += ["", "## Points not completed", ""]
        lines += [f"- {p['name']}: {p['status']}: {p['reason']}" for p in unfinished]
    if plot:
        lines += ["", f"![p_core and memory against batch, per group]({plot})"]
    return "\n".join(lines) + "\n"


GROUP_COLUMNS = (
    "group", "best p_core (batch)", "saturation batch", "fits", "out of memory at",
)  # fmt: skip


def _group_cells(group: dict[str, Any]) -> dict[str, str]:
    best = group["best_p_core"]
    at = group["out_of_memory_at"]
    limit = group["out_of_memory_limit_gib"]
    device = group["out_of_memory_device_gib"]
    memory = "device memory unknown" if device is None else f"{device:.1f} GiB device"
    if at is not None and limit:
        memory += f", limit {limit:g} GiB"
    return {
        "group": group["group"],
        "best p_core (batch)": NO_VALUE
        if best is None
        else f"{significant(best)} ({group['best_batch']})",
        "saturation batch": _or_none(group["saturation_batch"]),
        "fits": _or_none(group["largest_fit"]),
        "out of memory at": NO_VALUE if at is None else f"{at} ({memory})",
    }


def _or_none(value: int | None) -> str:
    return NO_VALUE if value is None else str(value)


def _lr_rule(sweep: dict[str, Any]) -> str:
    base = sweep["base"]
    global_batch = base["batch_size"] * base["world_size"]
    if sweep["lr_rule"] == "none":
        return f"none: every point keeps lr={base['lr']:g}, as fix_hp shows"
    return (
        f"linear: lr = {base['lr']:g} x global batch / {global_batch} (the configuration's lr at "
        f"its global batch, {base['batch_size']} x {base['world_size']} processes), as fix_hp "
        "shows"
    )
