"""Numerical precision of training: what each choice computes and how the step applies it.

- fp32: IEEE float32 everywhere. PyTorch lets cuDNN use TF32 for convolutions by default; we turn
  that off so that fp32 means fp32.
- tf32: float32 storage, TF32 tensor-core math for convolutions and matmuls (devices with TF32).
- amp: float16 autocast with dynamic loss scaling (torch.amp.GradScaler).
- bf16: bfloat16 autocast; no loss scaling needed.
- fp16: the backbone and head hold float16 weights and compute in float16; the optimizer updates
  float32 master copies; dynamic loss scaling. Anchors, box coding and losses stay float32 (the
  half features are cast back at the boundary), as float16 cannot hold pixel coordinates of
  large images exactly nor sums over 100k anchors.
- auto: the faster of fp32 and bf16 on this device, decided by timing a small convolution stack
  at start (the choice is recorded in the results).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from .distributed import synchronize
from .errors import UserError

AUTOCAST_DTYPE = {"amp": torch.float16, "bf16": torch.bfloat16}


def resolve_auto(requested: str, device: torch.device) -> str:
    """`auto` -> fp32 or bf16, whichever trains a small conv stack faster on `device`."""
    if requested != "auto":
        return requested
    fp32 = _probe_seconds(device, None)
    # A device that emulates bf16 can be 30x slower: stop timing it once that is plain.
    bf16 = _probe_seconds(device, torch.bfloat16, give_up_after=10 * fp32)
    # Ask for a clear win: reduced precision is only worth it when it is markedly faster.
    return "bf16" if bf16 < 0.8 * fp32 else "fp32"


def _probe_seconds(
    device: torch.device, dtype: torch.dtype | None, give_up_after: float = float("inf")
) -> float:
    """Best time of a forward + backward of three 3x3 convolutions on 2x64x48x48 activations
    (an upper bound once one round exceeds `give_up_after`)."""
    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
    ).to(device)  # fmt: skip
    x = torch.rand(2, 3, 48, 48, generator=generator).to(device)
    best = float("inf")
    for _ in range(4):  # the first round warms up kernels and allocator
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            net(x).float().square().mean().backward()
        synchronize(device)  # the device runs asynchronously: wait before reading the clock
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        if elapsed > give_up_after:
            break
    return best


class Precision:
    """Applies one precision choice: configures the model, wraps the forward, runs the update."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in ("fp32", "tf32", "amp", "bf16", "fp16"):
            raise ValueError(f"resolve 'auto' before building Precision, got {name!r}")
        self.name = name
        self.device = device
        self._configure_float32_math(name == "tf32")
        needs_scaling = name in ("amp", "fp16")
        self.scaler = torch.amp.GradScaler(device.type, enabled=needs_scaling)
        self._masters: list[tuple[nn.Parameter, nn.Parameter]] = []

    def _configure_float32_math(self, tf32: bool) -> None:
        if tf32 and not _has_tf32(self.device):
            raise UserError(
                f"precision tf32 needs a device with TF32 math (NVIDIA Ampere or newer); this "
                f"run's device is {self.device.type}: use fp32, bf16 or amp"
            )
        mode = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode

    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast the model for fp16; other precisions keep float32 weights."""
        if self.name == "fp16":
            for part in (model.backbone, model.head):
                part.half()
                part.register_forward_pre_hook(_cast_inputs(torch.float16))
                part.register_forward_hook(_cast_outputs(torch.float32))
        return model

    def optimizer_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The tensors the optimizer updates: float32 masters of half weights for fp16."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        if self.name != "fp16":
            return trainable
        self._masters = [
            (p, nn.Parameter(p.detach().float(), requires_grad=True)) for p in trainable
        ]
        return [master for _, master in self._masters]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dtype = AUTOCAST_DTYPE.get(self.name)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            yield

    def backward_and_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad_norm: float = 0.0
    ) -> None:
        """Backward, (un)scaling, optional clipping and the optimizer update; the update is
        skipped when loss scaling finds an overflow."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for model_param, master in self._masters:
            master.grad = None if model_param.grad is None else model_param.grad.float()
            model_param.grad = None
        if clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        self.scaler.step(optimizer)  # unscales and skips the step if a gradient is inf/nan
        self.scaler.update()
        with torch.no_grad():
            for model_param, master in self._masters:
                model_param.copy_(master)


def _has_tf32(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _cast_inputs(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(_cast(a, dtype) for a in args)

    return hook


def _cast_outputs(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple, output):
        return _cast(output, dtype)

    return hook


def _cast(value, dtype: torch.dtype):
    """Cast floating tensors inside tensors, lists and dicts (the head's and FPN's outputs)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, _cast(v, dtype)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value
