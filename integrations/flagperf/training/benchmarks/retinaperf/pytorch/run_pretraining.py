"""One rank of retinaperf, started as FlagPerf's harness starts a case's training script.

FlagPerf's start_pytorch_task.py starts one process per rank, without torchrun:

    python -u run_pretraining.py --extern_config_dir DIR --extern_config_file config_A100x1x8.py
        --vendor nvidia --data_dir DIR [--enable_extern_config --extern_module_dir DIR]

with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and NODE_RANK in the environment,
which retinaperf reads itself. This script reads the config file as data (retinaperf's
`config.flagperf`: nothing in it runs), maps its keys onto retinaperf's settings and runs the
rank in this process, with FlagPerf's [PerfLog] lines on rank 0's console, which FlagPerf's
tools read. Its exit status is the run's. Installed as FlagPerf's
training/benchmarks/retinaperf/pytorch/run_pretraining.py (integrations/flagperf/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retinaperf import cli, config
from retinaperf.config import flagperf
from retinaperf.errors import UserError

# The setting that prints FlagPerf's [PerfLog] lines (its "event": "FINISHED" line among them)
# on rank 0's console.
PERFLOG = "perflog_console"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One rank of retinaperf as a FlagPerf case (integrations/flagperf)."
    )
    parser.add_argument("--extern_config_dir", required=True, help="the vendor's config folder")
    parser.add_argument("--extern_config_file", required=True, help="config_<hw>x<N>x<M>.py")
    parser.add_argument("--vendor", help="FlagPerf's vendor; retinaperf finds the device itself")
    parser.add_argument("--data_dir", help="COCO2017 root (over the config file's data_dir)")
    # FlagPerf's switch that lets a config set keys its case does not list as mutable: retinaperf
    # maps every key it knows and refuses the others either way, so it changes nothing here.
    parser.add_argument("--enable_extern_config", action="store_true")
    parser.add_argument("--extern_module_dir", help="unused: retinaperf has no extern modules")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a retinaperf setting, over the config file's (repeatable)",
    )
    return parser.parse_args(argv)


def run_arguments(args: argparse.Namespace) -> list[str]:
    """The `retinaperf run` arguments of this rank."""
    config_file = Path(args.extern_config_dir) / args.extern_config_file
    arguments = flagperf.run_arguments(config_file, args.data_dir, args.overrides)
    if PERFLOG in {key.name.rpartition(".")[2] for key in config.all_keys()}:
        return [*arguments, "--set", f"{PERFLOG}=true"]
    # This script is copied into a FlagPerf tree and may meet an older retinaperf: the run is
    # still right, but FlagPerf's tools would find no result line; say so rather than fail.
    print(
        f"retinaperf: warning: the installed retinaperf has no {PERFLOG} setting: rank 0 prints "
        "no [PerfLog] lines for FlagPerf; install a retinaperf that has it",
        file=sys.stderr,
    )
    return arguments


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        arguments = run_arguments(args)
    except UserError as err:
        print(f"retinaperf: error: {err}", file=sys.stderr)
        return 1
    return cli.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
