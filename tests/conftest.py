"""Shared fixtures: a tiny generated dataset, the settings of a fast CPU run, and one run of it."""

import json
from pathlib import Path

import pytest
import torch

from retinaperf.data.synth import SynthSpec, generate

# Fixtures that run the benchmark: a test that uses one is an integration test.
RUNS = {"tiny_run_args", "one_run", "uninterrupted"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that run the benchmark are marked `integration`; tests marked `gpu` need a CUDA
    device: skipped, saying so, where there is none."""
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.py runs it)")
    for item in items:
        if RUNS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training and 8 validation images of 64 px, generated once per test session."""
    root = tmp_path_factory.mktemp("data") / "coco"
    return generate(SynthSpec(seed=3, train_images=24, val_images=8, image_size=64), root)


def _tiny_run_args(data_dir: Path, out: Path, *flags: str, **overrides: object) -> list[str]:
    """`retinaperf run` arguments for a run of a few seconds: 64 px, batch 2, fp32, no workers;
    `overrides` replace or add `--set` keys, `flags` are passed as they are."""
    settings = {
        "min_size": 64,
        "max_size": 86,
        "batch_size": 2,
        "eval_batch_size": 4,
        "precision": "fp32",
        "num_workers": 0,
        "log_every": 1,
        "epochs": 1,
        "max_steps": 2,
        **overrides,
    }
    args = ["run", "--data-dir", str(data_dir), "--output-dir", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args + list(flags)


@pytest.fixture(scope="session")
def tiny_run_args():
    """Builds `retinaperf run` arguments: tiny_run_args(data_dir, out, *flags, **settings)."""
    return _tiny_run_args


@pytest.fixture(scope="session")
def one_run(tiny_run_args, tiny_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """One run of 3 steps with TensorBoard on, shared by the tests of what a run writes
    (test_train.py, test_mlperf.py): its directory and its results."""
    from cli_helpers import run_cli  # imports the trainer: only where a run is wanted

    out = tmp_path_factory.mktemp("one") / "run"
    assert run_cli(tiny_run_args(tiny_dataset, out, max_steps=3, tensorboard="true")) == 0
    return out, json.loads((out / "results.json").read_text())
