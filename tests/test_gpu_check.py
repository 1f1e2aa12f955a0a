"""benchmarks/gpu_check.py on a machine without CUDA: its dry run, and its whole pipeline on the
CPU at toy sizes (the tests marked gpu skip; two precisions; the generated summary)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs the check's script in subprocesses

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # No GPU for this process even where the machine has one: the dry run is what is tested.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_without_cuda_it_prints_what_it_would_run_and_exits_0(tmp_path):
    done = gpu_check("--tier", "all", "--out", str(tmp_path / "results"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "no CUDA device here: dry run" in lines[0]
    (tests,) = [line for line in lines if "-m pytest -m gpu" in line]
    for name in ("test_precision.py", "test_devices_nvidia.py", "test_distributed.py"):
        assert name in tests  # the files that hold tests marked gpu, and only those
    assert "test_evaluate.py" not in tests and "test_monitor.py" not in tests
    runs = [line for line in lines if "-m retinaperf run --preset A100-1x1 --synthetic" in line]
    names = [r.split("output_dir=")[1].split("/")[-1] for r in runs]
    tier_1 = ["fp32", "bf16", "bf16-torchvision", "bf16-cudagraphs"]
    tier_2 = ["bf16-nchw", "bf16-cudnn-benchmark", "bf16-profile", "bf16-compile", "amp"]
    assert names == [*tier_1, *tier_2, "fp32-strict"]  # the short answers first, the slowest last
    steps = load("gpu_tiers").TIER_STEPS
    assert all(f"max_steps={steps[1]}" in runs[names.index(name)] for name in tier_1)
    assert all("max_steps=100" in runs[names.index(name)] for name in [*tier_2, "fp32-strict"])
    reference = runs[names.index("bf16-torchvision")]
    for setting in ("transform", "loss", "postprocess"):
        assert f"{setting}=torchvision" in reference
    assert "reuse_constants=false" in reference
    assert "cudnn_benchmark=on" in runs[names.index("bf16-cudnn-benchmark")]
    assert "profile_steps=" in runs[names.index("bf16-profile")]
    assert "compile=true" in runs[names.index("bf16-compile")]
    assert "compile_mode=reduce-overhead" in runs[names.index("bf16-cudagraphs")]
    # The stop-and-resume pair: halfway through 20 steps, deterministic kernels, every step logged
    (resume,) = [line for line in lines if line.strip().startswith("bf16-resume:")]
    assert "--stop-at 10" in resume and "--set max_steps=20" in resume
    assert "--set deterministic=true" in resume and "--set log_every=1" in resume
    # The short search: bf16 from batch 32, two batches at most, into its own folder
    (search,) = [line for line in lines if line.strip().startswith("bf16-find-batch:")]
    assert "-m retinaperf sweep --preset A100-1x1 --synthetic --set precision=bf16" in search
    assert "--set batch_size=32" in search and "--find-batch --max-trials 2" in search
    assert search.endswith("/bf16-find-batch")
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def load(name: str):
    """A script of benchmarks/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tier_totals_printed(stdout: str) -> dict[str, float]:
    """{tier: estimated minutes} from a dry run's 'tier N in all: X min estimated' lines."""
    found = re.findall(r"^tier (\d) in all: ([\d.]+) min estimated", stdout, re.MULTILINE)
    return {tier: float(minutes) for tier, minutes in found}


def test_tier_1_is_the_default_and_its_own_estimate_is_at_most_5_minutes(tmp_path):
    tiers = load("gpu_tiers")
    # name -> (settings, steps) of each entry that is not one run
    entries = {
        tiers.RESUME: (tiers.RESUME_SETTINGS, min(tiers.TIER_STEPS[1], tiers.RESUME_STEPS)),
        tiers.FIND_BATCH: (tiers.FIND_BATCH_SETTINGS, tiers.FIND_BATCH_STEPS),
    }
    estimated = sum(
        tiers.estimate_s(name, *entries.get(name, (tiers.RUNS.get(name, ()), tiers.TIER_STEPS[1])))
        for name in tiers.TIER_1
    )
    assert estimated <= tiers.TIER_1_MAX_S == 5 * 60
    done = gpu_check("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert tier_totals_printed(done.stdout) == {"1": pytest.approx(estimated / 60, abs=0.05)}
    listed = [line.split(":")[0].strip() for line in done.stdout.splitlines() if " min: " in line]
    assert listed == list(tiers.TIER_1)  # the tests, then the runs; tier 2 not run by default


def test_every_run_of_the_check_is_in_exactly_one_tier(tmp_path):
    tiers = load("gpu_tiers")
    everything = [tiers.TESTS, *tiers.RUNS, tiers.RESUME, tiers.FIND_BATCH]
    assert set(tiers.TIER_1) <= set(everything)
    assert all(tiers.tier_of(name) in (1, 2) for name in everything)
    done = gpu_check("--dry-run", "--tier", "all", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert set(tier_totals_printed(done.stdout)) == {"1", "2"}
    listed = [line.split(":")[0].strip() for line in done.stdout.splitlines() if " min: " in line]
    assert sorted(listed) == sorted(everything)  # each once
    tier_2 = done.stdout.split("\ntier 2:\n")[1]
    assert all((f"  {name}: " in tier_2) == (tiers.tier_of(name) == 2) for name in everything)


def test_a_run_outside_the_tier_asked_for_is_refused_and_runs_alone_picks_from_any_tier(
    tmp_path,
):
    refused = gpu_check("--dry-run", "--tier", "1", "--runs", "bf16,amp", "--out", str(tmp_path))
    assert refused.returncode == 2
    assert "--runs amp: not in tier 1 but in tier 2" in refused.stderr
    alone = gpu_check("--dry-run", "--runs", "amp", "--out", str(tmp_path))
    assert alone.returncode == 0, alone.stderr
    assert "  amp: " in alone.stdout and "max_steps=100" in alone.stdout
    assert "-m pytest -m gpu" in alone.stdout  # --runs alone, as before tiers: tests included
    second = gpu_check("--dry-run", "--tier", "2", "--runs", "amp", "--out", str(tmp_path))
    assert second.returncode == 0 and "-m pytest -m gpu" not in second.stdout


def test_bad_arguments_are_refused():
    assert gpu_check("--runs", "fp64").returncode == 2
    assert gpu_check("--steps", "0").returncode == 2


def test_the_whole_check_on_the_cpu_writes_runs_and_a_generated_summary(tmp_path):
    tiny = {
        "min_size": 64,
        "max_size": 86,
        "synth_image_size": 96,
        "synth_train_images": 8,
        "synth_val_images": 2,
        "batch_size": 2,
        "eval_batch_size": 2,
        "num_workers": 0,
        "timing_warmup_steps": 1,
        "monitor_interval": 0,
        "cache_dir": tmp_path / "cache",
    }
    sets = [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")]
    out = tmp_path / "results"
    done = gpu_check(
        "--cpu",
        "--steps",
        "2",
        "--runs",
        "fp32,bf16-torchvision,bf16-find-batch",
        "--out",
        str(out),
        *sets,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (folder,) = out.iterdir()
    assert folder.name.endswith("-cpu-gpu-check")
    for name in ("fp32", "bf16-torchvision"):
        assert (folder / name / "results.json").is_file()
    log = (folder / "gpu_tests.log").read_text()
    assert "skipped" in log  # no CUDA: every test marked gpu skips, saying why
    readme = (folder / "README.md").read_text()
    assert "python benchmarks/gpu_check.py --cpu --steps 2" in readme
    assert "tests marked gpu:" in readme and "failed: nothing" in readme
    lines = readme.splitlines()
    header = next(line for line in lines if line.startswith("| run |")).split("|")
    rows = [line.split("|") for line in lines if line.startswith("| ") and "bs=2" in line]
    precision = header.index(" precision ")
    assert [row[precision].strip() for row in rows] == ["fp32", "bf16"]
    assert (
        "| bf16-torchvision | bf16 | transform torchvision, reuse constants off, loss torchvision, "
        "postprocess torchvision" in readme
    )
    assert "conv ieee, matmul ieee" in readme
    # The search from the batch --set gives (2; 32 on a GPU), two batches, both fitting here
    points = json.loads((folder / "bf16-find-batch" / "sweep.json").read_text())["points"]
    assert [(p["batch_size"], p["status"]) for p in points] == [(2, "completed"), (4, "completed")]
    assert (
        "`sweep --find-batch` in bf16 (bf16-find-batch/report.md), batches tried 2, 4 (at most 2):"
        " largest that fits 4, out of memory at –." in readme
    )
    # Each run's measured wall time beside its estimate, and the tiers' totals
    (fp32,) = [line.split("|") for line in lines if line.startswith("| fp32 | 1 | 2 |")]
    assert float(fp32[4]) > 0 and float(fp32[5]) > 0  # estimated, measured seconds
    assert any(line.startswith("| tier 1, in all | 1 |") for line in lines)
    assert re.search(r"^fp32: exit status 0, \d+ s \(estimated \d+ s", done.stdout, re.MULTILINE)
    assert re.search(r"^tier 1: \d+ s measured, \d+ s estimated", done.stdout, re.MULTILINE)


def test_dry_run_runs_nothing_even_when_asked_for_the_cpu(tmp_path):
    done = gpu_check("--cpu", "--dry-run", "--out", str(tmp_path / "results"))
    assert done.returncode == 0 and "dry run" in done.stdout
    assert not (tmp_path / "results").exists()


def test_the_resume_pair_is_equal_only_with_equal_counts_segments_and_first_resumed_loss():
    resume_check = load("resume_check")
    metrics = dict.fromkeys(resume_check.SHOWN, 1.0) | {"time_between_segments": 2.0}
    whole = {"status": "completed", "metrics": metrics, "segments": [{}]}
    cut = {
        "status": "completed",
        "metrics": metrics,
        "segments": [
            {"ended": "interrupted", "end_step": 20},
            {"ended": "completed", "end_step": 40},
        ],
    }
    check = resume_check.ResumeCheck(whole, cut, 143, 0, 21, (0.5, 0.5))
    assert check.different == []
    assert "| loss at step 21 (the first after the stop) | 0.5 | 0.5 |" in check.table()
    assert resume_check.ResumeCheck(whole, cut, 143, 0, 21, (0.5, 0.51)).different == [
        "loss at step 21"
    ]
    fewer = {**cut, "metrics": {**metrics, "trained_images": 2.0}}
    assert resume_check.ResumeCheck(whole, fewer, 143, 0, 21, (0.5, 0.5)).different == [
        "trained_images"
    ]
