"""The training step and what it is built from: the optimizer, the lr schedule, DDP, and the
switches of how the device computes it.

The step itself (`train_step`) does only the step: forward, loss, backward, update. Timing,
logging, evaluation and checkpoints hang around it in the trainer's loop.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from retinaperf.config import ModelConfig, TrainConfig
from retinaperf.distributed import DistEnv
from retinaperf.errors import OutOfMemory, UserError
from retinaperf.measure.breakdown import CommTimer
from retinaperf.measure.memory import is_out_of_memory
from retinaperf.model.precision import Precision


def train_step(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    clip_grad_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One optimizer step: forward, loss, backward, update. Returns the loss parts (on device)."""
    with precision.autocast():
        losses = model(images, targets)  # {"classification": [], "bbox_regression": []}
    loss = sum(losses.values())
    precision.backward_and_step(loss, optimizer, clip_grad_norm)
    return {name: value.detach() for name, value in losses.items()}


def lr_factor(
    step_in_epoch: int,
    epoch: int,
    warmup_iters: int,
    warmup_factor: float,
    lr_steps: tuple[int, ...],
    gamma: float,
) -> float:
    """Multiplier of the base lr: linear warm-up over the first steps of epoch 0 (from
    warmup_factor to 1), then x gamma at the start of each epoch in lr_steps."""
    factor = gamma ** sum(epoch >= milestone for milestone in lr_steps)
    if epoch == 0 and step_in_epoch < warmup_iters:
        alpha = step_in_epoch / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def use_channels_last(setting: str, device: torch.device) -> bool:
    """`channels_last` resolved: `auto` is on for CUDA, whose convolutions (cuDNN, tensor cores)
    run fastest in NHWC, and off elsewhere."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def use_cudnn_benchmark(cfg: TrainConfig, device: torch.device) -> bool:
    """`cudnn_benchmark` resolved: never with deterministic kernels (its choice may differ from
    run to run) nor off CUDA; `auto` is off, as in torchvision's detection references, where
    each new input shape (tens per epoch of COCO) is timed anew."""
    return device.type == "cuda" and not cfg.deterministic and cfg.cudnn_benchmark == "on"


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The reference's SGD, updating every tensor in one fused kernel where the device has one
    (which also takes the loss scaler's overflow check without a host synchronisation), else with
    multi-tensor (foreach) kernels."""
    sgd = functools.partial(
        torch.optim.SGD, params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    try:
        return sgd(fused=True)
    except RuntimeError:  # no fused SGD for this device type
        return sgd(foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def wrap_ddp(
    model: nn.Module, env: DistEnv, comm: CommTimer | None = None
) -> tuple[nn.Module, dict | None]:
    """The model DDP-wrapped when there are several ranks, and how it was wrapped; `comm`, when
    given, times its all-reduce (the default one, as its communication hook)."""
    if env.world_size == 1:
        return model, None
    options = {
        # Batch norm that trains keeps running statistics, which rank 0 must hand to every rank
        # before each forward; frozen batch norm (the real recipe) keeps none that change, and
        # the broadcast is a per-step cost.
        "broadcast_buffers": any(isinstance(m, BATCH_NORMS) for m in model.modules()),
        # Gradients live in DDP's all-reduce buckets: no copy in and out of them each step.
        "gradient_as_bucket_view": True,
    }
    device_ids = [env.device] if env.device.type != "cpu" else None
    ddp = functools.partial(
        DistributedDataParallel,
        model,
        device_ids=device_ids,
        gradient_as_bucket_view=options["gradient_as_bucket_view"],
    )
    if _DDP_TAKES_FORWARD_SYNC:
        # torch 2.13 renamed the per-forward broadcast (and warns on every rank at the old
        # name); unlike the old False, the new one still syncs buffers once at init, which is
        # harmless here: every rank starts from the same weights.
        wrapped = ddp(forward_sync_buffers=options["broadcast_buffers"])
    else:
        wrapped = ddp(broadcast_buffers=options["broadcast_buffers"])
    if comm is not None:
        wrapped.register_comm_hook(None, comm.hook)  # None: the default process group
    return wrapped, options


# Every batch norm class of torch.nn, by their public names (their private base,
# nn.modules.batchnorm._BatchNorm, would say the same: tests/test_torch_compat.py checks it).
BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)

_DDP_TAKES_FORWARD_SYNC = (
    "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
)


def implementation(
    model: ModelConfig, channels_last: bool, optimizer: torch.optim.Optimizer, ddp: dict | None
) -> dict:
    """How the step is computed, for the results (`metrics.implementation`)."""
    return {
        "loss": model.loss,
        "postprocess": model.postprocess,
        "channels_last": channels_last,
        "compile": model.compile,
        "compile_mode": model.compile_mode if model.compile else None,
        "transform": model.transform,
        "reuse_constants": model.reuse_constants,
        "optimizer": f"SGD ({'fused' if optimizer.defaults.get('fused') else 'foreach'})",
        "ddp": ddp,
    }


def out_of_memory(
    err: BaseException,
    device: torch.device,
    where: str,
    images: list[torch.Tensor],
    model: ModelConfig,
    precision: Precision,
) -> OutOfMemory | None:
    """Where `err` is an allocation that failed in a step's work (`where`: "at step 3"), the
    OutOfMemory that says what to do, with the batch that did it; None for any other error."""
    if not is_out_of_memory(err):
        return None
    largest = max(images, key=lambda image: image.shape[1] * image.shape[2])
    return OutOfMemory(
        f"out of {device} memory {where}: local batch {len(images)}, images up to "
        f"{largest.shape[2]}x{largest.shape[1]} px resized to short side {model.min_size} "
        f"(long side at most {model.max_size}), precision {precision.name}: lower batch_size "
        f"(and lr with it), min_size/max_size, or use bf16/amp ({str(err).splitlines()[0]})"
    )


def as_out_of_memory(err: BaseException, device: torch.device) -> BaseException:
    """`err` as OutOfMemory where it is an allocation that failed (in an evaluation, say:
    a step's own says more, `out_of_memory`), so that it is recorded as such and told
    in one line; any other error as it is."""
    if isinstance(err, UserError) or not is_out_of_memory(err):
        return err
    return OutOfMemory(
        f"out of {device} memory outside a training step ({str(err).splitlines()[0]}): lower "
        "eval_batch_size, min_size/max_size or batch_size, or raise memory_limit_gib"
    )
