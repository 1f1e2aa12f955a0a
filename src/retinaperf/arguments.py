"""The arguments of each command (`cli.COMMAND_ARGUMENTS` names them): declared apart from what
the commands do, which the cli module holds. `run` and `sweep` share the options that choose a
configuration (`add_configuration`)."""

from __future__ import annotations

import argparse


def add_configuration(run: argparse.ArgumentParser) -> None:
    """The options that choose a configuration, which `run` and `sweep` share."""
    run.add_argument("--preset", help="preset name (see `retinaperf presets`); default: smoke")
    # The shortcut flags of three keys: their help is the keys' own (`presets --keys`).
    for flag in ("data_dir", "output_dir", "backbone_weights"):
        run.add_argument(f"--{flag.replace('_', '-')}", help=key_help(flag))
    run.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="start N processes on this node (one per device) through torchrun",
    )
    run.add_argument(
        "--synthetic",
        action="store_true",
        help="throughput mode: the preset's recipe on generated COCO-like data with random "
        "weights in the pretrained structure (no download); measures speed and memory, not mAP. "
        "With --data-dir D: on a dataset `retinaperf synth` wrote into D (e.g. `synth --profile "
        "coco`) instead of generating one; another dataset is refused",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key (repeatable), e.g. --set lr=0.02",
    )


def add_run(run: argparse.ArgumentParser) -> None:
    add_configuration(run)
    run.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help="run the configuration N times, each round a fresh command into <output dir>/"
        "round-K, then write summary.json (mean, min, max, cv of each metric) and report.md",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its newest checkpoint, with the configuration saved "
        "in RUN_DIR (--set may change only keys that leave the workload as it is)",
    )


def add_sweep(sweep: argparse.ArgumentParser) -> None:
    add_configuration(sweep)
    sweep.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an axis of the grid (repeatable): a key and its values, e.g. batch_size=8,16, or "
        "nproc_per_node=1,8; every combination is a point, a run of its own",
    )
    sweep.add_argument(
        "--find-batch",
        action="store_true",
        help="search the largest local batch that fits, per combination of the other axes, "
        "doubling then bisecting from the configuration's batch",
    )
    trials = (
        "with --find-batch: run at most N batches per search, to fit a time budget; its answer "
        "is then the largest that fitted and the smallest that did not, with the batches between "
        "untried (default: 0, search until they are one apart)"
    )
    sweep.add_argument("--max-trials", type=int, default=0, metavar="N", help=trials)
    sweep.add_argument(
        "--lr-rule",
        choices=("linear", "none"),
        default="linear",
        help="lr follows the global batch linearly, or not at all (default: %(default)s)",
    )


def add_synth(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--out", required=True, help="new or empty folder to write into")
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="the same seed and arguments write the same files; another seed, other images "
        "(default: %(default)s)",
    )
    gen.add_argument(
        "--train-images",
        type=int,
        default=512,
        metavar="N",
        help="images in train2017/ (default: %(default)s)",
    )
    gen.add_argument(
        "--val-images",
        type=int,
        default=96,
        metavar="N",
        help="images in val2017/ (default: %(default)s)",
    )
    gen.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="typical size in pixels: short side for shapes (default 128), long side for coco "
        "(default 640)",
    )
    gen.add_argument(
        "--profile",
        choices=("shapes", "coco"),
        default="shapes",
        help="shapes: quick to learn (default); coco: COCO2017's statistics, for throughput",
    )
    gen.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes drawing images (default: the CPUs available, at most 8)",
    )


def add_evaluate(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--annotations", required=True, help="COCO instances JSON (ground truth)")
    ev.add_argument("--detections", required=True, help="COCO results JSON (list of detections)")


def add_report(rep: argparse.ArgumentParser) -> None:
    rep.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, or the folder of a `run --repeat` (its rounds, and their spread) "
        "or of a `sweep` (its completed points, and what they tell)",
    )
    rep.add_argument(
        "--format",
        choices=("md", "csv", "json"),
        default="md",
        help="md: the table with notes, then the spread of runs of one configuration; csv, json: "
        "one row per run with ASCII keys and plain numbers, for scripts (default: %(default)s)",
    )
    rep.add_argument("--plots", action="store_true", help="also draw each run's plots again")


def add_presets(presets: argparse.ArgumentParser) -> None:
    presets.add_argument(
        "--keys",
        action="store_true",
        help="list every configuration key instead, as KEY=DEFAULT with its type and meaning",
    )


def key_help(name: str) -> str:
    """The help text of configuration key `name` (bare), for its shortcut flag."""
    from retinaperf import config

    (key,) = [key for key in config.all_keys() if key.name.rpartition(".")[2] == name]
    return key.help
