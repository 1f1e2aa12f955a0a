"""Each private PyTorch/torchvision API of torch_compat, exercised against the installed torch and
torchvision: an upgrade that removes or changes one fails its test here, with a message naming
it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerAction, profile, schedule

from retinaperf import torch_compat
from retinaperf.run.step import BATCH_NORMS


def test_start_profiler_at_numbers_steps_as_the_run_does(tmp_path: Path) -> None:
    """Started at step 3 with steps 5 and 6 active: the schedule is asked about 3, 4, 5 ... (4
    warms up), and the trace names the steps ProfilerStep#5 and #6."""
    plan = schedule(wait=4, warmup=1, active=2, repeat=1)
    assert plan(0) == ProfilerAction.NONE  # what start_profiler_at needs of a schedule
    trace = tmp_path / "trace.json"
    prof = profile(schedule=plan, on_trace_ready=lambda p: p.export_chrome_trace(str(trace)))
    torch_compat.start_profiler_at(prof, 3)
    assert prof.step_num == 3, "torch.profiler.profile no longer counts its steps in step_num"
    for _ in range(3, 8):  # steps 3..7, each with its own work, then the profiler's step()
        torch.randn(8, 8)
        prof.step()
    prof.stop()
    events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    names = [e["name"] for e in events if e.get("ph") == "X"]
    steps = {name for name in names if name.startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#5", "ProfilerStep#6"}, (
        f"the trace holds {sorted(steps)}: torch changed how profile.step_num names or "
        "schedules steps"
    )
    assert names.count("aten::randn") == 2


def test_batch_norms_are_every_batch_norm_class_of_torch_nn() -> None:
    """run/step.py names them rather than test for their private base: a batch norm class that
    an upgrade adds (or removes) fails here."""
    base = nn.modules.batchnorm._BatchNorm
    found = {c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, base)}
    assert found == set(BATCH_NORMS), "torch.nn's batch norm classes changed: update BATCH_NORMS"
