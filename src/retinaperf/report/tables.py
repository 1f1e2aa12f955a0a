"""The seed's table: one run's row of FlagPerf's RetinaNet table (its headers, its way of writing
each figure, the notes under it), and report.md, that table with what it stands on (`details`).

The table is formatted from results.json and never recomputes a number its own way. Every
function here reads results in the current schema's shape (`report.results`), which
`loading.load_results` gives for a file of any version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retinaperf.report import details
from retinaperf.units import NO_VALUE, significant

REPORT = "report.md"
PLOTS = "plots"
# The markdown table keeps the headers of FlagPerf's table (the seed; 配置: the device and the
# topology), with the run's name in front; CSV and JSON have ASCII keys and numbers instead.
SEED_COLUMNS = (
    "配置", "precision", "fix_hp", "e2e_time", "p_whole", "p_train", "p_core", "mAP", "mem",
)  # fmt: skip
# Columns FlagPerf's table does not have, marked with * and explained under every table.
IMAGES_PER_JOULE = "img/J*"
COLUMNS = ("run", *SEED_COLUMNS, IMAGES_PER_JOULE)
THROUGHPUTS = ("p_whole", "p_train", "p_core")
ADDED_COLUMNS_NOTE = (
    f"*{IMAGES_PER_JOULE[:-1]}: not a column of FlagPerf's table: trained images per joule of "
    f"the devices' training energy (evaluation left out); {NO_VALUE} where no device's energy "
    "was readable."
)
PROFILED_MARK = "†"
PROFILED_NOTE = (
    f"{PROFILED_MARK}: a run with profile_steps set: some of its steps ran under torch.profiler, "
    "so its throughputs include the profiler's overhead and are not benchmark numbers."
)


def row_values(results: dict, run: str | None = None) -> dict[str, Any]:
    """One run's row as CSV and JSON give it: ASCII keys, numbers as numbers. `run` names the
    run (default: its directory's name); mAP is None for a throughput-only run, whose data or
    weights make it meaningless."""
    m, config = results["metrics"], results["config"]
    return {
        "run": Path(results["run_dir"]).name if run is None else run,
        "preset": config["preset"],
        "run_dir": results["run_dir"],
        "profiled": bool(config["train"]["profile_steps"]),
        "config": f"{m['device_name']} {m['nodes']}x{m['devices_per_node']}",
        **{key: m[key] for key in ("precision", "local_batch", "lr", "e2e_time", *THROUGHPUTS)},
        "mAP": None if m["throughput_only"] else m["mAP"],
        "mem_used_gib": m["mem_used_gib"],
        "mem_total_gib": m["mem_total_gib"],
        "img_per_j": m["images_per_joule"],
    }


def table_row(results: dict) -> dict[str, str]:
    """One row of the markdown table from a results.json object."""
    return format_cells(row_values(results))


def format_cells(row: dict[str, Any]) -> dict[str, str]:
    """The markdown cells of a `row_values` row, written as the seed writes them: e2e in whole
    seconds, throughputs to three significant figures, mAP to four decimals, mem used/total."""
    cells = {
        "run": f"{row['run']} ({row['preset']})" + (PROFILED_MARK if row["profiled"] else ""),
        "配置": row["config"],
        "precision": row["precision"],
        "fix_hp": f"bs={row['local_batch']},lr={row['lr']:g}",
        # as `measure.memory` writes results.json's `mem`
        "mem": f"{row['mem_used_gib']:.1f}/{row['mem_total_gib']:.1f}",
    }
    numbers = {column: row[column] for column in ("e2e_time", *THROUGHPUTS, "mAP")}
    for column, value in {**numbers, IMAGES_PER_JOULE: row["img_per_j"]}.items():
        if value is None:
            cells[column] = NO_VALUE
        elif column == "e2e_time":
            cells[column] = f"{value:.0f}"
        elif column == "mAP":
            cells[column] = f"{value:.4f}"
        else:
            cells[column] = significant(value)
    return cells


def format_table(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table with the given columns."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def table_notes(rows: list[dict]) -> list[str]:
    """What every table says under it about its columns and marks (rows as `row_values`)."""
    return [ADDED_COLUMNS_NOTE] + ([PROFILED_NOTE] if any(row["profiled"] for row in rows) else [])


def render_report(results: dict) -> str:
    """The markdown report of one run: the seed's table and what it stands on (`details`)."""
    lines = [
        f"# retinaperf run: preset {results['config']['preset']}",
        "",
        format_table([table_row(results)]),
        "",
        *table_notes([row_values(results)]),
        "",
        *details.lines(results),
        "",
        "Metric definitions: docs/metrics.md in the retinaperf repository.",
    ]
    return "\n".join(lines) + "\n"
