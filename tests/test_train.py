"""The recipe (lr schedule, the step against torchvision's own loss and a hand-made SGD update),
and whole runs: stop rules, counting, and the run directory."""

import copy
import json
import re
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import run_cli
from torchvision.models.detection import retinanet_resnet50_fpn

from retinaperf.config import ModelConfig, TrainConfig
from retinaperf.data import coco
from retinaperf.measure import energy, energy_counters, scoring
from retinaperf.measure.meter import Meter, device_events
from retinaperf.model.network import RetinaPerfNet, build_model
from retinaperf.model.precision import Precision
from retinaperf.report.events import read_events
from retinaperf.report.loading import load_results
from retinaperf.run import checkpoint
from retinaperf.run.step import build_optimizer, lr_factor, train_step, use_channels_last

CPU = torch.device("cpu")
SPEC = {"warmup_factor": 1e-3, "lr_steps": (16, 22), "gamma": 0.1}


def factor(step_in_epoch: int, epoch: int, warmup_iters: int = 1000) -> float:
    return lr_factor(step_in_epoch, epoch, warmup_iters, **SPEC)


def test_warmup_is_linear_from_a_thousandth_over_epoch_zero():
    assert factor(0, 0) == pytest.approx(1e-3)
    assert factor(500, 0) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert factor(999, 0) == pytest.approx(1e-3 + (1 - 1e-3) * 0.999)
    assert factor(1000, 0) == 1.0
    assert factor(5000, 0) == 1.0
    # A short epoch caps warm-up at steps_per_epoch - 1 (the caller passes the cap).
    assert factor(9, 0, warmup_iters=9) == 1.0
    # Warm-up belongs to epoch 0 only.
    assert factor(0, 1) == 1.0


def test_decay_is_tenfold_at_epochs_16_and_22():
    assert [factor(0, e) for e in (15, 16, 21, 22, 25)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01, 0.01]
    )


def _images_and_targets(generator: torch.Generator):
    images = [torch.randint(0, 256, (3, 64, 80), generator=generator, dtype=torch.uint8)]
    images.append(torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8))
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([3])},
        {
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 44.0], [0, 0, 20, 20]]),
            "labels": torch.tensor([1, 7]),
        },
    ]
    return images, targets


def test_step_loss_equals_torchvision_and_update_is_plain_sgd():
    torch.manual_seed(0)
    ours = build_model(ModelConfig(min_size=64, max_size=80), None)
    reference = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=64, max_size=80
    )
    reference.load_state_dict(ours.state_dict())
    ours.train()
    reference.train()
    images, targets = _images_and_targets(torch.Generator().manual_seed(1))

    # torchvision's own loss on float images in [0, 1], and its gradients
    expected = reference([im.float() / 255 for im in images], copy.deepcopy(targets))
    sum(expected.values()).backward()

    lr, momentum, decay = 0.01, 0.9, 1e-4
    before = copy.deepcopy(ours.state_dict())
    config = TrainConfig(lr=lr, momentum=momentum, weight_decay=decay)
    optimizer = build_optimizer(list(ours.parameters()), config, torch.device("cpu"))
    assert optimizer.defaults["fused"]  # the CPU has a fused SGD kernel
    losses = train_step(ours, images, targets, optimizer, Precision("fp32", torch.device("cpu")))

    for name in ("classification", "bbox_regression"):
        assert losses[name].item() == pytest.approx(expected[name].item(), rel=1e-5)
    # First SGD step with momentum: the buffer is the gradient, so p' = p - lr (g + wd p).
    ref_params = dict(reference.named_parameters())
    for name in ("backbone.body.conv1.weight", "head.classification_head.cls_logits.bias"):
        grad = ref_params[name].grad
        want = before[name] - lr * (grad + decay * before[name])
        assert torch.allclose(ours.state_dict()[name], want, atol=1e-6, rtol=1e-4)
        assert not torch.equal(ours.state_dict()[name], before[name])


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False)],
)
def test_channels_last_auto_is_on_for_cuda_alone(setting, device, expected):
    assert use_channels_last(setting, torch.device(device)) is expected


def test_a_channels_last_step_computes_the_same_step():
    # The real recipe's structure (frozen batch norm). Batch norm that trains from scratch on
    # 64 px images (2x2 maps in the last stage) turns last-bit differences of the convolutions'
    # summation order into percent-level gradient differences, whichever memory format.
    torch.manual_seed(0)
    config = ModelConfig(min_size=64, max_size=80, backbone_weights="random")
    contiguous = build_model(config, None)
    before = copy.deepcopy(contiguous.state_dict())
    nhwc = copy.deepcopy(contiguous)
    nhwc.use_channels_last()
    conv = nhwc.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images, targets = _images_and_targets(torch.Generator().manual_seed(1))
    results = []
    for model in (contiguous, nhwc):
        model.train()
        optimizer = build_optimizer(list(model.parameters()), TrainConfig(lr=0.01), CPU)
        fp32 = Precision("fp32", CPU)
        losses = train_step(model, images, copy.deepcopy(targets), optimizer, fp32)
        results.append((losses, model.state_dict()))
    (losses_a, state_a), (losses_b, state_b) = results
    for name in losses_a:
        assert losses_b[name].item() == pytest.approx(losses_a[name].item(), rel=1e-5)
    for name, tensor in state_a.items():
        assert torch.allclose(state_b[name], tensor, rtol=1e-4, atol=1e-6), name
    moved = (
        (
            state_a["head.classification_head.conv.0.0.weight"]
            - before["head.classification_head.conv.0.0.weight"]
        )
        .abs()
        .max()
    )
    assert moved > 1e-5  # an update well above the tolerance


def test_compiled_parts_compute_the_same_steps_and_detections(monkeypatch):
    # Dynamo's graph capture (graph breaks, guards, sizes that change between batches) with the
    # eager backend: inductor's code generation takes minutes on this CPU. The GPU check runs
    # compile=true for real.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "eager"}))
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(ModelConfig(min_size=64, max_size=80, backbone_weights="random"), None)
    compiled = copy.deepcopy(eager)
    compiled.compile_parts()
    assert compiled.loss_fn is not eager.loss_fn
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged
    images, targets = _images_and_targets(torch.Generator().manual_seed(1))
    batches = [(images, targets), (images[1:], targets[1:]), (images[:1], targets[:1])]
    optimizers = {
        id(m): build_optimizer(list(m.parameters()), TrainConfig(lr=0.01), CPU)
        for m in (eager, compiled)
    }
    fp32 = Precision("fp32", CPU)
    for batch_images, batch_targets in batches:  # three sizes and box counts
        losses = [
            train_step(m, batch_images, copy.deepcopy(batch_targets), optimizers[id(m)], fp32)
            for m in (eager, compiled)
        ]
        for name in losses[0]:
            assert losses[1][name].item() == pytest.approx(losses[0][name].item(), rel=1e-6)
    with torch.no_grad():
        for m in (eager, compiled):  # scores of 0.5, above the threshold: detections to compare
            m.head.classification_head.cls_logits.bias.zero_()
        expected, got = (m.eval()(images) for m in (eager, compiled))
    assert all(len(d["boxes"]) > 0 for d in expected)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)


def test_results_hold_the_metrics_of_the_run(one_run):
    _, results = one_run
    m = results["metrics"]
    assert m["steps"] == 3
    assert m["trained_images"] == 3 * 2  # steps x local batch x 1 rank
    assert m["p_core"] >= m["p_train"] >= m["p_whole"] > 0
    assert m["train_time"] >= m["eval_time"] > 0
    assert m["e2e_time"] > m["train_time"]
    assert m["e2e_time"] == pytest.approx(m["init_time"] + m["train_time"], abs=5.0)
    assert m["world_size"] == 1 and m["nodes"] == 1 and m["devices_per_node"] == 1
    assert m["local_batch"] == 2 and m["global_batch"] == 2
    used, total = (float(x) for x in m["mem"].split("/"))
    assert 0 < used < total
    assert m["train_images"] <= 24 and m["val_images"] == 8
    assert results["config"]["train"]["max_steps"] == 3
    assert results["environment"]["packages"]["torch"] == torch.__version__.split("+")[0]


def test_results_say_how_the_step_was_computed_and_its_batch_shapes(one_run):
    _, results = one_run
    m = results["metrics"]
    assert m["implementation"] == {
        "transform": "batched",
        "reuse_constants": True,
        "loss": "batched",
        "postprocess": "batched",
        "channels_last": False,  # auto, on a CPU
        "compile": False,
        "compile_mode": None,
        "optimizer": "SGD (fused)",
        "ddp": None,
    }
    # The padded shapes of the steps' batches: 2 images, 3 channels, sides padded to 32.
    shapes = results["batch_shapes"]
    assert m["batch_shapes"] == len(shapes) >= 1
    assert len({tuple(s) for s in shapes}) == len(shapes)
    for batch, channels, height, width in shapes:
        assert (batch, channels) == (2, 3) and height % 32 == width % 32 == 0


def test_the_event_log_records_start_steps_evaluation_and_end(one_run):
    out, results = one_run
    m = results["metrics"]
    events = read_events(out / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for e in steps:
        assert e["loss"] == pytest.approx(e["classification"] + e["bbox_regression"])
        assert e["images_per_s"] > 0 and e["lr"] > 0
    (ev,) = [e for e in events if e["event"] == "eval"]
    assert set(scoring.STAT_NAMES) <= set(ev) and ev["mAP"] == ev["AP"] == m["mAP"]
    end = events[-1]
    assert end["p_core"] == m["p_core"] and end["e2e_time"] == m["e2e_time"]


def test_the_monitor_plots_environment_and_flops_are_recorded(one_run):
    out, results = one_run
    m = results["metrics"]
    samples = read_events(out / "monitor.jsonl")
    assert len(samples) >= 2 and all(s["devices"] == [] for s in samples)  # a CPU: host only
    assert results["monitor"]["samples"] == len(samples)
    assert list(results["monitor"]["host"]) == [samples[0]["host"]]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "host.png",
        "loss.png",
        "map.png",
        "throughput.png",
    ]
    assert m["flops_per_image"] > 1e8  # a ResNet-50 RetinaNet at 64 px: ~7 GFLOP
    assert m["achieved_tflops"] == pytest.approx(m["flops_per_image"] * m["p_core"] / 1e12)
    assert m["mfu"] is None and m["peak_tflops"] is None  # no peak known for a CPU
    env = results["environment"]
    assert env["cpu_count"] >= 1 and env["hosts"] == [samples[0]["host"]]
    assert env["command"] and env["packages"]["torchvision"]


def test_tensorboard_gets_the_event_logs_scalars(one_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = one_run
    steps = [e for e in read_events(out / "events.jsonl") if e["event"] == "step"]
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx(
        [e["loss"] for e in steps]
    )
    assert [e.value for e in board.Scalars("eval/mAP")] == pytest.approx(
        [results["metrics"]["mAP"]]
    )


def test_the_report_is_the_seeds_table_and_what_it_stands_on(one_run):
    out, results = one_run
    m = results["metrics"]
    report = (out / "report.md").read_text()
    assert (
        "| 配置 | precision | fix_hp | e2e_time | p_whole | p_train | p_core | mAP | mem |"
        in report
    )
    assert f"bs=2,lr={m['lr']:g}" in report and m["mem"] in report
    assert (
        "- step: transform batched, constants reused, loss batched, post-processing batched, "
        "channels-last off" in report
    )


def test_run_stops_at_the_first_evaluation_reaching_the_target(
    tiny_run_args, tiny_dataset, tmp_path, monkeypatch
):
    scores = iter([0.1, 0.6, 0.9])

    def fake_score(gt, detections):
        ap = next(scores)
        return {name: ap for name in scoring.STAT_NAMES}

    monkeypatch.setattr(scoring, "score", fake_score)
    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, epochs=3, max_steps=0, target_map=0.5, batch_size=8)
    assert run_cli(args) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["epochs"] == 2 and m["converged"] is True
    assert [e["mAP"] for e in m["evaluations"]] == [0.1, 0.6]
    assert m["time_to_target"] == pytest.approx(m["train_time"])
    steps_per_epoch = m["train_images"] // 8
    assert m["steps"] == 2 * steps_per_epoch
    assert m["trained_images"] == m["steps"] * 8


def test_run_without_reaching_the_target_runs_every_epoch(
    tiny_run_args, tiny_dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        scoring, "score", lambda gt, dets: {name: 0.2 for name in scoring.STAT_NAMES}
    )
    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, epochs=2, max_steps=0, batch_size=8)
    assert run_cli(args) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["epochs"] == 2 and m["converged"] is False and m["time_to_target"] is None
    assert len(m["evaluations"]) == 2


def test_synthetic_mode_measures_a_presets_recipe_on_coco_like_data(tmp_path, capsys):
    """`run --preset A100-1x1 --synthetic`, shrunk for a CPU: the preset's recipe on generated
    COCO-like data with random weights in the pretrained structure; throughput only; with a
    profiler window over two of its steps."""
    out = tmp_path / "run"
    settings = {
        "device": "cpu",
        "cache_dir": tmp_path / "cache",
        "min_size": 64,
        "max_size": 86,
        "synth_image_size": 96,
        "synth_train_images": 12,
        "synth_val_images": 4,
        "batch_size": 2,
        "eval_batch_size": 4,
        "num_workers": 0,
        "max_steps": 4,
        "timing_warmup_steps": 1,
        "profile_steps": "2:3",
        "monitor_interval": 0,
        "save_model": "true",
    }
    args = ["run", "--preset", "A100-1x1", "--synthetic", "--output-dir", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert run_cli(args) == 0
    results = json.loads((out / "results.json").read_text())
    m, config = results["metrics"], results["config"]
    # the preset's recipe, on the coco profile, for speed alone
    assert (m["lr"], m["precision"], m["precision_reason"]) == (0.04, "fp32", "as configured")
    assert m["throughput_only"] is True and config["data"]["synth_profile"] == "coco"
    assert "profile coco" in m["dataset"] and m["val_images"] == 4
    assert m["backbone_init"].startswith("random values in the pretrained structure")
    assert m["backbone_sha256"] is None  # nothing was downloaded or read
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.endswith("num_batches_tracked") for k in state)  # frozen batch norm
    # p_core_steady leaves out the first step
    assert m["timing_warmup_steps"] == 1 and m["steps"] == 4
    assert m["p_core_steady"] > 0 and m["p_core"] > 0
    # the float32 math in force is recorded: on a CPU, IEEE whatever the TF32 flags say
    assert m["math"]["effective_conv"] == "ieee" and m["math"]["conv_fp32_precision"] == "tf32"
    report = (out / "report.md").read_text()
    head = next(line for line in report.splitlines() if line.startswith("| ") and " mAP " in line)
    row = next(line for line in report.splitlines() if line.startswith("| ") and "bs=2" in line)
    cells = dict(zip(head.split("|"), row.split("|"), strict=True))
    assert cells[" mAP "].strip() == "–"
    assert "throughput-only run" in report and "float32 convolutions in IEEE" in report
    assert "p_core_steady" in report
    assert "steps 2:3 ran under torch.profiler" in report
    # the profiler window: a trace of steps 2 and 3, and the top operators
    events = read_events(out / "events.jsonl")
    (profiled,) = [e for e in events if e["event"] == "profile"]
    assert profiled["steps"] == [2, 3] and profiled["top_ops"]
    trace = json.loads((out / profiled["trace"]).read_text())
    labels = {e["name"] for e in trace["traceEvents"] if e["name"].startswith("ProfilerStep#")}
    assert labels == {"ProfilerStep#2", "ProfilerStep#3"}
    printed = capsys.readouterr().out
    assert profiled["top_ops"][0]["name"] in printed
    # the console: the dataset made before it is used; a header naming the mode; no mAP that
    # the run does not report, but the evaluation's time; the report named last
    lines = printed.splitlines()
    assert lines[0].startswith("retinaperf: generating the coco dataset (12 training + 4 ")
    assert lines[1] == (
        "retinaperf run: preset A100-1x1 (throughput mode: speed and memory, mAP not reported)"
    )
    assert "mAP 0." not in printed and "AP50" not in printed
    (evaluated,) = [line for line in lines if line.startswith("epoch 0: ")]
    seconds = m["evaluations"][0]["seconds"]
    assert evaluated == f"epoch 0: evaluated in {seconds:.1f} s; mAP not reported (throughput mode)"
    assert "throughput-only run" in lines[-3]
    assert lines[-2:] == [f"report: {out / 'report.md'}", f"results: {out / 'results.json'}"]


def test_a_loss_that_stays_nan_under_amp_fails_the_run_keeping_the_last_good_checkpoint(
    tiny_run_args, tiny_dataset, tmp_path, monkeypatch, capsys
):
    """From step 3 on the loss is NaN: the scaler skips every update (counted), and the third
    non-finite step in a row stops the run as failed, naming the step, the loss parts and lr."""
    original_loss, steps = RetinaPerfNet.compute_loss, []

    def poisoned_loss(self, *args, **kwargs):
        losses = original_loss(self, *args, **kwargs)
        if len(steps) >= 3:
            losses = {name: value * float("nan") for name, value in losses.items()}
        return losses

    def counted_step(*args, **kwargs):
        steps.append(1)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(RetinaPerfNet, "compute_loss", poisoned_loss)
    out = tmp_path / "run"
    settings = {"precision": "amp", "max_bad_steps": 3, "max_steps": 10, "monitor_interval": 0}
    # A timed checkpoint after every step, while the loss is finite.
    settings.update(checkpoint_minutes=1e-6, keep_checkpoints=5)
    assert run_cli(tiny_run_args(tiny_dataset, out, **settings), step_fn=counted_step) == 1
    err = capsys.readouterr().err
    assert "training diverged: the loss was not finite for 3 consecutive steps" in err
    assert "at step 5: bbox_regression nan, classification nan, lr " in err
    assert "the last good checkpoint is step-00000002.pt" in err
    assert [p.name for p in checkpoint.saved(out)] == ["step-00000001.pt", "step-00000002.pt"]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and "diverged" in results["reason"]
    assert results["metrics"]["steps"] == 5
    # The scaler skipped steps 3, 4 and 5, after those its first scale overflowed (if any).
    logged = {e["step"]: e for e in read_events(out / "events.jsonl") if e["event"] == "step"}
    assert results["metrics"]["skipped_steps"] == logged[2]["skipped_steps"] + 3
    assert results["metrics"]["mAP"] is None  # no evaluation ran
    assert results["segments"][-1]["ended"] == "failed"


@pytest.mark.parametrize("failing", [1, 2])  # the first step: a run with no rate at all
def test_out_of_memory_fails_the_run_with_the_batch_and_image_size(
    failing, tiny_run_args, tiny_dataset, tmp_path, capsys
):
    steps = []

    def runs_out(*args, **kwargs):
        steps.append(1)
        if len(steps) == failing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_step(*args, **kwargs)

    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, max_steps=3, monitor_interval=0)
    assert run_cli(args, step_fn=runs_out) == 1
    captured = capsys.readouterr()
    err = captured.err
    pattern = rf"out of cpu memory at step {failing}: local batch 2, images up to \d+x64 px"
    assert re.search(pattern, err)
    assert "resized to short side 64 (long side at most 86)" in err
    assert "lower batch_size" in err and "Tried to allocate 2.00 GiB" in err
    assert "could not write the failed run's results.json" not in err + captured.out
    results = load_results(out, completed_only=False)  # written, and in the schema
    assert results["status"] == "failed" and "out of cpu memory" in results["reason"]
    assert results["metrics"]["steps"] == failing - 1


CPU_ALLOCATOR = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"


@pytest.mark.parametrize("where", ["flop_count", "evaluation"])
def test_out_of_memory_outside_a_step_is_recorded_as_such_in_one_line(
    where, tiny_run_args, tiny_dataset, tmp_path, capsys, monkeypatch
):
    """An allocation that fails before training (the FLOP count runs a step's forward and
    backward on the first batch) or in an evaluation: results.json says out_of_memory, and the
    user gets one line, no traceback."""

    def runs_out(*args, **kwargs):
        raise RuntimeError(f"{CPU_ALLOCATOR}: you tried to allocate 8388608 bytes.")

    if where == "flop_count":
        monkeypatch.setattr("retinaperf.measure.utilization.train_flops_per_image", runs_out)
    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, max_steps=1, monitor_interval=0)
    code = run_cli(args, evaluate_fn=runs_out if where == "evaluation" else None)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = [e for e in err.splitlines() if e.startswith("retinaperf: error:")]
    assert "out of cpu memory" in line and "can't allocate memory" in line
    results = load_results(out, completed_only=False)
    assert (results["status"], results["failure"]) == ("failed", "out_of_memory")
    assert results["reason"] == line.removeprefix("retinaperf: error: ")
    if where == "flop_count":
        assert "counting the FLOPs of the first batch: local batch 2" in line.replace(
            " (a training step's forward and backward)", ""
        )
        assert results["metrics"]["steps"] == 0 and results["metrics"]["flops_per_image"] is None
    else:
        assert results["metrics"]["steps"] == 1


def test_a_run_with_loader_workers_exits(tiny_run_args, tiny_dataset, tmp_path):
    """Workers ignore SIGTERM, so the interpreter's exit, which terminates leftover workers,
    could not stop them: the run stops them itself, and the command ends."""
    args = tiny_run_args(tiny_dataset, tmp_path / "run", num_workers=1)
    done = subprocess.run(
        [sys.executable, "-m", "retinaperf", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_cpu_run_reports_its_packages_energy_or_says_why_not(
    tiny_run_args, tiny_dataset, tmp_path, monkeypatch
):
    """RAPL packages counting 50 W each (a fake powercap tree whose counters follow the clock):
    the run's figures are the counted joules; without RAPL, null with the reason."""
    root = tmp_path / "powercap"
    for index in (0, 1):
        domain = root / f"intel-rapl:{index}"
        domain.mkdir(parents=True)
        (domain / "name").write_text(f"package-{index}\n")
        (domain / "energy_uj").write_text("0\n")
        (domain / "max_energy_range_uj").write_text(f"{2**60}\n")
    monkeypatch.setattr(energy, "POWERCAP", root)
    monkeypatch.setattr(energy_counters.RaplCounter, "read", lambda self: 50 * time.perf_counter())
    out = tmp_path / "run"
    assert run_cli(tiny_run_args(tiny_dataset, out, max_steps=3, monitor_interval=0)) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    training = m["train_time"] - m["eval_time"]
    assert m["energy_train_j"] == pytest.approx(2 * 50 * training, rel=0.05)
    assert m["energy_eval_j"] == pytest.approx(2 * 50 * m["eval_time"], rel=0.05)
    assert m["images_per_joule"] == pytest.approx(m["trained_images"] / m["energy_train_j"])
    assert m["power_train_w"] == pytest.approx(100, rel=0.05)  # the device: both packages
    assert m["energy_source"] == "RAPL package energy (powercap)" and m["energy_note"] is None
    report = (out / "report.md").read_text()
    assert "| img/J* |" in report.splitlines()[2] and "images/J" in report

    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "none")
    out = tmp_path / "without"
    assert run_cli(tiny_run_args(tiny_dataset, out, max_steps=1, monitor_interval=0)) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["energy_train_j"] is None and m["images_per_joule"] is None
    assert "no RAPL package domain under" in m["energy_note"]
    assert "- energy: no figure:" in (out / "report.md").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("precision_name", ["fp32", "bf16"])
def test_cuda_step_and_its_timing_never_wait_for_the_device(precision_name):
    """The step as a run builds it on CUDA (pretrained structure, channels-last, fused SGD, the
    meter's event timing), with every synchronising call an error once its caches are warm."""
    cuda = torch.device("cuda")
    config = ModelConfig(min_size=256, max_size=400, backbone_weights="random")
    model = build_model(config, None).to(cuda)
    model.use_channels_last()
    chosen = Precision(precision_name, cuda)
    model = chosen.prepare(model).train()
    optimizer = build_optimizer(chosen.optimizer_params(model), TrainConfig(lr=0.01), cuda)
    meter = Meter(0.0, cuda, events=device_events(cuda))
    meter.train_started()
    images, targets = _images_and_targets(torch.Generator().manual_seed(2))
    images, targets = coco.to_device(images * 3, targets * 3, cuda)  # two sizes, interleaved

    def step() -> dict[str, torch.Tensor]:
        with meter.core_step(len(images)):
            return train_step(model, images, targets, optimizer, chosen)

    step()  # fills the caches (mean and std, anchors, frozen norms), which copy once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(v).all() for step_losses in losses for v in step_losses.values())
    meter.settle()
    assert meter.steps == 4 and meter.core_seconds > 0


def test_a_run_says_what_runs_where_and_a_resumed_one_from_where(
    tiny_run_args, tiny_dataset, tmp_path, capsys
):
    """The header before training; the command that continues an interrupted run; the same
    folder given to a new run offers that command; the resumed run's header says from where."""
    import signal

    from cli_helpers import signal_at

    from retinaperf import invocation
    from retinaperf.run import step

    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, precision="auto", monitor_interval=0)
    assert run_cli(args, step_fn=signal_at(step.train_step, 1)) == 128 + signal.SIGTERM
    stopped = json.loads((out / "results.json").read_text())
    m = stopped["metrics"]
    chosen = f"{m['precision']} ({m['precision_reason']})"  # auto: what it chose, and why
    header = [
        "retinaperf run: preset smoke",
        f"  device     cpu ({m['device_name']}), 1 process (1 node x 1 per node)",
        f"  precision  {chosen}",
        f"  dataset    {tiny_dataset}: {m['train_images']} training images, "
        f"{m['val_images']} validation images",
        f"  run dir    {out}",
    ]
    captured = capsys.readouterr()
    assert captured.out.splitlines()[: len(header)] == header
    resume = invocation.command("run", "--resume", str(out))
    assert captured.err.rstrip().endswith(f"continue with: {resume}")

    # the folder again, for a new run: refused, offering the resume
    assert run_cli(tiny_run_args(tiny_dataset, out)) == 1
    err = capsys.readouterr().err
    assert "holds a run that was interrupted, with checkpoint step-00000001.pt" in err
    assert f"continue it with `{resume}`" in err

    assert run_cli(["run", "--resume", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[: len(header)] == header
    assert lines[len(header)] == (
        f"  resumed    from step 1 (epoch 0, batch 1), checkpoint "
        f"{checkpoint.folder(out) / 'step-00000001.pt'}"
    )
    # the table, then where the report and the results are
    assert sum("| 配置 |" in line for line in lines) == 1
    assert lines[-2:] == [f"report: {out / 'report.md'}", f"results: {out / 'results.json'}"]


def test_more_loader_workers_than_cpus_is_one_line_naming_the_key(monkeypatch):
    """PyTorch's paragraph names no setting, and comes once per loader: one line of ours, and
    PyTorch's kept quiet."""
    import warnings

    from retinaperf import distributed
    from retinaperf.distributed import DistEnv
    from retinaperf.run import build

    monkeypatch.setattr(distributed, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch._utils, "cpu_count", lambda: 2)  # what DataLoader asks
    env = DistEnv(0, 1, 0, 1, CPU)
    with warnings.catch_warnings(record=True) as caught:  # its filters are restored after
        warnings.simplefilter("always")
        build.check_workers(2, env)  # as many as the CPUs: nothing said, nothing hidden
        torch.utils.data.DataLoader(range(4), num_workers=4)
        assert [str(w.message) for w in caught] == [
            "This DataLoader will create 4 worker processes in total. Our suggested max number "
            "of worker in current system is 2, which is smaller than what this DataLoader is "
            "going to create. Please be aware that excessive worker creation might get "
            "DataLoader running slow or even freeze, lower the worker number to avoid potential "
            "slowness/freeze if necessary."
        ]
        caught.clear()
        build.check_workers(4, env)
        torch.utils.data.DataLoader(range(4), num_workers=4)
        assert [str(w.message) for w in caught] == [
            "num_workers=4: more loader worker processes than the 2 CPUs this process may use, "
            "which slows data loading or stalls it: set --set num_workers=2 or fewer"
        ]
        caught.clear()
        build.check_workers(4, DistEnv(1, 2, 1, 2, CPU))  # the node's other ranks: quiet
        assert caught == []
