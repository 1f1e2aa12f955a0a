"""Checkpoints and resume: a run stopped by a signal and resumed equals the run left alone, bit
for bit; what is refused on the way (another configuration, pickled code, no disk space)."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli, signal_at
from mlperf_logging.mllog import constants as mlc

from retinaperf import config, files
from retinaperf.data.synth import SynthSpec, generate
from retinaperf.errors import UserError
from retinaperf.report.events import read_events
from retinaperf.report.mlperf import MLPERF_LOG, log_files, read_log
from retinaperf.run import checkpoint, evaluation, step

# Two epochs of 3 steps (12 images, batch 4) of 32 px, every step logged, deterministic kernels:
# what is asserted (a stop inside an epoch, at its end, during an evaluation; a checkpoint at every
# step) needs a few steps an epoch, not many, nor large images.
SETTINGS = {
    "min_size": 32,
    "max_size": 43,
    "batch_size": 4,
    "epochs": 2,
    "max_steps": 0,
    "target_map": 0,
    "deterministic": "true",
    "save_model": "true",
    "monitor_interval": 0,
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's dataset, in place of conftest's: 12 training and 8 validation images of
    32 px, every one with boxes."""
    root = tmp_path_factory.mktemp("data") / "coco"
    return generate(SynthSpec(seed=3, train_images=12, val_images=8, image_size=32), root)


def step_losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """{step: (classification, bbox_regression)} of every logged step, over all segments."""
    losses = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "step":
            losses[event["step"]] = (event["classification"], event["bbox_regression"])
    return losses


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tiny_run_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert run_cli(tiny_run_args(tiny_dataset, out, **SETTINGS)) == 0
    return out


@pytest.mark.parametrize(
    ("where", "call", "stopped_at"),
    [
        ("train_step", 2, 2),  # inside epoch 0: resumes at its 3rd batch
        ("evaluate_model", 1, 3),  # during the first evaluation: abandoned, run again after
    ],
)
def test_a_run_stopped_by_sigterm_and_resumed_equals_the_uninterrupted_run(
    where, call, stopped_at, uninterrupted, tiny_dataset, tiny_run_args, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    injected = (
        {"step_fn": signal_at(step.train_step, call)}
        if where == "train_step"
        else {"evaluate_fn": signal_at(evaluation.evaluate_model, call)}
    )
    args = tiny_run_args(tiny_dataset, out, **SETTINGS)
    assert run_cli(args, **injected) == 128 + signal.SIGTERM
    stopped = results(out)
    assert stopped["status"] == "interrupted" and "SIGTERM" in stopped["reason"]
    assert stopped["metrics"]["steps"] == stopped_at
    assert stopped["metrics"]["evaluations"] == []  # none finished, none recorded
    assert Path(stopped["checkpoint"]).name == f"step-{stopped_at:08d}.pt"
    assert not (out / "model.pt").exists() and not (out / "report.md").exists()

    assert run_cli(["run", "--resume", str(out)]) == 0

    whole, resumed = results(uninterrupted), results(out)
    assert resumed["status"] == "completed"
    assert step_losses(out) == step_losses(uninterrupted)  # every step, bit for bit
    for key in ("trained_images", "steps", "mAP", "best_mAP", "epochs"):
        assert resumed["metrics"][key] == whole["metrics"][key], key
    assert [e["mAP"] for e in resumed["metrics"]["evaluations"]] == [
        e["mAP"] for e in whole["metrics"]["evaluations"]
    ]
    one = torch.load(uninterrupted / "model.pt", weights_only=True)
    two = torch.load(out / "model.pt", weights_only=True)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)

    first, second = resumed["segments"]
    assert (first["ended"], first["end_step"]) == ("interrupted", stopped_at)
    assert (second["ended"], second["start_step"]) == ("completed", stopped_at)
    assert second["resumed_from"] == f"step-{stopped_at:08d}.pt"
    assert second["time_lost_s"] >= 0
    assert resumed["metrics"]["segments"] == 2
    # The MLPerf-format logs: a file per segment, each from init_start to its run_stop, the
    # interrupted one's aborted; the evaluations of both are the run's.
    logs = [read_log(path) for path in log_files(out)]
    assert [path.name for path in log_files(out)] == [MLPERF_LOG, "mlperf-segment-2.log"]
    for log, status in zip(logs, (mlc.ABORTED, mlc.SUCCESS), strict=True):
        keys = [(e["key"], e["metadata"].get(mlc.STATUS)) for e in log]
        bounds = [k for k in keys if k[0] in (mlc.INIT_START, mlc.RUN_START, mlc.RUN_STOP)]
        assert bounds == [(mlc.INIT_START, None), (mlc.RUN_START, None), (mlc.RUN_STOP, status)]
    accuracy = [e["value"] for log in logs for e in log if e["key"] == mlc.EVAL_ACCURACY]
    assert accuracy == [e["mAP"] for e in resumed["metrics"]["evaluations"]] and accuracy
    # Times add up over the segments; the time between them is in none of them.
    m = resumed["metrics"]
    assert m["time_between_segments"] == pytest.approx(second["time_lost_s"])
    assert m["p_core"] >= m["p_train"] >= m["p_whole"] > 0
    assert m["train_time"] > m["eval_time"] + m["checkpoint_time"]
    assert m["e2e_time"] > m["train_time"] + m["init_time"] - 1e-6
    report = (out / "report.md").read_text()
    assert f"- run in 2 segments (interrupted at step {stopped_at});" in report


def test_a_signal_during_an_evaluation_stops_the_run_after_the_batch_under_way(
    tiny_dataset, tiny_run_args, tmp_path
):
    """SIGTERM during the evaluation's 2nd batch: the run checkpoints and exits after that batch,
    in less time than the rest of the evaluation would have taken (a scheduler kills a job a
    fixed time after its SIGTERM), and logs how long it took."""
    slow_s, signal_batch = 5.0, 2
    served, signalled = [], []

    def slow_evaluation(model, loader, *args):
        def batches():
            for batch in loader:
                served.append(1)
                if len(served) == signal_batch:
                    signalled.append(time.monotonic())
                    os.kill(os.getpid(), signal.SIGTERM)
                elif signalled:
                    time.sleep(slow_s)  # each batch after the signal: a slow evaluation
                yield batch

        return evaluation.evaluate_model(model, batches(), *args)

    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, **{**SETTINGS, "epochs": 1, "eval_batch_size": 1})
    assert run_cli(args, evaluate_fn=slow_evaluation) == 128 + signal.SIGTERM
    returned = time.monotonic()
    stopped = results(out)
    assert len(served) == signal_batch  # the batch under way finished, no other began
    batches_left = stopped["metrics"]["val_images"] - signal_batch
    assert stopped["status"] == "interrupted" and stopped["metrics"]["evaluations"] == []
    assert torch.load(stopped["checkpoint"], weights_only=True)["position"] == {
        "epoch": 0,
        "step_in_epoch": 3,
        "step": 3,
    }
    (logged,) = [e for e in read_events(out / "events.jsonl") if e["event"] == "stopped"]
    assert logged["signal"] == "SIGTERM"
    assert 0 < logged["seconds"] <= returned - signalled[0] < batches_left * slow_s


def test_checkpoints_are_kept_newest_first_hold_the_state_and_go_when_the_run_completes(
    uninterrupted, tiny_dataset, tiny_run_args, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    # A timed checkpoint at every step, 3 kept; stopped during the last step.
    settings = {**SETTINGS, "checkpoint_minutes": 1e-6, "keep_checkpoints": 3}
    args = tiny_run_args(tiny_dataset, out, **settings)
    assert run_cli(args, step_fn=signal_at(step.train_step, 6)) == 128 + signal.SIGTERM
    kept = [p.name for p in checkpoint.saved(out)]
    assert kept == ["step-00000004.pt", "step-00000005.pt", "step-00000006.pt"]
    assert not [p for p in checkpoint.folder(out).iterdir() if p.name.startswith(".")]
    # Each with its digest, in sha256sum's format; the pruned ones' went with them.
    for path in checkpoint.saved(out):
        assert checkpoint.digest_file(path).read_text() == f"{files.sha256_of(path)}  {path.name}\n"
    assert len(list(checkpoint.folder(out).glob("*.sha256"))) == 3
    state = torch.load(checkpoint.saved(out)[-1], weights_only=True)
    assert state["position"] == {"epoch": 1, "step_in_epoch": 3, "step": 6}
    assert state["ranks"][0]["meter"]["images"] == 24
    assert len(state["ranks"][0]["meter"]["evals"]) == 1  # epoch 1's evaluation is still due
    assert state["workload"] == config.workload(config.load_saved(out / "config.json", {}))
    assert state["segments"][-1]["ended"] == "interrupted"

    assert run_cli(["run", "--resume", str(out)]) == 0
    done = results(out)
    assert done["metrics"]["mAP"] == results(uninterrupted)["metrics"]["mAP"]
    # A completed run has nothing left to resume: its checkpoints go, results.json stays.
    assert not checkpoint.folder(out).exists() and done["checkpoint"] is None


@pytest.fixture(scope="module")
def stopped_at_2(tiny_dataset, tiny_run_args, tmp_path_factory) -> Path:
    """A run stopped by SIGTERM after its second step, made once: use `stopped_run`'s copy."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    args = tiny_run_args(tiny_dataset, out, **{**SETTINGS, "epochs": 1})
    assert run_cli(args, step_fn=signal_at(step.train_step, 2)) == 128 + signal.SIGTERM
    return out


@pytest.fixture
def stopped_run(stopped_at_2, tmp_path) -> Path:
    """A copy of the run stopped after its second step, for this test alone to change and
    resume (a run directory may move: `--resume` takes it where it is now)."""
    return Path(shutil.copytree(stopped_at_2, tmp_path / "run"))


def test_resume_refuses_a_setting_that_changes_the_workload(stopped_run, capsys):
    out = stopped_run
    capsys.readouterr()
    assert run_cli(["run", "--resume", str(out), "--set", "lr=0.5"]) == 1
    assert "--set lr would change the workload" in capsys.readouterr().err
    assert run_cli(["run", "--resume", str(out), "--preset", "smoke"]) == 1
    assert "drop --preset" in capsys.readouterr().err
    # A key that leaves the workload alone may change.
    assert run_cli(["run", "--resume", str(out), "--set", "log_every=3"]) == 0
    assert results(out)["status"] == "completed"
    assert run_cli(["run", "--resume", str(out)]) == 1
    assert "holds a completed run: there is nothing to resume" in capsys.readouterr().err


def test_a_checkpoint_of_another_configuration_is_refused(stopped_run, capsys):
    out = stopped_run
    saved = json.loads((out / "config.json").read_text())
    saved["train"]["lr"] = 0.5  # as if the checkpoint had come from another run
    (out / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert run_cli(["run", "--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert "belongs to another configuration (lr is 0.01 there, 0.5 in this run)" in err


class Planted:
    """Unpickling this runs os.mkdir: a checkpoint carrying code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(stopped_run, tmp_path, capsys):
    out = stopped_run
    marker = tmp_path / "ran"
    planted = checkpoint.folder(out) / "step-9.pt"
    torch.save({"format": 1, "payload": Planted(marker)}, planted)
    # With a digest that matches: whoever can write the file can write that too.
    checkpoint.digest_file(planted).write_text(f"{files.sha256_of(planted)}  {planted.name}\n")
    capsys.readouterr()
    assert run_cli(["run", "--resume", str(out)]) == 1
    assert "pickled objects other than tensors" in capsys.readouterr().err
    assert not marker.exists()


def test_a_full_disk_while_checkpointing_leaves_nothing_half_written(
    uninterrupted, tiny_dataset, tiny_run_args, tmp_path, monkeypatch, capsys
):
    """The checkpoint of a stop (the second one) finds the disk full: the one before stays, no
    partial file is left, and the run resumes from it."""
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def fills_the_disk(state, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\0" * 1000)  # half the bytes, then no space left
            raise OSError(28, "No space left on device")
        real_save(state, f)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.torch, "save", fills_the_disk)
        args = tiny_run_args(tiny_dataset, out, **SETTINGS)
        assert run_cli(args, step_fn=signal_at(step.train_step, 5)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "cannot write step 5" in err and "No space left on device" in err
    assert "the newest checkpoint is still step-00000003.pt" in err
    assert sorted(p.name for p in checkpoint.folder(out).iterdir()) == [
        "step-00000003.pt",
        "step-00000003.pt.sha256",
    ]
    stopped = results(out)
    assert stopped["status"] == "interrupted" and stopped["metrics"]["checkpoint_failures"] == 1
    assert Path(stopped["checkpoint"]).name == "step-00000003.pt"

    assert run_cli(["run", "--resume", str(out)]) == 0
    resumed, whole = results(out)["metrics"], results(uninterrupted)["metrics"]
    assert (resumed["trained_images"], resumed["mAP"]) == (whole["trained_images"], whole["mAP"])


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(
    tiny_dataset, tiny_run_args, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10**6})()
    )
    assert run_cli(tiny_run_args(tiny_dataset, out, **SETTINGS)) == 1
    err = capsys.readouterr().err
    assert "has 0.00 GB free, but one checkpoint of this run needs" in err
    assert not out.exists()  # nothing written, not even the folder


def test_a_run_directory_that_cannot_be_written_is_refused_before_training(
    tiny_dataset, tiny_run_args, tmp_path, capsys
):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_cli(tiny_run_args(tiny_dataset, blocker / "run", **SETTINGS)) == 1
    assert f"output: cannot write in {blocker / 'run'}" in capsys.readouterr().err


def test_load_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "step-1.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(UserError, match="is not a retinaperf checkpoint"):
        checkpoint.load(path, {}, 1)


def test_a_background_write_saves_the_state_as_it_was_when_handed_over(tmp_path):
    weight = torch.ones(4)
    state = {"format": 1, "model": {"w": weight}, "ranks": [{"rng": (1, 2)}]}
    writer = checkpoint.Writer(tmp_path, keep=2)
    assert writer.submit(checkpoint.snapshot(state), step=3) is None
    weight.add_(1)  # training goes on while the file is written
    outcome = writer.finish()
    writer.close()
    assert outcome.path == checkpoint.folder(tmp_path) / "step-00000003.pt" == writer.newest
    saved = torch.load(outcome.path, weights_only=True)
    assert torch.equal(saved["model"]["w"], torch.ones(4))
    assert saved["ranks"] == [{"rng": (1, 2)}]


@pytest.fixture(scope="module")
def stopped_at_3_with_checkpoints(tiny_dataset, tiny_run_args, tmp_path_factory) -> Path:
    """A run with a checkpoint at every step (3 kept), stopped by SIGTERM at its 3rd, made once:
    use `stopped_with_checkpoints`'s copy."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    settings = {**SETTINGS, "epochs": 1, "checkpoint_minutes": 1e-6, "keep_checkpoints": 3}
    args = tiny_run_args(tiny_dataset, out, **settings)
    assert run_cli(args, step_fn=signal_at(step.train_step, 3)) == 128 + signal.SIGTERM
    assert [p.name for p in checkpoint.saved(out)] == [
        "step-00000001.pt",
        "step-00000002.pt",
        "step-00000003.pt",
    ]
    return out


@pytest.fixture
def stopped_with_checkpoints(stopped_at_3_with_checkpoints, tmp_path) -> Path:
    """A copy of that run, for this test alone to damage and resume."""
    return Path(shutil.copytree(stopped_at_3_with_checkpoints, tmp_path / "run"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_middle(path: Path) -> None:
    """4 KiB in the middle of the file changed, its size the same: still a valid zip."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(4096))


@pytest.mark.parametrize("harm", [truncate, overwrite_middle])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_goes_on_from_the_one_before(
    harm, stopped_with_checkpoints, capsys
):
    out = stopped_with_checkpoints
    newest = checkpoint.saved(out)[-1]
    harm(newest)
    capsys.readouterr()
    assert run_cli(["run", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "is damaged" in line]
    assert "step-00000003.pt is damaged (its bytes are not those written" in line
    assert "moved aside as step-00000003.pt.damaged" in line
    assert (checkpoint.folder(out).parent / "results.json").is_file()
    done = results(out)
    assert done["status"] == "completed"
    assert done["segments"][-1]["resumed_from"] == "step-00000002.pt"
    # Kept for a look, not deleted (the completed run's checkpoints go, the damaged one too).
    assert (
        not checkpoint.folder(out).exists()
        or (checkpoint.folder(out) / "step-00000003.pt.damaged").is_file()
    )


def test_with_no_intact_checkpoint_the_resume_stops_saying_what_to_do(
    stopped_with_checkpoints, capsys
):
    out = stopped_with_checkpoints
    for path in checkpoint.saved(out):
        overwrite_middle(path)
    capsys.readouterr()
    assert run_cli(["run", "--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("is damaged") == 3
    assert "no intact checkpoint in" in err and "start it again in a new --output-dir" in err
    assert len(list(checkpoint.folder(out).glob("*.pt.damaged"))) == 3  # kept, not deleted
    assert len(list(checkpoint.folder(out).glob("*.pt.damaged.sha256"))) == 3  # with their digests
