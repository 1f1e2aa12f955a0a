"""Each precision really changes what is computed: dtypes seen inside the model, loss scaling,
master weights, clipping, and the choice behind `auto`."""

import pytest
import torch
from torch import nn

from retinaperf import precision as precision_module
from retinaperf.config import ModelConfig
from retinaperf.errors import UserError
from retinaperf.model import build_model
from retinaperf.precision import Precision, resolve_auto

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 48.0, 40.0]]), "labels": torch.tensor([7])}]
    return images, targets


def observed_dtypes(name: str, batch) -> dict[str, torch.dtype]:
    """Run one training forward under `name` and record dtypes at points inside the model."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(min_size=64, max_size=64), None)
    chosen = Precision(name, CPU)
    model = chosen.prepare(model)
    seen: dict[str, torch.dtype] = {}

    def record(key):
        def hook(module, args, output):
            seen[f"{key}.in"] = args[0].dtype
            seen[f"{key}.out"] = output.dtype

        return hook

    model.backbone.body.conv1.register_forward_hook(record("stem"))
    model.head.classification_head.cls_logits.register_forward_hook(record("logits"))
    model.head.register_forward_hook(
        lambda m, a, out: seen.__setitem__("head.returned", out["cls_logits"].dtype)
    )
    seen["weights"] = model.backbone.body.conv1.weight.dtype
    images, targets = batch
    model.train()
    with chosen.autocast():
        losses = model(images, targets)
    seen["loss"] = losses["classification"].dtype
    assert all(torch.isfinite(v) for v in losses.values())
    return seen


@pytest.mark.parametrize(
    ("name", "compute", "weights"),
    [
        ("fp32", torch.float32, torch.float32),
        ("amp", torch.float16, torch.float32),
        ("bf16", torch.bfloat16, torch.float32),
        ("fp16", torch.float16, torch.float16),
    ],
)
def test_precision_sets_the_dtype_of_compute_and_weights(name, compute, weights, batch):
    seen = observed_dtypes(name, batch)
    assert seen["stem.out"] == compute
    assert seen["logits.out"] == compute
    assert seen["weights"] == weights
    if name == "fp16":
        assert seen["stem.in"] == torch.float16  # inputs are cast, not autocast
        # what leaves the head is float32 again: anchors, box coding and the loss stay exact
        assert seen["head.returned"] == torch.float32
        assert seen["loss"] == torch.float32


def test_fp32_turns_off_tf32_and_tf32_needs_a_device_that_has_it():
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # PyTorch's default for convolutions
    Precision("fp32", CPU)
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    with pytest.raises(UserError, match="tf32"):
        Precision("tf32", CPU)


def tiny_net() -> nn.Module:
    """A stand-in with the two parts Precision casts for fp16 (backbone and head)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten())
    net.head = nn.Linear(8 * 6 * 6, 4)
    return net


def loss_of(net: nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.ones(2, 3, 8, 8)
    return net.head(net.backbone(x)).float().square().mean() * scale


def sgd(params, lr=0.1):
    return torch.optim.SGD(params, lr=lr)


def test_fp16_updates_float32_masters_and_copies_them_to_the_half_model():
    chosen = Precision("fp16", CPU)
    net = chosen.prepare(tiny_net())
    params = chosen.optimizer_params(net)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.float16 for p in net.parameters())
    before = [p.detach().clone() for p in params]
    chosen.backward_and_step(loss_of(net), sgd(params))
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    for model_param, master in zip(net.parameters(), params, strict=True):
        assert torch.equal(model_param, master.detach().half())


def test_loss_scaling_skips_an_overflowing_step_and_lowers_the_scale():
    chosen = Precision("fp16", CPU)
    chosen.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # fp16 grads overflow
    net = chosen.prepare(tiny_net())
    params = chosen.optimizer_params(net)
    before = [p.detach().clone() for p in params]
    chosen.backward_and_step(loss_of(net), sgd(params))
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))
    assert chosen.scaler.get_scale() < 2.0**60


def test_amp_scales_and_bf16_and_fp32_do_not():
    assert Precision("amp", CPU).scaler.is_enabled()
    assert Precision("fp16", CPU).scaler.is_enabled()
    assert not Precision("bf16", CPU).scaler.is_enabled()
    assert not Precision("fp32", CPU).scaler.is_enabled()


@pytest.mark.parametrize("name", ["fp32", "amp"])
def test_clipping_bounds_the_update_to_the_clip_norm(name):
    chosen = Precision(name, CPU)
    # a modest scale: no fp16 overflow, yet clipping the still-scaled gradients would move 4x less
    chosen.scaler = torch.amp.GradScaler("cpu", init_scale=4.0, enabled=chosen.scaler.is_enabled())
    net = chosen.prepare(tiny_net())
    params = chosen.optimizer_params(net)
    before = [p.detach().clone() for p in params]
    # plain SGD with lr 1: the update is minus the (clipped) gradient
    with chosen.autocast():
        loss = loss_of(net, scale=1e3)
    chosen.backward_and_step(loss, sgd(params, lr=1.0), clip_grad_norm=0.5)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)])
    assert moved.norm().item() == pytest.approx(0.5, rel=1e-3)


def test_auto_picks_bf16_only_when_clearly_faster(monkeypatch):
    def timings(fp32, bf16):
        return lambda device, dtype, give_up_after=None: bf16 if dtype is torch.bfloat16 else fp32

    monkeypatch.setattr(precision_module, "_probe_seconds", timings(1.0, 0.5))
    assert resolve_auto("auto", CPU) == "bf16"
    monkeypatch.setattr(precision_module, "_probe_seconds", timings(1.0, 0.9))
    assert resolve_auto("auto", CPU) == "fp32"
    assert resolve_auto("amp", CPU) == "amp"  # an explicit choice is kept
