"""A profiler window over training steps: `profile_steps=A:B` records optimizer steps A..B.

The loop calls `before_step(n)` just before the core window of step n and `after_step(n)` just
after it, n being the number the event log gives that step (the meter's step count once it is
done); `close()` goes in a `finally`. Steps are numbered from 1 and both ends are recorded.

torch.profiler keeps the window: a `torch.profiler.schedule` (wait, one warm-up step, A..B
active, one cycle) and the profiler's `step()` at the end of every step, as torch's examples do.

- The run's first step starts the profiler, numbered as the run numbers it (a run resumed from
  a checkpoint starts past step 1; one resumed inside the window records from its first step,
  one resumed after it records nothing). Until step A-1 a step costs the profiler's `step()`,
  tens of microseconds, and records nothing. No profiler exists in a run without a window, on
  another rank, or after step B.
- Step A-1 is the profiler's warm-up, not recorded: kineto readies itself there (CUPTI, on
  CUDA), so that its start does not slow step A. A window from step 1 has none.
- Each step is one `ProfilerStep#N` range, the name torch's `profile.step()` gives it, which
  TensorBoard's PyTorch Profiler plugin reads as one step. It runs from the end of step N-1 to
  the end of step N, so the trace also shows what the loop does between steps (waiting for and
  copying the batch, logging), from the end of step A-1 to the end of step B without a break.
- Only the main rank profiles (`enabled=False` elsewhere): one trace per run.

What a window leaves in the run directory, once step B is done (or at `close()`, with the steps
recorded so far), written by the trace handler that the schedule calls:

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
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from retinaperf.distributed import synchronize

if TYPE_CHECKING:
    import torch
    from torch.autograd.profiler_util import EventList
    from torch.profiler import profile

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
        self._pending = bool(self._first)  # the run's first step is still to start a profiler
        self._prof: profile | None = None
        self._by_device = False  # whether the device's activity is recorded (set at the start)
        self._recorded_from = 0  # the first step recorded: A, or a resumed run's first step
        self._last = 0  # the last step begun
        self._closing = False  # close() stops the profiler: the window did not end
        self._written = False

    def before_step(self, step: int) -> None:
        """Call just before the core window of step `step`."""
        self._last = step
        if self._pending:
            self._pending = False
            if step <= self._final:  # a run resumed after the window has nothing to record
                self._start(step)

    def after_step(self, step: int) -> None:
        """Call just after the core window of step `step`; after step B, writes the results."""
        prof = self._prof
        if prof is None:
            return
        ending = step == self._final
        if ending:
            # The step() below ends the recording: kernels still queued would be missing.
            synchronize(self._device)
        prof.step()  # the schedule warms up, records, and past step B calls `_write`
        if ending:
            self._prof = None
            prof.stop()  # ends the range step() opened for the step after the window

    def close(self) -> None:
        """End of the run (call it in a `finally`): writes what an unfinished window recorded,
        and says so when the run recorded no step of it."""
        prof, self._prof = self._prof, None
        if prof is not None:
            self._closing = True
            try:
                synchronize(self._device)  # kernels still queued would be missing from the trace
            finally:
                prof.stop()  # `_write`, when the schedule was recording
        if self._first and not self._written:
            self._written = True
            why = (
                f"the run resumed after step {self._final}"
                if self._last > self._final
                else f"the run ended before step {self._first}"
            )
            tqdm.write(f"profile: {why}: nothing recorded")
            self._emit(steps=None, complete=False, trace=None, sort_by=None, top_ops=[])

    def _start(self, step: int) -> None:
        """A profiler whose schedule records steps A..B, started at `step`, the run's first."""
        from torch.profiler import ProfilerActivity, profile, schedule, supported_activities

        from retinaperf.torch_compat import start_profiler_at

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
        activities = [ProfilerActivity.CPU]
        if self._by_device and device_activity is not None:
            activities.append(device_activity)
        warmup = 1 if self._first > 1 else 0  # step A-1; step 1 has no step before it
        with warnings.catch_warnings():
            # torch warns of a schedule without warm-up; from step 1 there is no other way.
            warnings.filterwarnings("ignore", "Profiler won't be using warmup")
            # Steps 0..A-1-warmup wait (torch asks about step 0 when the profiler is made).
            plan = schedule(
                wait=self._first - warmup,
                warmup=warmup,
                active=self._final - self._first + 1,
                repeat=1,
            )
        self._prof = profile(activities=activities, schedule=plan, on_trace_ready=self._write)
        self._recorded_from = max(step, self._first)
        start_profiler_at(self._prof, step)

    def _write(self, prof: profile) -> None:
        """The trace handler (`on_trace_ready`), once the schedule has stopped recording, at the
        end of step B or at `close()`: the trace, the top operators, the `profile` event."""
        if self._last < self._recorded_from:
            return  # the run ended before step A began: close() says so; the wait is no step
        self._written = True
        complete = not self._closing
        started = time.perf_counter()
        trace = self._out_dir / TRACE
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if self._by_device else "self_cpu_time_total"
        top_ops = _top_ops(prof.key_averages(), sort_by, self._by_device)
        busy = device_busy(prof.events()) if self._by_device else None
        first, last = self._recorded_from, self._last
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
