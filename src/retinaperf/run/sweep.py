"""`retinaperf sweep`: a grid of one configuration's variants, each point a run of its own, side by
side (issue 25).

Each point is a fresh `retinaperf run` process (through torchrun for several processes), as each
round of `run --repeat` is (run/rounds.py): a point that fails or runs out of memory cannot
leave the next one a fragmented allocator or a broken process group. A point out of memory is
the boundary of the batch, not a crash: its run writes results.json with `failure`
"out_of_memory", read here. The learning rate follows the batch by a rule (`point_lr`). Then
sweep.json, report.md (report/sweep_report.py) and sweep.png sit beside the points' run
directories; `retinaperf report` reads such a folder (`run_dirs`).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaperf import config, files
from retinaperf.errors import UserError
from retinaperf.report import loading, plots, sweep_report, tables
from retinaperf.report.results import RESULTS
from retinaperf.run import batch_search, rounds, signals

SWEEP = "sweep.json"
PLOT = "sweep.png"
NPROC_AXIS = "nproc_per_node"  # an axis of the launch (torchrun's processes), not a key
BATCH = sweep_report.BATCH
STOPS = (signal.SIGINT, signal.SIGTERM)  # what stops a sweep, as it stops a run
# Keys a point cannot vary: each point has its own run directory, and lr follows the batch.
FIXED_KEYS = {"output_dir": "each point gets its own run directory in the sweep's folder"}


@dataclass(frozen=True)
class Axis:
    key: str  # a configuration key by its bare name, or NPROC_AXIS
    values: tuple[str, ...]  # as given: what each point passes to `--set`


@dataclass(frozen=True)
class Base:
    """What the sweep's points start from: the resolved configuration's batch and lr, and the
    processes its lr is for (the preset's shape, else the sweep's --nproc-per-node)."""

    preset: str
    batch_size: int
    lr: float
    world_size: int
    precision: str
    memory_limit_gib: float
    shape_fixed: bool  # the preset names its devices per node: a point of another count says so


@dataclass(frozen=True)
class SweepPlan:
    out_dir: Path
    axes: tuple[Axis, ...]
    find_batch: bool
    lr_rule: str
    base: Base
    nproc_per_node: int | None  # the sweep's --nproc-per-node (None: one process, no torchrun)
    # `retinaperf run` for N processes (None: one) with the point's `--set` pairs
    command: Callable[[int | None, list[str]], list[str]]
    start_variable: str  # the environment variable that hands a point its start time
    max_trials: int = 0  # --find-batch's batches tried per search at most (0: no limit)


def parse_axes(texts: list[str]) -> tuple[Axis, ...]:
    """`--vary KEY=V1,V2,...` options as axes, every key and value checked as `--set` checks
    them (UserError naming the option otherwise)."""
    axes: list[Axis] = []
    for text in texts:
        key, sep, joined = text.partition("=")
        key = key.strip()
        values = tuple(value.strip() for value in joined.split(","))
        if not sep or "" in values:
            raise UserError(f"--vary {text!r}: write KEY=V1,V2,..., e.g. --vary batch_size=8,16")
        if key == NPROC_AXIS:
            bad = [v for v in values if not v.isdigit() or int(v) < 1]
            if bad:
                raise UserError(f"--vary {key}={bad[0]}: give a number of processes, 1 or more")
        else:
            for value in values:
                config.parse_overrides([f"{key}={value}"], "--vary")
            key = key.rpartition(".")[2]
            if config.is_list_key(key) or key in FIXED_KEYS:
                why = FIXED_KEYS.get(key, "its value is a list, whose commas --vary would split")
                raise UserError(f"--vary {key}: cannot be varied: {why}; set it with --set")
        if key in [axis.key for axis in axes]:
            raise UserError(f"--vary {key}: given twice; give all its values in one --vary")
        if len(set(values)) < len(values):
            raise UserError(f"--vary {text!r}: a value given twice; give each once")
        axes.append(Axis(key, values))
    return tuple(axes)


def check_plan(axes: tuple[Axis, ...], find_batch: bool, lr_rule: str, max_trials: int = 0) -> None:
    """What cannot go together: the batch searched and varied, lr varied and scaled, a limit on
    a search's trials without a search."""
    keys = [axis.key for axis in axes]
    if max_trials < 0:
        raise UserError(f"--max-trials {max_trials}: give 0 (no limit) or a number of batches")
    if max_trials and not find_batch:
        raise UserError("--max-trials: it limits --find-batch's search; add --find-batch")
    if find_batch and BATCH in keys:
        raise UserError("--find-batch: drop --vary batch_size: the search chooses the batches")
    if not find_batch and not axes:
        raise UserError("sweep: give --vary KEY=V1,V2,... (repeatable), --find-batch, or both")
    if lr_rule == "linear" and "lr" in keys:
        raise UserError("--vary lr: lr follows the batch by --lr-rule linear; add --lr-rule none")


def axis_overrides(axes: tuple[Axis, ...]) -> list[dict[str, Any]]:
    """Each value of each configuration axis as the override it makes, for checking each value
    with the rest of the configuration before any point runs."""
    return [
        config.parse_overrides([f"{axis.key}={value}"], "--vary")
        for axis in axes
        if axis.key != NPROC_AXIS
        for value in axis.values
    ]


def bare_key(pair: str) -> str:
    """The bare key of a `--set` pair: `train.batch_size=4` -> `batch_size`."""
    return pair.partition("=")[0].strip().rpartition(".")[2]


def replace_pairs(pairs: list[str], point_pairs: list[str]) -> list[str]:
    """The sweep's `--set` pairs with those of keys a point sets dropped, then the point's."""
    replaced = {bare_key(p) for p in point_pairs}
    return [*(p for p in pairs if bare_key(p) not in replaced), *point_pairs]


def base_of(resolved: config.RunConfig, nproc_per_node: int | None) -> Base:
    """The sweep's base: the resolved configuration's batch and lr, for the processes of the
    preset's shape (nodes x devices per node), else of --nproc-per-node, else one."""
    shape = resolved.nodes * resolved.devices_per_node
    return Base(
        preset=resolved.preset,
        batch_size=resolved.train.batch_size,
        lr=resolved.train.lr,
        world_size=shape or nproc_per_node or 1,
        precision=resolved.train.precision,
        memory_limit_gib=resolved.memory_limit_gib,
        shape_fixed=resolved.devices_per_node != 0,
    )


def point_lr(base: Base, batch_size: int, world_size: int, rule: str) -> float:
    """The linear scaling rule (Goyal et al., 2017): lr in proportion to the global batch, from
    the base's lr at its global batch; `none` keeps the base's lr."""
    if rule == "none":
        return base.lr
    return base.lr * (batch_size * world_size) / (base.batch_size * base.world_size)


def run_sweep(plan: SweepPlan) -> int:
    """Run the plan's points into `plan.out_dir` (a new or empty folder, locked while the sweep
    runs), then write sweep.json, report.md and sweep.png. Returns 0, 1 where a point failed
    (the others still ran), or 128 + the signal that stopped the sweep (what finished is
    written)."""
    lock = files.claim_folder(
        plan.out_dir,
        "output",
        "wait for it to end, or choose another --output-dir",
        lambda: files.require_empty(plan.out_dir, "output", "choose a new --output-dir"),
    )
    records: list[dict[str, Any]] = []
    stopped_by: int | None = None
    # SIGINT and SIGTERM are recorded for the whole sweep (and passed on to the point running,
    # signals.run_child): one that comes between two points, or while a point's outcome is
    # read, stops the sweep before the next point, losing nothing.
    received: list[int] = []
    previous = {sig: signal.signal(sig, _recorder(received)) for sig in STOPS}
    try:
        stopped_by = _run_points(plan, records, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            write_outputs(plan, records, stopped_by)
        finally:
            lock.release()
    if stopped_by is not None:
        print(f"retinaperf: sweep stopped by {signal.Signals(stopped_by).name}", flush=True)
        return 128 + stopped_by
    return 1 if any(r["status"] == "failed" for r in records) else 0


def _recorder(received: list[int]) -> Callable[[int, Any], None]:
    def record(signum: int, _frame: Any) -> None:
        received.append(signum)

    return record


def _run_points(plan: SweepPlan, records: list[dict[str, Any]], received: list[int]) -> int | None:
    """Every point of the grid (each searched for its batch with find_batch), appended to
    `records` as it ends, until a signal is `received`; the signal that stopped the sweep, or
    None."""
    combinations = list(itertools.product(*(axis.values for axis in plan.axes)))

    def attempt(values: dict[str, str], left: str) -> dict[str, Any]:
        number = len(records) + 1
        record = _run_point(plan, values, f"point {number} ({left})", received)
        records.append(record)
        return record

    for k, combination in enumerate(combinations):
        if received:
            return received[0]
        values = dict(zip([axis.key for axis in plan.axes], combination, strict=True))
        if not plan.find_batch:
            left = f"{len(combinations) - k - 1} left after it"
            if attempt(values, left)["status"] == "interrupted" or received:
                return received[0] if received else signal.SIGINT
            continue
        searches_left = len(combinations) - k - 1

        def fits(
            batch: int, values: dict = values, left: int = searches_left
        ) -> batch_search.Outcome:
            if received:  # between two points of the search
                return "stop"
            record = attempt({**values, BATCH: str(batch)}, f"searching; {left} searches after it")
            return _search_outcome(record, received)

        result = batch_search.search(plan.base.batch_size, fits, plan.max_trials)
        if received or (records and records[-1]["status"] == "interrupted"):
            return received[0] if received else signal.SIGINT
        print(_search_line(values, result), flush=True)
    return None


def _search_outcome(record: dict[str, Any], received: list[int]) -> batch_search.Outcome:
    if received or record["status"] in ("failed", "interrupted"):
        return "stop"
    return "fits" if record["status"] == "completed" else "out_of_memory"


def _search_line(values: dict[str, str], result: batch_search.SearchResult) -> str:
    where = ", ".join(f"{k}={v}" for k, v in values.items()) or "the configuration"
    if result.stopped_at is not None:
        return f"retinaperf: {where}: search stopped at batch {result.stopped_at} (failed)"
    untried = f" (--max-trials {len(result.tried)} reached)" if result.out_of_trials else ""
    return (
        f"retinaperf: {where}: largest batch that fits {result.largest_fit}, out of memory at "
        f"{result.smallest_out_of_memory}{untried}"
    )


def _run_point(
    plan: SweepPlan, values: dict[str, str], progress: str, received: list[int]
) -> dict[str, Any]:
    """One point: its `retinaperf run` into its own folder, and what became of it."""
    nproc_text = values.get(NPROC_AXIS)
    nproc = int(nproc_text) if nproc_text is not None else plan.nproc_per_node
    world = nproc or 1
    batch = int(values.get(BATCH, plan.base.batch_size))
    lr = point_lr(plan.base, batch, world, plan.lr_rule)
    pairs = [f"{key}={value}" for key, value in values.items() if key != NPROC_AXIS]
    if plan.lr_rule != "none":
        pairs.append(f"lr={lr!r}")
    if nproc_text is not None and plan.base.shape_fixed:
        pairs.append(f"devices_per_node={world}")  # the point's shape, not the preset's
    name = "_".join(f"{key}-{value}" for key, value in values.items()) or "point"
    folder = plan.out_dir / name
    print(f"retinaperf: {progress}: {name} -> {folder}", flush=True)
    environment = {**os.environ, plan.start_variable: repr(time.time())}
    command = plan.command(nproc, [*pairs, f"output_dir={folder}"])
    code = signals.run_child(command, environment, received=received)
    record = {
        "name": name,
        "run_dir": str(folder),
        "values": values,
        "batch_size": batch,
        "nproc_per_node": world,
        "lr": lr,
        "memory_limit_gib": float(values.get("memory_limit_gib", plan.base.memory_limit_gib)),
        "exit_status": code,
        **_outcome(folder, code, values.get("precision", plan.base.precision)),
    }
    print(f"retinaperf: {name}: {record['status']}", flush=True)
    return record


def _outcome(folder: Path, code: int, precision: str) -> dict[str, Any]:
    """What became of a point, from its results.json where it wrote one: completed,
    out_of_memory, failed or interrupted, with the figures the sweep's report reads."""
    if not (folder / RESULTS).exists():
        interrupted = code in (128 + signal.SIGINT, 128 + signal.SIGTERM)
        return {
            "status": "interrupted" if interrupted else "failed",
            "reason": f"exit status {code} before its run wrote results (its output says why)",
            "precision": precision,
            "p_core": None,
            "mem_used_gib": None,
            "mem_total_gib": None,
        }
    results = loading.load_results(folder, completed_only=False)
    status = results["status"]
    if status == "failed" and results["failure"] == "out_of_memory":
        status = "out_of_memory"
    m = results["metrics"]
    return {
        "status": status,
        "reason": results["reason"],
        "precision": m["precision"],
        "p_core": m["p_core"] if status == "completed" else None,
        "mem_used_gib": m["mem_used_gib"],
        "mem_total_gib": m["mem_total_gib"],
    }


def write_outputs(plan: SweepPlan, records: list[dict[str, Any]], stopped_by: int | None) -> dict:
    """sweep.json, report.md and sweep.png of the points in `records` (those that ran)."""
    sweep = {
        "status": "interrupted" if stopped_by is not None else "completed",
        "axes": {axis.key: list(axis.values) for axis in plan.axes},
        "find_batch": plan.find_batch,
        "max_trials": plan.max_trials,
        "lr_rule": plan.lr_rule,
        "base": {
            "preset": plan.base.preset,
            "batch_size": plan.base.batch_size,
            "lr": plan.base.lr,
            "world_size": plan.base.world_size,
        },
        "points": records,
        **sweep_report.summarize(records),
    }
    files.write_json_atomic(plan.out_dir / SWEEP, sweep)
    runs = [{**loading.load_results(d), "run_dir": str(d)} for d in _completed(plan.out_dir, sweep)]
    series = sweep_report.plot_series(records)
    if series:
        figure = plots.sweep_figure(series)
        figure.savefig(plan.out_dir / PLOT, dpi=plots.DPI, metadata=plots.PNG_METADATA)
    text = sweep_report.render(sweep, runs, PLOT if (plan.out_dir / PLOT).exists() else None)
    files.write_text_atomic(plan.out_dir / tables.REPORT, text)
    print(text, flush=True)
    print(f"sweep: {plan.out_dir / SWEEP}")
    return sweep


def _completed(folder: Path, sweep: dict) -> list[Path]:
    """The run directories of the sweep's completed points, where they are now (in `folder`)."""
    return [Path(folder) / p["name"] for p in sweep["points"] if p["status"] == "completed"]


def is_sweep(path: Path) -> bool:
    return (Path(path) / SWEEP).exists()


def run_dirs(path: Path) -> list[Path]:
    """The run directories a folder given to `retinaperf report` stands for: a sweep's completed
    points, or what `rounds.run_dirs` finds (a run, a `--repeat` folder's rounds)."""
    if not is_sweep(path):
        return rounds.run_dirs(path)
    return _completed(path, files.read_json(Path(path) / SWEEP, "report"))


def report_text(path: Path, runs: list[dict]) -> str:
    """A sweep folder's report, as its report.md holds it, from sweep.json and `runs`, the
    results of its completed points (`run_dirs`) as loaded."""
    sweep = files.read_json(Path(path) / SWEEP, "report")
    plot = PLOT if (Path(path) / PLOT).exists() else None
    return sweep_report.render(sweep, runs, plot)
