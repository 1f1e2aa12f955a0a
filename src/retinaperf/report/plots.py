"""Plots of a run, drawn from the event log and the monitor's samples; and a sweep's plot of
p_core and memory against the batch (`sweep_figure`).

Every plotted number is a field of an event or a monitor sample, as written there: nothing is
recomputed or smoothed here, so a plot can always be checked against `events.jsonl`. Figures are
built on matplotlib's Agg canvas directly, never through pyplot, so a training process can call
this without a display and without touching pyplot's global state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retinaperf.report.events import EVENTS, read_events, read_monitor
from retinaperf.report.tables import PLOTS

SIZE = (8.0, 4.5)
"""Inches of every plot but the device one; fixed so that plots of two runs compare side by side."""
TALL_SIZE = (8.0, 9.0)
"""Inches of the device plot, whose three panels need the height."""
DPI = 100
PNG_METADATA: dict[str, str | None] = {"Software": None}
"""No matplotlib version in the file: the same data gives the same bytes."""

LOSS_FIELDS = ("loss", "classification", "bbox_regression")
AP_FIELDS = ("mAP", "AP50", "AP75")
LINE_STYLES = ("-", "--", ":", "-.")

Record = dict[str, Any]
Series = tuple[list[float], list[float]]


def write_run_plots(run_dir: Path) -> list[Path]:
    """The plots of a run directory, drawn from its event log and monitor samples into its
    plots/ (`write_plots`): as the run writes them, and as `retinaperf report --plots` does."""
    return write_plots(read_events(run_dir / EVENTS), read_monitor(run_dir), run_dir / PLOTS)


def write_plots(
    events: list[dict], monitor_samples: list[dict] | None, out_dir: Path
) -> list[Path]:
    """Write the PNGs whose data exists into `out_dir` and return their paths, in this order:
    loss.png, throughput.png, map.png, then devices.png (samples with devices) or host.png
    (samples without: a CPU machine). Nothing is written, not even `out_dir`, when nothing has data.
    A plot left out for want of data is named in one warning line, with the reason.
    """
    steps = [e for e in events if e.get("event") == "step"]
    evals = [e for e in events if e.get("event") == "eval"]
    samples = monitor_samples or []
    plans: list[tuple[str, Callable[[], Figure]]] = []
    if _has_any(steps, LOSS_FIELDS):
        plans.append(("loss.png", lambda: loss_figure(steps)))
    if _has_any(steps, ("images_per_s",)):
        plans.append(("throughput.png", lambda: throughput_figure(steps)))
    if _has_any(evals, AP_FIELDS):
        plans.append(("map.png", lambda: map_figure(evals)))
    if any(s.get("devices") for s in samples):
        plans.append(("devices.png", lambda: devices_figure(samples)))
    elif _has_any(samples, ("cpu_util", "mem_used_gib")):
        plans.append(("host.png", lambda: host_figure(samples)))
    not_drawn = _not_drawn(events, steps, [name for name, _ in plans])
    if not_drawn:
        warnings.warn(f"plots: not drawn: {not_drawn}", stacklevel=2)
    if not plans:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in plans:
        path = out_dir / name
        build().savefig(path, dpi=DPI, metadata=PNG_METADATA)
        paths.append(path)
    return paths


def _not_drawn(events: list[Record], steps: list[Record], drawn: list[str]) -> str:
    """Which plots `drawn` lacks and why, in one line ("" when none), from the run's settings in
    its run_start event and its step count in run_end, where the log holds them."""
    start = next((e for e in events if e.get("event") == "run_start"), {})
    end = next((e for e in events if e.get("event") == "run_end"), {})
    config = start.get("config") or {}
    parts = []
    step_plots = [name for name in ("loss.png", "throughput.png") if name not in drawn]
    if step_plots:
        why = "no logged step holds their numbers" if steps else "no step was logged"
        log_every, ran = (config.get("train") or {}).get("log_every"), end.get("steps")
        if not steps and log_every is not None and ran is not None:
            why += (
                f" (a step is logged every log_every={log_every} steps, and the run took {ran}: "
                f"set log_every to {max(ran, 1)} or less)"
            )
        parts.append(f"{' and '.join(step_plots)}: {why}")
    if "map.png" not in drawn:
        parts.append("map.png: no evaluation recorded an AP")
    if "devices.png" not in drawn and "host.png" not in drawn:
        off = config.get("monitor_interval") == 0
        why = "monitor_interval=0 turned the monitor off" if off else "no monitor sample"
        parts.append(f"devices.png/host.png: {why}")
    return "; ".join(parts)


def loss_figure(steps: list[Record]) -> Figure:
    """The logged losses over optimizer steps, with the learning rate on a second axis.

    Axes: fig.axes[0] holds one line per field of LOSS_FIELDS present, fig.axes[1] the lr. The lr
    axis is logarithmic when lr spans more than 10x (warm-up from a small factor, step drops),
    where a linear axis would flatten everything but the largest value.
    """
    fig, ax = _figure("Training loss")
    for field in LOSS_FIELDS:
        _line(ax, _points(steps, "step", field), label=field)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (global batch)")
    lr_ax = ax.twinx()
    steps_x, lrs = _points(steps, "step", "lr")
    if lrs:
        lr_ax.plot(steps_x, lrs, color="0.4", linestyle="--", label="lr")
        if min(lrs) > 0 and max(lrs) > 10 * min(lrs):
            lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_lines() + lr_ax.get_lines()
    # Outside both axes, right of the lr axis's labels: inside, "best" placement sees only the
    # loss lines and covered the lr curve.
    fig.legend(handles, [str(h.get_label()) for h in handles], loc="outside right upper")
    return fig


def throughput_figure(steps: list[Record]) -> Figure:
    """Global images/s of each log interval, as the step events logged it."""
    fig, ax = _figure("Training throughput")
    _line(ax, _points(steps, "step", "images_per_s"), label="images_per_s", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("images/s (global, per log interval)")
    ax.set_ylim(bottom=0)
    return fig


def map_figure(evals: list[Record]) -> Figure:
    """COCO bbox AP of each evaluation; markers, because evaluations are few and far apart."""
    fig, ax = _figure("Validation accuracy (COCO bbox)")
    for field in AP_FIELDS:
        _line(ax, _points(evals, "step", field), label=field, marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("AP (fraction)")
    ax.set_ylim(bottom=0)
    # Outside the data area: a throughput-only run's APs lie along the bottom, where an inner
    # corner legend would hide them.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def devices_figure(samples: list[Record]) -> Figure:
    """Utilisation (%), memory used (GiB) and power (W) of every device over time.

    Panels are fig.axes[0..2], lines in the order devices first appear; each device keeps its
    colour and style in every panel, and the utilisation panel adds each host's CPU. Devices are
    named "host:index" so that two nodes' GPU 0 stay apart.
    """
    fig = _new_figure(TALL_SIZE)
    util_ax, mem_ax, power_ax = fig.subplots(3, 1, sharex=True)
    keys = list(dict.fromkeys((s["host"], d["index"]) for s in samples for d in _devices(s)))
    panels = ((util_ax, "util"), (mem_ax, "mem_used_gib"), (power_ax, "power_w"))
    for i, key in enumerate(keys):
        style = {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}
        for ax, field in panels:
            _line(ax, _device_points(samples, key, field), label=f"{key[0]}:{key[1]}", **style)
    for j, host in enumerate(_hosts(samples)):
        style = {"color": "black", "linestyle": LINE_STYLES[j % len(LINE_STYLES)]}
        _line(util_ax, _host_points(samples, host, "cpu_util"), label=f"{host} CPU", **style)
    util_ax.set_title("Device utilisation, memory and power")
    util_ax.set_ylabel("utilisation (%)")
    mem_ax.set_ylabel("memory used (GiB)")
    power_ax.set_ylabel("power (W)")
    power_ax.set_xlabel("time (s)")
    for ax, _ in panels:
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    util_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def host_figure(samples: list[Record]) -> Figure:
    """CPU utilisation (%) and memory used (GiB) of each host over time (fig.axes[0], [1])."""
    fig = _new_figure(SIZE)
    cpu_ax, mem_ax = fig.subplots(2, 1, sharex=True)
    for j, host in enumerate(_hosts(samples)):
        style = {"color": f"C{j % 10}"}
        _line(cpu_ax, _host_points(samples, host, "cpu_util"), label=host, **style)
        _line(mem_ax, _host_points(samples, host, "mem_used_gib"), label=host, **style)
    cpu_ax.set_title("Host CPU and memory")
    cpu_ax.set_ylabel("CPU utilisation (%)")
    mem_ax.set_ylabel("memory used (GiB)")
    mem_ax.set_xlabel("time (s)")
    for ax in (cpu_ax, mem_ax):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    # Outside the data area, as in the device plot: inside it sat on the CPU line.
    cpu_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def sweep_figure(series: dict[str, dict[str, list[float]]]) -> Figure:
    """A sweep's p_core (fig.axes[0]) and peak memory (fig.axes[1]) against the local batch, one
    line per group (`report.sweep_report.plot_series`); a batch that ran out of memory is a
    vertical dotted line in its group's colour on the memory panel. The batch axis is in powers
    of two, as --find-batch doubles it."""
    fig = _new_figure(TALL_SIZE)
    core_ax, mem_ax = fig.subplots(2, 1, sharex=True)
    for i, (label, points) in enumerate(series.items()):
        style = {"color": f"C{i % 10}", "marker": "o"}
        _line(core_ax, (points["batch"], points["p_core"]), label=label, **style)
        _line(mem_ax, (points["batch"], points["mem_used_gib"]), label=label, **style)
        for batch in points["out_of_memory"]:
            mem_ax.axvline(
                batch, color=style["color"], linestyle=":", label=f"{label}: out of memory"
            )
    core_ax.set_title("p_core and peak memory against the batch")
    core_ax.set_ylabel("p_core (images/s)")
    mem_ax.set_ylabel("peak memory (GiB)")
    mem_ax.set_xlabel("local batch")
    mem_ax.set_xscale("log", base=2)
    for ax in (core_ax, mem_ax):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no display, nothing global changed."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure(title: str) -> tuple[Figure, Axes]:
    fig = _new_figure(SIZE)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _line(ax: Axes, series: Series, **kwargs: Any) -> None:
    """Plot a series unless it has no points: a line with no data would only clutter the legend."""
    xs, ys = series
    if ys:
        ax.plot(xs, ys, **kwargs)


def _has_any(records: Iterable[Record], fields: Iterable[str]) -> bool:
    fields = tuple(fields)
    return any(r.get(f) is not None for r in records for f in fields)


def _points(records: Iterable[Record], x: str, y: str) -> Series:
    """(x, y) of the records where both are present; a missing or None reading is skipped,
    not drawn as 0."""
    pairs = [(r.get(x), r.get(y)) for r in records]
    kept = [(a, b) for a, b in pairs if a is not None and b is not None]
    return [a for a, _ in kept], [b for _, b in kept]


def _devices(sample: Record) -> list[Record]:
    return sample.get("devices") or []


def _hosts(samples: Iterable[Record]) -> list[str]:
    """Host names in order of first appearance."""
    return list(dict.fromkeys(s["host"] for s in samples))


def _host_points(samples: Iterable[Record], host: str, field: str) -> Series:
    return _points((s for s in samples if s["host"] == host), "time", field)


def _device_points(samples: Iterable[Record], key: tuple[str, int], field: str) -> Series:
    """One device's readings of `field` over time, with the time of the sample that holds them."""
    readings = [
        {"time": s.get("time"), field: d.get(field)}
        for s in samples
        if s["host"] == key[0]
        for d in _devices(s)
        if d["index"] == key[1]
    ]
    return _points(readings, "time", field)
