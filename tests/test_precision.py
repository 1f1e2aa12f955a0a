"""Each precision really changes what is computed: dtypes seen inside the model, the float32
math flags in force, loss scaling, master weights, clipping, and the choice behind `auto`."""

import pytest
import torch
from torch import nn

from retinaperf.config import ModelConfig
from retinaperf.errors import UserError
from retinaperf.model import precision as precision_module
from retinaperf.model.network import build_model
from retinaperf.model.precision import (
    FRAMEWORK_CONV,
    FRAMEWORK_MATMUL,
    Precision,
    choose,
    math_in_effect,
    native_bf16,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_math_flags():
    """Precision sets process-wide flags: leave them as the framework had them."""
    yield
    torch.backends.cudnn.conv.fp32_precision = FRAMEWORK_CONV
    torch.backends.cuda.matmul.fp32_precision = FRAMEWORK_MATMUL


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
    model.anchor_generator.register_forward_hook(
        lambda m, a, out: seen.__setitem__("anchors", out[0].dtype)
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
        ("fp32-strict", torch.float32, torch.float32),
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
    # Whatever the convolutions compute in, what leaves the head is float32 again and anchors
    # are float32: box coding, matching and the loss stay exact.
    assert seen["head.returned"] == torch.float32
    assert seen["anchors"] == torch.float32
    assert seen["loss"] == torch.float32


def test_fp32_is_the_framework_default_math_and_fp32_strict_is_ieee():
    Precision("fp32-strict", CPU)
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    Precision("fp32", CPU)  # after another precision in the same process: defaults again
    assert torch.backends.cudnn.conv.fp32_precision == FRAMEWORK_CONV == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == FRAMEWORK_MATMUL
    with pytest.raises(UserError, match="tf32"):
        Precision("tf32", CPU)


def test_math_in_effect_is_what_the_flags_mean_on_the_device(monkeypatch):
    Precision("fp32", CPU)
    on_cpu = math_in_effect(CPU)
    # PyTorch asks for TF32 convolutions, but a CPU has no TF32: float32 is IEEE there
    assert on_cpu["conv_fp32_precision"] == "tf32" and on_cpu["effective_conv"] == "ieee"
    assert on_cpu["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    # On a device with TF32 (an A100, say), fp32 is the seed's math: TF32 convolutions,
    # while matmuls keep PyTorch's IEEE default
    monkeypatch.setattr(precision_module, "has_tf32", lambda device: True)
    fp32 = Precision("fp32", CPU)
    assert (math_in_effect(CPU)["effective_conv"], math_in_effect(CPU)["effective_matmul"]) == (
        "tf32",
        "ieee",
    )
    assert fp32.peak_math() == "tf32"
    strict = Precision("fp32-strict", CPU)
    assert math_in_effect(CPU)["effective_conv"] == "ieee" and strict.peak_math() == "fp32"
    tf32 = Precision("tf32", CPU)
    assert math_in_effect(CPU)["effective_matmul"] == "tf32" and tf32.peak_math() == "tf32"
    record = tf32.record()
    assert record["precision"] == "tf32" and record["math"]["effective_conv"] == "tf32"


@pytest.mark.parametrize(
    ("name", "math"), [("amp", "fp16"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32")]
)
def test_peak_math_follows_the_compute_type(name, math):
    assert Precision(name, CPU).peak_math() == math  # a CPU: fp32 is IEEE


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


def test_skipped_updates_are_counted_on_the_device():
    chosen = Precision("amp", CPU)
    weight = nn.Parameter(torch.ones(3))
    optimizer = sgd([weight])
    for factor, skipped in ((1.0, 0), (float("inf"), 1), (1.0, 1), (float("nan"), 2)):
        chosen.backward_and_step((weight * factor).sum(), optimizer)
        assert int(chosen.skipped_steps()) == skipped
    assert int(Precision("fp32", CPU).skipped_steps()) == 0


def test_fp16_state_restores_masters_scaler_and_count_and_saves_the_masters():
    """What a checkpoint keeps of the precision: a fresh fp16 run loaded with it holds the same
    float32 masters (not their half rounding), scale and skipped count."""
    chosen = Precision("fp16", CPU)
    net = chosen.prepare(tiny_net())
    optimizer = sgd(chosen.optimizer_params(net), lr=0.001)
    for _ in range(3):
        chosen.backward_and_step(loss_of(net), optimizer)
    state = chosen.state_dict()
    masters = chosen.float32_state_dict(net)
    assert all(v.dtype == torch.float32 for k, v in masters.items() if "weight" in k)
    assert any(not torch.equal(v, v.half().float()) for v in masters.values())

    fresh = Precision("fp16", CPU)
    other = fresh.prepare(tiny_net())
    torch.nn.init.zeros_(other.head.weight)
    fresh.optimizer_params(other)
    other.load_state_dict(net.state_dict())
    fresh.load_state_dict(state)
    restored = fresh.float32_state_dict(other)
    assert all(torch.equal(masters[k], restored[k]) for k in masters)
    assert fresh.scaler.get_scale() == chosen.scaler.get_scale()
    assert int(fresh.skipped_steps()) == int(chosen.skipped_steps())
    assert torch.equal(other.head.weight, masters["head.weight"].half())


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


def test_auto_is_bf16_where_cuda_computes_it_natively(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert choose("auto", cuda) == ("bf16", "auto: CUDA compute capability 9.0 >= 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
    assert choose("auto", cuda) == ("fp32", "auto: CUDA compute capability 7.0 < 8.0")
    assert choose("amp", cuda) == ("amp", "as configured")  # an explicit choice is kept


@pytest.mark.parametrize(
    ("features", "native"),
    [
        ({"avx512_bf16": True, "amx_bf16": False}, True),
        ({"avx512_bf16": False, "amx_bf16": True}, True),
        ({"avx512_bf16": False, "amx_bf16": False}, False),
        ({}, False),
    ],
)
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, features, native):
    # Fails, rather than adds the function, where torch lacks it: then the test below applies.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
    found, why = native_bf16(CPU)
    assert found is native
    assert ("AVX512-BF16" in why) is not native  # the reason names what was looked for
    assert choose("auto", CPU)[0] == ("bf16" if native else "fp32")


@pytest.mark.parametrize("avx512_bf16", [True, False])
def test_auto_on_a_cpu_without_get_capabilities_asks_torchs_own_probe(monkeypatch, avx512_bf16):
    """Torch versions before torch.cpu.get_capabilities: the same answer from the probe torch's
    dispatch uses."""
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16(CPU)[0] is avx512_bf16


def test_auto_on_another_accelerator_asks_torch(monkeypatch):
    class Backend:
        @staticmethod
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            return not including_emulation  # native only: emulation must not count

    monkeypatch.setattr(torch, "xpu", Backend, raising=False)
    assert choose("auto", torch.device("xpu")) == (
        "bf16",
        "auto: torch.xpu.is_bf16_supported() is True",
    )
    assert choose("auto", torch.device("meta"))[0] == "fp32"  # nothing to ask: fp32


CUDA = torch.device("cuda", 0)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.double().cpu() - reference).norm() / reference.norm()).item()


@pytest.mark.gpu
def test_the_math_flags_change_what_the_gpu_computes():
    """fp32 is the framework's default (TF32 convolutions, IEEE matmuls), fp32-strict IEEE
    everywhere, tf32 TF32 everywhere: seen in the errors against float64, not only in flags."""
    if not precision_module.has_tf32(CUDA):
        pytest.skip("needs a GPU with TF32 (compute capability 8.0 or newer)")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 56, 56, generator=generator)
    w = torch.randn(64, 64, 3, 3, generator=generator)
    a = torch.randn(1024, 1024, generator=generator)
    b = torch.randn(1024, 1024, generator=generator)
    conv_reference = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    matmul_reference = a.double() @ b.double()
    errors = {}
    for name in ("fp32", "fp32-strict", "tf32"):
        Precision(name, CUDA)
        conv = torch.nn.functional.conv2d(x.to(CUDA), w.to(CUDA), padding=1)
        matmul = a.to(CUDA) @ b.to(CUDA)
        errors[name] = (
            relative_error(conv, conv_reference),
            relative_error(matmul, matmul_reference),
            math_in_effect(CUDA),
        )
    # TF32 keeps 10 mantissa bits: relative errors ~1e-4..1e-3; IEEE float32: ~1e-7
    assert errors["fp32"][0] > 5e-5 and errors["fp32"][1] < 1e-5
    assert errors["fp32-strict"][0] < 1e-5 and errors["fp32-strict"][1] < 1e-5
    assert errors["tf32"][0] > 5e-5 and errors["tf32"][1] > 5e-5
    assert errors["fp32"][2]["effective_conv"] == "tf32"
    assert errors["fp32"][2]["effective_matmul"] == "ieee"
    assert errors["fp32-strict"][2]["effective_conv"] == "ieee"
    assert errors["tf32"][2]["effective_matmul"] == "tf32"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp32", "fp32-strict", "tf32", "amp", "bf16", "fp16"])
def test_training_steps_on_the_gpu_are_finite_and_update_the_weights(name):
    from retinaperf.run.step import train_step

    if name == "tf32" and not precision_module.has_tf32(CUDA):
        pytest.skip("needs a GPU with TF32")
    torch.manual_seed(0)
    chosen = Precision(name, CUDA)
    model = chosen.prepare(build_model(ModelConfig(min_size=256, max_size=341), None).to(CUDA))
    params = chosen.optimizer_params(model)
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 240, 320), generator=generator, dtype=torch.uint8).to(CUDA)
        for _ in range(2)
    ]
    boxes = torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 300.0, 200.0]])
    targets = [{"boxes": boxes.to(CUDA), "labels": torch.tensor([1, 18]).to(CUDA)}] * 2
    before = [p.detach().clone() for p in params]
    # 8 steps: with loss scaling the first steps may overflow and be skipped, by design
    for _ in range(8):
        losses = train_step(model, images, targets, optimizer, chosen)
        assert all(torch.isfinite(v).item() for v in losses.values()), losses
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)]
    assert sum(moved) > len(moved) // 2  # most tensors were updated
