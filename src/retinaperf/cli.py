"""Command line: parse, build, run. A `UserError` becomes one line on stderr and exit status 1."""

import time

COMMAND_START = time.perf_counter()  # e2e_time starts here, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from retinaperf import arguments, clock, files, invocation  # noqa: E402
from retinaperf.distributed import launch  # noqa: E402
from retinaperf.errors import UserError  # noqa: E402

EXIT_USER_ERROR = 1
START_ENV = "RETINAPERF_COMMAND_START"  # wall-clock start, set by `run --nproc-per-node`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retinaperf",
        description="Train RetinaNet ResNet-50-FPN on COCO2017; report how well a machine does it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, add_arguments) in COMMAND_ARGUMENTS.items():
        add_arguments(commands.add_parser(name, help=summary))
    return parser


# Each command: its line in `retinaperf --help`, and what adds its arguments.
COMMAND_ARGUMENTS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": ("run the benchmark (default: smoke preset, generated data)", arguments.add_run),
    "sweep": (
        "run a grid of a configuration's variants and put them side by side",
        arguments.add_sweep,
    ),
    "synth": ("write the generated COCO-layout dataset", arguments.add_synth),
    "evaluate": ("COCO bbox scores of a detections file", arguments.add_evaluate),
    "report": (
        "put finished runs side by side in the table of FlagPerf's RetinaNet case",
        arguments.add_report,
    ),
    "presets": ("list presets (or every configuration key)", arguments.add_presets),
}


def main(argv: list[str] | None = None, run_fn: Callable[..., dict] | None = None) -> int:
    """The command line; `run_fn` stands for `run.job.run` (tests inject a wrapped step)."""
    args = build_parser().parse_args(argv)
    args.run_fn = run_fn
    warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"retinaperf: error: {launch().rank_prefix}{err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("retinaperf: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from retinaperf import config
    from retinaperf.report.details import THROUGHPUT_ONLY_NOTE
    from retinaperf.report.tables import REPORT, format_table, table_row
    from retinaperf.run import job, rundir

    flags = {
        "data_dir": args.data_dir,
        "output_dir": args.output_dir,
        "backbone_weights": args.backbone_weights,
    }
    pairs = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.resume is not None:
        _check_resume(args, pairs)
    pairs += args.overrides
    # Resolving first reports a bad setting once, before any process is started.
    overrides = config.parse_overrides(pairs)
    if args.resume is not None:
        resolved = config.load_saved(Path(args.resume) / rundir.CONFIG, overrides)
        resolved.output_dir = args.resume  # where it is now, whatever it was called then
    else:
        resolved = config.resolve(args.preset or "smoke", overrides, args.synthetic)
    if args.repeat is not None:
        return _repeat(args, resolved, pairs)
    if args.nproc_per_node is not None:
        if not resolved.output_dir:
            # Chosen here, not by each worker: workers torchrun starts again after a failure
            # must find the same directory.
            pairs.append(f"output_dir={files.new_timestamped_dir()}")
        with invocation.handed_down():
            return _launch(args.nproc_per_node, _child_args(args, pairs))
    run = args.run_fn or job.run
    if launch().error_file is not None:
        # Under torchrun: record this worker's error where torchrun's failure summary reads it,
        # so the summary says which rank failed and why.
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run)
    results = run(resolved, _command_start(), resume=args.resume is not None)
    if results.get("status") == "interrupted":
        if "run_dir" in results:
            print(
                f"retinaperf: interrupted at step {results['metrics']['steps']} "
                f"({results['reason']}, {results['stopped_in_s']:.1f} s after it); checkpoint "
                f"{results['checkpoint']}; continue with: {_resume_command(results['run_dir'])}",
                file=sys.stderr,
            )
        # As a process the signal had stopped: 143 for SIGTERM, 130 for SIGINT.
        return 128 + signal.Signals[results["signal"]].value
    if "run_dir" in results:
        run_dir = Path(results["run_dir"])
        print(format_table([table_row(results)]))
        if results["metrics"]["throughput_only"]:
            print(THROUGHPUT_ONLY_NOTE)
        print(f"report: {run_dir / REPORT}")
        print(f"results: {run_dir / 'results.json'}")
    return 0


def _resume_command(run_dir: str) -> str:
    """The command that continues the run in `run_dir`, as this job was started: its launcher's
    `--nproc-per-node` again; a torchrun the user typed, or a launcher that started every rank,
    which this process cannot repeat, named as such."""
    launched = launch()
    if not launched.by_torchrun:
        if launched.world_size > 1:
            return f"the same launch of every rank with `retinaperf run --resume {run_dir}`"
        return invocation.command("run", "--resume", run_dir)
    if os.environ.get(invocation.COMMAND_ENV):  # `run --nproc-per-node N` started this job
        nproc = str(launched.local_world_size)
        return invocation.command("run", "--resume", run_dir, "--nproc-per-node", nproc)
    return f"the same torchrun command with `-m retinaperf run --resume {run_dir}`"


def _check_resume(args: argparse.Namespace, pairs: list[str]) -> None:
    """`--resume` takes the run's saved configuration: flags that would set another are refused."""
    given = [
        flag
        for flag, value in (
            ("--preset", args.preset),
            ("--synthetic", args.synthetic or None),
            ("--repeat", args.repeat),
            ("--data-dir", args.data_dir),
            ("--output-dir", args.output_dir),
            ("--backbone-weights", args.backbone_weights),
        )
        if value is not None
    ]
    if given:
        raise UserError(
            f"--resume {args.resume}: drop {given[0]}: a resumed run keeps the configuration "
            "saved in its run directory"
        )


def _child_args(args: argparse.Namespace, pairs: list[str]) -> list[str]:
    """`retinaperf run` arguments that repeat this command's settings (the shortcut flags as
    `--set` pairs), for the processes it starts."""
    if getattr(args, "resume", None) is not None:  # `sweep` has no --resume
        child = ["run", "--resume", args.resume]
    else:
        child = ["run", "--preset", args.preset or "smoke"]
        child += ["--synthetic"] if args.synthetic else []
    for pair in pairs:
        child += ["--set", pair]
    return child


def _repeat(args: argparse.Namespace, resolved, pairs: list[str]) -> int:
    """`run --repeat N`: N rounds, each a fresh `retinaperf run` (under torchrun with
    --nproc-per-node), then their summary."""
    from retinaperf.run import rounds

    if launch().by_torchrun or launch().world_size > 1:
        instead = invocation.command("run", "--repeat", "N", "--nproc-per-node", "M")
        raise UserError(
            "--repeat: this process is one rank of a job (torchrun's, or a launcher's that "
            f"started every rank); repeat the launch instead, or use `{instead}`"
        )
    out_dir = Path(resolved.output_dir) if resolved.output_dir else files.new_timestamped_dir()
    # Each round gets its own output_dir, given last.
    child = _child_args(args, [p for p in pairs if p.partition("=")[0].strip() != "output_dir"])
    if args.nproc_per_node is not None:
        _check_launch(args.nproc_per_node)
        command = _torchrun_command(args.nproc_per_node, child)
    else:
        command = [sys.executable, "-m", "retinaperf", *child]
    with invocation.handed_down():  # so that a round's messages name the command typed
        return rounds.run_rounds(args.repeat, out_dir, command, START_ENV)


def _sweep(args: argparse.Namespace) -> int:
    """`sweep`: the points of the grid (or the batch search), each a fresh `retinaperf run`."""
    from retinaperf import config
    from retinaperf.run import sweep

    if args.nproc_per_node is not None:
        _check_launch(args.nproc_per_node)
    elif launch().by_torchrun or launch().world_size > 1:
        raise UserError("sweep: this process is one rank of a job; run the sweep outside it")
    flags = {"data_dir": args.data_dir, "backbone_weights": args.backbone_weights}
    pairs = [f"{key}={value}" for key, value in flags.items() if value is not None]
    pairs += args.overrides
    overrides = config.parse_overrides(pairs)  # a bad setting, once, before any point runs
    resolved = config.resolve(args.preset or "smoke", overrides, args.synthetic)
    axes = sweep.parse_axes(args.vary)
    sweep.check_plan(axes, args.find_batch, args.lr_rule, args.max_trials)
    for varied in sweep.axis_overrides(axes):  # each value checked before any point runs
        config.resolve(args.preset or "smoke", {**overrides, **varied}, args.synthetic)
    out_dir = Path(args.output_dir) if args.output_dir else files.new_timestamped_dir()
    base = sweep.base_of(resolved, args.nproc_per_node)

    def command(nproc: int | None, point_pairs: list[str]) -> list[str]:
        # A point's own settings (its axis values, lr, output_dir) replace the sweep's --set of
        # the same keys: `--set batch_size=2 --vary batch_size=2,4` starts the lr rule at 2.
        child = _child_args(args, sweep.replace_pairs(pairs, point_pairs))
        if nproc is None:
            return [sys.executable, "-m", "retinaperf", *child]
        return _torchrun_command(nproc, child)

    launch_plan = (base, args.nproc_per_node, command, START_ENV, args.max_trials)
    plan = sweep.SweepPlan(out_dir, axes, args.find_batch, args.lr_rule, *launch_plan)
    with invocation.handed_down():  # so that a point's messages name the command typed
        return sweep.run_sweep(plan)


def _check_launch(nproc_per_node: int) -> None:
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {nproc_per_node}: give 1 or more")
    if launch().by_torchrun or launch().world_size > 1:
        raise UserError("--nproc-per-node: this process is already one rank of a job")


def _torchrun_command(nproc_per_node: int, child: list[str]) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc-per-node", str(nproc_per_node), "-m", "retinaperf", *child]


def _launch(nproc_per_node: int, child: list[str]) -> int:
    """`run --nproc-per-node N`: the same run under torchrun, N processes on this node."""
    from retinaperf.run import signals

    _check_launch(nproc_per_node)
    command = _torchrun_command(nproc_per_node, child)
    # e2e_time starts at this command, not at the workers' start: hand them its wall-clock time.
    started = clock.wall_time_at(COMMAND_START)
    env = {**os.environ, START_ENV: repr(started)}
    return signals.run_child(command, env)


def _command_start() -> float:
    """The perf_counter reading at which this command started; a launcher's start if given."""
    inherited = os.environ.get(START_ENV)
    if inherited is None:
        return COMMAND_START
    return clock.perf_counter_at(float(inherited))


def _synth(args: argparse.Namespace) -> int:
    from retinaperf.data.synth import SynthSpec, default_workers, generate

    spec = SynthSpec(args.seed, args.train_images, args.val_images, args.image_size, args.profile)
    workers = default_workers() if args.workers is None else args.workers
    out = generate(spec, Path(args.out), workers)
    print(
        f"wrote {spec.train_images} training and {spec.val_images} validation images "
        f"({spec.profile}, {spec.image_size} px) to {out}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from retinaperf.measure.scoring import evaluate_files

    print(json.dumps(evaluate_files(Path(args.annotations), Path(args.detections))))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from retinaperf import config

    if args.keys:
        import textwrap

        # Each key as `--set` takes it, with its default, then its help: most run to two lines.
        indent = " " * 4
        print("KEY=DEFAULT  (what it takes), then its meaning; change one with --set KEY=VALUE")
        for key in config.all_keys():
            print(f"{key.name}={key.default}  ({key.kind})")
            print(textwrap.fill(key.help, 100, initial_indent=indent, subsequent_indent=indent))
    else:
        for name in config.preset_names():
            print(f"{name:10} {config.preset_description(name)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from retinaperf.report import spread
    from retinaperf.report.loading import load_results
    from retinaperf.run import sweep

    run_dirs = [d for given in args.run_dirs for d in sweep.run_dirs(Path(given))]
    # Named where they are now, as given: a run directory may have moved since it was written.
    runs = [{**load_results(d), "run_dir": str(d)} for d in run_dirs]
    if len(args.run_dirs) == 1 and sweep.is_sweep(Path(args.run_dirs[0])) and args.format == "md":
        # its points, and what they tell: report.md as the sweep wrote it, to the byte
        print(sweep.report_text(Path(args.run_dirs[0]), runs), end="")
    else:
        print(spread.render_runs(runs, args.format))
    if args.plots:
        from retinaperf.report.plots import write_run_plots

        for run_dir in run_dirs:
            written = write_run_plots(run_dir)
            print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


COMMANDS = {
    "run": _run,
    "sweep": _sweep,
    "synth": _synth,
    "evaluate": _evaluate,
    "report": _report,
    "presets": _presets,
}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"retinaperf: warning: {launch().rank_prefix}{message}", file=sys.stderr)
