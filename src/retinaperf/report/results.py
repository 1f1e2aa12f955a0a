"""results.json: its schema, the pure function that builds it, and the upgrade of older files.

Readers (the report, rounds, the GPU check) read a file through `report.loading.load_results`: it
brings a file of any earlier version to the current shape (`upgrade.upgrade`) and checks it
(`check`), so that no reader needs to know which version wrote it. Versions: 0, files without
`schema_version` (their fields came in over several commits, back to the first committed
results, of 966242c); 1, the first versioned schema; 2, issue 18: device plug-ins name their
readings and peaks; 3, `notes`, what went wrong after the outcome was written (issue 23); 4,
this one (issue 25): `breakdown`, where the training time went, and `failure`, what kind of
failure a failed run met (`retinaperf sweep` records a run out of memory as the boundary of the
batch, not as a crash).

TypedDicts, not dataclasses: results.json is a JSON object that readers index by key and the
builder writes as a dict; TypedDicts type those keys without a conversion at either end, and
msgspec (a dependency already) checks a file against them, naming the missing or mistyped field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

import msgspec

from retinaperf.config import RunConfig
from retinaperf.errors import UserError

RESULTS = "results.json"
SCHEMA_VERSION = 4  # raised when a field is added or changes meaning; `upgrade` learns the step

Status = Literal["completed", "interrupted", "failed"]
# What a failed run met: its device's memory could not hold the step (or evaluation), or any other
# error. None: a run that did not fail, or a file written before the field (version < 4).
Failure = Literal["out_of_memory", "error"]


class Evaluation(TypedDict):
    epoch: int
    step: int
    mAP: float
    seconds: float


class TimePart(TypedDict):
    part: Literal["data", "host", "device", "communication", "other"]
    seconds: float  # "other" is negative where parts overlapped
    share: float | None  # of the breakdown's total; None: a total of 0


class Breakdown(TypedDict):
    """Where the training time went (`measure.breakdown.breakdown`, docs/metrics.md)."""

    total: float  # train_time - eval_time - checkpoint_time
    parts: list[TimePart]  # they add up to `total`
    device_is_host: bool  # the CPU: no host part, the device's is the host's time
    bound_by: Literal["data", "host", "device", "communication"] | None
    evidence: str
    advice: str | None  # None: no verdict (no step timed)


class Summary(TypedDict):
    """The times, throughputs and accuracy of docs/metrics.md (`measure.meter.summarize`)."""

    init_time: float
    train_time: float
    eval_time: float
    checkpoint_time: float
    core_time: float
    trained_images: int
    steps: int
    p_whole: float | None  # None: no image trained
    p_train: float | None
    p_core: float | None
    p_core_steady: float | None  # None: no step after the first timing_warmup_steps
    timing_warmup_steps: int
    breakdown: Breakdown | None  # None: a file written before the breakdown (breakdown_note)
    breakdown_note: str | None  # why there is no breakdown; None when there is one
    mAP: float | None  # None: a stopped run with no evaluation
    best_mAP: float | None
    best_epoch: int | None
    best_step: int | None
    converged: bool
    target_mAP: float
    time_to_target: float | None
    evaluations: list[Evaluation]


class Memory(TypedDict):
    """Peak memory from both views, GiB (`measure.memory.memory`)."""

    mem: str
    mem_used_gib: float
    mem_total_gib: float
    mem_source: str
    mem_process: str
    mem_process_source: str
    mem_driver: str | None  # None: the device plug-in's sampler did not see the job's devices
    mem_per_rank_gib: list[float]


class Math(TypedDict):
    """The float32 math in force (`model.precision.math_in_effect`)."""

    conv_fp32_precision: str
    matmul_fp32_precision: str
    cudnn_benchmark: bool
    cudnn_deterministic: bool
    deterministic_algorithms: bool
    effective_conv: Literal["tf32", "ieee"]
    effective_matmul: Literal["tf32", "ieee"]


class Ddp(TypedDict):
    broadcast_buffers: bool
    gradient_as_bucket_view: bool


class Implementation(TypedDict):
    """How the step was computed; the workload is the same either way."""

    loss: str
    postprocess: str
    channels_last: bool
    compile: bool
    compile_mode: str | None  # None: not compiled
    transform: str
    reuse_constants: bool
    optimizer: str
    ddp: Ddp | None  # None: one rank, no DDP


# The words of `Facts.backbone_init`, how the backbone started: run/build.py writes them, and
# upgrade.py gives them to the files written before the field.
RANDOM_INIT = "random initialisation (batch norm and every layer trainable)"
RANDOM_IN_STRUCTURE = (
    "random values in the pretrained structure (frozen batch norm, 3 trainable stages)"
)


def imagenet_init(path: str) -> str:
    """`backbone_init` of a backbone that started from the ImageNet weights at `path`."""
    return f"ImageNet weights from {path}"


class Facts(TypedDict):
    """What the set-up knows: the dataset, the weights, the precision and the step."""

    dataset: str
    train_images: int
    val_images: int
    backbone_weights: str
    backbone_sha256: str | None
    backbone_init: str
    throughput_only: bool
    precision_requested: str
    implementation: Implementation
    precision: str
    precision_reason: str
    math: Math


class EnergyTotals(TypedDict):
    """The job's energy sums (`measure.energy.job_energy`): null, never a part, when a device
    has no figure; `energy_note` says why."""

    energy_train_j: float | None
    energy_eval_j: float | None
    images_per_joule: float | None
    power_train_w: float | None
    energy_source: str | None
    energy_note: str | None


class HostEnergy(TypedDict):
    host: str
    source: str | None  # None: nothing read
    train_j: float | None
    eval_j: float | None
    complete: bool  # False: a counter reset or missed a reading


class DeviceEnergy(HostEnergy):
    label: str | None
    reason: str | None  # why there is no figure


class Energy(TypedDict):
    devices: list[DeviceEnergy]
    hosts: list[HostEnergy]  # the CPU packages beside GPUs


class JobEnergy(EnergyTotals):
    """`measure.energy.job_energy`'s result: the sums and, under `energy`, their parts."""

    energy: Energy


class Utilization(TypedDict):
    """FLOPs and MFU (`measure.utilization.utilization`)."""

    flops_per_image: float | None  # None: a run whose rank 0 counted none
    achieved_tflops: float | None  # None: no rate (a run that failed before its first step)
    peak_math: str
    peak_tflops: float | None  # None: the device's plug-in knows no peak (peak_note says why)
    peak_source: str | None  # the datasheet the peak comes from
    peak_note: str | None  # why there is no peak; None when there is one
    mfu: float | None


class Metrics(Summary, Memory, Facts, EnergyTotals, Utilization):
    """The fields of docs/metrics.md, flat, as the event log's run_end has them."""

    epochs: int
    world_size: int
    nodes: int
    devices_per_node: int
    local_batch: int
    global_batch: int
    lr: float
    seed: int
    device_name: str
    skipped_steps: int | None  # None: not counted (amp and fp16 runs before 2026-11-28)
    batch_shapes: int | None  # distinct padded batch shapes; None: not recorded
    segments: int
    time_between_segments: float
    checkpoint_failures: int
    e2e_time: float


class Segment(TypedDict):
    """One process of the run: the first, and each resumed or restarted one."""

    started_at: str
    start_step: int
    resumed_from: str | None
    time_lost_s: float | None
    elastic_restart: int
    ended: Literal["completed", "interrupted", "failed", "crashed"]
    end_step: int
    ended_at: NotRequired[str]  # a crashed segment's end is not known


class HostSummary(TypedDict):
    cpu_util_mean: float | None
    cpu_util_peak: float | None
    mem_used_peak_gib: float | None
    mem_total_gib: float | None


class DeviceSummary(TypedDict):
    host: str
    index: int
    uuid: str | None
    name: str | None
    util_mean: float | None
    mem_used_peak_gib: float | None
    mem_total_gib: float | None
    power_mean_w: float | None
    power_peak_w: float | None
    temp_peak_c: float | None
    sm_clock_mean_mhz: float | None


class MonitorSummary(TypedDict):
    """The system monitor's means and peaks (`measure.monitor.summarize`)."""

    samples: int
    seconds: float
    host: dict[str, HostSummary]
    devices: list[DeviceSummary]


class Environment(TypedDict):
    """Versions, devices and hosts (`measure.environment.capture`)."""

    command: list[str]
    python: str
    packages: dict[str, str | None]
    git_commit: str | None
    os: str
    cpu: str
    cpu_count: int
    hosts: list[str]
    device_type: str
    device_name: str
    device_count: int
    device_plugin: str  # the plug-in that read the device (measure/devices/)
    device_readings: str | None  # where the monitor's device readings come from; None: none
    device_readings_note: str | None  # why there are none; None when there are
    torch_cuda_runtime: str | None
    # The plug-in's facts (DevicePlugin.facts): NVIDIA's, AMD's; a vendor plug-in's keys pass.
    cuda_driver: NotRequired[str | None]
    cudnn: NotRequired[int | None]
    rocm_driver: NotRequired[str | None]
    hip_runtime: NotRequired[str | None]


class Results(TypedDict):
    schema_version: int
    status: Status
    reason: str | None  # why a run stopped or failed; None when completed
    failure: Failure | None
    metrics: Metrics
    segments: list[Segment] | None  # None: not recorded (a run of one segment)
    batch_shapes: list[list[int]] | None  # None: not recorded
    energy: Energy
    checkpoint: str | None  # the newest checkpoint of a run that can go on
    monitor: MonitorSummary | None  # None: the monitor was off
    # RunConfig.to_dict(), whose schema is config/settings.py's; the upgrade adds the keys that
    # readers read and older versions lacked.
    config: dict[str, Any]
    environment: Environment
    run_dir: str
    notes: list[str]
    """What went wrong once the outcome was written (report.md or the plots not drawn): never a
    change of status or numbers."""


def build_results(
    *,
    status: Status,
    reason: str | None,
    failure: Failure | None = None,
    summary: Summary,
    memory: Memory,
    facts: Facts,
    energy: JobEnergy,
    utilization: Utilization,
    config: RunConfig,
    world_size: int,
    nodes: int,
    devices_per_node: int,
    device_name: str,
    skipped_steps: int,
    batch_shapes: list[tuple[int, ...]],
    segments: list[Segment],
    checkpoint_failures: int,
    newest_checkpoint: Path | None,
    monitor: MonitorSummary | None,
    environment: Environment,
    run_dir: Path,
    e2e_time: float,
) -> Results:
    """results.json of a run from what its end gathered (pure: no clock, no file, no device).

    `batch_shapes` are the distinct padded shapes of the training batches, sorted; `segments`
    every segment of the run, the last one ended; `e2e_time` is read by the caller as late as it
    can, just before the file is written."""
    evaluations = summary["evaluations"]
    # A completed run has nothing left to resume: its checkpoints are deleted.
    resumable = newest_checkpoint is not None and status != "completed"
    metrics: Metrics = {
        **summary,
        **memory,
        **facts,
        "epochs": evaluations[-1]["epoch"] + 1 if evaluations else 0,
        "world_size": world_size,
        "nodes": nodes,
        "devices_per_node": devices_per_node,
        "local_batch": config.train.batch_size,
        "global_batch": config.train.batch_size * world_size,
        "lr": config.train.lr,
        "seed": config.train.seed,
        "device_name": device_name,
        "skipped_steps": skipped_steps,
        "batch_shapes": len(batch_shapes),
        "segments": len(segments),
        "time_between_segments": sum(seg["time_lost_s"] or 0.0 for seg in segments),
        "checkpoint_failures": checkpoint_failures,
        # The sums alone: their parts (`energy`) go in results.json beside the metrics.
        **cast(EnergyTotals, {key: value for key, value in energy.items() if key != "energy"}),
        **utilization,
        "e2e_time": e2e_time,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "reason": reason,
        "failure": failure,
        "metrics": metrics,
        "segments": segments,
        "batch_shapes": [list(shape) for shape in batch_shapes],
        "energy": energy["energy"],
        "checkpoint": str(newest_checkpoint) if resumable else None,
        "monitor": monitor,
        "config": config.to_dict(),
        "environment": environment,
        "run_dir": str(run_dir),
        "notes": [],
    }


def check(results: dict[str, Any]) -> Results:
    """`results`, refused (UserError naming the field) unless it has the current schema's shape;
    keys the schema does not declare pass."""
    try:
        msgspec.convert(results, Results)
    except msgspec.ValidationError as err:
        raise UserError(f"not a results file of schema_version {SCHEMA_VERSION}: {err}") from None
    return cast(Results, results)
