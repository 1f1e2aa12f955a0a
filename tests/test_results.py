"""results.json's schema: the builder's output has its shape, every committed results file of any
version loads in that shape and renders, and a file that lacks a field is refused by name.

`made_results` is the results object of other tests (test_report, test_rounds): built by
`build_results` from the measuring functions' own outputs, so that it has every field a run
writes."""

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from retinaperf import config
from retinaperf.distributed import DistEnv
from retinaperf.errors import UserError
from retinaperf.measure import energy, environment, monitor, utilization
from retinaperf.measure.devices.cpu import Cpu
from retinaperf.measure.devices.nvidia import PEAKS, Nvidia
from retinaperf.measure.memory import memory
from retinaperf.measure.meter import Meter, summarize
from retinaperf.model.precision import math_in_effect
from retinaperf.report.comparison import compare, render_comparison
from retinaperf.report.loading import load_results
from retinaperf.report.results import SCHEMA_VERSION, Results, build_results, check
from retinaperf.report.spread import render_all_spreads, spread
from retinaperf.report.tables import render_report
from retinaperf.report.upgrade import upgrade

CPU = torch.device("cpu")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"
COMMITTED = sorted(path.parent for path in DOCS.glob("**/results.json"))
# Those written before results.json had a schema_version (the first committed runs)
UNVERSIONED = [
    d for d in COMMITTED if "schema_version" not in json.loads((d / "results.json").read_text())
]
UUID = "GPU-0a1b2c3d"


def _summary(target_map: float) -> dict[str, Any]:
    """SPEC §3's summary of three steps and one evaluation; the clock ticks a second a read."""
    ticks = iter(range(1000))
    meter = Meter(0.0, CPU, clock=lambda: float(next(ticks)), synchronize=lambda _: None)
    meter.timing_warmup_steps = 1
    meter.train_started()
    for _ in range(3):
        with meter.core_step(images=16):
            pass
    with meter.evaluation():
        pass
    meter.eval_done(0, {"AP": 0.35012})
    return summarize(meter, DistEnv(0, 1, 0, 1, CPU), target_map)


def _built(status: str = "completed", **overrides: Any) -> dict[str, Any]:
    """The results of a one-GPU run of preset A100-1x1 on COCO2017, from what `finish` has."""
    run_config = config.resolve("A100-1x1", {"data_dir": "/data/coco2017", **overrides})
    summary = _summary(run_config.train.target_map)
    sample = {"time": 1.0, "host": "node1", "cpu_util": 50.0, "mem_used_gib": 9.0}
    gpu = {"index": 0, "uuid": UUID, "name": "NVIDIA A100-SXM4-40GB", "util": 90.0}
    gpu |= {"mem_used_gib": 38.1, "mem_total_gib": 40.0, "power_w": 300.0, "temp_c": 60.0}
    samples = [{**sample, "mem_total_gib": 64.0, "devices": [{**gpu, "sm_clock_mhz": 1400.0}]}]
    monitored = monitor.summarize(samples)
    counted = {"label": UUID, "source": "NVML energy counter", "train_j": 2100.0, "eval_j": 300.0}
    package = {"label": "package-0", "source": "RAPL", "train_j": 700.0, "eval_j": 100.0}
    rank_energy = {"device": {**counted, "complete": True}, "device_reason": None}
    rank_energy |= {"reads_host": True, "host": [{**package, "complete": True}]}
    rank_energy |= {"host_reason": None, "windows": []}
    ranks = [{"host": "node1", "uuid": UUID, "energy": rank_energy}]
    peak = {"used": 36.0, "total": 40.0, "source": "allocator peak reserved / device total"}
    images, p_core = summary["trained_images"], summary["p_core"]
    train_seconds = summary["train_time"] - summary["eval_time"]
    facts = {"dataset": "/data/coco2017", "train_images": 117266, "val_images": 5000}
    facts |= {
        "backbone_weights": run_config.model.backbone_weights,
        "backbone_sha256": "0676ba61" + "0" * 56,
        "backbone_init": "ImageNet weights from /cache/resnet50-0676ba61.pth",
        "throughput_only": False,
        "precision_requested": "fp32",
        "implementation": {
            "loss": "batched",
            "postprocess": "batched",
            "channels_last": True,
            "compile": False,
            "compile_mode": None,
            "transform": "batched",
            "reuse_constants": True,
            "optimizer": "SGD (fused)",
            "ddp": None,
        },
        "precision": "fp32",
        "precision_reason": "as configured",
        "math": math_in_effect(CPU),
    }
    segment = {"started_at": "2026-12-01T10:00:00+00:00", "start_step": 0, "resumed_from": None}
    segment |= {"time_lost_s": None, "elastic_restart": 0, "ended": status, "end_step": 3}
    a100_tf32 = PEAKS.peak("NVIDIA A100-SXM4-40GB", "tf32")
    return build_results(
        status=status,
        reason=None if status == "completed" else "stopped by SIGTERM",
        summary=summary,
        memory=memory([peak], (38.1, 40.0), Nvidia.memory_view),
        facts=facts,
        energy=energy.job_energy(ranks, samples, False, images, train_seconds, 1, 1),
        utilization=utilization.utilization(1.3e12, p_core, a100_tf32, "tf32", 1),
        config=run_config,
        world_size=1,
        nodes=1,
        devices_per_node=1,
        device_name="NVIDIA A100-SXM4-40GB",
        skipped_steps=0,
        batch_shapes=[(16, 3, 800, 1216), (16, 3, 1344, 800)],
        segments=[{**segment, "ended_at": "2026-12-01T10:20:00+00:00"}],
        checkpoint_failures=0,
        newest_checkpoint=Path("runs/x/checkpoints/step-3.pt"),
        monitor=monitored,
        environment=environment.capture(CPU, ["node1"], Cpu(), None),
        run_dir=Path("runs/x"),
        e2e_time=1234.4,
    )


def made_results(set_pairs: dict[str, Any] | None = None, **metrics: Any) -> dict[str, Any]:
    """A completed run's results as `build_results` makes them, its configuration changed by
    `set_pairs` (`--set` keys) and then `metrics` replaced."""
    results = _built(**(set_pairs or {}))
    results["metrics"].update(metrics)
    return results


def test_built_results_round_trip_through_the_schema():
    built = _built()
    written = json.loads(json.dumps(built))  # as results.json holds it
    # every key is declared (conversion drops the others), with its declared type
    assert msgspec.convert(written, Results) == written
    m = built["metrics"]
    assert built["schema_version"] == SCHEMA_VERSION
    assert (m["epochs"], m["steps"], m["global_batch"], m["lr"]) == (1, 3, 16, 0.04)
    assert (m["batch_shapes"], built["batch_shapes"][0]) == (2, [16, 3, 800, 1216])
    assert (m["segments"], m["time_between_segments"]) == (1, 0.0)
    assert (m["energy_train_j"], m["power_train_w"]) == (2100.0, 300.0)
    assert built["energy"]["hosts"][0]["train_j"] == 700.0
    assert m["mem"] == "38.1/40.0" and m["e2e_time"] == 1234.4
    assert built["checkpoint"] is None  # a completed run keeps no checkpoint
    assert _built("interrupted")["checkpoint"] == "runs/x/checkpoints/step-3.pt"


def test_built_results_are_laid_out_as_the_trainer_wrote_them():
    built = _built()
    assert list(built) == [
        "schema_version", "status", "reason", "failure", "metrics", "segments", "batch_shapes",
        "energy", "checkpoint", "monitor", "config", "environment", "run_dir", "notes",
    ]  # fmt: skip
    keys = list(built["metrics"])
    # the summary, memory and set-up facts first, e2e_time last (it ends as the file is written)
    assert keys[:3] == ["init_time", "train_time", "eval_time"]
    assert keys.index("mem") < keys.index("dataset") < keys.index("epochs")
    assert keys.index("checkpoint_failures") < keys.index("energy_train_j") < keys.index("mfu")
    assert keys[-1] == "e2e_time"


def test_upgrade_leaves_current_results_as_they_are():
    built = _built()
    assert upgrade(built) is built
    assert upgrade(copy.deepcopy(built)) == built


def _as_version_3(status: str = "completed") -> dict[str, Any]:
    """The built results as a file of schema 3 has them: no breakdown of the time, no kind of
    failure."""
    older = _built(status)
    del older["metrics"]["breakdown"], older["metrics"]["breakdown_note"], older["failure"]
    return older


def test_a_version_2_file_gets_no_notes():
    older = {key: value for key, value in _as_version_3().items() if key != "notes"}
    upgraded = upgrade({**older, "schema_version": 2})
    assert upgraded["notes"] == [] and upgraded["schema_version"] == SCHEMA_VERSION


def test_a_version_3_file_gets_a_null_breakdown_with_its_reason():
    upgraded = upgrade({**_as_version_3(), "schema_version": 3})
    check(upgraded)
    m = upgraded["metrics"]
    assert m["breakdown"] is None
    assert m["breakdown_note"] == "results written before retinaperf broke the training time down"
    assert "- time breakdown: none: results written before" in render_report(upgraded)
    # everything else as it was written
    expected = _built()
    expected["metrics"] |= {"breakdown": None, "breakdown_note": m["breakdown_note"]}
    assert upgraded == expected


def test_a_version_3_failed_file_records_no_kind_of_failure():
    upgraded = upgrade({**_as_version_3("failed"), "schema_version": 3})
    check(upgraded)
    assert upgraded["failure"] is None and upgraded["status"] == "failed"


@pytest.mark.parametrize("run_dir", COMMITTED, ids=lambda p: str(p.relative_to(DOCS)))
def test_every_committed_results_file_loads_upgraded_and_renders(run_dir):
    original = json.loads((run_dir / "results.json").read_text())
    results = load_results(run_dir, completed_only=False)
    check(results)
    assert results["schema_version"] == SCHEMA_VERSION
    assert json.loads((run_dir / "results.json").read_text()) == original  # read, not rewritten
    assert upgrade(upgrade(original)) == upgrade(original) == results
    if results["status"] != "completed":  # a run writes report.md once completed, and only then
        assert not (run_dir / "report.md").exists() and results["reason"]
        return
    report = render_report(results)
    assert f"| {results['metrics']['precision']} |" in report and "- step: transform " in report


@pytest.mark.parametrize("run_dir", UNVERSIONED, ids=lambda p: str(p.relative_to(DOCS)))
def test_an_unversioned_committed_file_says_what_it_did_not_record(run_dir):
    report = render_report(load_results(run_dir))
    assert "- energy: no figure: results written" in report
    assert "- time breakdown: none: results written before" in report


def test_committed_results_render_side_by_side():
    completed = [d for d in COMMITTED if load_results(d, False)["status"] == "completed"]
    runs = [load_results(run_dir) for run_dir in completed]
    assert len(runs) >= 7 and len(UNVERSIONED) >= 7
    rows = compare(runs)
    for fmt in ("md", "csv", "json"):
        assert render_comparison(rows, fmt)
    assert spread(runs)["p_core"]["n"] == len(runs)
    render_all_spreads(runs)


def test_unversioned_results_get_what_their_fields_meant_then():
    run_dir = DOCS / "2026-11-25-cpu-2core-amd-epyc-smoke"  # before issues 7 to 15
    m = load_results(run_dir)["metrics"]
    # issue 15: torchvision's transform, its constants recomputed at every step
    impl = m["implementation"]
    assert (impl["transform"], impl["reuse_constants"], impl["loss"]) == (
        "torchvision",
        False,
        "torchvision",
    )
    assert (impl["channels_last"], impl["compile"], impl["ddp"]) == (False, False, None)
    # no timing warm-up: p_core_steady is p_core; fp32 was IEEE float32
    assert (m["timing_warmup_steps"], m["p_core_steady"]) == (0, m["p_core"])
    assert m["math"]["effective_conv"] == m["math"]["effective_matmul"] == "ieee"
    assert m["precision_reason"] == "auto: its reason was not recorded"
    # one segment, no checkpoints, no energy read, shapes not recorded
    assert (m["segments"], m["checkpoint_time"], m["skipped_steps"]) == (1, 0.0, 0)
    assert m["energy_train_j"] is None and m["images_per_joule"] is None
    assert m["batch_shapes"] is None
    amp = load_results(DOCS / "2026-11-28-nvidia-h200-gpu-check" / "amp")["metrics"]
    assert amp["skipped_steps"] is None  # loss scaling skipped steps no one counted


def test_upgrade_leaves_its_argument_alone():
    original = json.loads((COMMITTED[0] / "results.json").read_text())
    kept = copy.deepcopy(original)
    upgrade(original)
    assert original == kept


def _write(tmp_path: Path, results: dict) -> Path:
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path


def test_a_missing_field_is_refused_naming_the_file_and_the_field(tmp_path):
    results = _built()
    del results["metrics"]["p_core"]
    with pytest.raises(UserError, match="missing required field `p_core`") as refused:
        load_results(_write(tmp_path, results))
    assert str(tmp_path / "results.json") in str(refused.value)
    assert "$.metrics" in str(refused.value)


def test_a_mistyped_field_is_refused_naming_it(tmp_path):
    results = _built()
    results["metrics"]["implementation"]["compile"] = "no"
    with pytest.raises(UserError, match=r"\$\.metrics\.implementation\.compile"):
        load_results(_write(tmp_path, results))


def test_a_file_of_a_newer_schema_or_not_of_results_is_refused(tmp_path):
    with pytest.raises(UserError, match="schema_version 99 is not one this retinaperf reads"):
        load_results(_write(tmp_path, {**_built(), "schema_version": 99}))
    with pytest.raises(UserError, match="it is not a retinaperf results file"):
        load_results(_write(tmp_path, {"metrics": {}}))
    with pytest.raises(UserError, match="it is not a retinaperf results file"):
        load_results(_write(tmp_path, [1, 2]))
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(UserError, match=r"results\.json is not valid JSON"):
        load_results(tmp_path)


def test_a_stopped_run_loads_only_when_asked(tmp_path):
    run_dir = _write(tmp_path, _built("interrupted"))
    with pytest.raises(UserError, match="was interrupted \\(stopped by SIGTERM\\)"):
        load_results(run_dir)
    assert load_results(run_dir, completed_only=False)["status"] == "interrupted"
