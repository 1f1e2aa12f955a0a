"""A profiler window over training steps: `profile_steps=A:B` records optimizer steps A..B.

The loop calls `before_step(n)` just before the core window of step n and `after_step(n)` just
after it, n being the number the event log gives that step (the meter's step count once it is
done); `close()` goes in a `finally`. Steps are numbered from 1 and both ends are recorded.

- Outside the window a call costs an integer compare and a None check: no profiler object exists
  before step A nor after step B.
- The profiler runs without a break from `before_step(A)` to `after_step(B)`, so the trace also
  shows what the loop does between those steps (waiting for and copying the next batch, logging):
  the gaps between the steps' `ProfilerStep#N` ranges. `ProfilerStep#N` is the name torch's own
  `profile.step()` gives a step, which TensorBoard's PyTorch Profiler plugin reads as one.
- Only the main rank profiles (`enabled=False` elsewhere): one trace per run.

What a window leaves in the run directory, once step B is done (or at `close()`, with the steps
recorded so far):

    profile/rank0.pt.trace.json  the trace, Chrome trace-event JSON. Perfetto: open it at
                                 https://ui.perfetto.dev ("Open trace file"). TensorBoard:
                                 `tensorboard --logdir <run_dir>` with the torch-tb-profiler
                                 package, "PyTorch Profiler" tab, run `profile` (the plugin reads
                                 `<logdir>/<run>/<worker>.pt.trace.json`; here the worker is rank0).
    profile/top_ops.txt          the 15 operators with the most self device time (self CPU time
                                 when only the CPU is profiled), also printed and in the event
                                 log's `profile` event, with `device_busy`: the share of the
                                 window's device timeline (first kernel's start to last kernel's
                                 end) in which some kernel or copy ran; the rest the device
                                 waited (for the host to enqueue work, or for data).

Profiling slows the steps it records, and writing the trace takes seconds of training time: the
throughputs of a profiled run are not benchmark numbers.

No torch import at module level: the profiler is built in every run, and torch is imported where
a window starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from retinaperf.distributed import synchronize

if TYPE_CHECKING:
    import torch
    from torch.autograd.profiler_util import EventList
    from torch.profiler import profile, record_function

# Kineto's log levels run from 0 (verbose) to 5 (its trace points, "USDT"); above them it logs
# nothing.
KINETO_LOG_LEVEL = "KINETO_LOG_LEVEL"
KINETO_SILENT = "6"
TRACE = "profile/rank0.pt.trace.json"
TOP_OPS = "profile/top_ops.txt"
TOP_ROWS = 15
STEP_LABEL = "ProfilerStep"  # + "#N": the name torch's profile.step() gives step N
# Host-side events of key_averages that are no operator: the step labels (whose time is the
# steps') and kineto's own overhead (the trace's "overhead" category: CUPTI buffer requests).
_NOT_OPERATORS = (STEP_LABEL, "Activity Buffer Request")


class Events(Protocol):
    """Where the `profile` event goes: report.events.EventLog."""

    def emit(self, event: str, **fields: Any) -> None: ...


class StepProfiler:
    """Records the steps of `window` with torch.profiler and writes what it saw to `out_dir`."""

    def __init__(
        self,
        window: tuple[int, int] | None,
        out_dir: Path,
        device: torch.device,
        enabled: bool = True,
        events: Events | None = None,
    ) -> None:
        self._out_dir = Path(out_dir)
        self._device = device
        self._events = events
        # 0 is no step's number: a profiler without a window, or off on this rank, never starts.
        self._first, self._final = window if window is not None and enabled else (0, 0)
        self._prof: profile | None = None
        self._label: record_function | None = None
        self._by_device = False  # whether the device's activity is recorded (set at the start)
        self._last = 0  # the last step begun inside the window
        self._done = False

    def before_step(self, step: int) -> None:
        """Call just before the core window of step `step`."""
        if step == self._first:
            self._start()
        if self._prof is not None:
            from torch.profiler import record_function

            self._label = record_function(f"{STEP_LABEL}#{step}")
            self._label.__enter__()
            self._last = step

    def after_step(self, step: int) -> None:
        """Call just after the core window of step `step`; after step B, writes the results."""
        if self._prof is None:
            return
        self._close_label()
        if step >= self._final:
            self._finish(complete=True)

    def close(self) -> None:
        """End of the run (call it in a `finally`): writes what an unfinished window recorded,
        and says so when the run ended before the window began."""
        if self._prof is not None:
            self._close_label()  # the step that raised never reached after_step
            self._finish(complete=False)
        elif self._first and not self._done:
            self._done = True
            tqdm.write(f"profile: the run ended before step {self._first}: nothing recorded")
            self._emit(steps=None, complete=False, trace=None, sort_by=None, top_ops=[])

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile, supported_activities

        # The device's activity is the ProfilerActivity of the same name (CUDA, XPU, ...), when
        # this torch build can record it; without it only host-side operators are timed.
        device_activity = getattr(ProfilerActivity, self._device.type.upper(), None)
        self._by_device = self._device.type != "cpu" and device_activity in supported_activities()
        if not self._by_device:
            # Kineto, the profiler's library, logs to stderr on its own: a CUDA build on a
            # machine without a GPU prints "gpuGetDeviceCount failed" at every window, and every
            # build its "profiler_start" trace points. With host-side operators alone none of it
            # concerns what is recorded. Read when kineto starts (the first window of the
            # process); a level the user set is kept.
            os.environ.setdefault(KINETO_LOG_LEVEL, KINETO_SILENT)
        activities = [ProfilerActivity.CPU, *([device_activity] if self._by_device else [])]
        self._prof = profile(activities=activities)
        self._prof.start()

    def _close_label(self) -> None:
        if self._label is not None:
            self._label.__exit__(None, None, None)
            self._label = None

    def _finish(self, complete: bool) -> None:
        prof, self._prof = self._prof, None
        assert prof is not None
        self._done = True
        try:
            synchronize(self._device)  # kernels still queued would be missing from the trace
        finally:
            prof.stop()
        started = time.perf_counter()
        trace = self._out_dir / TRACE
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if self._by_device else "self_cpu_time_total"
        top_ops = _top_ops(prof.key_averages(), sort_by, self._by_device)
        busy = device_busy(prof.events()) if self._by_device else None
        first, last = self._first, self._last
        table = _format_table(top_ops, self._device.type.upper() if self._by_device else None)
        heading = (
            f"profile: steps {first}-{last}{'' if complete else ' (run ended early)'}, "
            f"trace {trace}; top {len(top_ops)} operators by self "
            f"{'device' if self._by_device else 'CPU'} time"
        )
        if busy is not None:
            heading += f"; the device was busy {100 * busy:.1f}% of the window"
        (self._out_dir / TOP_OPS).write_text(f"{heading}\n{table}\n", encoding="utf-8")
        tqdm.write(f"{heading}\n{table}")
        self._emit(
            steps=[first, last],
            complete=complete,
            trace=TRACE,
            sort_by=sort_by,
            top_ops=top_ops,
            device_busy=busy,
            export_seconds=time.perf_counter() - started,
        )

    def _emit(self, **fields: Any) -> None:
        if self._events is not None:
            self._events.emit("profile", requested=[self._first, self._final], **fields)


def device_busy(events: Iterable[Any]) -> float | None:
    """The share of the device's timeline, from its first activity's start to its last one's
    end, covered by some activity (kernels, copies: the profiler's events not on the CPU; those
    of several streams merged where they overlap). None without device activity."""
    from torch.autograd import DeviceType

    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type != DeviceType.CPU
    )
    if not spans:
        return None
    covered, (open_start, open_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > open_end:
            covered += open_end - open_start
            open_start, open_end = start, end
        else:
            open_end = max(open_end, end)
    covered += open_end - open_start
    whole = open_end - spans[0][0]  # the last group ends last: groups are disjoint, in order
    return covered / whole if whole > 0 else None


def _top_ops(averages: EventList, sort_by: str, by_device: bool) -> list[dict]:
    """The TOP_ROWS host-side operators with the most `sort_by` time, times in microseconds.

    Only host-side events count: a kernel's time is already the self device time of the operator
    that launched it, and listing kernels too would count it twice. `self_device_time_total` and
    `self_cpu_time_total` are FunctionEventAvg attributes in every torch this project supports
    (>= 2.9; `self_cuda_time_total` is the deprecated name, gone from FunctionEventAvg in 2.14).
    """
    from torch.autograd import DeviceType

    ops = [
        avg
        for avg in averages
        # startswith: key_averages may merge the step labels into "ProfilerStep*"
        if avg.device_type == DeviceType.CPU and not avg.key.startswith(_NOT_OPERATORS)
    ]
    ops.sort(key=lambda avg: getattr(avg, sort_by), reverse=True)
    return [
        {
            "name": avg.key,
            "calls": avg.count,
            "self_device_us": round(avg.self_device_time_total, 3) if by_device else None,
            "self_cpu_us": round(avg.self_cpu_time_total, 3),
        }
        for avg in ops[:TOP_ROWS]
    ]


def _format_table(top_ops: list[dict], device_name: str | None) -> str:
    """top_ops as fixed-width text, times in ms; `device_name` None: no device time recorded,
    and the table has the CPU time alone (on a CPU that is the device's time)."""
    device_column = [f"{f'self {device_name} ms':>16}"] if device_name else []
    lines = ["  ".join([*device_column, f"{'self CPU ms':>12}", f"{'calls':>8}", "operator"])]
    for op in top_ops:
        device = [f"{op['self_device_us'] / 1e3:>16.3f}"] if device_name else []
        cpu = f"{op['self_cpu_us'] / 1e3:>12.3f}"
        lines.append("  ".join([*device, cpu, f"{op['calls']:>8}", op["name"]]))
    return "\n".join(lines)
