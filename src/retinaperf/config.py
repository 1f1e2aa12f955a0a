"""Typed configuration: one dataclass per concern, composed by `RunConfig`.

Precedence, lowest first: the defaults below < the preset file < the command line (`--set KEY=VALUE`
and its shortcut flags). Every key has a name unique across sections, so `--set lr=0.02` and
`--set train.lr=0.02` mean the same. Values are checked where they are defined (`__post_init__`);
a bad one raises `UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from retinaperf.errors import UserError

BACKBONE_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
PRECISIONS = ("auto", "fp32", "fp32-strict", "tf32", "amp", "bf16", "fp16")
IMPLEMENTATIONS = ("batched", "torchvision")
SWITCHES = ("auto", "on", "off")
SYNTH_PROFILES = ("shapes", "coco")
COMPILE_MODES = ("default", "reduce-overhead")

# `run --synthetic`: a preset's recipe on generated COCO-like data, for speed alone. A layer above
# the preset and below --set: the user can still change any of these.
THROUGHPUT_MODE: dict[str, Any] = {
    "synth_profile": "coco",
    # COCO2017's ratio of validation to training images (5000 / 117266), so that evaluation
    # weighs in p_whole as it does in the real case.
    "synth_train_images": 2048,
    "synth_val_images": 88,
    "backbone_weights": "random",
    "throughput_only": True,
    "target_map": 0.0,
    "max_steps": 200,
}


def _check(condition: bool, key: str, value: object, need: str) -> None:
    if not condition:
        raise UserError(f"config: {key}={value!r} is not valid: {need}")


@dataclass
class DataConfig:
    data_dir: str = ""
    """COCO2017 root (train2017/, val2017/, annotations/). Empty: the generated dataset."""
    num_workers: int = 4
    """DataLoader worker processes per rank; 0 loads in the training process."""
    hflip_prob: float = 0.5
    """Probability of a horizontal flip of each training image."""
    aspect_ratio_group_factor: int = 3
    """Aspect-ratio bins for grouped batches (torchvision's reference uses 3); -1 turns it off."""
    synth_train_images: int = 512
    """Generated dataset: number of training images (used when data_dir is empty)."""
    synth_val_images: int = 96
    """Generated dataset: number of validation images."""
    synth_image_size: int = 0
    """Generated dataset: typical image size in pixels (shapes: the short side; coco: the long
    side of most images). 0: the profile's own (shapes 128, coco 640, as COCO's images)."""
    synth_profile: str = "shapes"
    """Generated dataset: `shapes` (a few learnable shapes, for smoke runs) or `coco` (images,
    boxes and categories with COCO2017's statistics, for throughput runs)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "use 0 or more")
        _check(0 <= self.hflip_prob <= 1, "hflip_prob", self.hflip_prob, "use a value in [0, 1]")
        _check(
            self.aspect_ratio_group_factor >= -1,
            "aspect_ratio_group_factor",
            self.aspect_ratio_group_factor,
            "use -1 (off) or 0 or more",
        )
        for key in ("synth_train_images", "synth_val_images"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "use 1 or more")
        _check(
            self.synth_image_size == 0 or self.synth_image_size >= 32,
            "synth_image_size",
            self.synth_image_size,
            "use 0 (the profile's own) or 32 and more",
        )
        _check(
            self.synth_profile in SYNTH_PROFILES,
            "synth_profile",
            self.synth_profile,
            f"use {SYNTH_PROFILES}",
        )


@dataclass
class ModelConfig:
    backbone_weights: str = BACKBONE_URL
    """ImageNet ResNet-50 weights: a URL, file:// URL or a path. Or no file: `none` (random
    init, every layer trainable, ordinary batch norm: training from scratch) or `random` (random
    values in the pretrained structure: frozen batch norm, 3 trainable stages; the speed of the
    real recipe without its download, for throughput_only runs)."""
    min_size: int = 800
    """The model's resize: short side of the input in pixels."""
    max_size: int = 1333
    """The model's resize: longest side allowed in pixels."""
    loss: str = "batched"
    """How the loss is computed: `batched` (the whole batch at once, no host synchronisation) or
    `torchvision` (torchvision's per-image code, the reference). The same numbers either way."""
    postprocess: str = "batched"
    """How detections are selected from the head's outputs: `batched` (every image at once,
    boxes decoded in float32) or `torchvision` (torchvision's per-image code, the reference)."""
    transform: str = "batched"
    """How input images are normalised, resized and batched: `batched` (once per distinct image
    size, boxes scaled by one table) or `torchvision` (image by image, the reference). The same
    numbers either way."""
    reuse_constants: bool = True
    """Compute frozen batch norm's scale and shift once (they are frozen) and anchors once per
    batch shape, instead of at every step as torchvision does (false). The same numbers."""
    channels_last: str = "auto"
    """Channels-last memory format for the network and its input: on, off, or auto (on for CUDA,
    where convolutions run faster in it; off elsewhere)."""
    compile: bool = False
    """Run backbone, FPN, head and loss through torch.compile (the first steps compile)."""
    compile_mode: str = "default"
    """torch.compile's mode for `compile=true`: `default`, or `reduce-overhead`: the compiled
    parts also replay as CUDA graphs, one recorded per batch shape (CUDA only; the 800/1333
    resize padded to 32 px bounds the shapes to under a hundred), so that the host launches a
    part's hundreds of kernels at once."""

    def __post_init__(self) -> None:
        _check(self.min_size >= 32, "min_size", self.min_size, "use 32 or more")
        for key in ("loss", "postprocess", "transform"):
            value = getattr(self, key)
            _check(value in IMPLEMENTATIONS, key, value, f"use {IMPLEMENTATIONS}")
        _check(
            self.channels_last in SWITCHES, "channels_last", self.channels_last, f"use {SWITCHES}"
        )
        _check(self.max_size >= self.min_size, "max_size", self.max_size, "use at least min_size")
        _check(
            self.compile_mode in COMPILE_MODES,
            "compile_mode",
            self.compile_mode,
            f"use {COMPILE_MODES}",
        )
        _check(
            self.compile or self.compile_mode == "default",
            "compile_mode",
            self.compile_mode,
            "a mode of torch.compile needs compile=true as well",
        )
        _check(self.backbone_weights.strip() != "", "backbone_weights", "", "give a source")

    @property
    def random_backbone(self) -> str | None:
        """`none` or `random` when backbone_weights names no file (random values), else None."""
        source = self.backbone_weights.strip().lower()
        return source if source in ("none", "random") else None


@dataclass
class TrainConfig:
    batch_size: int = 16
    """Images per device per step (the local batch)."""
    lr: float = 0.04
    """Peak learning rate after warm-up."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay (L2), on every trainable parameter."""
    epochs: int = 26
    """Most epochs to run (epochs 0..epochs-1)."""
    lr_steps: tuple[int, ...] = (16, 22)
    """Epochs at whose start the learning rate is multiplied by lr_gamma."""
    lr_gamma: float = 0.1
    """Learning-rate multiplier at each of lr_steps."""
    warmup_iters: int = 1000
    """Linear warm-up length in steps, capped at (steps per epoch - 1)."""
    warmup_factor: float = 1e-3
    """Warm-up starts at lr * warmup_factor."""
    clip_grad_norm: float = 0.0
    """Clip the gradients' global L2 norm to this before each update; 0 is off, as in the
    reference recipe. Training from random initialisation (smoke) needs it to stay stable."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit); a final evaluation follows."""
    precision: str = "fp32"
    """fp32 (the framework's default float32 math, as the seed's: TF32 convolutions on NVIDIA
    Ampere and newer), fp32-strict (IEEE float32 everywhere), tf32 (TF32 convolutions and
    matmuls), amp (fp16 autocast + loss scaling), bf16 (autocast), fp16 (half model with fp32
    master weights), or auto (bf16 where the device computes it natively, else fp32)."""
    target_map: float = 0.35
    """Stop at the first evaluation whose mAP reaches this; 0 never stops early."""
    seed: int = 0
    """Seeds weights, sampling and augmentation."""
    log_every: int = 20
    """Steps between logged steps (loss, lr, images/s)."""
    deterministic: bool = False
    """Use deterministic kernels (slower); for equivalence tests."""
    cudnn_benchmark: str = "auto"
    """cuDNN times its convolution algorithms for each new input shape and keeps the fastest:
    on, off, or auto: off, as torchvision's detection references (COCO's batches come in tens of
    shapes, each timed anew), until the GPU check measures otherwise. Off with
    deterministic=true."""
    timing_warmup_steps: int = 10
    """Steps left out of p_core_steady (kernel selection, allocator growth, caches warming);
    p_core counts every step. Not the lr warm-up."""
    profile_steps: str = ""
    """`A:B`: record steps A to B (both included, numbered from 1 as in the event log) with
    torch.profiler into <run dir>/profile and print the top operators. Empty: off."""
    max_bad_steps: int = 20
    """Stop the run as failed when the loss is not finite for this many consecutive steps (the
    last good checkpoint is kept); 0: never stop."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "epochs", "log_every"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "use 1 or more")
        for key in ("lr", "lr_gamma", "warmup_factor"):
            _check(getattr(self, key) > 0, key, getattr(self, key), "use a positive number")
        for key in (
            "momentum",
            "weight_decay",
            "warmup_iters",
            "max_steps",
            "clip_grad_norm",
            "timing_warmup_steps",
            "max_bad_steps",
        ):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "use 0 or more")
        _check(self.precision in PRECISIONS, "precision", self.precision, f"use {PRECISIONS}")
        _check(
            self.cudnn_benchmark in SWITCHES,
            "cudnn_benchmark",
            self.cudnn_benchmark,
            f"use {SWITCHES}",
        )
        _check(0 <= self.target_map <= 1, "target_map", self.target_map, "use a value in [0, 1]")
        _check(
            list(self.lr_steps) == sorted(self.lr_steps),
            "lr_steps",
            self.lr_steps,
            "list epochs in increasing order",
        )
        parse_step_window(self.profile_steps)


@dataclass
class EvalConfig:
    eval_batch_size: int = 16
    """Images per device per inference batch."""

    def __post_init__(self) -> None:
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "use 1+")


@dataclass
class RunConfig:
    preset: str = ""
    """Name of the preset this configuration started from."""
    device: str = "auto"
    """A torch device type (cuda, cpu, ...) or auto: the accelerator if there is one, else cpu."""
    nodes: int = 0
    """Nodes the preset is meant for: a job of another shape is refused, as its row would not
    compare with the preset's. 0: any."""
    devices_per_node: int = 0
    """Processes (devices) per node the preset is meant for. 0: any."""
    dist_timeout: float = 600.0
    """Seconds a collective may wait for the other ranks before the job fails (a dead rank on
    another node is noticed by then at the latest)."""
    output_dir: str = ""
    """Run directory. Empty: runs/<timestamp>/."""
    tensorboard: bool = False
    """Also write the event log's scalars for TensorBoard to <run dir>/tensorboard (needs the
    tensorboard package)."""
    monitor_interval: float = 5.0
    """Seconds between the system monitor's samples (CPU, RAM, and per GPU utilisation, memory,
    power, temperature, clock); 0 turns the monitor off."""
    throughput_only: bool = False
    """Measure speed alone: the data or weights make mAP meaningless (`run --synthetic`);
    results say so and the table shows no mAP."""
    save_model: bool = False
    """Write the trained model's state dict to <run dir>/model.pt at the end (float32: fp16
    runs write their master weights)."""
    checkpoint_minutes: float = 30.0
    """Minutes between checkpoints inside an epoch (one is also written after every epoch's
    evaluation, and when the run is stopped by a signal); 0 turns the timed ones off."""
    keep_checkpoints: int = 2
    """Checkpoints kept in <run dir>/checkpoints (the newest); older ones are deleted."""
    cache_dir: str = ""
    """Downloads and the generated dataset. Empty: $RETINAPERF_CACHE or ~/.cache/retinaperf."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(self.nodes >= 0, "nodes", self.nodes, "use 1 or more, or 0 for any")
        _check(self.devices_per_node >= 0, "devices_per_node", self.devices_per_node, "use 0+")
        _check(self.dist_timeout > 0, "dist_timeout", self.dist_timeout, "use a positive number")
        _check(self.monitor_interval >= 0, "monitor_interval", self.monitor_interval, "use 0+")
        _check(
            self.checkpoint_minutes >= 0, "checkpoint_minutes", self.checkpoint_minutes, "use 0+"
        )
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "use 1+")
        _check(
            self.throughput_only or self.model.random_backbone != "random",
            "backbone_weights",
            self.model.backbone_weights,
            "random values in the pretrained structure do not learn like ImageNet weights: "
            "use it with throughput_only=true (run --synthetic), or `none` to train from scratch",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in ("data", "model", "train", "eval")}


def _key_index() -> dict[str, tuple[str | None, type]]:
    """Every settable key: bare name -> (section or None for the root, value type)."""
    index: dict[str, tuple[str | None, type]] = {}
    root_hints = typing.get_type_hints(RunConfig)
    sections = _section_types()
    for f in dataclasses.fields(RunConfig):
        if f.name not in sections:
            index[f.name] = (None, root_hints[f.name])
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"config key {f.name} is defined twice"
            index[f.name] = (section, hints[f.name])
    return index


def _parse_value(key: str, text: str, kind: type) -> Any:
    """Turn the text of `--set key=text` into a value of the key's type."""
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is tuple:
            return tuple(int(part) for part in text.split(",") if part.strip())
        return text
    except ValueError:
        raise UserError(f"config: {key}={text!r} is not a valid {_type_name(kind)}") from None


def _type_name(kind: type) -> str:
    if typing.get_origin(kind) is tuple:
        return "int list"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}[kind]


def _check_type(key: str, value: Any, kind: type, where: str) -> Any:
    """Check a value read from a preset file; TOML already typed it."""
    if typing.get_origin(kind) is tuple:
        ok = isinstance(value, (list, tuple)) and all(type(v) is int for v in value)
        value = tuple(value) if ok else value
    elif kind is float:
        ok = type(value) in (int, float)
        value = float(value) if ok else value
    else:
        ok = type(value) is kind
    if not ok:
        raise UserError(f"{where}: {key} = {value!r} is not a valid {_type_name(kind)}")
    return value


def preset_names() -> list[str]:
    files = resources.files("retinaperf") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def preset_description(name: str) -> str:
    """The first comment line of a preset file, which says what it is for."""
    text = (resources.files("retinaperf") / "presets" / f"{name}.toml").read_text()
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()


def _read_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    path = resources.files("retinaperf") / "presets" / f"{name}.toml"
    return tomllib.loads(path.read_text())


def _flatten_preset(name: str, table: dict[str, Any]) -> dict[str, Any]:
    return _flatten(table, f"preset file {name}.toml")


def _flatten(table: dict[str, Any], where: str) -> dict[str, Any]:
    """{section: {key: value}} or {key: value}, as a preset file or a run's config.json holds
    them -> {bare key: typed value}, each key and value checked; `where` names the source."""
    index = _key_index()
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key in _section_types():
            for sub, subvalue in value.items():
                if sub not in index or index[sub][0] != key:
                    raise UserError(f"{where}: unknown key {key}.{sub}")
                flat[sub] = _check_type(sub, subvalue, index[sub][1], where)
        elif key in index and index[key][0] is None:
            flat[key] = _check_type(key, value, index[key][1], where)
        else:
            raise UserError(f"{where}: unknown key {key}")
    return flat


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["lr=0.02", "train.epochs=3"]` -> `{"lr": 0.02, "epochs": 3}`, each checked."""
    index = _key_index()
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"--set {pair!r}: write KEY=VALUE, e.g. --set lr=0.02")
        section, _, bare = key.rpartition(".")
        if bare == "preset":
            raise UserError(f"--set {key}: choose the preset with --preset NAME, not --set")
        if bare not in index or (section and index[bare][0] != section):
            raise UserError(
                f"--set {key}: unknown key; `retinaperf presets --keys` lists the valid keys"
            )
        if bare in overrides:
            raise UserError(f"--set {key}: given twice; give each key once")
        overrides[bare] = _parse_value(key, text, index[bare][1])
    return overrides


def resolve(preset: str, overrides: dict[str, Any], synthetic: bool = False) -> RunConfig:
    """Defaults < preset file < throughput mode (if `synthetic`) < overrides, validated."""
    mode = THROUGHPUT_MODE if synthetic else {}
    preset_values = _flatten_preset(preset, _read_preset(preset))
    values = {**preset_values, **mode, **overrides, "preset": preset}
    if synthetic and values.get("data_dir"):
        raise UserError(
            f"--synthetic generates its own data: drop --data-dir {values['data_dir']} (or drop "
            "--synthetic to run on that dataset)"
        )
    return _build(values)


def _build(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from {bare key: typed value}; every section's checks run."""
    index = _key_index()
    root: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _section_types()}
    for key, value in values.items():
        section = index[key][0]
        (sections[section] if section else root)[key] = value
    built = {name: cls(**sections[name]) for name, cls in _section_types().items()}
    return RunConfig(**root, **built)


# Keys that say where a run writes and how it is kept alive, not what it computes: a resumed run
# may change these; any other key would make the halves of the run different workloads.
RUN_KEYS = frozenset(
    {
        "output_dir",
        "cache_dir",
        "tensorboard",
        "monitor_interval",
        "save_model",
        "dist_timeout",
        "checkpoint_minutes",
        "keep_checkpoints",
        "max_bad_steps",
        "num_workers",
        "log_every",
        "profile_steps",
    }
)


def workload(config: RunConfig) -> dict[str, Any]:
    """The configuration less RUN_KEYS, flat: what a checkpoint must share with the run that
    loads it."""
    flat = _flatten(config.to_dict(), "configuration")
    return {key: value for key, value in flat.items() if key not in RUN_KEYS}


def load_saved(path: Path, overrides: dict[str, Any]) -> RunConfig:
    """The configuration a run saved (`config.json` in its run directory), with `overrides` of
    RUN_KEYS only: `run --resume` continues the same workload."""
    import json

    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"--resume: {path} does not exist: give the run directory of a run this version "
            "started (it saves its configuration there)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--resume: {path} is not valid JSON ({err})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} holds no JSON object: it is not a run's config.json")
    changed = sorted(key for key in overrides if key not in RUN_KEYS)
    if changed:
        raise UserError(
            f"--resume: --set {changed[0]} would change the workload of the run being resumed; "
            f"only these keys may change: {', '.join(sorted(RUN_KEYS - {'output_dir'}))}"
        )
    return _build({**_flatten(saved, str(path)), **overrides})


def all_keys() -> list[tuple[str, str, str]]:
    """(qualified key, type, docstring's first line) for `retinaperf presets --keys`."""
    docs = _field_docs()
    rows = []
    for key, (section, kind) in _key_index().items():
        if key == "preset":
            continue
        qualified = f"{section}.{key}" if section else key
        rows.append((qualified, _type_name(kind), docs.get(key, "")))
    return rows


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string literal under each field) read from this module's source."""
    import ast

    tree = ast.parse(Path(__file__).read_text())
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for item, following in itertools.pairwise(body):
            if (
                isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[item.target.id] = " ".join(following.value.value.split())
    return docs


__all__ = [
    "BACKBONE_URL",
    "PRECISIONS",
    "RUN_KEYS",
    "THROUGHPUT_MODE",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "all_keys",
    "load_saved",
    "parse_overrides",
    "preset_description",
    "preset_names",
    "resolve",
    "workload",
]


_WINDOW = re.compile(r"([0-9]+):([0-9]+)")


def parse_step_window(text: str) -> tuple[int, int] | None:
    """The steps `profile_steps` asks for: "" is None (no profiling), "A:B" is (A, B), the first
    and last step to record, 1 <= A <= B; anything else raises UserError."""
    if text == "":
        return None
    match = _WINDOW.fullmatch(text)
    window = (int(match[1]), int(match[2])) if match else None
    if window is None or not 1 <= window[0] <= window[1]:
        raise UserError(
            f"config: profile_steps={text!r} is not valid: write A:B, the first and last "
            "optimizer step to record (1 <= A <= B, numbered as the event log numbers steps), "
            "e.g. 11:15"
        )
    return window
