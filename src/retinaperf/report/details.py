"""The lines of a run's report.md under the seed's table: what its numbers stand on (accuracy,
precision and math, how the step was computed, times, checkpoints, memory, compute, energy, the
monitor, the device readings, the dataset), each figure with its source."""

from __future__ import annotations

from retinaperf.units import NO_VALUE, significant

THROUGHPUT_ONLY_NOTE = (
    f"mAP {NO_VALUE}: a throughput-only run (generated COCO-like data or random weights) "
    "measures speed and memory; its accuracy means nothing."
)


def lines(results: dict) -> list[str]:
    """One run's lines, in the report's order, from a results.json object."""
    m = results["metrics"]
    return [
        _accuracy_line(m),
        _precision_line(m),
        _implementation_line(m),
        f"- images trained: {m['trained_images']} in {m['steps']} steps over {m['epochs']} "
        f"epoch(s); world size {m['world_size']} ({m['nodes']} node(s) x "
        f"{m['devices_per_node']}), global batch {m['global_batch']}",
        f"- times (s): e2e {m['e2e_time']:.1f}, init {m['init_time']:.1f}, train "
        f"{m['train_time']:.1f}, of which evaluation {m['eval_time']:.1f}; core "
        f"{m['core_time']:.1f}",
        _steady_line(m),
        *breakdown_lines(m),
        *_resilience_lines(results),
        *_profile_lines(results["config"]),
        f"- mem: {m['mem']} GiB ({m['mem_source']}); this process's view {m['mem_process']} "
        f"({m['mem_process_source']})",
        _utilization_line(m),
        *_energy_lines(results),
        *_monitor_lines(results["monitor"]),
        _device_line(results["environment"]),
        f"- dataset: {m['train_images']} training images after filtering, {m['val_images']} "
        f"validation images ({m['dataset']})",
    ]


def _accuracy_line(m: dict) -> str:
    if m["throughput_only"]:
        return f"- {THROUGHPUT_ONLY_NOTE} Backbone: {m['backbone_init']}."
    target = "reached" if m["converged"] else "not reached"
    return (
        f"- mAP (COCO bbox AP@[.5:.95]) at the last evaluation: {m['mAP']:.4f}; best "
        f"{m['best_mAP']:.4f} (epoch {m['best_epoch']}, step {m['best_step']}); target "
        f"{m['target_mAP']} {target}"
        + (f" after {m['time_to_target']:.0f} s of training" if m["converged"] else "")
    )


def _precision_line(m: dict) -> str:
    """The precision and the float32 math in force: what `fp32` meant on this device."""
    math = m["math"]
    flags = (
        f"cuDNN conv fp32_precision={math['conv_fp32_precision']}, cuBLAS matmul "
        f"fp32_precision={math['matmul_fp32_precision']}, cudnn.benchmark="
        f"{math['cudnn_benchmark']}, deterministic algorithms {math['deterministic_algorithms']}"
    )
    return (
        f"- precision {m['precision']} ({m['precision_reason']}): float32 convolutions in "
        f"{math['effective_conv'].upper()}, float32 matmuls in {math['effective_matmul'].upper()} "
        f"({flags})"
    )


def _implementation_line(m: dict) -> str:
    """How the step was computed (the workload is the same either way)."""
    impl = m["implementation"]
    ddp = impl["ddp"]
    wrapped = (
        "one rank, no DDP"
        if ddp is None
        else f"DDP broadcast_buffers={ddp['broadcast_buffers']}, "
        f"gradient_as_bucket_view={ddp['gradient_as_bucket_view']}"
    )
    compiled = f"on ({impl['compile_mode']})" if impl["compile_mode"] else "off"
    return (
        f"- step: transform {impl['transform']}, constants "
        f"{'reused' if impl['reuse_constants'] else 'recomputed'}, loss {impl['loss']}, "
        f"post-processing {impl['postprocess']}, channels-last "
        f"{'on' if impl['channels_last'] else 'off'}, torch.compile "
        f"{compiled if impl['compile'] else 'off'}, {impl['optimizer']}, {wrapped}"
    )


def _resilience_lines(results: dict) -> list[str]:
    """Checkpoints, segments and skipped updates."""
    m = results["metrics"]
    skipped = NO_VALUE if m["skipped_steps"] is None else m["skipped_steps"]  # None: not counted
    line = (
        f"- checkpoints: training waited {m['checkpoint_time']:.1f} s for them (within "
        f"train_time); deleted as the run completed; updates skipped by loss scaling: {skipped}"
    )
    if m["checkpoint_failures"]:
        line += f"; {m['checkpoint_failures']} checkpoint(s) could not be written"
    lines = [line]
    if m["segments"] > 1:
        ended = ", ".join(
            f"{seg['ended']} at step {seg['end_step']}" for seg in results["segments"][:-1]
        )
        lines.append(
            f"- run in {m['segments']} segments ({ended}); {m['time_between_segments']:.0f} s "
            "between them, counted in no time above"
        )
    return lines


def breakdown_lines(m: dict) -> list[str]:
    """Where the training time went, and what bounds the run (docs/metrics.md)."""
    b = m["breakdown"]
    if b is None:
        return [f"- time breakdown: none: {m['breakdown_note']}"]
    parts = ", ".join(
        f"{p['part']} {p['seconds']:.1f} s ({_share(p['share'])})" for p in b["parts"]
    )
    cpu = " (on the CPU the device is the host: one part, device)" if b["device_is_host"] else ""
    lines = [
        f"- where the time went, of {b['total']:.1f} s of training without evaluation and "
        f"checkpoints: {parts}{cpu}"
    ]
    if b["bound_by"] is None:
        return [*lines, f"- bound by: {NO_VALUE} ({b['evidence']})"]
    return [*lines, f"- bound by: {b['bound_by']} ({b['evidence']}); try: {b['advice']}"]


def _share(share: float | None) -> str:
    return NO_VALUE if share is None else f"{share:.0%}"


def _steady_line(m: dict) -> str:
    if m["p_core_steady"] is None:
        return (
            f"- p_core_steady: {NO_VALUE} (no step after the first "
            f"{m['timing_warmup_steps']}, which it leaves out)"
        )
    return (
        f"- p_core_steady {significant(m['p_core_steady'])} images/s: p_core without the first "
        f"{m['timing_warmup_steps']} steps (p_core {significant(m['p_core'])} counts them all)"
    )


def _profile_lines(config: dict) -> list[str]:
    window = config["train"]["profile_steps"]
    if not window:
        return []
    return [
        f"- steps {window} ran under torch.profiler (trace and top operators in profile/): the "
        "throughputs above include its overhead and are not benchmark numbers"
    ]


def _utilization_line(m: dict) -> str:
    if m["flops_per_image"] is None:
        return "- compute: not counted (the run failed before its FLOPs were counted)"
    if m["achieved_tflops"] is None:
        flops = m["flops_per_image"] / 1e9
        return f"- compute: {flops:.1f} GFLOP per training image; no step timed"
    line = (
        f"- compute: {m['flops_per_image'] / 1e9:.1f} GFLOP per training image; "
        f"{m['achieved_tflops']:.3g} TFLOP/s at p_core"
    )
    if m["mfu"] is None:
        return line + f"; no MFU: {m['peak_note']}"
    share = f"{100 * m['mfu']:.1f}%"
    return line + (
        f", {share} of the {m['peak_math']} peak {m['peak_tflops']:.4g} TFLOP/s (MFU; peak "
        f"from the {m['peak_source']})"
    )


def _energy_lines(results: dict) -> list[str]:
    """The devices' energy (and the host CPUs' beside GPUs), each figure with its source."""
    m = results["metrics"]
    if m["energy_train_j"] is None:
        return [f"- energy: no figure: {m['energy_note']}"]
    line = (
        f"- energy ({m['energy_source']}): training {m['energy_train_j'] / 1e3:.3g} kJ, "
        f"{m['power_train_w']:.0f} W per device on average; "
        + (
            f"evaluation {m['energy_eval_j'] / 1e3:.3g} kJ; "
            if m["energy_eval_j"] is not None
            else ""
        )
        + f"{significant(m['images_per_joule'])} images/J"
    )
    if any(not device["complete"] for device in results["energy"]["devices"]):
        line += " (a lower bound: a counter reset or missed a reading)"
    lines = [line]
    for host in results["energy"]["hosts"]:
        if host["train_j"] is not None:
            lines.append(
                f"- host {host['host']} CPU packages ({host['source']}): training "
                f"{host['train_j'] / 1e3:.3g} kJ"
            )
    return lines


def _monitor_lines(summary: dict | None) -> list[str]:
    if not summary:
        return ["- monitor: off"]
    lines = []
    for host, h in summary["host"].items():
        cpu = NO_VALUE if h["cpu_util_mean"] is None else f"{h['cpu_util_mean']:.0f}%"
        lines.append(
            f"- host {host}: CPU {cpu} mean, RAM peak {h['mem_used_peak_gib']:.1f}/"
            f"{h['mem_total_gib']:.1f} GiB ({summary['samples']} samples)"
        )
    for d in summary["devices"]:
        lines.append(
            f"- {d['host']}:{d['index']} {d['name']}: utilisation {_maybe(d['util_mean'], '%')} "
            f"mean, memory peak {_maybe(d['mem_used_peak_gib'])}/{_maybe(d['mem_total_gib'])} "
            f"GiB, power {_maybe(d['power_mean_w'], ' W')} mean / "
            f"{_maybe(d['power_peak_w'], ' W')} peak"
        )
    return lines


def _device_line(environment: dict) -> str:
    """Which plug-in read the device, and where its readings came from or why there are none."""
    readings = environment["device_readings"]
    where = f"from {readings}" if readings else f"none: {environment['device_readings_note']}"
    return f"- device readings ({environment['device_plugin']} plug-in): {where}"


def _maybe(value: float | None, unit: str = "") -> str:
    return NO_VALUE if value is None else f"{value:.1f}{unit}"
