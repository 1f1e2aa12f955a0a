"""Plots: which files are written, that they are real and deterministic images, and that the lines
carry exactly the numbers of the event log and the monitor samples."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from retinaperf.report.plots import (
    DPI,
    SIZE,
    TALL_SIZE,
    devices_figure,
    host_figure,
    loss_figure,
    map_figure,
    throughput_figure,
    write_plots,
)

# Most cases here leave some plot out on purpose; the tests of the warning that says so catch it
# themselves (pytest.warns sees warnings whatever the filters).
pytestmark = pytest.mark.filterwarnings("ignore:plots. not drawn")


def step_events(losses: list[float], lrs: list[float] | None = None) -> list[dict]:
    """One step event per loss, 10 steps apart, as the trainer logs them."""
    lrs = lrs or [0.01] * len(losses)
    return [
        {
            "event": "step",
            "time": 1.0 + i,
            "epoch": 0,
            "step": 10 * (i + 1),
            "loss": loss,
            "classification": 0.7 * loss,
            "bbox_regression": 0.3 * loss,
            "lr": lr,
            "images_per_s": 5.0 + i % 3,
        }
        for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True))
    ]


def eval_events() -> list[dict]:
    return [
        {"event": "eval", "time": 20.0, "epoch": 0, "step": 30, "mAP": 0.1, "AP": 0.1,
         "AP50": 0.25, "AP75": 0.08, "detections": 100, "seconds": 2.0},
        {"event": "eval", "time": 40.0, "epoch": 1, "step": 60, "mAP": 0.2, "AP": 0.2,
         "AP50": 0.4, "AP75": 0.15, "detections": 120, "seconds": 2.1},
    ]  # fmt: skip


def run_events() -> list[dict]:
    """A whole log: the events that are not plotted surround the ones that are."""
    return [
        {"event": "run_start", "time": 0.5, "world_size": 1},
        *step_events([2.0, 1.5, 1.2, 1.0, 0.9, 0.8]),
        *eval_events(),
        {"event": "run_end", "time": 41.0, "mAP": 0.2},
    ]


def device(index: int, util: float | None, power: float | None = 300.0) -> dict:
    return {
        "index": index,
        "uuid": f"GPU-{index}",
        "name": "NVIDIA A100",
        "util": util,
        "mem_used_gib": 10.0 + index,
        "mem_total_gib": 40.0,
        "power_w": power,
        "temp_c": 60.0,
        "sm_clock_mhz": 1410.0,
    }


def gpu_samples() -> list[dict]:
    """Two hosts of two GPUs; a few readings are None, as when NVML cannot answer."""
    samples = []
    for t in range(5):
        for host in ("n1", "n2"):
            utils = [50.0 + 10 * t, None if t == 2 else 40.0 + t]
            samples.append(
                {
                    "time": float(2 * t),
                    "host": host,
                    "cpu_util": None if (host, t) == ("n1", 3) else 20.0 + t,
                    "mem_used_gib": 8.0,
                    "mem_total_gib": 64.0,
                    "devices": [device(i, u, None if host == "n2" else 300.0 + t)
                                for i, u in enumerate(utils)],
                }
            )  # fmt: skip
    return samples


def cpu_samples() -> list[dict]:
    return [
        {"time": float(t), "host": "n1", "cpu_util": 30.0 + 5 * t, "mem_used_gib": 4.0 + t,
         "mem_total_gib": 16.0, "devices": []}
        for t in range(5)
    ]  # fmt: skip


def pixels(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * DPI), round(size[1] * DPI)


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """The plots of a whole log and a GPU monitor, written once (drawing is the slow part)."""
    out = tmp_path_factory.mktemp("gpu") / "plots" / "nested"  # created when missing
    return write_plots(run_events(), gpu_samples(), out), out


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """The plots of evaluations and a CPU machine's monitor."""
    out = tmp_path_factory.mktemp("cpu")
    return write_plots(eval_events(), cpu_samples(), out), out


def test_writes_every_plot_in_order_and_only_those(gpu_run, cpu_run) -> None:
    for (paths, out), expected in [
        (gpu_run, ["loss.png", "throughput.png", "map.png", "devices.png"]),
        (cpu_run, ["map.png", "host.png"]),
    ]:
        assert names(paths) == expected
        assert all(p.parent == out for p in paths)
        assert sorted(p.name for p in out.iterdir()) == sorted(expected)


@pytest.mark.parametrize(
    ("run", "name", "size"),
    [
        ("gpu_run", "loss.png", SIZE),
        ("gpu_run", "throughput.png", SIZE),
        ("gpu_run", "map.png", SIZE),
        ("gpu_run", "devices.png", TALL_SIZE),
        ("cpu_run", "host.png", SIZE),
    ],
)
def test_each_file_is_a_png_of_fixed_size_with_content(
    request: pytest.FixtureRequest, run: str, name: str, size: tuple[float, float]
) -> None:
    _, out = request.getfixturevalue(run)
    with Image.open(out / name) as image:
        assert image.format == "PNG"
        assert image.size == pixels(size)
        assert "Software" not in image.text  # no version stamp: the bytes depend on the data only
        rgb = image.convert("RGB")
    white = rgb.convert("L").histogram()[255]
    assert rgb.width * rgb.height - white > 0.01 * rgb.width * rgb.height
    # Lines in several colours, not just black text on white.
    assert len(rgb.getcolors(maxcolors=1 << 16)) > 50


def test_absent_data_writes_no_plot(tmp_path: Path) -> None:
    without_eval = [e for e in run_events() if e["event"] != "eval"]
    assert names(write_plots(without_eval, None, tmp_path / "a")) == ["loss.png", "throughput.png"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["loss.png", "throughput.png"]

    # Samples whose every reading is None have no data either.
    blank = [{"time": 1.0, "host": "n1", "cpu_util": None, "mem_used_gib": None, "devices": []}]
    assert write_plots([], blank, tmp_path / "b") == []

    bookends = [{"event": "run_start", "time": 0.1}, {"event": "run_failed", "time": 0.2}]
    assert write_plots(bookends, [], tmp_path / "c") == []
    assert write_plots([], None, tmp_path / "d") == []
    assert not any((tmp_path / d).exists() for d in "bcd")


def test_a_tiny_run_says_which_plots_it_did_not_draw_and_why(tmp_path: Path) -> None:
    """max_steps below log_every: no step logged, so no loss or throughput plot; the monitor off.
    One warning line names each plot left out, with the setting that left it out."""
    events = [
        {"event": "run_start", "time": 0.5, "config": {"train": {"log_every": 20},
                                                       "monitor_interval": 0.0}},
        *eval_events(),
        {"event": "run_end", "time": 41.0, "steps": 2},
    ]  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        assert names(write_plots(events, None, tmp_path)) == ["map.png"]
    (warning,) = caught
    assert str(warning.message) == (
        "plots: not drawn: loss.png and throughput.png: no step was logged (a step is logged "
        "every log_every=20 steps, and the run took 2: set log_every to 2 or less); "
        "devices.png/host.png: monitor_interval=0 turned the monitor off"
    )
    with pytest.warns(UserWarning, match=r"^plots: not drawn: map.png: no evaluation recorded"):
        write_plots([e for e in run_events() if e["event"] != "eval"], cpu_samples(), tmp_path)


def test_a_run_with_every_plot_warns_nothing(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(write_plots(run_events(), cpu_samples(), tmp_path)) == 4


@pytest.mark.parametrize(
    "build",
    [
        lambda: loss_figure(step_events([2.0, 1.5, 1.2, 1.0], lrs=[0.01, 0.02, 0.04, 0.04])),
        lambda: map_figure(eval_events()),
        lambda: host_figure(cpu_samples()),
        lambda: devices_figure(gpu_samples()),
    ],
    ids=["loss", "map", "host", "devices"],
)
def test_legends_lie_outside_every_data_area(build) -> None:
    """A legend inside the axes covers some line wherever it goes (loss.png's covered the lr
    curve, host.png's the CPU line): each legend's box meets no axes' data area."""
    fig = build()
    fig.canvas.draw()  # lays the figure out: the boxes are where the PNG has them
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends
    for legend in legends:
        box = legend.get_window_extent()
        assert not any(box.overlaps(ax.bbox) for ax in fig.axes), (box, [a.bbox for a in fig.axes])
        assert fig.bbox.contains(box.x1 - 1, box.y0 + 1)  # and it is on the image, not cut off


def test_identical_data_gives_identical_bytes(gpu_run, tmp_path: Path) -> None:
    first, _ = gpu_run
    second = write_plots(run_events(), gpu_samples(), tmp_path)
    assert names(second) == names(first)
    assert [p.read_bytes() for p in second] == [p.read_bytes() for p in first]


def test_different_data_gives_different_pixels(gpu_run, tmp_path: Path) -> None:
    _, first = gpu_run
    steps = [e for e in run_events() if e["event"] == "step"]
    steps[2] = {**steps[2], "loss": 0.3}
    write_plots(steps, None, tmp_path)
    with Image.open(first / "loss.png") as a, Image.open(tmp_path / "loss.png") as b:
        assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is not None
    # The throughput is the same in both, and so is its plot.
    assert (tmp_path / "throughput.png").read_bytes() == (first / "throughput.png").read_bytes()


def test_loss_lines_are_the_logged_numbers() -> None:
    steps = step_events([2.0, 1.5, 1.2], lrs=[0.001, 0.01, 0.01])
    fig = loss_figure(steps)
    loss_ax, lr_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert list(lines) == ["loss", "classification", "bbox_regression"]
    for field, line in lines.items():
        assert list(line.get_xdata()) == [e["step"] for e in steps]
        assert list(line.get_ydata()) == [e[field] for e in steps]
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == [0.001, 0.01, 0.01]
    assert lr_ax.get_yscale() == "linear"  # exactly 10x: not more than 10x


def test_lr_axis_is_logarithmic_beyond_10x() -> None:
    fig = loss_figure(step_events([2.0, 1.5, 1.2], lrs=[0.0001, 0.01, 0.001]))
    assert fig.axes[1].get_yscale() == "log"
    assert fig.axes[0].get_yscale() == "linear"


def test_throughput_and_map_lines_are_the_logged_numbers() -> None:
    steps = step_events([2.0, 1.5, 1.2, 1.0])
    (line,) = throughput_figure(steps).axes[0].get_lines()
    assert list(line.get_xdata()) == [10, 20, 30, 40]
    assert list(line.get_ydata()) == [e["images_per_s"] for e in steps]

    lines = map_figure(eval_events()).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["mAP", "AP50", "AP75"]
    assert [list(line.get_ydata()) for line in lines] == [[0.1, 0.2], [0.25, 0.4], [0.08, 0.15]]
    assert all(list(line.get_xdata()) == [30, 60] for line in lines)


def test_map_without_ap75_plots_what_is_there() -> None:
    evals = [{k: v for k, v in e.items() if k != "AP75"} for e in eval_events()]
    lines = map_figure(evals).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["mAP", "AP50"]


def test_device_lines_skip_none_readings() -> None:
    samples = gpu_samples()
    util_ax, mem_ax, power_ax = devices_figure(samples).axes
    util = {line.get_label(): line for line in util_ax.get_lines()}
    assert list(util) == ["n1:0", "n1:1", "n2:0", "n2:1", "n1 CPU", "n2 CPU"]
    assert list(util["n1:0"].get_ydata()) == [50.0, 60.0, 70.0, 80.0, 90.0]
    # GPU 1 had no utilisation reading at t=4 (sample 2): the point is left out, not drawn as 0.
    assert list(util["n2:1"].get_xdata()) == [0.0, 2.0, 6.0, 8.0]
    assert list(util["n2:1"].get_ydata()) == [40.0, 41.0, 43.0, 44.0]
    assert list(util["n1 CPU"].get_xdata()) == [0.0, 2.0, 4.0, 8.0]
    assert list(util["n2 CPU"].get_ydata()) == [20.0, 21.0, 22.0, 23.0, 24.0]

    mem = {line.get_label(): list(line.get_ydata()) for line in mem_ax.get_lines()}
    assert mem == {"n1:0": [10.0] * 5, "n1:1": [11.0] * 5, "n2:0": [10.0] * 5, "n2:1": [11.0] * 5}
    # n2 never reported power: no line for its devices, rather than an empty one in the legend.
    power = {line.get_label(): list(line.get_ydata()) for line in power_ax.get_lines()}
    assert power == {
        "n1:0": [300.0, 301.0, 302.0, 303.0, 304.0],
        "n1:1": [300.0 + t for t in range(5)],
    }
    # Each device keeps its colour from panel to panel.
    colours = [
        {line.get_label(): line.get_color() for line in ax.get_lines()} for ax in (util_ax, mem_ax)
    ]
    assert all(colours[1][k] == colours[0][k] for k in colours[1])
    assert len(set(colours[0][k] for k in colours[1])) == 4


def test_none_readings_do_not_crash_writing(tmp_path: Path) -> None:
    samples = gpu_samples()
    samples[0]["devices"][0] = {**samples[0]["devices"][0], "mem_used_gib": None, "util": None}
    samples.append({"time": None, "host": "n1", "cpu_util": None, "mem_used_gib": None,
                    "devices": [device(0, None, None)]})  # fmt: skip
    assert names(write_plots([], samples, tmp_path)) == ["devices.png"]
    host_only = [*cpu_samples(), {**cpu_samples()[0], "time": 9.0, "cpu_util": None}]
    assert names(write_plots([], host_only, tmp_path / "h")) == ["host.png"]


def test_host_lines_are_the_sampled_numbers() -> None:
    samples = cpu_samples()
    cpu_ax, mem_ax = host_figure(samples).axes
    (cpu,) = cpu_ax.get_lines()
    (mem,) = mem_ax.get_lines()
    assert cpu.get_label() == "n1"
    assert list(cpu.get_xdata()) == [s["time"] for s in samples]
    assert list(cpu.get_ydata()) == [s["cpu_util"] for s in samples]
    assert list(mem.get_ydata()) == [s["mem_used_gib"] for s in samples]


def test_does_not_import_pyplot(tmp_path: Path) -> None:
    """A training process that writes plots keeps pyplot (and its global figure state) unloaded."""
    code = (
        "import sys; from pathlib import Path; from retinaperf.report.plots import write_plots; "
        "write_plots([{'event': 'step', 'step': 1, 'loss': 1.0}], None, Path(sys.argv[1])); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / "loss.png").exists()
