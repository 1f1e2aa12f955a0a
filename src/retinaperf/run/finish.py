"""How a run ends: the metrics reduced over the ranks and results.json written with the run's
status (`finish`), once; then, for a completed run, the report and plots, and its checkpoints go
(`publish`), which never changes that outcome.

Collectives run unless the run failed: then the other ranks may be gone, and rank 0's own view
stands for the job.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from retinaperf import files
from retinaperf.config import RunConfig
from retinaperf.distributed import DistEnv
from retinaperf.errors import OutOfMemory, UserError
from retinaperf.measure import energy, environment, monitor, utilization
from retinaperf.measure.devices.base import DevicePlugin
from retinaperf.measure.memory import driver_peak, memory_peak
from retinaperf.measure.memory import memory as job_memory
from retinaperf.measure.meter import Meter, summarize
from retinaperf.measure.monitor import Monitor
from retinaperf.model.precision import Precision
from retinaperf.report import plots, tables
from retinaperf.report import results as schema
from retinaperf.report.events import MONITOR, EventLog
from retinaperf.report.results import RESULTS, Results, build_results
from retinaperf.run import checkpoint
from retinaperf.run.checkpointer import Checkpointer


class TrainedRun(Protocol):
    """What a run's end reads of the trainer (`run.trainer.Trainer`)."""

    config: RunConfig
    env: DistEnv
    run_dir: Path
    events: EventLog
    meter: Meter
    energy: energy.RunEnergy
    monitor: Monitor | None
    readings_note: str | None
    checkpointer: Checkpointer
    device_plugin: DevicePlugin
    precision: Precision
    inference_model: nn.Module
    flops_per_image: float | None
    facts: dict[str, Any]


def finish(
    t: TrainedRun,
    status: schema.Status,
    reason: str | None = None,
    failure: schema.Failure | None = None,
) -> dict[str, Any]:
    """Reduce the metrics and write results.json with the run's status (and a failed run's kind
    of failure); returns the results on rank 0 and {"status": ...} on the others."""
    reduce = status != "failed"
    if status != "completed":
        t.meter.stopped()  # training time, and its energy, end here
    t.checkpointer.finish()  # the newest checkpoint is on disk before results say so
    # One gather of what only each rank knows: its host, device, memory peak, monitor samples.
    mine = {
        "host": environment.hostname(),
        "uuid": t.device_plugin.device_id(t.env.device),
        "memory": memory_peak(t.env.device),
        "samples": t.monitor.stop() if t.monitor else [],
        "energy": t.energy.summary(),
        "batch_shapes": sorted(t.meter.batch_shapes),
    }
    ranks = t.env.gather(mine) if reduce else [mine]
    summary = summarize(t.meter, t.env, t.config.train.target_map, reduce=reduce)
    if not t.env.is_main or ranks is None:
        return {"status": status}
    results = _results(t, (status, reason, failure), summary, ranks)
    files.write_json_atomic(t.run_dir / RESULTS, results)
    t.events.emit(
        "run_end",
        status=status,
        reason=reason,
        **{k: v for k, v in results["metrics"].items() if k != "evaluations"},
    )
    return cast(dict[str, Any], results)


def _results(
    t: TrainedRun,
    outcome: tuple[schema.Status, str | None, schema.Failure | None],
    summary: dict,
    ranks: list[dict],
) -> Results:
    """The results of the job, on rank 0, from its summary and what each rank gave. The
    measure layer's figures are plain dicts (it sits below the report layer's schema): they
    are given their schema's types here, and `build_results` checks them."""
    cfg, env, meter, plugin = t.config, t.env, t.meter, t.device_plugin
    status, reason, failure = outcome
    samples = [sample for rank in ranks for sample in rank["samples"]]
    monitored = monitor.summarize(samples) if samples else None
    uuids = [rank["uuid"] for rank in ranks]
    driver = driver_peak(monitored["devices"], uuids) if monitored else None
    memory = job_memory([rank["memory"] for rank in ranks], driver, plugin.memory_view)
    device_name = plugin.device_name(env.device)
    segments = t.checkpointer.segments.until(status, meter.steps)
    batch_shapes = sorted({tuple(shape) for rank in ranks for shape in rank["batch_shapes"]})
    spent = energy.job_energy(
        ranks,
        samples,
        plugin.energy_is_host,
        summary["trained_images"],
        summary["train_time"] - summary["eval_time"],
        len(segments),
        env.nodes if plugin.energy_is_host else env.world_size,
    )
    if samples:
        files.write_jsonl(t.run_dir / MONITOR, samples)
    completed = status == "completed"
    if completed and cfg.save_model:
        path = t.run_dir / "model.pt"
        torch.save(t.precision.float32_state_dict(t.inference_model), path)
    used = utilization.utilization(
        t.flops_per_image,
        summary["p_core"],
        plugin.peak(device_name, t.precision.peak_math()),
        t.precision.peak_math(),
        env.world_size,
    )
    hosts = [rank["host"] for rank in ranks]
    machine = environment.capture(env.device, hosts, plugin, t.readings_note)
    return build_results(
        status=status,
        reason=reason,
        failure=failure,
        summary=cast(schema.Summary, summary),
        memory=cast(schema.Memory, memory),
        facts=cast(schema.Facts, t.facts),
        energy=cast(schema.JobEnergy, spent),
        utilization=cast(schema.Utilization, used),
        config=cfg,
        world_size=env.world_size,
        nodes=env.nodes,
        devices_per_node=env.local_world_size,
        device_name=device_name,
        skipped_steps=int(t.precision.skipped_steps().item()),
        batch_shapes=batch_shapes,
        segments=cast(list[schema.Segment], segments),
        checkpoint_failures=t.checkpointer.writer.failures,
        newest_checkpoint=t.checkpointer.newest,
        monitor=cast(schema.MonitorSummary | None, monitored),
        environment=cast(schema.Environment, machine),
        run_dir=t.run_dir,
        # e2e_time ends here, as results.json is written (over every segment of the run).
        e2e_time=meter.e2e_time(),
    )


def publish(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """What a completed run writes once its results.json is: report.md and the plots (from the
    event log and monitor.jsonl); then its checkpoints go (they are for going on, and cost
    hundreds of MB each; save_model=true keeps the trained weights). The numbers were measured:
    a report or plot that cannot be drawn (a full disk, a plot of an unusual run) is a warning
    and a note in results.json, never a change of status or numbers. Returns the results as
    written."""
    try:
        files.write_text_atomic(run_dir / tables.REPORT, tables.render_report(results))
        plots.write_run_plots(run_dir)
    except Exception as err:
        note = (
            f"report: {tables.REPORT} or {tables.PLOTS}/ not written ({type(err).__name__}: "
            f"{err}); results.json holds every number: `retinaperf report --plots {run_dir}` "
            "draws them again"
        )
        warnings.warn(note, stacklevel=1)
        results = {**results, "notes": [*results["notes"], note]}
        files.write_json_atomic(run_dir / RESULTS, results)
    shutil.rmtree(checkpoint.folder(run_dir), ignore_errors=True)
    return results


def record_failure(t: TrainedRun, err: BaseException) -> None:
    """results.json of a run that failed once set up, saying why; never masks the error. An
    allocation that failed is an OutOfMemory by now (job.py, `step.as_out_of_memory`)."""
    reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    try:
        finish(t, "failed", reason, "out_of_memory" if isinstance(err, OutOfMemory) else "error")
    except Exception as secondary:  # the run is failing already: say so, keep the first error
        warnings.warn(
            "could not write the failed run's results.json: "
            f"{type(secondary).__name__}: {secondary}",
            stacklevel=1,
        )
