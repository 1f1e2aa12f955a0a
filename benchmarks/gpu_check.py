"""One command that checks a CUDA GPU: the tests marked `gpu`, then the throughput mode of the
A100-1x1 preset (its batch, lr and 800x1333 resize, on generated COCO-like data) in several
precisions, and in bf16 with torchvision's code for every part of the step (the reference),
without channels-last, with cuDNN's benchmark mode, with a profiler window (top operators, how
much of the window the device was busy), with torch.compile and with torch.compile replaying
CUDA graphs: what each choice of the step is worth there. Writes
docs/results/<date>-<device>-gpu-check/: each run's directory, the tests' log and a README.md
with the generated summary table and the command that produced it.

    python benchmarks/gpu_check.py                       # after `make` (or: make gpu-check)
    PYTHONPATH=src python3 benchmarks/gpu_check.py       # a GPU machine's own torch, no install
    python benchmarks/gpu_check.py --dry-run             # print what it would run

Needs no network: random weights in the pretrained structure and generated data. About 100
steps per run keeps it within 9 minutes on one H100. Without a CUDA device it prints what
it would run and exits 0 (`--cpu` runs it on the CPU anyway, slowly: to try the script).
Exit status: 0 when every test and every run succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

import torch  # noqa: E402
from resume_check import ResumeCheck, stop_and_resume  # noqa: E402

from retinaperf.config import PRECISIONS as KNOWN_PRECISIONS  # noqa: E402
from retinaperf.files import write_text_atomic  # noqa: E402
from retinaperf.report import comparison, loading, tables  # noqa: E402
from retinaperf.report.events import EVENTS, read_events  # noqa: E402
from retinaperf.report.results import RESULTS  # noqa: E402
from retinaperf.units import NO_VALUE, significant  # noqa: E402

PRESET = "A100-1x1"
PROFILED = "40:45"  # the steps bf16-profile records: after the warm-up, before the end
# name -> settings of each run, in the order they run. fp32-strict last: the slowest, so a check
# cut short by its time limit loses the least.
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
    "bf16-nchw": ("precision=bf16", "channels_last=off"),
    "bf16-cudnn-benchmark": ("precision=bf16", "cudnn_benchmark=on"),
    "bf16-profile": ("precision=bf16", f"profile_steps={PROFILED}"),
    "bf16-compile": ("precision=bf16", "compile=true"),
    "bf16-cudagraphs": ("precision=bf16", "compile=true", "compile_mode=reduce-overhead"),
    "amp": ("precision=amp",),
    "fp32-strict": ("precision=fp32-strict",),
}
# Any precision can be asked for by name, as a run of that precision alone.
KNOWN_RUNS = {**{p: (f"precision={p}",) for p in KNOWN_PRECISIONS}, **RUNS}
# Not a run but a pair: bf16 stopped by SIGTERM halfway and resumed, against the same left alone
# (resume_check.py), with deterministic kernels so that the first resumed step's loss can be
# compared bit for bit (cuBLAS needs a fixed workspace for that).
RESUME = "bf16-resume"
RESUME_SETTINGS = ("precision=bf16", "deterministic=true", "log_every=1")
RESUME_STEPS = 40
DETERMINISTIC_CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.runs) - {*KNOWN_RUNS, RESUME})
    if unknown or args.steps < 1:
        choices = ", ".join([*KNOWN_RUNS, RESUME])
        parser.error(f"--runs: choose from {choices}" if unknown else "--steps >= 1")
    started = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else device
    out_dir = _new_dir(Path(args.out), f"{datetime.date.today()}-{_slug(name)}-gpu-check")
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    tests += [str(path) for path in _files_with_gpu_tests()]
    overrides = ["device=cpu", *args.overrides] if args.cpu else args.overrides
    runs = {
        name: _run_command(KNOWN_RUNS[name], args.steps, out_dir / name, overrides)
        for name in args.runs
        if name != RESUME
    }
    steps = min(args.steps, RESUME_STEPS)
    resume_args = _run_args((*RESUME_SETTINGS, f"max_steps={steps}"), overrides)
    if args.dry_run or not (torch.cuda.is_available() or args.cpu):
        why = "dry run" if args.dry_run else "no CUDA device here: dry run"
        print(f"gpu_check ({why}); it would run, writing {out_dir}:")
        for command in (tests, *runs.values()):
            print("  " + shlex.join(command))
        if RESUME in args.runs:
            print(
                f"  {RESUME}: resume_check.py --stop-at {steps // 2} -- {shlex.join(resume_args)}"
            )
        return 0

    out_dir.mkdir(parents=True)
    environment = {**os.environ, "PYTHONPATH": _pythonpath()}
    print(f"gpu_check on {name}: writing {out_dir}", flush=True)
    tested = subprocess.run(
        tests, cwd=REPO, env=environment, capture_output=True, text=True, check=False
    )
    (out_dir / "gpu_tests.log").write_text(tested.stdout + tested.stderr, encoding="utf-8")
    verdict = _pytest_verdict(tested.stdout)
    print(f"tests marked gpu: {verdict} ({time.perf_counter() - started:.0f} s)", flush=True)
    failed = [] if tested.returncode == 0 else ["tests marked gpu"]
    for run_name, command in runs.items():
        done = subprocess.run(command, cwd=REPO, env=environment, check=False)
        print(f"{run_name}: exit status {done.returncode} ({time.perf_counter() - started:.0f} s)")
        if done.returncode != 0:
            failed.append(f"run {run_name}")
    resumed = None
    if RESUME in args.runs:
        resumed = stop_and_resume(
            resume_args, steps // 2, out_dir / RESUME, {**environment, **DETERMINISTIC_CUBLAS}
        )
        print(f"{RESUME}: {resumed.different or 'equal'} ({time.perf_counter() - started:.0f} s)")
        if resumed.different:
            failed.append(f"{RESUME} ({', '.join(resumed.different)})")
    finished = [out_dir / p for p in runs if (out_dir / p / RESULTS).is_file()]
    loaded = [loading.load_results(d) for d in finished]
    text = summary(name, loaded, verdict, failed, argv, resumed)
    write_text_atomic(out_dir / "README.md", text)
    print(text)
    print(f"gpu_check: {time.perf_counter() - started:.0f} s in all; {out_dir / 'README.md'}")
    return 1 if failed else 0


def summary(
    device: str,
    runs: list[dict],
    verdict: str,
    failed: list[str],
    argv: list[str] | None,
    resumed: ResumeCheck | None = None,
) -> str:
    """The results folder's README: what ran, the seed's table of the runs, and the columns a
    throughput check adds (p_core_steady, MFU, the float32 math in force, how the step ran)."""
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
        steps = runs[0]["metrics"]["steps"]
        lines += [
            f"Throughput mode of preset {PRESET} (`retinaperf run --preset {PRESET} --synthetic`),"
            f" {steps} steps per run:",
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
        "batch shapes": str(m["batch_shapes"]),
        "float32 math": f"conv {m['math']['effective_conv']}, matmul "
        f"{m['math']['effective_matmul']}",
        "mem": m["mem"],
        "img/J": NO_VALUE if per_joule is None else significant(per_joule),
        "energy": m["energy_source"] or m["energy_note"],
    }


def _device_busy(run_dir: Path) -> float | None:
    """The profiled window's device busy share, from the run's event log (profiled runs only)."""
    profiles = [e for e in read_events(run_dir / EVENTS) if e["event"] == "profile"]
    return profiles[-1].get("device_busy") if profiles else None


def _run_command(
    settings: tuple[str, ...], steps: int, run_dir: Path, overrides: list[str]
) -> list[str]:
    run_args = _run_args((*settings, f"max_steps={steps}"), [*overrides, f"output_dir={run_dir}"])
    return [sys.executable, "-m", "retinaperf", "run", *run_args]


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
    parser.add_argument("--steps", type=int, default=100, help="steps per run (default 100)")
    parser.add_argument(
        "--runs",
        type=lambda text: [name for name in text.split(",") if name],
        default=[*RUNS, RESUME],
        help=f"comma-separated run names: a precision or one of {', '.join([*RUNS, RESUME])} "
        "(default all)",
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
