"""FlagPerf's case configuration files, read as data, and their keys as retinaperf's settings:
what `integrations/flagperf/training/benchmarks/retinaperf/pytorch/run_pretraining.py` runs
when FlagPerf's harness starts retinaperf as a case.

A FlagPerf config (the vendor's `config_A100x1x8.py` in FlagPerf's
`training/<vendor>/<case>-pytorch/config/`, and the case's `_base` beside its training script)
is a Python module of `name = value` lines, which FlagPerf imports. Here it is parsed
and each value read with `ast.literal_eval`: nothing in it runs, and anything that is not a
literal setting (an import, a call, a loop) is refused, naming the file and line. Every key is
either mapped onto a retinaperf setting, checked against the one value retinaperf's workload
has, or on a documented list of keys that change nothing here; any other key is refused, so that
no setting that would change the workload is dropped unseen.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retinaperf.config.presets import preset_names
from retinaperf.errors import UserError


def _text(value: Any) -> str:
    """A value as `--set` reads it: booleans as true/false, lists comma-separated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_text(item) for item in value)
    return str(value)


# FlagPerf's RetinaNet keys (the `_base` config in its training/benchmarks/retinanet/pytorch/
# config folder) that are retinaperf settings under another name, or the same.
RENAMED = {
    "train_batch_size": "batch_size",
    "eval_batch_size": "eval_batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "momentum": "momentum",
    "lr_steps": "lr_steps",
    "lr_gamma": "lr_gamma",
    "max_epoch": "epochs",
    "target_mAP": "target_map",
    "seed": "seed",
    "num_workers": "num_workers",
    "aspect_ratio_group_factor": "aspect_ratio_group_factor",
    "data_dir": "data_dir",
    "log_freq": "log_every",
}

# Keys whose values become a setting of another form. Each returns the `--set` pairs.
CONVERTED: dict[str, Callable[[Any], list[str]]] = {
    "cudnn_benchmark": lambda on: [f"cudnn_benchmark={'on' if on else 'off'}"],
    # FlagPerf's switch makes cuDNN alone deterministic; retinaperf's has every kernel so
    # (slower still). False is both one's default.
    "cudnn_deterministic": lambda on: ["deterministic=true"] if on else [],
    # Both false: the preset's precision (fp32, as the seed).
    "fp16": lambda on: ["precision=fp16"] if on else [],
    "amp": lambda on: ["precision=amp"] if on else [],
}

# Keys with one value in retinaperf's workload: another is refused.
FIXED = {"do_train": True}

# Keys that change nothing in retinaperf, and why: the harness's, the driver's, or keys
# FlagPerf's RetinaNet case itself never reads.
IGNORED = {
    "vendor": "the harness's vendor folder; retinaperf finds the device itself",
    "name": "the case's name",
    "device": "set by FlagPerf's driver; retinaperf picks the rank's device itself",
    "distributed": "set by FlagPerf's driver from the world size",
    "dist_backend": "retinaperf's device plug-in names the collective backend",
    "local_rank": "LOCAL_RANK, from the environment",
    "use_env": "the launch is read from the environment",
    "n_device": "set by FlagPerf's driver from the world size",
    "print_freq": "FlagPerf's console logging",
    "train_data": "unused by FlagPerf's RetinaNet: it reads train2017, as retinaperf",
    "eval_data": "unused by FlagPerf's RetinaNet: it reads val2017, as retinaperf",
    "num_classes": "unused by FlagPerf's RetinaNet: torchvision's 91 classes, as retinaperf",
    "warmup": "unused by FlagPerf's RetinaNet: its warm-up is 1000 steps, as retinaperf's",
    "sync_bn": "unused by FlagPerf's RetinaNet",
    "gradient_accumulation_steps": "unused by FlagPerf's RetinaNet",
    "pretrained_path": "unused by FlagPerf's RetinaNet: its backbone is resnet50-0676ba61.pth, "
    "as retinaperf's (a local copy: backbone_weights in `retinaperf`)",
}

# A dict of retinaperf's own settings ({"min_size": 800, ...}) for what FlagPerf has no key for.
OWN = "retinaperf"

NAME = re.compile(r"config_(?P<hardware>.+)x(?P<nodes>\d+)x(?P<devices>\d+)\.py")


def read_config(path: Path) -> dict[str, Any]:
    """The settings of a FlagPerf config file, name to value, in the file's order (a name set
    twice keeps its last value, as when the module is imported); anything but a literal
    `name = value` (annotated or not) and strings standing alone (docstrings) is refused."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except OSError as err:
        raise UserError(f"FlagPerf config {path}: cannot read it ({err.strerror})") from None
    except SyntaxError as err:
        raise UserError(
            f"FlagPerf config {path}, line {err.lineno}: not valid Python ({err.msg})"
        ) from None
    settings: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        target, value = _assignment(node)
        try:
            if target is None or value is None:
                raise ValueError
            settings[target] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise UserError(
                f"FlagPerf config {path}, line {node.lineno}: "
                f"`{ast.get_source_segment(source, node) or ''}` is not a `name = value` "
                "setting with a literal value: retinaperf reads config files as data and never "
                "runs them; write each value itself (e.g. `lr = 0.08`), without imports, calls "
                "or expressions"
            ) from None
    return settings


def _assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    """(name, value) of `name = value` or `name: type = value`; None for anything else."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        return (target.id if isinstance(target, ast.Name) else None), node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def preset_for(config_file: str) -> tuple[str, list[str]]:
    """The preset a FlagPerf config file's shape (`config_<hardware>x<nodes>x<devices>.py`, the
    name FlagPerf's harness builds from a case) runs, and the `--set` pairs it needs: the seed's
    A100 preset of that shape, which holds FlagPerf's recipe; for a shape the seed has no row of,
    A100-1x8's recipe with the job's shape."""
    match = NAME.fullmatch(Path(config_file).name)
    if match is None:
        raise UserError(
            f"FlagPerf config {config_file}: FlagPerf names a case's config "
            "config_<hardware>x<nodes>x<devices>.py (e.g. config_A100x1x8.py): rename it so"
        )
    nodes, devices = int(match["nodes"]), int(match["devices"])
    preset = f"A100-{nodes}x{devices}"
    if preset in preset_names():
        return preset, []
    return "A100-1x8", [f"nodes={nodes}", f"devices_per_node={devices}"]


def set_pairs(settings: dict[str, Any], path: Path) -> list[str]:
    """The `--set` pairs of a FlagPerf config's settings; a key of none of the tables above, or
    of another value than FIXED's, is refused naming the file."""
    pairs: list[str] = []
    for key, value in settings.items():
        if key in RENAMED:
            if value is not None:  # FlagPerf's `data_dir = None`: not set
                pairs.append(f"{RENAMED[key]}={_text(value)}")
        elif key in CONVERTED:
            pairs += CONVERTED[key](value)
        elif key in FIXED:
            if value != FIXED[key]:
                raise UserError(
                    f"FlagPerf config {path}: {key}={value!r}: retinaperf's case runs with "
                    f"{key}={FIXED[key]!r} only; remove the line"
                )
        elif key == OWN and isinstance(value, dict):
            pairs += [f"{name}={_text(own)}" for name, own in value.items()]
        elif key not in IGNORED:
            raise UserError(
                f"FlagPerf config {path}: unknown key {key!r}: retinaperf maps "
                f"{', '.join(sorted([*RENAMED, *CONVERTED, *FIXED]))}, takes its own settings "
                f"in `{OWN} = {{...}}` and ignores {', '.join(sorted(IGNORED))} "
                "(integrations/flagperf/README.md)"
            )
    precisions = [pair for pair in pairs if pair.startswith("precision=")]
    if len(precisions) > 1:
        raise UserError(
            f"FlagPerf config {path}: {' and '.join(precisions)}: set fp16 or amp, not both"
        )
    return pairs


def run_arguments(config_file: Path, data_dir: str | None, extra: list[str]) -> list[str]:
    """`retinaperf run` arguments for a FlagPerf config file: its shape's preset, its settings,
    the harness's `--data_dir` (over the file's data_dir, as FlagPerf's own arguments go over its
    configs), then `extra` `--set` pairs."""
    preset, shape = preset_for(config_file.name)
    pairs = shape + set_pairs(read_config(config_file), config_file)
    if data_dir:
        pairs.append(f"data_dir={data_dir}")
    pairs += extra
    # A key set twice (the file's data_dir and --data_dir, or a file's key and `extra`): the
    # later wins, as --set refuses a key given twice.
    last = {pair.partition("=")[0].strip(): pair for pair in pairs}
    arguments = ["run", "--preset", preset]
    for pair in last.values():
        arguments += ["--set", pair]
    return arguments
