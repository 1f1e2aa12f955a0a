"""The command line: subcommands, and bad input -> one clear line, exit 1, nothing half-written."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from retinaperf import cli


def fails_cleanly(args: list[str], capsys, *needles: str) -> str:
    """Run the CLI; assert exit 1 and a single stderr line naming every needle; return it."""
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("retinaperf: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def keep_warning_display():
    import warnings

    saved = warnings.showwarning
    yield
    warnings.showwarning = saved


def test_unknown_preset(capsys, tmp_path):
    out = tmp_path / "run"
    fails_cleanly(["run", "--preset", "H100-9x9", "--output-dir", str(out)], capsys, "H100-9x9")
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "needle"),
    [("no_such_key=1", "no_such_key"), ("batch_size=many", "batch_size"), ("lr", "lr")],
)
def test_bad_settings(setting, needle, capsys, tmp_path):
    out = tmp_path / "run"
    fails_cleanly(["run", "--output-dir", str(out), "--set", setting], capsys, needle)
    assert not out.exists()


def test_missing_data_dir(tiny_run_args, capsys, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere"
    args = tiny_run_args(missing, out)
    fails_cleanly(args, capsys, str(missing))
    assert not out.exists()


def test_empty_data_dir(tiny_run_args, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    fails_cleanly(tiny_run_args(empty, out), capsys, "instances_train2017.json")
    assert not out.exists()


def test_output_dir_that_holds_files_is_left_alone(tiny_run_args, tiny_dataset, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    fails_cleanly(tiny_run_args(tiny_dataset, out), capsys, str(out))
    assert (out / "results.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_corrupt_jpeg_stops_the_run_naming_the_file(tiny_run_args, tiny_dataset, capsys, tmp_path):
    data = tmp_path / "coco"
    shutil.copytree(tiny_dataset, data)
    for victim in (data / "train2017").iterdir():
        victim.write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "run"
    line = fails_cleanly(tiny_run_args(data, out), capsys, "train2017")
    assert ".jpg" in line
    assert not (out / "results.json").exists()


def test_weights_with_a_wrong_hash(tiny_run_args, tiny_dataset, capsys, tmp_path):
    bad = tmp_path / "resnet50-0676ba61.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    assert not hashlib.sha256(bad.read_bytes()).hexdigest().startswith("0676ba61")
    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, "--backbone-weights", str(bad))
    fails_cleanly(args, capsys, "0676ba61", str(bad))
    assert not out.exists()


def test_preset_that_does_not_fit_the_job(tiny_run_args, tiny_dataset, capsys, tmp_path):
    args = tiny_run_args(tiny_dataset, tmp_path / "run", "--preset", "A100-1x8")
    fails_cleanly(args, capsys, "A100-1x8", "--nproc-per-node 8")


def test_presets_lists_the_shipped_presets_with_their_purpose(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("smoke", "A100-1x1", "A100-1x8", "A100-2x8"):
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert "lr 0.08" in out


def test_presets_keys_lists_settable_keys_with_default_type_and_help(capsys):
    assert cli.main(["presets", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # `KEY=DEFAULT  (TYPE)`, a line each, followed by the help indented
    keys = {line.partition("=")[0]: line for line in lines if not line.startswith(" ")}
    for key in ("train.batch_size", "train.lr", "train.precision", "train.max_steps", "device"):
        assert key in keys
    assert (
        keys["train.precision"]
        == "train.precision=fp32  (auto|fp32|fp32-strict|tf32|amp|bf16|fp16)"
    )
    assert keys["train.lr_steps"] == "train.lr_steps=16,22  (integers)"
    help_of_lr = lines[lines.index(keys["train.lr"]) + 1]
    assert help_of_lr == "    Peak learning rate after warm-up."
    assert all(len(line) <= 100 for line in lines if line.startswith(" "))  # help is wrapped


def test_synth_command_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["synth", "--out", str(out), "--train-images", "3", "--val-images", "2"]
    assert cli.main([*args, "--image-size", "40"]) == 0
    assert len(list((out / "train2017").iterdir())) == 3
    assert len(list((out / "val2017").iterdir())) == 2
    fails_cleanly(["synth", "--out", str(out)], capsys, str(out))


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "retinaperf", "presets"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "smoke" in done.stdout


def test_workers_started_by_the_shortcut_count_e2e_from_the_launcher(monkeypatch):
    import time

    monkeypatch.setenv(cli.START_ENV, repr(time.time() - 5.0))
    assert time.perf_counter() - cli._command_start() == pytest.approx(5.0, abs=0.5)
    monkeypatch.delenv(cli.START_ENV)
    assert cli._command_start() == cli.COMMAND_START


def test_nproc_per_node_checks_settings_before_starting_anything(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--nproc-per-node", "2", "--output-dir", str(out), "--set", "bogus=1"]
    fails_cleanly(args, capsys, "bogus")
    assert not out.exists()


def test_corrupt_jpeg_found_during_training_fails_the_run_in_its_results(
    tiny_run_args, tiny_dataset, capsys, tmp_path
):
    data = tmp_path / "coco"
    shutil.copytree(tiny_dataset, data)
    victim = sorted((data / "val2017").iterdir())[0]  # read at the first evaluation
    victim.write_bytes(victim.read_bytes()[:200])
    out = tmp_path / "run"
    line = fails_cleanly(tiny_run_args(data, out), capsys, victim.name)
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and victim.name in results["reason"]
    assert results["metrics"]["steps"] == 2 and results["metrics"]["mAP"] is None
    assert "cannot read image" in line
