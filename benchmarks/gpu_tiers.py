"""What the GPU check runs, in which tier, and how long each run should take on one H100.

A device is lent rarely, for 15 minutes with its start included, and for at most 10 minutes a
command, so the check comes in two tiers. Tier 1 answers the main questions in at most 5 minutes
of one H100 by the estimate below: the tests marked gpu, fp32, bf16, bf16 with every reference
path, bf16 with CUDA graphs, the bf16 stop-and-resume pair, and a short `sweep --find-batch` in
bf16. Tier 2 is every other run.

The estimate of a run: START_S to start and end its process, plus its steps at its precision's
seconds per step times the run's own factor, plus its one-off seconds (compiling, say). No H100
has run the check yet: the figures below are the H200 check's (H200_CHECK) scaled to an H100, or
guesses where nothing was measured, and all of them are to be replaced by the first measured
H100 check, whose README's time table sets each run's measured wall time beside its estimate.
"""

from __future__ import annotations

from collections.abc import Iterable

from retinaperf.run import batch_search

H200_CHECK = "docs/results/2026-11-28-nvidia-h200-gpu-check"  # 100 steps per run, measured
TESTS = "tests marked gpu"
PROFILED = "40:45"  # the steps bf16-profile records: after the warm-up, before the end
# name -> settings of each run, in the order they run within their tier. fp32-strict last: the
# slowest, so a check cut short by its time limit loses the least.
RUNS = {
    "fp32": ("precision=fp32",),
    "bf16": ("precision=bf16",),
    "bf16-torchvision": (
        "precision=bf16",
        "transform=torchvision",
        "reuse_constants=false",
        "loss=torchvision",
        "postprocess=torchvision",
    ),
    "bf16-cudagraphs": ("precision=bf16", "compile=true", "compile_mode=reduce-overhead"),
    "bf16-nchw": ("precision=bf16", "channels_last=off"),
    "bf16-cudnn-benchmark": ("precision=bf16", "cudnn_benchmark=on"),
    "bf16-profile": ("precision=bf16", f"profile_steps={PROFILED}"),
    "bf16-compile": ("precision=bf16", "compile=true"),
    "amp": ("precision=amp",),
    "fp32-strict": ("precision=fp32-strict",),
}
# Not a run but a pair: bf16 stopped by SIGTERM halfway and resumed, against the same left alone
# (resume_check.py), with deterministic kernels so that the first resumed step's loss can be
# compared bit for bit.
RESUME = "bf16-resume"
RESUME_SETTINGS = ("precision=bf16", "deterministic=true", "log_every=1")
RESUME_STEPS = 20  # stopped after step 10: past the first logged steps, and short for tier 1

# Not a run but a sweep: `retinaperf sweep --find-batch` in bf16, each point a run of
# FIND_BATCH_STEPS steps (the first step holds the peak but for the optimizer's state, which the
# second adds), from batch FIND_BATCH_START for at most FIND_BATCH_TRIALS batches: short, so its
# answer is a bracket (on an H100 where FIND_BATCH_CAPACITY puts it: 32 fits, 64 does not).
FIND_BATCH = "bf16-find-batch"
FIND_BATCH_SETTINGS = ("precision=bf16",)
FIND_BATCH_START, FIND_BATCH_TRIALS, FIND_BATCH_STEPS = 32, 2, 2
# The largest batch an H100 (80 GiB) holds if memory grew in proportion to the batch from the H200
# check's bf16 run (mem_used_gib 35.0 at batch 16): a floor, as part of that peak does not grow.
FIND_BATCH_CAPACITY = int(16 * 80 / 35.0)

TIER_1 = (TESTS, "fp32", "bf16", "bf16-torchvision", "bf16-cudagraphs", RESUME, FIND_BATCH)
TIER_1_MAX_S = 5 * 60
# Steps per run of each tier unless --steps says otherwise: 30 keeps tier 1's estimate within
# TIER_1_MAX_S and leaves 20 steady steps after the 10 of timing_warmup_steps; tier 2 keeps 100,
# the check's steps before it had tiers (bf16-profile records steps 40 to 45).
TIER_STEPS = {1: 30, 2: 100}

# Seconds per step of A100-1x1 (16 images at 800x1333) on one H100: the H200 check's measured
# 16 / p_core_steady, times the H200's memory bandwidth over the H100's (4.8 / 3.35 TB/s). That
# factor is pessimistic (the step is not bound by memory alone) so that tier 1 fits.
H100_OVER_H200 = 4.8 / 3.35
STEP_S = {
    precision: 16 / images_per_s * H100_OVER_H200
    for precision, images_per_s in {
        "fp32": 63.4,
        "amp": 72.6,
        "bf16": 73.1,
        "fp32-strict": 20.1,
    }.items()
}
# A run's seconds outside its steps: the H200 check's e2e_time less its steps at the steady step
# (bf16 11.6, amp 12.0, fp32-strict 14.4: its slower evaluation; fp32 19.3 as the first run, its
# caches cold, which the tests before it now warm), plus a second for the interpreter. Mostly the
# host's work (imports, generated data, the model), which an H100 machine's 16 cores share.
START_S = 13.0
TESTS_S = 20.0  # the H200 check's pytest took 17.4 s for its 9 tests marked gpu, its start included
# name -> (factor on its precision's step, one-off seconds). Guesses, nothing of these measured:
# torchvision's reference loops over the images on the host; cuDNN times its algorithms for each
# new batch shape (tens of shapes); the profiler writes a trace; compiling the backbone, head and
# loss (training and evaluation) takes about a minute on 16 cores, and CUDA graphs record a graph
# per batch shape on top; the resume pair's deterministic kernels and per-step logging are slower.
COSTS = {
    "bf16-torchvision": (2.0, 0.0),
    "bf16-nchw": (1.2, 0.0),
    "bf16-cudnn-benchmark": (1.0, 30.0),
    "bf16-profile": (1.0, 20.0),
    "bf16-compile": (1.0, 60.0),
    "bf16-cudagraphs": (1.0, 90.0),
    RESUME: (1.3, 0.0),
}


def tier_of(name: str) -> int:
    """1 for the runs of tier 1, 2 for every other (a precision asked for by name included)."""
    return 1 if name in TIER_1 else 2


def find_batch_tried() -> list[int]:
    """The batches the find-batch sweep should try on an H100 (FIND_BATCH_CAPACITY)."""
    result = batch_search.search(
        FIND_BATCH_START,
        lambda batch: "fits" if batch <= FIND_BATCH_CAPACITY else "out_of_memory",
        FIND_BATCH_TRIALS,
    )
    return result.tried


def estimate_s(name: str, settings: tuple[str, ...], steps: int) -> float:
    """Seconds the run `name` with these settings and steps should take on one H100."""
    if name == TESTS:
        return TESTS_S
    precision = next(s.split("=", 1)[1] for s in settings if s.startswith("precision="))
    factor, once = COSTS.get(name, (1.0, 0.0))
    step = STEP_S.get(precision, STEP_S["fp32"]) * factor  # an unmeasured precision: as fp32
    if name == RESUME:  # three processes: left alone, stopped, resumed; the steps twice over
        return 3 * START_S + 2 * steps * step + once
    if name == FIND_BATCH:  # a process per point, its step in proportion to its batch
        return sum(START_S + steps * step * batch / 16 for batch in find_batch_tried())
    return START_S + steps * step + once


def time_table(rows: Iterable[tuple[str, int, int | None, float, float | None]]) -> str:
    """Markdown: each run's tier, steps, estimated and measured seconds on this device, then each
    tier's totals. A row is (name, tier, steps or None, estimated s, measured s or None)."""
    rows = list(rows)
    lines = [
        "| run | tier | steps | estimated s (one H100) | measured s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, tier, steps, estimated, measured in rows:
        shown = "–" if measured is None else f"{measured:.0f}"
        lines.append(
            f"| {name} | {tier} | {'–' if steps is None else steps} | {estimated:.0f} | {shown} |"
        )
    for tier, estimated, measured in tier_totals(rows):
        lines.append(f"| tier {tier}, in all | {tier} | | {estimated:.0f} | {measured:.0f} |")
    return "\n".join(lines)


def tier_totals(
    rows: Iterable[tuple[str, int, int | None, float, float | None]],
) -> list[tuple[int, float, float]]:
    """(tier, estimated s, measured s) of each tier in rows, a run not measured counted as 0."""
    totals: dict[int, tuple[float, float]] = {}
    for _, tier, _, estimated, measured in rows:
        before = totals.get(tier, (0.0, 0.0))
        totals[tier] = (before[0] + estimated, before[1] + (measured or 0.0))
    return [(tier, *totals[tier]) for tier in sorted(totals)]
