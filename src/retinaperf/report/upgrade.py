"""The upgrade of older results.json files to the current schema (results.py).

A field that a file's version did not record gets what it meant then (before issue 15 the
transform was torchvision's), or None where nothing can be known (said at the field).
"""

from __future__ import annotations

import copy
from typing import Any

from retinaperf.errors import UserError
from retinaperf.report.results import RANDOM_INIT, SCHEMA_VERSION, imagenet_init


def upgrade(results: dict[str, Any]) -> dict[str, Any]:
    """`results` in the current schema's shape: a file of an earlier version gets the fields it
    lacks, each with what it meant when that file was written; the current shape is returned as
    it is. Raises UserError for what is not a results object, or of a version newer than this."""
    if not all(isinstance(results.get(part), dict) for part in ("metrics", "config")):
        raise UserError("no 'metrics' and 'config': it is not a retinaperf results file")
    version = results.get("schema_version", 0)
    if version == SCHEMA_VERSION:
        return results
    if not isinstance(version, int) or not 0 <= version < SCHEMA_VERSION:
        raise UserError(
            f"schema_version {version!r} is not one this retinaperf reads (0 to "
            f"{SCHEMA_VERSION}): read it with the retinaperf that wrote it, or a newer one"
        )
    upgraded = copy.deepcopy(results)
    if version < 1:
        _from_version_0(upgraded)
    if version < 2:
        _from_version_1(upgraded)
    upgraded.setdefault("notes", [])  # version 3: nothing was noted after the outcome before
    # Version 4 (issue 25): the time was not broken down before, nor a failure's kind recorded
    # (None: not known, as for no failure).
    upgraded["metrics"].setdefault("breakdown", None)
    upgraded["metrics"].setdefault(
        "breakdown_note", "results written before retinaperf broke the training time down"
    )
    upgraded.setdefault("failure", None)
    # First, as written; a versioned file's own (older) number must not win over it.
    return {
        "schema_version": SCHEMA_VERSION,
        **{k: v for k, v in upgraded.items() if k != "schema_version"},
    }


def _from_version_0(results: dict[str, Any]) -> None:
    """Fill in, in place, what the unversioned files lacked. Each such file has the fields of the
    commit that wrote it, so each step gives the defaults of the fields one commit added, and
    they run oldest first (a later step reads what an earlier one set)."""
    for step in (
        _before_precision_reason,
        _before_throughput_mode,
        _before_step_choices,
        _before_checkpoints,
        _before_energy,
        _before_batched_transform,
    ):
        step(results)


def _before_precision_reason(results: dict[str, Any]) -> None:
    """40e3f7e: the precision's reason and math; before, fp32 was IEEE and only tf32 used TF32,
    and the device's peak was looked up by the precision's name."""
    m, train = results["metrics"], results["config"].get("train", {})
    precision, requested = m.get("precision"), train.get("precision")
    m.setdefault(
        "precision_reason",
        "as configured" if requested == precision else f"{requested}: its reason was not recorded",
    )
    mode = "tf32" if precision == "tf32" else "ieee"
    m.setdefault(
        "math",
        {
            "conv_fp32_precision": mode,
            "matmul_fp32_precision": mode,
            "cudnn_benchmark": False,
            "cudnn_deterministic": False,
            "deterministic_algorithms": train.get("deterministic", False),
            "effective_conv": mode,
            "effective_matmul": mode,
        },
    )
    m.setdefault("peak_math", precision)


def _before_throughput_mode(results: dict[str, Any]) -> None:
    """cfaf473: no timing warm-up before, so p_core_steady is p_core; no throughput mode, so the
    backbone was random only where no weights were given, the data the one generator's, and no
    step ran under the profiler."""
    m, config = results["metrics"], results["config"]
    train = config.get("train", {})
    m.setdefault("timing_warmup_steps", 0)
    m.setdefault("p_core_steady", m.get("p_core"))
    m.setdefault("throughput_only", False)
    m.setdefault("precision_requested", train.get("precision"))
    weights = str(m.get("backbone_weights"))
    m.setdefault(
        "backbone_init",
        RANDOM_INIT if weights.strip().lower() == "none" else imagenet_init(weights),
    )
    config.setdefault("data", {}).setdefault("synth_profile", "shapes")
    train.setdefault("profile_steps", "")


def _before_step_choices(results: dict[str, Any]) -> None:
    """22f7d61: the step's choices; before, torchvision's loss and post-processing unless
    configured, torch's default SGD and DDP's default options; the trainer did not yet apply the
    channels_last and compile keys."""
    m, model = results["metrics"], results["config"].get("model", {})
    ddp_defaults = {"broadcast_buffers": True, "gradient_as_bucket_view": False}
    m.setdefault(
        "implementation",
        {
            "loss": model.get("loss", "torchvision"),
            "postprocess": model.get("postprocess", "torchvision"),
            "channels_last": False,
            "compile": False,
            "optimizer": "SGD (torch's default)",
            "ddp": ddp_defaults if m.get("world_size", 1) > 1 else None,
        },
    )


def _before_checkpoints(results: dict[str, Any]) -> None:
    """20e631f: statuses, checkpoints and segments; before, results were written only by a
    completed run of one segment without checkpoints, and only amp and fp16 scale the loss."""
    m = results["metrics"]
    results.setdefault("status", "completed")
    results.setdefault("reason", None)
    results.setdefault("segments", None)
    results.setdefault("checkpoint", None)
    m.setdefault("checkpoint_time", 0.0)
    m.setdefault("skipped_steps", None if m.get("precision") in ("amp", "fp16") else 0)
    m.setdefault("segments", 1)
    m.setdefault("time_between_segments", 0.0)
    m.setdefault("checkpoint_failures", 0)


def _before_energy(results: dict[str, Any]) -> None:
    """5a8162b: energy was not read before."""
    m = results["metrics"]
    for key in ("energy_train_j", "energy_eval_j", "images_per_joule", "power_train_w"):
        m.setdefault(key, None)
    m.setdefault("energy_source", None)
    m.setdefault("energy_note", "results written before retinaperf read energy")
    results.setdefault("energy", {"devices": [], "hosts": []})


def _before_batched_transform(results: dict[str, Any]) -> None:
    """b057cc9 (issue 15): before, torchvision's transform, constants recomputed at every step,
    torch.compile in its default mode; the batch shapes were not recorded."""
    m = results["metrics"]
    impl = m["implementation"]
    impl.setdefault("compile_mode", "default" if impl.get("compile") else None)
    impl.setdefault("transform", "torchvision")
    impl.setdefault("reuse_constants", False)
    m.setdefault("batch_shapes", None)
    results.setdefault("batch_shapes", None)


def _from_version_1(results: dict[str, Any]) -> None:
    """Issue 18: the readings came from NVML on CUDA devices and from the host on a CPU; the
    peaks from the NVIDIA table, which knew no other device."""
    m, env = results["metrics"], results.setdefault("environment", {})
    env.setdefault(
        "device_plugin", {"cuda": "nvidia", "cpu": "cpu"}.get(env.get("device_type"), "none")
    )
    sampled = bool((results.get("monitor") or {}).get("devices"))
    env.setdefault("device_readings", "NVML" if sampled else None)
    env.setdefault(
        "device_readings_note",
        None if sampled else "no device readings (written before device plug-ins)",
    )
    known = m.get("peak_tflops") is not None
    m.setdefault("peak_source", "NVIDIA datasheet" if known else None)
    m.setdefault(
        "peak_note",
        None if known else "no peak for this device in the table of the retinaperf that wrote it",
    )
