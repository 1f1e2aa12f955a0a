"""Every private PyTorch and torchvision API the package relies on, each behind one name here.

Private names change without notice between releases. Kept here, each has a test in
tests/test_torch_compat.py that exercises it against the installed torch and torchvision, so an
upgrade that breaks one fails a test naming it, rather than a run on a GPU machine.

Each entry says what it is for, the versions it was checked against, and why no public API
serves.

A base module: it imports torch alone, so that the data layer can use it without importing
torchvision, which takes seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.profiler import profile


def start_profiler_at(prof: profile, step: int) -> None:
    """Start `prof`, a profiler with a schedule, at step `step` rather than 0: its schedule is
    asked about the run's own step numbers, and each step's range in the trace is named
    `ProfilerStep#<that number>` (a run resumed from a checkpoint starts past step 1).

    `prof`'s schedule must answer NONE for step 0, which torch asks it about when it is made.
    Not private by name, but undocumented use: `profile.step_num`, which torch's examples read
    in a trace handler; written here, before `start()` and one `step()`, which name and schedule
    the step from it. Checked with torch 2.14.1.
    No public alternative: a profiler counts its steps from 0 at `start()`.
    """
    prof.step_num = step - 1
    prof.start()
    prof.step()
