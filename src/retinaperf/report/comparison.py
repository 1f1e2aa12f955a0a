"""Runs side by side (`retinaperf report`): each run's row of the seed's table, with scaling
efficiency against the runs of one device given beside it and the ratio to the seed's A100 row,
in markdown, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import statistics
from importlib import resources
from pathlib import Path

from retinaperf.report.details import THROUGHPUT_ONLY_NOTE
from retinaperf.report.tables import (
    COLUMNS,
    THROUGHPUTS,
    format_cells,
    format_table,
    row_values,
    table_notes,
)
from retinaperf.units import NO_VALUE

COMPARISON_COLUMNS = (*COLUMNS, "scaling", "vs A100 ref")


def seed_reference() -> dict:
    """The seed's A100 table (FlagPerf's RetinaNet case), shipped with the package."""
    text = (resources.files("retinaperf") / "reference" / "flagperf_a100.json").read_text("utf-8")
    return json.loads(text)


def compare(runs: list[dict]) -> list[dict]:
    """One row per run (`row_values`, named by `run_labels`), plus scaling efficiency and the
    ratio to the seed's A100 row of the same topology.

    Scaling efficiency of a run of W > 1 ranks: p / (W x p of the one-device run), for each
    throughput p, against the runs among `runs` with world size 1 on the same device, precision,
    local batch and image sizes (the mean of their p where there are several); None for a
    one-device run (its ratio to another run of one device is noise, not scaling) and where
    there is no such run. The reference ratio is given only for runs of the seed's workload
    shape: COCO2017, or generated data of COCO's statistics (`--synthetic`), at 800/1333 px; the
    smoke preset's shapes are another workload.
    """
    reference = seed_reference()["rows"]
    rows = []
    for results, label in zip(runs, run_labels([r["run_dir"] for r in runs]), strict=True):
        m = results["metrics"]
        topology = f"{m['nodes']}x{m['devices_per_node']}"
        singles = [
            other["metrics"]
            for other in runs
            if other["metrics"]["world_size"] == 1 and _workload(other) == _workload(results)
        ]
        scaled = m["world_size"] > 1 and bool(singles)
        ref_row = reference.get(topology, {}) if _is_seed_shape(results["config"]) else {}
        row = row_values(results, label)
        for p in THROUGHPUTS:
            single = statistics.fmean(s[p] for s in singles) if scaled else None
            row[f"scaling_{p[2:]}"] = m[p] / (m["world_size"] * single) if single else None
        for p in THROUGHPUTS:
            row[f"ref_{p[2:]}"] = m[p] / ref_row[p] if ref_row.get(p) else None
        rows.append(row)
    return rows


def run_labels(run_dirs: list[str]) -> list[str]:
    """Each run directory's name, with as many of its parent folders as it takes to tell the
    runs apart (`rep-a/round-1` beside `rep-b/round-1`)."""
    parts = [Path(run_dir).parts for run_dir in run_dirs]
    for depth in range(1, max(map(len, parts), default=0) + 1):
        named = ["/".join(p[-depth:]) for p in parts]
        if len(set(named)) == len(named):
            return named
    return [str(run_dir) for run_dir in run_dirs]  # the same directory given twice


def _workload(results: dict) -> tuple:
    """What a run's one-device counterpart must share with it for scaling to mean anything."""
    m, model = results["metrics"], results["config"]["model"]
    sizes = (model["min_size"], model["max_size"])
    return (m["device_name"], m["precision"], m["local_batch"], *sizes)


def _is_seed_shape(config: dict) -> bool:
    """Whether a run's speed can stand beside the seed's: COCO2017 or COCO-like generated data,
    at the recipe's sizes (not the smoke shapes, nor another resize)."""
    data, model = config["data"], config["model"]
    coco_like = bool(data["data_dir"]) or data["synth_profile"] == "coco"
    return coco_like and (model["min_size"], model["max_size"]) == (800, 1333)


def render_comparison(rows: list[dict], fmt: str) -> str:
    """`retinaperf report`'s table of `compare`'s rows: markdown (FlagPerf's headers, numbers
    formatted, notes under it), or CSV or JSON (ASCII keys, numbers; a missing one empty or
    null)."""
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    text_rows = []
    for row in rows:
        cells = format_cells(row)
        scaling = row["scaling_train"]
        cells["scaling"] = f"{100 * scaling:.1f}%" if scaling is not None else NO_VALUE
        ratios = [row[f"ref_{p.removeprefix('p_')}"] for p in THROUGHPUTS]
        cells["vs A100 ref"] = (
            "/".join(NO_VALUE if r is None else f"{r:.2f}" for r in ratios)
            if any(r is not None for r in ratios)
            else NO_VALUE
        )
        text_rows.append(cells)
    notes = [
        "scaling: for a run of several devices, p_train / (devices x p_train of the one-device "
        "run given beside it on the same device, precision, batch and image size; their mean "
        f"where there are several); {NO_VALUE} for a run of one device, or without such a run.",
        "vs A100 ref: p_whole/p_train/p_core over FlagPerf's A100 row of the same topology "
        "(PyTorch 1.8: its fp32 computed convolutions in TF32), for runs on COCO2017 or COCO-like "
        "generated data at 800/1333 px.",
    ]
    if any(row["mAP"] is None for row in rows):
        notes.append(THROUGHPUT_ONLY_NOTE)
    notes += table_notes(rows)
    return format_table(text_rows, COMPARISON_COLUMNS) + "\n\n" + "\n".join(notes)
