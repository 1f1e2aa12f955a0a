"""The profiler window: `profile_steps=A:B` parsed, steps A..B recorded (and no others) into a
trace, a table of the top operators and a `profile` event; nothing when off or on another rank.
Which steps end up in the trace is torch's schedule at work: these tests read the trace."""

import json
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from retinaperf.config import parse_step_window
from retinaperf.errors import UserError
from retinaperf.measure.profiling import (
    TOP_OPS,
    TOP_ROWS,
    TRACE,
    StepProfiler,
    _format_table,
    device_busy,
)
from retinaperf.units import NO_VALUE

CPU = torch.device("cpu")


class Events:
    """Collects what the profiler emits, as the EventLog would write it."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields: object) -> None:
        self.records.append((event, fields))


def train(profiler: StepProfiler, steps: int, fail_at: int | None = None, first: int = 1) -> None:
    """Optimizer steps `first`..`steps` of a two-layer MLP (a resumed run starts past 1), called
    around each step as the loop calls them: 2 aten::addmm per step (the forward of each
    Linear), 1 aten::randn before it (its data); step `fail_at` raises mid-step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(first, steps + 1):
        x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))  # the "data", between steps
        profiler.before_step(step)
        loss = nn.functional.cross_entropy(model(x), y)
        if step == fail_at:
            raise RuntimeError(f"step {step} failed")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        profiler.after_step(step)


def trace_events(out: Path) -> Counter:
    """(category, name) -> count of the complete events ("X") in the trace."""
    trace = json.loads((out / TRACE).read_text(encoding="utf-8"))
    return Counter((e.get("cat"), e["name"]) for e in trace["traceEvents"] if e.get("ph") == "X")


def step_labels(events: Counter) -> set[str]:
    return {name for _cat, name in events if name.startswith("ProfilerStep#")}


@pytest.mark.parametrize(
    ("text", "window"), [("", None), ("2:2", (2, 2)), ("1:3", (1, 3)), ("11:15", (11, 15))]
)
def test_parse_step_window_accepts(text: str, window: tuple[int, int] | None) -> None:
    assert parse_step_window(text) == window


@pytest.mark.parametrize("text", ["0:3", "5:2", "a:b", "3", "5-9", "2:4:6", "-1:3", ":3", " "])
def test_parse_step_window_rejects(text: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_step_window(text)
    message = str(caught.value)
    assert f"profile_steps={text!r}" in message
    assert "A:B" in message


def test_window_records_its_steps_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    events = Events()
    profiler = StepProfiler((2, 4), tmp_path, CPU, events=events)
    train(profiler, steps=6)
    # Written when step 4 ended, before close(): steps 5 and 6 ran without a profiler.
    assert (tmp_path / TRACE).exists() and (tmp_path / TOP_OPS).exists()
    assert len(events.records) == 1
    profiler.close()
    assert len(events.records) == 1  # close() after the window adds nothing

    recorded = trace_events(tmp_path)
    assert step_labels(recorded) == {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"}
    assert recorded[("cpu_op", "aten::addmm")] == 3 * 2  # 3 steps x 2 Linear layers
    # Each step's range runs from the previous step's end: the data of steps 2, 3 and 4, not 5.
    assert recorded[("cpu_op", "aten::randn")] == 3

    event, fields = events.records[0]
    assert event == "profile"
    assert fields["requested"] == [2, 4] and fields["steps"] == [2, 4] and fields["complete"]
    assert fields["trace"] == TRACE and fields["sort_by"] == "self_cpu_time_total"
    top_ops = fields["top_ops"]
    assert len(top_ops) == TOP_ROWS
    names = [op["name"] for op in top_ops]
    assert not any(name.startswith("ProfilerStep") for name in names)  # labels are no operator
    assert {name for _cat, name in recorded} >= set(names)  # operators the trace holds
    addmm = top_ops[names.index("aten::addmm")]
    assert addmm["calls"] == 6 and addmm["self_cpu_us"] > 0
    cpu_times = [op["self_cpu_us"] for op in top_ops]
    assert cpu_times == sorted(cpu_times, reverse=True) and min(cpu_times) >= 0
    assert all(op["self_device_us"] is None for op in top_ops)  # CPU: no device time

    table = (tmp_path / TOP_OPS).read_text(encoding="utf-8")
    assert "steps 2-4" in table and all(name in table for name in names)
    assert table.rstrip("\n") in capsys.readouterr().out


@pytest.mark.parametrize(("window", "enabled"), [((2, 4), False), (None, True)])
def test_off_writes_nothing(
    tmp_path: Path, window: tuple[int, int] | None, enabled: bool, capsys: pytest.CaptureFixture
) -> None:
    events = Events()
    profiler = StepProfiler(window, tmp_path, CPU, enabled=enabled, events=events)
    train(profiler, steps=6)
    profiler.close()
    assert list(tmp_path.iterdir()) == []
    assert events.records == []
    assert capsys.readouterr().out == ""


def test_a_step_that_raises_leaves_a_partial_trace(tmp_path: Path) -> None:
    events = Events()
    profiler = StepProfiler((2, 5), tmp_path, CPU, events=events)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        try:
            train(profiler, steps=6, fail_at=3)
        finally:
            profiler.close()

    recorded = trace_events(tmp_path)
    assert step_labels(recorded) == {"ProfilerStep#2", "ProfilerStep#3"}
    assert recorded[("cpu_op", "aten::addmm")] == 2 * 2  # step 2's and step 3's forward
    ((event, fields),) = events.records
    assert event == "profile" and fields["steps"] == [2, 3] and not fields["complete"]
    assert "aten::addmm" in {op["name"] for op in fields["top_ops"]}
    assert "steps 2-3 (run ended early)" in (tmp_path / TOP_OPS).read_text(encoding="utf-8")


@pytest.mark.parametrize("steps", [3, 4])  # 4: the run ends in step 5's warm-up step
def test_a_run_that_ends_before_the_window_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture, steps: int
) -> None:
    events = Events()
    profiler = StepProfiler((5, 6), tmp_path, CPU, events=events)
    train(profiler, steps=steps)
    profiler.close()
    assert list(tmp_path.iterdir()) == []
    ((event, fields),) = events.records
    assert event == "profile" and fields["steps"] is None and fields["requested"] == [5, 6]
    assert "ended before step 5" in capsys.readouterr().out


def test_a_run_resumed_inside_the_window_records_the_rest(tmp_path: Path) -> None:
    """Resumed at step 4 of a 3:5 window: steps 4 and 5, named by the run's own numbers."""
    events = Events()
    profiler = StepProfiler((3, 5), tmp_path, CPU, events=events)
    train(profiler, steps=7, first=4)
    profiler.close()
    recorded = trace_events(tmp_path)
    assert step_labels(recorded) == {"ProfilerStep#4", "ProfilerStep#5"}
    assert recorded[("cpu_op", "aten::addmm")] == 2 * 2
    ((event, fields),) = events.records
    assert event == "profile" and fields["steps"] == [4, 5] and fields["complete"]


def test_a_run_resumed_after_the_window_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    events = Events()
    profiler = StepProfiler((2, 4), tmp_path, CPU, events=events)
    train(profiler, steps=8, first=6)
    profiler.close()
    assert list(tmp_path.iterdir()) == []
    ((event, fields),) = events.records
    assert event == "profile" and fields["steps"] is None and fields["requested"] == [2, 4]
    assert "resumed after step 4: nothing recorded" in capsys.readouterr().out


def test_a_window_from_step_1_warns_of_nothing(tmp_path: Path) -> None:
    """Step 1 has no step before it to warm the profiler up: no warning that it has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profiler = StepProfiler((1, 1), tmp_path, CPU)
        train(profiler, steps=2)
    assert step_labels(trace_events(tmp_path)) == {"ProfilerStep#1"}


PROFILE_CPU = """
import sys, torch
from pathlib import Path
from retinaperf.measure.profiling import StepProfiler
profiler = StepProfiler((1, 2), Path(sys.argv[1]), torch.device("cpu"))
for step in (1, 2):
    profiler.before_step(step)
    torch.randn(64, 64) @ torch.randn(64, 64)
    profiler.after_step(step)
"""


@pytest.mark.parametrize("user_level", [None, "5"])
def test_a_cpu_window_keeps_kinetos_log_off_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_level: str | None
) -> None:
    """Kineto logs to stderr on its own (its trace points everywhere, "gpuGetDeviceCount failed"
    from a CUDA build without a GPU): a fresh process, as kineto starts once per process. A level
    the user set is theirs."""
    if user_level is None:
        monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("KINETO_LOG_LEVEL", user_level)
    ran = subprocess.run(
        [sys.executable, "-c", PROFILE_CPU, str(tmp_path)], capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    assert "steps 1-2" in (tmp_path / TOP_OPS).read_text(encoding="utf-8")
    if user_level is None:
        assert ran.stderr == ""
    else:
        assert "profiler_start" in ran.stderr  # kineto's own trace point, at the user's level


def test_the_cpu_table_shows_cpu_time_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """On a CPU the device's time is the CPU time: one time column, named so, no empty one."""
    profiler = StepProfiler((1, 2), tmp_path, CPU)
    train(profiler, steps=2)
    heading, header, *rows = (tmp_path / TOP_OPS).read_text(encoding="utf-8").splitlines()
    assert heading.endswith("operators by self CPU time")
    assert header.split() == ["self", "CPU", "ms", "calls", "operator"]
    assert len(rows) == TOP_ROWS and all(float(row.split()[0]) >= 0 for row in rows)
    assert NO_VALUE not in "\n".join(rows)


def test_a_device_table_has_the_device_time_first() -> None:
    ops = [{"name": "aten::mm", "calls": 3, "self_device_us": 2500.0, "self_cpu_us": 40.0}]
    header, row = _format_table(ops, "CUDA").splitlines()
    assert header.split() == ["self", "CUDA", "ms", "self", "CPU", "ms", "calls", "operator"]
    assert row.split() == ["2.500", "0.040", "3", "aten::mm"]


def test_the_parser_imports_without_torch() -> None:
    # config.py validates profile_steps with it, and the CLI imports config before torch.
    code = (
        "import sys; from retinaperf.config import parse_step_window; "
        "assert parse_step_window('2:4') == (2, 4); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class Span:
    """A profiler event's device type and time range (microseconds)."""

    def __init__(self, start: float, end: float, on_device: bool = True) -> None:
        from torch.autograd import DeviceType

        self.device_type = DeviceType.CUDA if on_device else DeviceType.CPU
        self.time_range = SimpleNamespace(start=start, end=end)


def test_device_busy_is_the_covered_share_of_the_device_timeline() -> None:
    # Device activity 0-10, 5-12 (overlapping: two streams), 20-30; host events do not count.
    events = [Span(20, 30), Span(0, 10), Span(5, 12), Span(-50, 100, on_device=False)]
    assert device_busy(events) == pytest.approx((12 + 10) / 30)
    assert device_busy([Span(3, 8)]) == 1.0
    assert device_busy([Span(0, 40, on_device=False)]) is None
