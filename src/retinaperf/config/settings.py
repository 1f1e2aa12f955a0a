"""The settings: one dataclass per concern (data, model, train, eval), composed by `RunConfig`.

Each key is a `setting` (see fields.py): its default, its help text, the range its value must lie
in and its role; its type, a `Literal` for a choice, says what it accepts (msgspec checks a value
against the type and the range). Checks that involve more than one key are in the classes'
`__post_init__`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from retinaperf.config.fields import Checked, check, setting
from retinaperf.errors import UserError

BACKBONE_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


# `run --synthetic`: a preset's recipe on generated COCO-like data (generated for the run, or one
# `retinaperf synth` wrote, given with --data-dir), for speed alone. A layer above the preset and
# below --set: the user can still change any of these.
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


@dataclass
class DataConfig(Checked):
    data_dir: str = setting(
        "",
        "COCO2017 root (train2017/, val2017/, annotations/). Empty: the generated dataset. With "
        "`run --synthetic`: only a folder `retinaperf synth` wrote.",
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
        check(
            self.synth_image_size == 0 or self.synth_image_size >= 32,
            "synth_image_size",
            self.synth_image_size,
            "use 0 (the profile's own) or 32 and more",
        )


@dataclass
class ModelConfig(Checked):
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
        check(self.max_size >= self.min_size, "max_size", self.max_size, "use at least min_size")
        check(
            self.compile or self.compile_mode == "default",
            "compile_mode",
            self.compile_mode,
            "a mode of torch.compile needs compile=true as well",
        )
        check(self.backbone_weights.strip() != "", "backbone_weights", "", "give a source")

    @property
    def random_backbone(self) -> str | None:
        """`none` or `random` when backbone_weights names no file (random values), else None."""
        source = self.backbone_weights.strip().lower()
        return source if source in ("none", "random") else None


@dataclass
class TrainConfig(Checked):
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
        "fp32 (the framework's default float32 math, as FlagPerf's RetinaNet results, which this "
        "benchmark reproduces, measured it: TF32 convolutions on NVIDIA Ampere and newer), "
        "fp32-strict (IEEE float32 everywhere), tf32 (TF32 convolutions and "
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
        check(
            list(self.lr_steps) == sorted(self.lr_steps),
            "lr_steps",
            self.lr_steps,
            "list epochs in increasing order",
        )
        parse_step_window(self.profile_steps)


@dataclass
class EvalConfig(Checked):
    eval_batch_size: int = setting(16, "Images per device per inference batch.", ge=1)


@dataclass
class RunConfig(Checked):
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
    memory_limit_gib: float = setting(
        0.0,
        "GiB of memory each process may take on its device; past it, an allocation fails as out "
        "of memory (what `retinaperf sweep --find-batch` searches against). CUDA: the caching "
        "allocator's cap (torch.cuda.set_per_process_memory_fraction; the CUDA context is not "
        "counted). CPU: on the scale of `mem` (the peak resident set): the data segment "
        "(RLIMIT_DATA: heap and private mappings) may grow by the limit less the resident set "
        "when the run starts (Linux). 0: no limit.",
        ge=0,
        role="conduct",
    )
    output_dir: str = setting("", "Run directory. Empty: runs/<timestamp>/.", role="place")
    tensorboard: bool = setting(
        False,
        "Also write the event log's scalars for TensorBoard to <run dir>/tensorboard (needs the "
        "tensorboard package).",
        role="place",
    )
    perflog_console: bool = setting(
        False,
        "Also print FlagPerf's [PerfLog] lines (written to <run dir>/flagperf.log always) on rank "
        "0's console, as FlagPerf's harness greps them from rank 0's log.",
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
    mlperf_org: str = setting(
        "retinaperf",
        "The MLPerf log's submission_org: who ran the run (your organisation). The default names "
        "the benchmark itself, as MLPerf's reference implementations log "
        "`reference_implementation`.",
        role="place",
    )
    mlperf_platform: str = setting(
        "",
        "The MLPerf log's submission_platform: the system the run trained on. Empty: its devices "
        "as `<devices>x<device name>` on one node, `<nodes>x<devices per node>x<device name>` on "
        "several (e.g. 1xNVIDIA H100, 2x8xNVIDIA A100).",
        role="place",
    )
    mlperf_division: Literal["open", "closed"] = setting(
        "open",
        "The MLPerf log's submission_division. open: this workload is FlagPerf's RetinaNet recipe "
        "(COCO, ResNet-50, SGD), not MLPerf's closed RetinaNet (OpenImages, ResNeXt-50, Adam); "
        "closed holds the log to the closed rules, which this workload does not meet.",
        role="place",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.throughput_only or self.model.random_backbone != "random",
            "backbone_weights",
            self.model.backbone_weights,
            "random values in the pretrained structure do not learn like ImageNet weights: "
            "use it with throughput_only=true (run --synthetic), or `none` to train from scratch",
        )
        # MLPerf's checker refuses an empty submission_org (the platform's empty means derived).
        check(self.mlperf_org.strip() != "", "mlperf_org", self.mlperf_org, "name who ran the run")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
