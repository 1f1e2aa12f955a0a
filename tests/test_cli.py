"""The command line: subcommands, and bad input -> one clear line, exit 1, nothing half-written."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "seed" not in out and "The recipe of FlagPerf RetinaNet's A100 1x8 result" in out


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
    # what the first column is, said before it; every key's line shows its default
    assert lines[0].startswith("KEY=DEFAULT  (what it takes)")
    assert keys["output_dir"] == "output_dir=  (string)"  # an empty default, its help says why
    assert keys["train.deterministic"] == "train.deterministic=false  (true|false)"
    assert "the seed" not in " ".join(lines).lower()  # the benchmark reproduced is named


def help_of(capsys, *argv: str) -> str:
    """`retinaperf ARGV --help`, as one line whatever argparse's wrapping."""
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_synth_help_says_what_each_option_does_and_its_default(capsys):
    text = help_of(capsys, "synth")
    assert "--seed N the same seed and arguments write the same files" in text
    assert "another seed, other images (default: 0)" in text
    assert "--train-images N images in train2017/ (default: 512)" in text
    assert "--val-images N images in val2017/ (default: 96)" in text


def test_run_help_says_synthetic_takes_a_dataset_synth_wrote(capsys):
    text = help_of(capsys, "run")
    assert "With --data-dir D: on a dataset `retinaperf synth` wrote into D" in text
    assert "With `run --synthetic`: only a folder `retinaperf synth` wrote." in text  # --data-dir


@pytest.mark.parametrize("command", ["run", "synth", "evaluate", "presets"])
def test_help_speaks_of_no_seed_table(capsys, command):
    """`the seed` (the benchmark this one reproduces) meant nothing to a user: it is named."""
    assert "the seed" not in help_of(capsys, command).lower()


def test_report_help_says_what_it_takes_and_what_each_format_gives(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["report", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line, whatever the wrapping
    assert "--format {md,csv,json} md: the table" in text and "(default: md)" in text
    assert "csv, json: one row per run with ASCII keys" in text
    assert "the folder of a `run --repeat`" in text and "the seed" not in text


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


def test_messages_name_the_command_the_way_this_process_was_started(tmp_path, monkeypatch):
    """After `make run` the script is `.venv/bin/retinaperf`, not on PATH: a message that tells
    the user a command names it so that it can be pasted as it is."""
    from retinaperf import invocation

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "retinaperf"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    no_env: dict[str, str] = {}
    prefix = invocation.prefix
    assert prefix(".venv/bin/retinaperf", tmp_path, no_env) == ".venv/bin/retinaperf"
    assert prefix(str(script), tmp_path, no_env) == ".venv/bin/retinaperf"  # inside: relative
    assert prefix(str(script), bin_dir, no_env) == "./retinaperf"
    elsewhere = tmp_path / "elsewhere"
    assert prefix(str(script), elsewhere, no_env) == str(script)  # outside: absolute
    monkeypatch.setenv("PATH", str(bin_dir))
    assert prefix(str(script), elsewhere, no_env) == "retinaperf"  # PATH finds this very file
    # `python -m retinaperf` (and torchrun's workers): this interpreter, as a shell reaches it
    python = Path(sys.executable)
    module = str(Path(cli.__file__).with_name("__main__.py"))
    assert prefix(module, python.parent, no_env) == f"./{python.name} -m retinaperf"
    assert prefix(module, tmp_path, no_env) == f"{python} -m retinaperf"
    # the processes a command starts (torchrun's workers, --repeat's rounds) name that command
    assert prefix(module, tmp_path, {invocation.COMMAND_ENV: "bin/rp"}) == "bin/rp"
    monkeypatch.setattr(sys, "argv", [str(script), "run"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(invocation.COMMAND_ENV, raising=False)
    with invocation.handed_down():
        assert os.environ[invocation.COMMAND_ENV] == "retinaperf"
        monkeypatch.setattr(sys, "argv", [module, "run"])
        assert invocation.command("run", "--resume", "my runs/a") == (
            "retinaperf run --resume 'my runs/a'"
        )
    assert invocation.COMMAND_ENV not in os.environ
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert invocation.command("report", "runs/a") == f"{python} -m retinaperf report runs/a"


def test_an_interrupted_jobs_resume_command_starts_it_as_it_was_started(monkeypatch):
    from retinaperf import invocation

    monkeypatch.delenv(invocation.COMMAND_ENV, raising=False)
    for name in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cli._resume_command("runs/a") == invocation.command("run", "--resume", "runs/a")
    # a launcher that started every rank itself (FlagPerf's harness): its launch again
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli._resume_command("runs/a") == (
        "the same launch of every rank with `retinaperf run --resume runs/a`"
    )
    # torchrun's workers: under `run --nproc-per-node 2`, that command again
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv(invocation.COMMAND_ENV, ".venv/bin/retinaperf")
    assert cli._resume_command("runs/a") == (
        ".venv/bin/retinaperf run --resume runs/a --nproc-per-node 2"
    )
    # under a torchrun the user typed, which this process cannot spell out
    monkeypatch.delenv(invocation.COMMAND_ENV)
    assert cli._resume_command("runs/a") == (
        "the same torchrun command with `-m retinaperf run --resume runs/a`"
    )
