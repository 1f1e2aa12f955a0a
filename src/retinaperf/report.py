"""What a run leaves behind: the event log, results.json and the report in the seed's table.

The event log (JSON lines) and results.json are the sources of truth; the table is formatted from
results.json and never recomputes a number its own way.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any

RESULTS = "results.json"
EVENTS = "events.jsonl"
REPORT = "report.md"
COLUMNS = ("配置", "precision", "fix_hp", "e2e_time", "p_whole", "p_train", "p_core", "mAP", "mem")


class EventLog:
    """Append-only JSON lines, one object per event, flushed as written (a crash keeps the log).

    Only the main rank writes; on other ranks `path` is None and `emit` does nothing.
    """

    def __init__(self, path: Path | None, command_start: float) -> None:
        self.command_start = command_start
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": event, "time": round(time.perf_counter() - self.command_start, 6)}
        record.update(fields)
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _significant(value: float, digits: int = 3) -> str:
    """138, 22.3, 0.412: three significant figures like the seed's table; integers stay whole."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    return f"{value:.{decimals}f}"


def table_row(results: dict) -> dict[str, str]:
    """One row of the seed's table from a results.json object."""
    m = results["metrics"]
    return {
        "配置": f"{m['device_name']} {m['nodes']}x{m['devices_per_node']}",
        "precision": m["precision"],
        "fix_hp": f"bs={m['local_batch']},lr={m['lr']:g}",
        "e2e_time": f"{m['e2e_time']:.0f}",
        "p_whole": _significant(m["p_whole"]),
        "p_train": _significant(m["p_train"]),
        "p_core": _significant(m["p_core"]),
        "mAP": f"{m['mAP']:.4f}",
        "mem": m["mem"],
    }


def format_table(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table with the given columns."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_report(results: dict) -> str:
    """The markdown report of one run: the seed's table and what it stands on."""
    m = results["metrics"]
    target = "reached" if m["converged"] else "not reached"
    lines = [
        f"# retinaperf run: preset {results['config']['preset']}",
        "",
        format_table([table_row(results)]),
        "",
        f"- mAP (COCO bbox AP@[.5:.95]) at the last evaluation: {m['mAP']:.4f}; best "
        f"{m['best_mAP']:.4f} (epoch {m['best_epoch']}, step {m['best_step']}); target "
        f"{m['target_mAP']} {target}"
        + (f" after {m['time_to_target']:.0f} s of training" if m["converged"] else ""),
        f"- images trained: {m['trained_images']} in {m['steps']} steps over {m['epochs']} "
        f"epoch(s); world size {m['world_size']} ({m['nodes']} node(s) x "
        f"{m['devices_per_node']}), global batch {m['global_batch']}",
        f"- times (s): e2e {m['e2e_time']:.1f}, init {m['init_time']:.1f}, train "
        f"{m['train_time']:.1f}, of which evaluation {m['eval_time']:.1f}; core "
        f"{m['core_time']:.1f}",
        f"- mem: {m['mem']} GiB ({m['mem_source']})",
        f"- dataset: {m['train_images']} training images after filtering, {m['val_images']} "
        f"validation images ({m['dataset']})",
        "",
        "Metric definitions: docs/metrics.md in the retinaperf repository.",
    ]
    return "\n".join(lines) + "\n"
