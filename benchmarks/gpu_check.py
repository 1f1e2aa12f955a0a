"""One command that checks a CUDA GPU, in two tiers (benchmarks/gpu_tiers.py says which run is
in which, and how long each should take on one H100).

Tier 1, the default, answers the main questions in about 5 minutes of one H100: the tests
marked `gpu`, then the throughput mode of the A100-1x1 preset (its batch, lr and 800x1333
resize, on generated COCO-like data) for 30 steps in fp32, bf16, bf16 with torchvision's code
for every part of the step (the reference) and bf16 with torch.compile replaying CUDA graphs,
and bf16 stopped by SIGTERM, resumed and compared with the same run left alone, and a short
`sweep --find-batch` in bf16 (two batches from 32: the largest batch's bracket). Tier 2 runs 100
steps of the rest: amp, fp32-strict, and bf16 without channels-last, with cuDNN's benchmark
mode, with a profiler window (top operators, how much of the window the device was busy) and
with torch.compile: what each choice of the step is worth there. Writes
docs/results/<date>-<device>-gpu-check/: each run's directory, the tests' log and a README.md
with the generated summary tables, each run's measured wall time beside its estimate, and the
command that produced it.

    python benchmarks/gpu_check.py                       # after `make` (or: make gpu-check)
    PYTHONPATH=src python3 benchmarks/gpu_check.py       # a GPU machine's own torch, no install
    python benchmarks/gpu_check.py --tier 2              # every other run (--tier all: both)
    python benchmarks/gpu_check.py --dry-run --tier all  # the tiers, commands and estimates

Needs no network: random weights in the pretrained structure and generated data. Without a
CUDA device it prints what it would run and exits 0 (`--cpu` runs it on the CPU anyway,
slowly: to try the script). Exit status: 0 when every test and every run succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

import torch  # noqa: E402
from gpu_tiers import (  # noqa: E402
    FIND_BATCH,
    FIND_BATCH_SETTINGS,
    FIND_BATCH_START,
    FIND_BATCH_STEPS,
    FIND_BATCH_TRIALS,
    PROFILED,
    RESUME,
    RESUME_SETTINGS,
    RESUME_STEPS,
    RUNS,
    TESTS,
    TIER_1,
    TIER_STEPS,
    estimate_s,
    tier_of,
    tier_totals,
    time_table,
)
from resume_check import ResumeCheck, stop_and_resume  # noqa: E402

from retinaperf.config import PRECISIONS as KNOWN_PRECISIONS  # noqa: E402
from retinaperf.files import write_text_atomic  # noqa: E402
from retinaperf.report import comparison, loading, tables  # noqa: E402
from retinaperf.report.events import EVENTS, read_events  # noqa: E402
from retinaperf.report.results import RESULTS  # noqa: E402
from retinaperf.run.sweep import SWEEP, bare_key  # noqa: E402
from retinaperf.units import NO_VALUE, significant  # noqa: E402

PRESET = "A100-1x1"
# Any precision can be asked for by name, as a run of that precision alone (tier 2).
KNOWN_RUNS = {**{p: (f"precision={p}",) for p in KNOWN_PRECISIONS}, **RUNS}
PAIRS_AND_SWEEPS = (RESUME, FIND_BATCH)  # entries that are not one run
DETERMINISTIC_CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # bit-equal cuBLAS, for the pair


@dataclass
class Planned:
    """One entry of the check: the tests, a run or the resume pair, with its estimate."""

    name: str
    tier: int
    steps: int | None  # None: the tests
    estimate_s: float
    command: list[str]  # the resume pair's: the `retinaperf run` arguments of both its runs


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    tiers = _tiers(parser, args)
    started = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else device
    out_dir = _new_dir(Path(args.out), f"{datetime.date.today()}-{_slug(name)}-gpu-check")
    plan = _plan(args, tiers, out_dir)
    if args.dry_run or not (torch.cuda.is_available() or args.cpu):
        _print_plan(plan, out_dir, "dry run" if args.dry_run else "no CUDA device here: dry run")
        return 0

    out_dir.mkdir(parents=True)
    environment = {**os.environ, "PYTHONPATH": _pythonpath()}
    print(f"gpu_check on {name}: writing {out_dir}", flush=True)
    verdict, failed, resumed = "not run (tier 1 not asked for)", [], None
    measured: dict[str, float] = {}
    for entry in plan:
        began = time.perf_counter()
        if entry.name == TESTS:
            verdict, outcome = _run_tests(entry.command, out_dir, environment)
            failed += [] if outcome == 0 else [TESTS]
            outcome_text = verdict
        elif entry.name == RESUME:
            env = {**environment, **DETERMINISTIC_CUBLAS}
            resumed = stop_and_resume(entry.command, _stop_at(entry), out_dir / RESUME, env)
            failed += [f"{RESUME} ({', '.join(resumed.different)})"] if resumed.different else []
            outcome_text = ", ".join(resumed.different) or "equal"
        else:
            done = subprocess.run(entry.command, cwd=REPO, env=environment, check=False)
            failed += [f"run {entry.name}"] if done.returncode else []
            outcome_text = f"exit status {done.returncode}"
        measured[entry.name] = time.perf_counter() - began
        print(
            f"{entry.name}: {outcome_text}, {measured[entry.name]:.0f} s "
            f"(estimated {entry.estimate_s:.0f} s on one H100)",
            flush=True,
        )
    times = [(e.name, e.tier, e.steps, e.estimate_s, measured.get(e.name)) for e in plan]
    finished = [out_dir / e.name for e in plan if (out_dir / e.name / RESULTS).is_file()]
    loaded = [loading.load_results(d) for d in finished]
    searched = out_dir / FIND_BATCH / SWEEP
    search = json.loads(searched.read_text()) if searched.is_file() else None
    text = summary(name, loaded, verdict, failed, argv, resumed, times, search)
    write_text_atomic(out_dir / "README.md", text)
    print(text)
    for tier, estimated, took in tier_totals(times):
        print(f"tier {tier}: {took:.0f} s measured, {estimated:.0f} s estimated on one H100")
    print(f"gpu_check: {time.perf_counter() - started:.0f} s in all; {out_dir / 'README.md'}")
    return 1 if failed else 0


def _tiers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[int]:
    """The tiers asked for: --tier's, else all when --runs names the runs, else tier 1. With
    both, a run named outside the tier is refused: the two say different things."""
    known = [*KNOWN_RUNS, *PAIRS_AND_SWEEPS]
    unknown = sorted(set(args.runs or ()) - set(known))
    if unknown:
        parser.error(f"--runs {', '.join(unknown)}: choose from {', '.join(known)}")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps >= 1")
    tier = args.tier or ("all" if args.runs else "1")
    tiers = {1, 2} if tier == "all" else {int(tier)}
    outside = [run for run in args.runs or () if tier_of(run) not in tiers]
    if outside:
        parser.error(
            f"--runs {', '.join(outside)}: not in tier {tier} but in tier 2; "
            "name --tier 2 or --tier all, or leave --tier out to run them by name"
        )
    return tiers


def _plan(args: argparse.Namespace, tiers: set[int], out_dir: Path) -> list[Planned]:
    """What the check runs, in order: the tests (with tier 1), then the runs of the tiers asked
    for (tier 1's first, as the short answers) or those --runs names, in its order."""
    overrides = ["device=cpu", *args.overrides] if args.cpu else args.overrides
    default = [n for n in (*TIER_1, *RUNS) if n != TESTS and tier_of(n) in tiers]
    names = list(dict.fromkeys(args.runs or default))
    plan = []
    if 1 in tiers:
        tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        tests += [str(path) for path in _files_with_gpu_tests()]
        plan.append(Planned(TESTS, 1, None, estimate_s(TESTS, (), 0), tests))
    for name in names:
        steps = args.steps or TIER_STEPS[tier_of(name)]
        if name == RESUME:
            steps, settings = min(steps, RESUME_STEPS), RESUME_SETTINGS
            command = _run_args((*settings, f"max_steps={steps}"), overrides)
        elif name == FIND_BATCH:
            steps, settings = args.steps or FIND_BATCH_STEPS, FIND_BATCH_SETTINGS
            command = _find_batch_command(steps, out_dir / name, overrides)
        else:
            settings = KNOWN_RUNS[name]
            command = _run_command(settings, steps, out_dir / name, overrides)
        estimate = estimate_s(name, settings, steps)
        plan.append(Planned(name, tier_of(name), steps, estimate, command))
    return plan


def _print_plan(plan: list[Planned], out_dir: Path, why: str) -> None:
    """Each tier's entries with their estimates and commands, and the tier's estimated total."""
    print(f"gpu_check ({why}); it would run, writing {out_dir}:")
    for tier in sorted({entry.tier for entry in plan}):
        print(f"tier {tier}:")
        for entry in (e for e in plan if e.tier == tier):
            if entry.name == RESUME:
                command = f"resume_check.py --stop-at {_stop_at(entry)} -- "
                command += shlex.join(entry.command)
            else:
                command = shlex.join(entry.command)
            print(f"  {entry.name}: {entry.estimate_s / 60:.1f} min: {command}")
        total = sum(e.estimate_s for e in plan if e.tier == tier)
        print(f"tier {tier} in all: {total / 60:.1f} min estimated on one H100")


def _stop_at(entry: Planned) -> int:
    """The step after which the resume pair's second run is stopped: halfway."""
    return (entry.steps or RESUME_STEPS) // 2


def _run_tests(command: list[str], out_dir: Path, environment: dict[str, str]) -> tuple[str, int]:
    """The tests marked gpu, their log into out_dir: pytest's verdict and exit status."""
    tested = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, check=False
    )
    (out_dir / "gpu_tests.log").write_text(tested.stdout + tested.stderr, encoding="utf-8")
    return _pytest_verdict(tested.stdout), tested.returncode


def summary(
    device: str,
    runs: list[dict],
    verdict: str,
    failed: list[str],
    argv: list[str] | None,
    resumed: ResumeCheck | None = None,
    times: list[tuple[str, int, int | None, float, float | None]] | None = None,
    search: dict | None = None,
) -> str:
    """The results folder's README: what ran, the seed's table of the runs, the columns a
    throughput check adds (p_core_steady, MFU, the float32 math in force, how the step ran), and
    each run's measured wall time beside its estimate (the figures gpu_tiers.py's are to become)."""
    command = "python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# GPU check on {device}, {datetime.date.today()}",
        "",
        f"Produced by `{command.strip()}` (torch {torch.__version__}, CUDA runtime "
        f"{torch.version.cuda}); every number below is read from the runs' results.json.",
        "",
        f"- tests marked gpu: {verdict} (log: gpu_tests.log)",
        f"- failed: {', '.join(failed)}" if failed else "- failed: nothing",
        "",
    ]
    if runs:
        steps = " or ".join(str(n) for n in sorted({r["metrics"]["steps"] for r in runs}))
        lines += [
            f"Throughput mode of preset {PRESET} (`retinaperf run --preset {PRESET} --synthetic`),"
            f" {steps} steps per run (each run's in the time table below):",
            "",
            comparison.render_comparison(comparison.compare(runs), "md"),
            "",
            tables.format_table([_extra_row(r) for r in runs], EXTRA_COLUMNS),
        ]
    if resumed is not None:
        verdict = "equal" if not resumed.different else "DIFFERENT: " + ", ".join(resumed.different)
        lines += [
            "",
            f"Stopped by SIGTERM at step {resumed.cut['segments'][0]['end_step']} and resumed "
            f"(`{RESUME}`: {', '.join(RESUME_SETTINGS)}), against the same run left alone: "
            f"{verdict}.",
            "",
            resumed.table(),
        ]
    if search is not None:
        lines += ["", _search_line(search)]
    if times:
        lines += [
            "",
            "Wall time of each run on this device (the run's process or processes, start to end),"
            " beside its estimate on one H100 (benchmarks/gpu_tiers.py):",
            "",
            time_table(times),
        ]
    return "\n".join(lines) + "\n"


EXTRA_COLUMNS = (
    "run",
    "precision",
    "step",
    "p_core",
    "p_core_steady",
    "TFLOP/s",
    "MFU",
    "GPU util",
    "device busy",
    "bound by",
    "batch shapes",
    "float32 math",
    "mem",
    "img/J",
    "energy",
)


def _extra_row(results: dict) -> dict[str, str]:
    m = results["metrics"]
    steady = m["p_core_steady"]
    impl = m["implementation"]
    per_joule = m["images_per_joule"]
    utilisation = [d["util_mean"] for d in (results["monitor"] or {}).get("devices", [])]
    utilisation = [u for u in utilisation if u is not None]
    busy = _device_busy(Path(results["run_dir"]))
    compiled = impl["compile_mode"] or "off"
    return {
        "run": Path(results["run_dir"]).name,
        "precision": m["precision"],
        "step": f"transform {impl['transform']}, reuse constants "
        f"{'on' if impl['reuse_constants'] else 'off'}, loss {impl['loss']}, postprocess "
        f"{impl['postprocess']}, channels-last {'on' if impl['channels_last'] else 'off'}, "
        f"cudnn.benchmark {'on' if m['math']['cudnn_benchmark'] else 'off'}, compile {compiled}",
        "p_core": significant(m["p_core"]),
        "p_core_steady": NO_VALUE if steady is None else significant(steady),
        "TFLOP/s": significant(m["achieved_tflops"]),
        "MFU": NO_VALUE if m["mfu"] is None else f"{100 * m['mfu']:.1f}% of {m['peak_math']}",
        # NVML's utilisation: the share of sample periods in which a kernel ran (monitor mean)
        "GPU util": f"{max(utilisation):.1f}%" if utilisation else NO_VALUE,
        "device busy": NO_VALUE if busy is None else f"{100 * busy:.1f}% of steps {PROFILED}",
        # where the training time went (docs/metrics.md): the verdict and its evidence
        "bound by": _bound_by(m["breakdown"]),
        "batch shapes": str(m["batch_shapes"]),
        "float32 math": f"conv {m['math']['effective_conv']}, matmul "
        f"{m['math']['effective_matmul']}",
        "mem": m["mem"],
        "img/J": NO_VALUE if per_joule is None else significant(per_joule),
        "energy": m["energy_source"] or m["energy_note"],
    }


def _search_line(search: dict) -> str:
    """What the find-batch sweep (sweep.json) found: the bracket of the largest batch."""
    (group,) = search["groups"]
    device = group["out_of_memory_device_gib"]
    above = NO_VALUE if group["out_of_memory_at"] is None else str(group["out_of_memory_at"])
    above += "" if device is None else f" (of {device:.1f} GiB)"
    tried = ", ".join(str(p["batch_size"]) for p in search["points"])
    return (
        f"`sweep --find-batch` in bf16 ({FIND_BATCH}/report.md), batches tried {tried} (at most "
        f"{search['max_trials'] or 'any number'}): largest that fits "
        f"{group['largest_fit'] or NO_VALUE}, out of memory at {above}."
    )


def _bound_by(breakdown: dict | None) -> str:
    if breakdown is None or breakdown["bound_by"] is None:
        return NO_VALUE
    return f"{breakdown['bound_by']}: {breakdown['evidence']}"


def _device_busy(run_dir: Path) -> float | None:
    """The profiled window's device busy share, from the run's event log (profiled runs only)."""
    profiles = [e for e in read_events(run_dir / EVENTS) if e["event"] == "profile"]
    return profiles[-1].get("device_busy") if profiles else None


def _run_command(
    settings: tuple[str, ...], steps: int, run_dir: Path, overrides: list[str]
) -> list[str]:
    run_args = _run_args((*settings, f"max_steps={steps}"), [*overrides, f"output_dir={run_dir}"])
    return [sys.executable, "-m", "retinaperf", "run", *run_args]


def _find_batch_command(steps: int, sweep_dir: Path, overrides: list[str]) -> list[str]:
    """`retinaperf sweep --find-batch`: the preset's throughput mode in bf16, each point `steps`
    steps, from FIND_BATCH_START (a batch in `overrides` wins) for FIND_BATCH_TRIALS batches."""
    given = {bare_key(pair) for pair in overrides}
    start = () if "batch_size" in given else (f"batch_size={FIND_BATCH_START}",)
    sweep_args = _run_args((*FIND_BATCH_SETTINGS, *start, f"max_steps={steps}"), overrides)
    search = [
        "--find-batch",
        "--max-trials",
        str(FIND_BATCH_TRIALS),
        "--output-dir",
        str(sweep_dir),
    ]
    return [sys.executable, "-m", "retinaperf", "sweep", *sweep_args, *search]


def _run_args(settings: tuple[str, ...], overrides: list[str]) -> list[str]:
    """`retinaperf run` arguments: the preset's throughput mode with these settings."""
    args = ["--preset", PRESET, "--synthetic"]
    for pair in (*settings, *overrides):
        args += ["--set", pair]
    return args


def _files_with_gpu_tests() -> list[Path]:
    """The test files that hold tests marked gpu: collecting only these keeps the check free of
    the other tests' dependencies (pycocotools, say), which a GPU machine may lack."""
    return sorted(
        path
        for path in (REPO / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in path.read_text(encoding="utf-8")
    )


def _pytest_verdict(output: str) -> str:
    """pytest's last summary line ('12 passed, 1 skipped in 30.1s'), without its decoration."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\b(passed|failed|error|skipped|deselected)\b", line):
            return line.strip("= ").strip()
    return "no summary (see gpu_tests.log)"


def _new_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... when a check already ran today."""
    candidate, suffix = parent / name, 2
    while candidate.exists():
        candidate, suffix = parent / f"{name}-{suffix}", suffix + 1
    return candidate


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _pythonpath() -> str:
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(REPO / "src"), *([inherited] if inherited else [])])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tier",
        choices=("1", "2", "all"),
        help="1: the main questions, about 5 minutes of one H100; 2: every other run; "
        "all (default: 1, or all with --runs)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"steps per run (default: {TIER_STEPS[1]} in tier 1, {TIER_STEPS[2]} in tier 2; "
        f"{RESUME} at most {RESUME_STEPS}; {FIND_BATCH} {FIND_BATCH_STEPS} a point)",
    )
    parser.add_argument(
        "--runs",
        type=lambda text: [name for name in text.split(",") if name],
        help=f"comma-separated run names: a precision or one of "
        f"{', '.join([*RUNS, *PAIRS_AND_SWEEPS])} "
        "(default: every run of the tiers asked for)",
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "results"), help="parent folder")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a configuration key for every run (e.g. num_workers=8)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (slow; to try it)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
