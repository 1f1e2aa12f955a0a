"""Numerical precision of training, in three parts that each do one thing:

1. the float32 math flags: how float32 convolutions and matmuls are computed (IEEE or TF32);
2. the policy of each precision: autocast dtype, loss scaling, half weights, and `auto`'s choice;
3. the model's boundaries: half weights with float32 master copies (fp16), and float32 anchors,
   box coding and losses under every reduced precision.

`Precision` composes them for the training step. The choices:

- fp32: float32 storage with the framework's default float32 math, as the seed measured it
  (FlagPerf's A100 rows ran PyTorch 1.8's defaults, which computed float32 convolutions in TF32 on
  Ampere; PyTorch still does for convolutions, while matmuls default to IEEE). The flags in
  effect are recorded with every run.
- fp32-strict: IEEE float32 everywhere (TF32 off for convolutions and matmuls).
- tf32: float32 storage, TF32 tensor-core math for convolutions and matmuls (devices with TF32).
- amp: float16 autocast with dynamic loss scaling (torch.amp.GradScaler).
- bf16: bfloat16 autocast; no loss scaling needed.
- fp16: the backbone and head hold float16 weights and compute in float16; the optimizer updates
  float32 master copies; dynamic loss scaling.

Under amp, bf16 and fp16 alike, what leaves the backbone and the head is cast to float32, so that
anchors (made in the features' dtype), box coding, matching and the losses stay float32: half
types cannot hold the pixel coordinates of large images exactly (bfloat16 steps by 4 px at
1000 px) nor sum losses over 100k anchors, and bfloat16 box coding turned the smoke run's loss
into NaN within ten steps. The convolutions still run in the reduced type.
- auto: bf16 where the device computes bfloat16 natively, else fp32; decided from what the device
  reports (no timing), and recorded with its reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from retinaperf.errors import UserError
from retinaperf.torch_compat import cpu_capabilities, loss_scale

Model = TypeVar("Model", bound=nn.Module)

# --- 1. The float32 math flags ------------------------------------------------------------------

# The framework's own settings, read before anything here changes them: `fp32` restores these.
# (`torch.backends.cudnn.conv` and `torch.backends.fp32_precision` live on the objects that torch
# puts in place of those modules in sys.modules, which type checkers do not see: hence the
# `attr-defined` ignores below.)
FRAMEWORK_CONV = torch.backends.cudnn.conv.fp32_precision  # type: ignore[attr-defined]
FRAMEWORK_MATMUL = torch.backends.cuda.matmul.fp32_precision


def set_float32_math(conv: str, matmul: str) -> None:
    """How float32 convolutions (cuDNN) and matmuls (cuBLAS) compute: "tf32", "ieee", or "none"
    (inherit the framework's wider setting)."""
    torch.backends.cudnn.conv.fp32_precision = conv  # type: ignore[attr-defined]
    torch.backends.cuda.matmul.fp32_precision = matmul


def has_tf32(device: torch.device) -> bool:
    """Whether the device has TF32 tensor-core math (NVIDIA compute capability 8.0 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def math_in_effect(device: torch.device) -> dict:
    """The float32 math settings now in force, and what they mean on `device`: convolutions and
    matmuls in "tf32" or "ieee". Recorded in results.json, named in the report."""
    conv = _inherited(torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision)  # type: ignore[attr-defined]
    matmul = _inherited(torch.backends.cuda.matmul.fp32_precision)
    if matmul == "none":
        # No new-style setting anywhere: the legacy knob decides. (Reading it once a new-style
        # setting is made raises, so it is read only here.)
        matmul = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    tf32 = has_tf32(device)
    return {
        "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,  # type: ignore[attr-defined]
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        # TF32 settings only change devices that have TF32; elsewhere float32 is IEEE.
        "effective_conv": "tf32" if tf32 and conv == "tf32" else "ieee",
        "effective_matmul": "tf32" if tf32 and matmul == "tf32" else "ieee",
    }


def _inherited(*levels: str) -> str:
    """The first setting that is not "none", from the most specific to the framework's global."""
    for value in (*levels, torch.backends.fp32_precision):  # type: ignore[attr-defined]
        if value != "none":
            return value
    return "none"


# --- 2. The policy of each precision --------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    autocast_dtype: torch.dtype | None
    """The dtype autocast computes in; None: no autocast."""
    loss_scaling: bool
    """Dynamic loss scaling (float16 gradients underflow without it)."""
    half_weights: bool
    """Backbone and head weights in float16, with float32 master copies."""
    float32_math: tuple[str, str] | None
    """(conv, matmul) float32 math to set; None: the framework's defaults."""


POLICIES = {
    "fp32": Policy(None, False, False, None),
    "fp32-strict": Policy(None, False, False, ("ieee", "ieee")),
    "tf32": Policy(None, False, False, ("tf32", "tf32")),
    "amp": Policy(torch.float16, True, False, None),
    "bf16": Policy(torch.bfloat16, False, False, None),
    "fp16": Policy(None, True, True, None),
}


def choose(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision to train in and why: an explicit choice is kept; `auto` is bf16 where the
    device computes bfloat16 natively, fp32 elsewhere."""
    if requested != "auto":
        return requested, "as configured"
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), f"auto: {why}"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 in hardware, from what torch reports about it."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = (major, minor) >= (8, 0)
        relation = ">=" if native else "<"
        return native, f"CUDA compute capability {major}.{minor} {relation} 8.0"
    if device.type == "cpu":
        capabilities = cpu_capabilities()  # as torch's own dispatch sees the CPU
        features = sorted(f for f in ("avx512_bf16", "amx_bf16") if capabilities.get(f, False))
        if features:
            return True, f"the CPU has {' and '.join(features)}"
        return False, "the CPU has neither AVX512-BF16 nor AMX-BF16"
    backend = getattr(torch, device.type, None)
    supported = getattr(backend, "is_bf16_supported", None)
    if supported is None:
        return False, f"torch reports no bfloat16 support for {device.type}"
    try:
        native = bool(supported(including_emulation=False))
    except TypeError:  # backends whose check has no emulation switch
        native = bool(supported())
    return native, f"torch.{device.type}.is_bf16_supported() is {native}"


# --- 3. The model's boundaries -------------------------------------------------------------------


def float32_outputs(model: nn.Module) -> None:
    """Backbone and head hand float32 tensors on: anchors, box coding and losses stay float32."""
    for part in (model.get_submodule("backbone"), model.get_submodule("head")):
        part.register_forward_hook(_cast_outputs(torch.float32))


class MasterWeights:
    """Float32 copies of a half model's trainable weights: the optimizer updates these, and the
    half weights are refreshed from them after every update."""

    def __init__(self) -> None:
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []

    @staticmethod
    def make_half(model: nn.Module) -> None:
        """Backbone and head in float16, taking inputs of any floating type."""
        for part in (model.get_submodule("backbone"), model.get_submodule("head")):
            part.half()
            part.register_forward_pre_hook(_cast_inputs(torch.float16))

    def masters_of(self, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
        self._pairs = [(p, nn.Parameter(p.detach().float(), requires_grad=True)) for p in trainable]
        return [master for _, master in self._pairs]

    def gradients_to_masters(self) -> None:
        for half, master in self._pairs:
            master.grad = None if half.grad is None else half.grad.float()
            half.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for half, master in self._pairs:
            half.copy_(master)

    def by_weight(self) -> dict[int, nn.Parameter]:
        return {id(half): master for half, master in self._pairs}

    def state(self) -> list[torch.Tensor]:
        return [master.detach() for _, master in self._pairs]

    @torch.no_grad()
    def load(self, masters: list[torch.Tensor]) -> None:
        for (_, master), saved in zip(self._pairs, masters, strict=True):
            master.copy_(saved)
        self.masters_to_model()


# --- The composition the training step uses ------------------------------------------------------


class Precision:
    """Applies one precision choice: sets the float32 math, configures the model, wraps the
    forward, runs the update."""

    def __init__(self, name: str, device: torch.device, reason: str = "as configured") -> None:
        if name not in POLICIES:
            raise ValueError(f"resolve 'auto' before building Precision, got {name!r}")
        self.name = name
        self.reason = reason
        self.device = device
        self.policy = POLICIES[name]
        if name == "tf32" and not has_tf32(device):
            raise UserError(
                f"precision tf32 needs a device with TF32 math (NVIDIA Ampere or newer); this "
                f"run's device is {device.type}: use fp32, bf16 or amp"
            )
        set_float32_math(*(self.policy.float32_math or (FRAMEWORK_CONV, FRAMEWORK_MATMUL)))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.policy.loss_scaling)
        self._masters = MasterWeights() if self.policy.half_weights else None
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)

    def prepare(self, model: Model) -> Model:
        """Half weights for fp16 (others keep float32 weights); float32 box math for every
        reduced precision."""
        if self._masters is not None:
            self._masters.make_half(model)
        if self._masters is not None or self.policy.autocast_dtype is not None:
            float32_outputs(model)
        return model

    def optimizer_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The tensors the optimizer updates: float32 masters of half weights for fp16."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        return self._masters.masters_of(trainable) if self._masters is not None else trainable

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dtype = self.policy.autocast_dtype
        if dtype is None:  # no autocast object: some device types (meta) have no autocast
            yield
            return
        with torch.autocast(self.device.type, dtype=dtype):
            yield

    def backward_and_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad_norm: float = 0.0
    ) -> None:
        """Backward, (un)scaling, optional clipping and the optimizer update; the update is
        skipped when loss scaling finds an overflow."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self._masters is not None:
            self._masters.gradients_to_masters()
        if clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        self.scaler.step(optimizer)  # unscales and skips the step if a gradient is inf/nan
        if self.scaler.is_enabled():
            # The scaler backs off exactly when it skipped the update; counted on the device:
            # with fused SGD the step otherwise never waits for it (get_scale() would).
            before = loss_scale(self.scaler).clone()
            self.scaler.update()
            self._skipped += loss_scale(self.scaler) < before
        else:
            self.scaler.update()
        if self._masters is not None:
            self._masters.masters_to_model()

    def skipped_steps(self) -> torch.Tensor:
        """Updates the loss scaler skipped for a gradient that was not finite (a device tensor:
        reading it waits for the device)."""
        return self._skipped

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the scaler, fp16's float32 masters, the skipped count."""
        return {
            "scaler": self.scaler.state_dict(),
            "masters": self._masters.state() if self._masters is not None else None,
            "skipped_steps": self._skipped.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self._masters is not None:
            self._masters.load(state["masters"])
        self._skipped.copy_(state["skipped_steps"])

    def float32_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with fp16's float32 masters in place of its half weights:
        what the optimizer trained, not its rounding."""
        state = model.state_dict()
        if self._masters is not None:
            masters = self._masters.by_weight()
            for name, weight in model.named_parameters():
                if id(weight) in masters:
                    state[name] = masters[id(weight)].detach()
        return state

    def peak_math(self) -> str:
        """The math the model's convolutions run in, which names the device peak to compare
        with: fp32, tf32, fp16 or bf16."""
        if self.policy.half_weights or self.policy.autocast_dtype is torch.float16:
            return "fp16"
        if self.policy.autocast_dtype is torch.bfloat16:
            return "bf16"
        return "tf32" if math_in_effect(self.device)["effective_conv"] == "tf32" else "fp32"

    def record(self) -> dict:
        """What results.json says about the precision: the choice, why, and the math in force."""
        return {
            "precision": self.name,
            "precision_reason": self.reason,
            "math": math_in_effect(self.device),
        }


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
