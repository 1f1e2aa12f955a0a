"""Typed configuration: one dataclass per concern, composed by `RunConfig`.

Precedence, lowest first: the defaults below < the preset file < the command line (`--set KEY=VALUE`
and its shortcut flags). Every key has a name unique across sections, so `--set lr=0.02` and
`--set train.lr=0.02` mean the same. Each key is a `setting`: its default, its help text, the range
its value must lie in, and its role (does it change the workload?); its type, a `Literal` for a
choice, says what it accepts. Values are checked where they are defined (`__post_init__`), and
again where they are read (with the file or flag they came from); a bad one raises `UserError`
naming the key, the value and what to use.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

from retinaperf.errors import UserError

BACKBONE_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"

# What a key is about. "workload": what a run computes. "conduct": how the run is carried out and
# kept alive (workers, logging, profiling, checkpoints, timeouts): the same numbers, perhaps not
# the same speed. "place": where a run writes and what it records on the side: neither the
# numbers nor the speed.
Role = Literal["workload", "conduct", "place"]

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


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    role: Role = "workload",
) -> Any:
    """A configuration key: a dataclass field whose metadata hold its help text (for `retinaperf
    presets --keys`; kept here, not in the source, which an installation may lack), the range
    its value must lie in (>= ge, > gt, <= le) and its role."""
    return field(
        default=default, metadata={"help": help, "role": role, "ge": ge, "gt": gt, "le": le}
    )


class _Checked:
    """Checks every setting against its type and range when a configuration is made, however it
    is made; a subclass's `__post_init__` adds the checks that involve more than one key."""

    def __post_init__(self) -> None:
        for f, kind in _settings(type(self)):
            # Stored as the type holds it: an int given for a float, a list for a tuple.
            setattr(self, f.name, _valid(f, kind, getattr(self, f.name), "config"))


def _check(condition: bool, key: str, value: object, need: str) -> None:
    if not condition:
        raise _invalid("config", key, value, need)


def _invalid(where: str, key: str, value: object, need: str) -> UserError:
    return UserError(f"{where}: {key}={value!r} is not valid: {need}")


@dataclass
class DataConfig(_Checked):
    data_dir: str = setting(
        "", "COCO2017 root (train2017/, val2017/, annotations/). Empty: the generated dataset."
    )
    num_workers: int = setting(
        4,
        "DataLoader worker processes per rank; 0 loads in the training process.",
        ge=0,
        role="conduct",
    )
    hflip_prob: float = setting(
        0.5, "Probability of a horizontal flip of each training image.", ge=0, le=1
    )
    aspect_ratio_group_factor: int = setting(
        3,
        "Aspect-ratio bins for grouped batches (torchvision's reference uses 3); -1 turns it off.",
        ge=-1,
    )
    synth_train_images: int = setting(
        512,
        "Generated dataset: number of training images (used when data_dir is empty).",
        ge=1,
    )
    synth_val_images: int = setting(96, "Generated dataset: number of validation images.", ge=1)
    synth_image_size: int = setting(
        0,
        "Generated dataset: typical image size in pixels (shapes: the short side; coco: the long "
        "side of most images). 0: the profile's own (shapes 128, coco 640, as COCO's images).",
    )
    synth_profile: Literal["shapes", "coco"] = setting(
        "shapes",
        "Generated dataset: `shapes` (a few learnable shapes, for smoke runs) or `coco` (images, "
        "boxes and categories with COCO2017's statistics, for throughput runs).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.synth_image_size == 0 or self.synth_image_size >= 32,
            "synth_image_size",
            self.synth_image_size,
            "use 0 (the profile's own) or 32 and more",
        )


@dataclass
class ModelConfig(_Checked):
    backbone_weights: str = setting(
        BACKBONE_URL,
        "ImageNet ResNet-50 weights: a URL, file:// URL or a path. Or no file: `none` (random "
        "init, every layer trainable, ordinary batch norm: training from scratch) or `random` "
        "(random values in the pretrained structure: frozen batch norm, 3 trainable stages; the "
        "speed of the real recipe without its download, for throughput_only runs).",
    )
    min_size: int = setting(800, "The model's resize: short side of the input in pixels.", ge=32)
    max_size: int = setting(1333, "The model's resize: longest side allowed in pixels.")
    loss: Literal["batched", "torchvision"] = setting(
        "batched",
        "How the loss is computed: `batched` (the whole batch at once, no host synchronisation) "
        "or `torchvision` (torchvision's per-image code, the reference). The same numbers either "
        "way.",
    )
    postprocess: Literal["batched", "torchvision"] = setting(
        "batched",
        "How detections are selected from the head's outputs: `batched` (every image at once, "
        "boxes decoded in float32) or `torchvision` (torchvision's per-image code, the "
        "reference).",
    )
    transform: Literal["batched", "torchvision"] = setting(
        "batched",
        "How input images are normalised, resized and batched: `batched` (once per distinct "
        "image size, boxes scaled by one table) or `torchvision` (image by image, the reference). "
        "The same numbers either way.",
    )
    reuse_constants: bool = setting(
        True,
        "Compute frozen batch norm's scale and shift once (they are frozen) and anchors once per "
        "batch shape, instead of at every step as torchvision does (false). The same numbers.",
    )
    channels_last: Literal["auto", "on", "off"] = setting(
        "auto",
        "Channels-last memory format for the network and its input: on, off, or auto (on for "
        "CUDA, where convolutions run faster in it; off elsewhere).",
    )
    compile: bool = setting(
        False,
        "Run backbone, FPN, head and loss through torch.compile (the first steps compile).",
    )
    compile_mode: Literal["default", "reduce-overhead"] = setting(
        "default",
        "torch.compile's mode for `compile=true`: `default`, or `reduce-overhead`: the compiled "
        "parts also replay as CUDA graphs, one recorded per batch shape (CUDA only; the 800/1333 "
        "resize padded to 32 px bounds the shapes to under a hundred), so that the host launches "
        "a part's hundreds of kernels at once.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.max_size >= self.min_size, "max_size", self.max_size, "use at least min_size")
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
class TrainConfig(_Checked):
    batch_size: int = setting(16, "Images per device per step (the local batch).", ge=1)
    lr: float = setting(0.04, "Peak learning rate after warm-up.", gt=0)
    momentum: float = setting(0.9, "SGD momentum.", ge=0)
    weight_decay: float = setting(
        1e-4, "SGD weight decay (L2), on every trainable parameter.", ge=0
    )
    epochs: int = setting(26, "Most epochs to run (epochs 0..epochs-1).", ge=1)
    lr_steps: tuple[int, ...] = setting(
        (16, 22), "Epochs at whose start the learning rate is multiplied by lr_gamma."
    )
    lr_gamma: float = setting(0.1, "Learning-rate multiplier at each of lr_steps.", gt=0)
    warmup_iters: int = setting(
        1000, "Linear warm-up length in steps, capped at (steps per epoch - 1).", ge=0
    )
    warmup_factor: float = setting(1e-3, "Warm-up starts at lr * warmup_factor.", gt=0)
    clip_grad_norm: float = setting(
        0.0,
        "Clip the gradients' global L2 norm to this before each update; 0 is off, as in the "
        "reference recipe. Training from random initialisation (smoke) needs it to stay stable.",
        ge=0,
    )
    max_steps: int = setting(
        0,
        "Stop after this many optimizer steps (0: no limit); a final evaluation follows.",
        ge=0,
    )
    precision: Literal["auto", "fp32", "fp32-strict", "tf32", "amp", "bf16", "fp16"] = setting(
        "fp32",
        "fp32 (the framework's default float32 math, as the seed's: TF32 convolutions on NVIDIA "
        "Ampere and newer), fp32-strict (IEEE float32 everywhere), tf32 (TF32 convolutions and "
        "matmuls), amp (fp16 autocast + loss scaling), bf16 (autocast), fp16 (half model with "
        "fp32 master weights), or auto (bf16 where the device computes it natively, else fp32).",
    )
    target_map: float = setting(
        0.35,
        "Stop at the first evaluation whose mAP reaches this; 0 never stops early.",
        ge=0,
        le=1,
    )
    seed: int = setting(0, "Seeds weights, sampling and augmentation.")
    log_every: int = setting(
        20, "Steps between logged steps (loss, lr, images/s).", ge=1, role="conduct"
    )
    deterministic: bool = setting(
        False, "Use deterministic kernels (slower); for equivalence tests."
    )
    cudnn_benchmark: Literal["auto", "on", "off"] = setting(
        "auto",
        "cuDNN times its convolution algorithms for each new input shape and keeps the fastest: "
        "on, off, or auto: off, as torchvision's detection references (COCO's batches come in "
        "tens of shapes, each timed anew), until the GPU check measures otherwise. Off with "
        "deterministic=true.",
    )
    timing_warmup_steps: int = setting(
        10,
        "Steps left out of p_core_steady (kernel selection, allocator growth, caches warming); "
        "p_core counts every step. Not the lr warm-up.",
        ge=0,
    )
    profile_steps: str = setting(
        "",
        "`A:B`: record steps A to B (both included, numbered from 1 as in the event log) with "
        "torch.profiler into <run dir>/profile and print the top operators. Empty: off.",
        role="conduct",
    )
    max_bad_steps: int = setting(
        20,
        "Stop the run as failed when the loss is not finite for this many consecutive steps (the "
        "last good checkpoint is kept); 0: never stop.",
        ge=0,
        role="conduct",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            list(self.lr_steps) == sorted(self.lr_steps),
            "lr_steps",
            self.lr_steps,
            "list epochs in increasing order",
        )
        parse_step_window(self.profile_steps)


@dataclass
class EvalConfig(_Checked):
    eval_batch_size: int = setting(16, "Images per device per inference batch.", ge=1)


@dataclass
class RunConfig(_Checked):
    preset: str = setting("", "Name of the preset this configuration started from.")
    device: str = setting(
        "auto",
        "A torch device type (cuda, cpu, ...) or auto: the accelerator if there is one, else cpu.",
    )
    nodes: int = setting(
        0,
        "Nodes the preset is meant for: a job of another shape is refused, as its row would not "
        "compare with the preset's. 0: any.",
        ge=0,
    )
    devices_per_node: int = setting(
        0, "Processes (devices) per node the preset is meant for. 0: any.", ge=0
    )
    dist_timeout: float = setting(
        600.0,
        "Seconds a collective may wait for the other ranks before the job fails (a dead rank on "
        "another node is noticed by then at the latest).",
        gt=0,
        role="conduct",
    )
    output_dir: str = setting("", "Run directory. Empty: runs/<timestamp>/.", role="place")
    tensorboard: bool = setting(
        False,
        "Also write the event log's scalars for TensorBoard to <run dir>/tensorboard (needs the "
        "tensorboard package).",
        role="place",
    )
    monitor_interval: float = setting(
        5.0,
        "Seconds between the system monitor's samples (CPU, RAM, and per GPU utilisation, "
        "memory, power, temperature, clock); 0 turns the monitor off.",
        ge=0,
        role="place",
    )
    throughput_only: bool = setting(
        False,
        "Measure speed alone: the data or weights make mAP meaningless (`run --synthetic`); "
        "results say so and the table shows no mAP.",
    )
    save_model: bool = setting(
        False,
        "Write the trained model's state dict to <run dir>/model.pt at the end (float32: fp16 "
        "runs write their master weights).",
        role="place",
    )
    checkpoint_minutes: float = setting(
        30.0,
        "Minutes between checkpoints inside an epoch (one is also written after every epoch's "
        "evaluation, and when the run is stopped by a signal); 0 turns the timed ones off.",
        ge=0,
        role="conduct",
    )
    keep_checkpoints: int = setting(
        2,
        "Checkpoints kept in <run dir>/checkpoints (the newest); older ones are deleted.",
        ge=1,
        role="conduct",
    )
    cache_dir: str = setting(
        "",
        "Downloads and the generated dataset. Empty: $RETINAPERF_CACHE or ~/.cache/retinaperf.",
        role="place",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.throughput_only or self.model.random_backbone != "random",
            "backbone_weights",
            self.model.backbone_weights,
            "random values in the pretrained structure do not learn like ImageNet weights: "
            "use it with throughput_only=true (run --synthetic), or `none` to train from scratch",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the keys, their types and checks --------------------------------------------------------


@functools.cache
def _settings(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved type) of each setting of `cls`: the fields with a help text."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata)


_SECTIONS: dict[str, type] = {
    name: kind
    for name, kind in typing.get_type_hints(RunConfig).items()
    if dataclasses.is_dataclass(kind)
}


class _Key(NamedTuple):
    section: str | None  # None: a key of RunConfig itself
    field: dataclasses.Field
    kind: Any


def _index() -> dict[str, _Key]:
    index = {f.name: _Key(None, f, kind) for f, kind in _settings(RunConfig)}
    for section, cls in _SECTIONS.items():
        for f, kind in _settings(cls):
            assert f.name not in index, f"config key {f.name} is defined twice"
            index[f.name] = _Key(section, f, kind)
    return index


_KEYS = _index()  # bare name -> where it lives and what it takes
# The choices of two keys, which other modules name.
PRECISIONS: tuple[str, ...] = typing.get_args(_KEYS["precision"].kind)
SYNTH_PROFILES: tuple[str, ...] = typing.get_args(_KEYS["synth_profile"].kind)

# The plain types of keys: the name `presets --keys` gives each, and what to use instead of a value
# of another type.
_PLAIN_TYPES = {
    bool: ("true|false", "use true or false"),
    int: ("integer", "use an integer"),
    float: ("number", "use a number"),
    str: ("string", "use a string"),
}


def _valid(f: dataclasses.Field, kind: Any, value: Any, where: str) -> Any:
    """`value` as the setting `f` of type `kind` holds it (a float for an int, a tuple for a
    list), or UserError naming `where` it came from, the key, the value and what to use."""
    need = None
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        need = None if value in choices else f"use one of {', '.join(choices)}"
    elif typing.get_origin(kind) is tuple:
        ints = isinstance(value, (list, tuple)) and all(type(v) is int for v in value)
        value, need = (tuple(value), None) if ints else (value, "use integers, e.g. 16,22")
    elif type(value) is kind or (kind is float and type(value) is int):  # not bool for int
        value = kind(value)
        need = _range_need(f.metadata, value)
    else:
        need = _PLAIN_TYPES[kind][1]
    if need:
        raise _invalid(where, f.name, value, need)
    return value


def _range_need(metadata: typing.Mapping[str, Any], value: float) -> str | None:
    """What to use when `value` lies outside a setting's bounds, else None."""
    ge, gt, le = metadata["ge"], metadata["gt"], metadata["le"]
    if (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le):
        return None
    if le is not None:
        return f"use a value in [{ge}, {le}]"
    if gt is not None:
        return "use a positive number" if gt == 0 else f"use a number above {gt}"
    return f"use {ge} or more"


def _from_text(text: str, kind: Any) -> Any:
    """The value a preset file would hold for the `--set` text, or the text itself where it is
    none of the type's (then `_valid` says what to use)."""
    try:
        if kind is bool:
            return {"true": True, "false": False}.get(text.strip().lower(), text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is tuple:
            return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        pass
    return text


def _type_name(kind: Any) -> str:
    """What a key takes, as `retinaperf presets --keys` shows it."""
    if typing.get_origin(kind) is Literal:
        return "|".join(typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return "integers"
    return _PLAIN_TYPES[kind][0]


def _as_text(value: Any) -> str:
    """A default as `--set` would write it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# --- presets, overrides, resolving -----------------------------------------------------------


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


def _flatten(table: dict[str, Any], where: str) -> dict[str, Any]:
    """{section: {key: value}} or {key: value}, as a preset file or a run's config.json holds
    them -> {bare key: typed value}, each key and value checked; `where` names the source."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key in _SECTIONS:
            for sub, subvalue in value.items():
                if sub not in _KEYS or _KEYS[sub].section != key:
                    raise UserError(f"{where}: unknown key {key}.{sub}")
                flat[sub] = _valid(_KEYS[sub].field, _KEYS[sub].kind, subvalue, where)
        elif key in _KEYS and _KEYS[key].section is None:
            flat[key] = _valid(_KEYS[key].field, _KEYS[key].kind, value, where)
        else:
            raise UserError(f"{where}: unknown key {key}")
    return flat


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["lr=0.02", "train.epochs=3"]` -> `{"lr": 0.02, "epochs": 3}`, each checked."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"--set {pair!r}: write KEY=VALUE, e.g. --set lr=0.02")
        section, _, bare = key.rpartition(".")
        if bare == "preset":
            raise UserError(f"--set {key}: choose the preset with --preset NAME, not --set")
        if bare not in _KEYS or (section and _KEYS[bare].section != section):
            raise UserError(
                f"--set {key}: unknown key; `retinaperf presets --keys` lists the valid keys"
            )
        if bare in overrides:
            raise UserError(f"--set {key}: given twice; give each key once")
        entry = _KEYS[bare]
        overrides[bare] = _valid(entry.field, entry.kind, _from_text(text, entry.kind), "--set")
    return overrides


def resolve(preset: str, overrides: dict[str, Any], synthetic: bool = False) -> RunConfig:
    """Defaults < preset file < throughput mode (if `synthetic`) < overrides, validated."""
    mode = THROUGHPUT_MODE if synthetic else {}
    preset_values = _flatten(_read_preset(preset), f"preset file {preset}.toml")
    values = {**preset_values, **mode, **overrides, "preset": preset}
    if synthetic and values.get("data_dir"):
        raise UserError(
            f"--synthetic generates its own data: drop --data-dir {values['data_dir']} (or drop "
            "--synthetic to run on that dataset)"
        )
    return _build(values)


def _build(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from {bare key: typed value}; every section's checks run."""
    root: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in values.items():
        section = _KEYS[key].section
        (sections[section] if section else root)[key] = value
    built = {name: cls(**sections[name]) for name, cls in _SECTIONS.items()}
    return RunConfig(**root, **built)


# --- what is the workload ---------------------------------------------------------------------


def _keys_of_role(*roles: Role) -> frozenset[str]:
    return frozenset(name for name, key in _KEYS.items() if key.field.metadata["role"] in roles)


# Keys a resumed run may change (`run --resume --set`): any other would make the halves of the
# run different workloads.
RUN_KEYS = _keys_of_role("conduct", "place")
# Keys in which rounds of one configuration may differ (run/rounds.py): they change neither what
# a run computes nor how fast.
PLACE_KEYS = _keys_of_role("place")


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


class Key(NamedTuple):
    """A settable key as `retinaperf presets --keys` lists it."""

    name: str  # qualified: section.key, or the key alone at the root
    kind: str  # what it takes
    default: str  # as `--set` would write it
    help: str


def all_keys() -> list[Key]:
    """Every key `--set` takes (all but `preset`), from the settings' metadata."""
    return [
        Key(
            f"{key.section}.{name}" if key.section else name,
            _type_name(key.kind),
            _as_text(key.field.default),
            key.field.metadata["help"],
        )
        for name, key in _KEYS.items()
        if name != "preset"
    ]


__all__ = [
    "BACKBONE_URL",
    "PLACE_KEYS",
    "PRECISIONS",
    "RUN_KEYS",
    "SYNTH_PROFILES",
    "THROUGHPUT_MODE",
    "DataConfig",
    "EvalConfig",
    "Key",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "all_keys",
    "load_saved",
    "parse_overrides",
    "parse_step_window",
    "preset_description",
    "preset_names",
    "resolve",
    "setting",
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
