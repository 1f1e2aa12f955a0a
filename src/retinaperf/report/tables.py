"""What a run leaves behind: the event log, results.json and the report in the seed's table.

The event log (JSON lines) and results.json are the sources of truth; the table is formatted from
results.json and never recomputes a number its own way. Every function here reads results in the
current schema's shape (`report.results`), which `load_results` gives for a file of any version.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from importlib import resources
from pathlib import Path
from typing import Any

from retinaperf import invocation
from retinaperf.errors import UserError
from retinaperf.files import read_json
from retinaperf.report.results import RESULTS, check
from retinaperf.report.upgrade import upgrade
from retinaperf.units import NO_VALUE

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


def significant(value: float, digits: int = 3) -> str:
    """138, 22.3, 0.412: three significant figures like the seed's table; integers stay whole."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    return f"{value:.{decimals}f}"


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


THROUGHPUT_ONLY_NOTE = (
    f"mAP {NO_VALUE}: a throughput-only run (generated COCO-like data or random weights) "
    "measures speed and memory; its accuracy means nothing."
)
COMPARISON_COLUMNS = (*COLUMNS, "scaling", "vs A100 ref")


_STATUS_WORDS = {"interrupted": "was interrupted"}


def load_results(run_dir: Path, completed_only: bool = True) -> dict:
    """A run's results.json in the current schema's shape, whichever version wrote it (see
    `report.results`); by default only a completed run's, since the numbers of a run that
    stopped early do not stand beside others."""
    path = Path(run_dir) / RESULTS
    results = read_json(
        path, "report", if_missing="give finished runs' directories or a `run --repeat` folder"
    )
    if not isinstance(results, dict):
        raise UserError(f"report: {path} is not a JSON object: it is not a retinaperf results file")
    try:
        results = check(upgrade(results))
    except UserError as err:
        raise UserError(f"report: {path}: {err}") from None
    status = results["status"]
    if completed_only and status != "completed":
        raise UserError(
            f"report: {run_dir} is a run that {_STATUS_WORDS.get(status, status)} "
            f"({results['reason']}): resume it "
            f"with `{invocation.command('run', '--resume', run_dir)}`, or leave it out"
        )
    return results


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


def table_notes(rows: list[dict]) -> list[str]:
    """What every table says under it about its columns and marks (rows as `row_values`)."""
    return [ADDED_COLUMNS_NOTE] + ([PROFILED_NOTE] if any(row["profiled"] for row in rows) else [])


def render_report(results: dict) -> str:
    """The markdown report of one run: the seed's table and what it stands on."""
    m = results["metrics"]
    lines = [
        f"# retinaperf run: preset {results['config']['preset']}",
        "",
        format_table([table_row(results)]),
        "",
        *table_notes([row_values(results)]),
        "",
        _accuracy_line(m),
        _precision_line(m),
        _implementation_line(m),
        f"- images trained: {m['trained_images']} in {m['steps']} steps over {m['epochs']} "
        f"epoch(s); world size {m['world_size']} ({m['nodes']} node(s) x "
        f"{m['devices_per_node']}), global batch {m['global_batch']}",
        f"- times (s): e2e {m['e2e_time']:.1f}, init {m['init_time']:.1f}, train "
        f"{m['train_time']:.1f}, of which evaluation {m['eval_time']:.1f}; core "
        f"{m['core_time']:.1f}",
        _steady_line(m),
        *_resilience_lines(results),
        *_profile_lines(results["config"]),
        f"- mem: {m['mem']} GiB ({m['mem_source']}); this process's view {m['mem_process']} "
        f"({m['mem_process_source']})",
        _utilization_line(m),
        *_energy_lines(results),
        *_monitor_lines(results["monitor"]),
        _device_line(results["environment"]),
        f"- dataset: {m['train_images']} training images after filtering, {m['val_images']} "
        f"validation images ({m['dataset']})",
        "",
        "Metric definitions: docs/metrics.md in the retinaperf repository.",
    ]
    return "\n".join(lines) + "\n"


def _accuracy_line(m: dict) -> str:
    if m["throughput_only"]:
        return f"- {THROUGHPUT_ONLY_NOTE} Backbone: {m['backbone_init']}."
    target = "reached" if m["converged"] else "not reached"
    return (
        f"- mAP (COCO bbox AP@[.5:.95]) at the last evaluation: {m['mAP']:.4f}; best "
        f"{m['best_mAP']:.4f} (epoch {m['best_epoch']}, step {m['best_step']}); target "
        f"{m['target_mAP']} {target}"
        + (f" after {m['time_to_target']:.0f} s of training" if m["converged"] else "")
    )


def _precision_line(m: dict) -> str:
    """The precision and the float32 math in force: what `fp32` meant on this device."""
    math = m["math"]
    flags = (
        f"cuDNN conv fp32_precision={math['conv_fp32_precision']}, cuBLAS matmul "
        f"fp32_precision={math['matmul_fp32_precision']}, cudnn.benchmark="
        f"{math['cudnn_benchmark']}, deterministic algorithms {math['deterministic_algorithms']}"
    )
    return (
        f"- precision {m['precision']} ({m['precision_reason']}): float32 convolutions in "
        f"{math['effective_conv'].upper()}, float32 matmuls in {math['effective_matmul'].upper()} "
        f"({flags})"
    )


def _implementation_line(m: dict) -> str:
    """How the step was computed (the workload is the same either way)."""
    impl = m["implementation"]
    ddp = impl["ddp"]
    wrapped = (
        "one rank, no DDP"
        if ddp is None
        else f"DDP broadcast_buffers={ddp['broadcast_buffers']}, "
        f"gradient_as_bucket_view={ddp['gradient_as_bucket_view']}"
    )
    compiled = f"on ({impl['compile_mode']})" if impl["compile_mode"] else "off"
    return (
        f"- step: transform {impl['transform']}, constants "
        f"{'reused' if impl['reuse_constants'] else 'recomputed'}, loss {impl['loss']}, "
        f"post-processing {impl['postprocess']}, channels-last "
        f"{'on' if impl['channels_last'] else 'off'}, torch.compile "
        f"{compiled if impl['compile'] else 'off'}, {impl['optimizer']}, {wrapped}"
    )


def _resilience_lines(results: dict) -> list[str]:
    """Checkpoints, segments and skipped updates."""
    m = results["metrics"]
    skipped = NO_VALUE if m["skipped_steps"] is None else m["skipped_steps"]  # None: not counted
    line = (
        f"- checkpoints: training waited {m['checkpoint_time']:.1f} s for them (within "
        f"train_time); deleted as the run completed; updates skipped by loss scaling: {skipped}"
    )
    if m["checkpoint_failures"]:
        line += f"; {m['checkpoint_failures']} checkpoint(s) could not be written"
    lines = [line]
    if m["segments"] > 1:
        ended = ", ".join(
            f"{seg['ended']} at step {seg['end_step']}" for seg in results["segments"][:-1]
        )
        lines.append(
            f"- run in {m['segments']} segments ({ended}); {m['time_between_segments']:.0f} s "
            "between them, counted in no time above"
        )
    return lines


def _steady_line(m: dict) -> str:
    if m["p_core_steady"] is None:
        return (
            f"- p_core_steady: {NO_VALUE} (no step after the first "
            f"{m['timing_warmup_steps']}, which it leaves out)"
        )
    return (
        f"- p_core_steady {significant(m['p_core_steady'])} images/s: p_core without the first "
        f"{m['timing_warmup_steps']} steps (p_core {significant(m['p_core'])} counts them all)"
    )


def _profile_lines(config: dict) -> list[str]:
    window = config["train"]["profile_steps"]
    if not window:
        return []
    return [
        f"- steps {window} ran under torch.profiler (trace and top operators in profile/): the "
        "throughputs above include its overhead and are not benchmark numbers"
    ]


def _utilization_line(m: dict) -> str:
    line = (
        f"- compute: {m['flops_per_image'] / 1e9:.1f} GFLOP per training image; "
        f"{m['achieved_tflops']:.3g} TFLOP/s at p_core"
    )
    if m["mfu"] is None:
        return line + f"; no MFU: {m['peak_note']}"
    share = f"{100 * m['mfu']:.1f}%"
    return line + (
        f", {share} of the {m['peak_math']} peak {m['peak_tflops']:.4g} TFLOP/s (MFU; peak "
        f"from the {m['peak_source']})"
    )


def _energy_lines(results: dict) -> list[str]:
    """The devices' energy (and the host CPUs' beside GPUs), each figure with its source."""
    m = results["metrics"]
    if m["energy_train_j"] is None:
        return [f"- energy: no figure: {m['energy_note']}"]
    line = (
        f"- energy ({m['energy_source']}): training {m['energy_train_j'] / 1e3:.3g} kJ, "
        f"{m['power_train_w']:.0f} W per device on average; "
        + (
            f"evaluation {m['energy_eval_j'] / 1e3:.3g} kJ; "
            if m["energy_eval_j"] is not None
            else ""
        )
        + f"{significant(m['images_per_joule'])} images/J"
    )
    if any(not device["complete"] for device in results["energy"]["devices"]):
        line += " (a lower bound: a counter reset or missed a reading)"
    lines = [line]
    for host in results["energy"]["hosts"]:
        if host["train_j"] is not None:
            lines.append(
                f"- host {host['host']} CPU packages ({host['source']}): training "
                f"{host['train_j'] / 1e3:.3g} kJ"
            )
    return lines


def _monitor_lines(summary: dict | None) -> list[str]:
    if not summary:
        return ["- monitor: off"]
    lines = []
    for host, h in summary["host"].items():
        cpu = NO_VALUE if h["cpu_util_mean"] is None else f"{h['cpu_util_mean']:.0f}%"
        lines.append(
            f"- host {host}: CPU {cpu} mean, RAM peak {h['mem_used_peak_gib']:.1f}/"
            f"{h['mem_total_gib']:.1f} GiB ({summary['samples']} samples)"
        )
    for d in summary["devices"]:
        lines.append(
            f"- {d['host']}:{d['index']} {d['name']}: utilisation {_maybe(d['util_mean'], '%')} "
            f"mean, memory peak {_maybe(d['mem_used_peak_gib'])}/{_maybe(d['mem_total_gib'])} "
            f"GiB, power {_maybe(d['power_mean_w'], ' W')} mean / "
            f"{_maybe(d['power_peak_w'], ' W')} peak"
        )
    return lines


def _device_line(environment: dict) -> str:
    """Which plug-in read the device, and where its readings came from or why there are none."""
    readings = environment["device_readings"]
    where = f"from {readings}" if readings else f"none: {environment['device_readings_note']}"
    return f"- device readings ({environment['device_plugin']} plug-in): {where}"


def _maybe(value: float | None, unit: str = "") -> str:
    return NO_VALUE if value is None else f"{value:.1f}{unit}"
