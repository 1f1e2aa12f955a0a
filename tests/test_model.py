"""The model is torchvision's `retinanet_resnet50_fpn` (v1), built with our backbone state dict.

The reference is torchvision's own builder. For the pretrained case its backbone weights are
redirected to the same random ResNet-50 state dict (no download), so that both builders start
from identical inputs.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet50_Weights
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d

from retinaperf.config import ModelConfig
from retinaperf.errors import UserError
from retinaperf.model.network import FrozenNorm, ReusedAnchors, build_model

SMALL = ModelConfig(min_size=64, max_size=64)


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict with every entry random (so a copy can be recognised:
    fresh batch norm statistics are all 0 or 1)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    g = torch.Generator().manual_seed(1)
    return {
        k: torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def pretrained(resnet_state):
    return build_model(SMALL, resnet_state)


@pytest.fixture(scope="module")
def reference_pretrained(resnet_state):
    """torchvision's builder with `weights_backbone=IMAGENET1K_V1`, fed our state dict."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: dict(resnet_state))
        return retinanet_resnet50_fpn(
            weights=None,
            weights_backbone=ResNet50_Weights.IMAGENET1K_V1,
            num_classes=91,
            min_size=SMALL.min_size,
            max_size=SMALL.max_size,
        )


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def norm_types(model: nn.Module) -> dict[str, type]:
    """Each normalisation layer's kind (FrozenNorm is a FrozenBatchNorm2d with a cache)."""
    return {
        name: FrozenBatchNorm2d if isinstance(m, FrozenBatchNorm2d) else type(m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm))
    }


def test_backbone_body_holds_the_given_tensors(pretrained, resnet_state):
    body = pretrained.backbone.body.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer4.2.bn3.bias"):
        assert torch.equal(body[key], resnet_state[key]), key
    # Every body tensor is the given one (fc is the classifier: not part of the body).
    assert set(body) == {
        k for k in resnet_state if not k.startswith("fc.") and "num_batches_tracked" not in k
    }
    for key, tensor in body.items():
        assert torch.equal(tensor, resnet_state[key]), key


def test_pretrained_is_torchvisions_model(pretrained, reference_pretrained, resnet_state):
    # The reference really loaded our tensors (the redirect worked).
    ref_body = reference_pretrained.backbone.body.state_dict()
    assert torch.equal(ref_body["layer3.1.conv2.weight"], resnet_state["layer3.1.conv2.weight"])

    assert shapes(pretrained) == shapes(reference_pretrained)
    types = norm_types(pretrained)
    assert types == norm_types(reference_pretrained)
    body_norms = [t for name, t in types.items() if name.startswith("backbone.body.")]
    assert len(body_norms) == 53 and set(body_norms) == {FrozenBatchNorm2d}
    frozen_eps = {m.eps for m in pretrained.modules() if isinstance(m, FrozenBatchNorm2d)}
    ref_eps = {m.eps for m in reference_pretrained.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert frozen_eps == ref_eps
    for key, tensor in pretrained.backbone.body.state_dict().items():
        assert torch.equal(tensor, ref_body[key]), key

    trainable = {n: p.requires_grad for n, p in pretrained.named_parameters()}
    assert trainable == {n: p.requires_grad for n, p in reference_pretrained.named_parameters()}
    # Spelled out: conv1 and layer1 frozen, layer2-4, the FPN and the heads train.
    for name, requires_grad in trainable.items():
        if name.startswith(("backbone.body.conv1.", "backbone.body.layer1.")):
            assert not requires_grad, name
        else:
            assert requires_grad, name
    assert any(n.startswith("backbone.body.layer2.") for n in trainable)


def test_random_init_is_torchvisions_random_model():
    torch.manual_seed(0)
    model = build_model(SMALL, None)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    assert shapes(model) == shapes(reference)
    assert norm_types(model) == norm_types(reference)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    body_norms = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(body_norms) == 53
    assert all(p.requires_grad for p in model.parameters())
    assert model.head.classification_head.num_classes == 91


def test_transform_and_detection_settings_are_torchvisions(pretrained, reference_pretrained):
    ours, ref = pretrained.transform, reference_pretrained.transform
    assert ours.min_size == ref.min_size == (SMALL.min_size,)
    assert ours.max_size == ref.max_size == SMALL.max_size
    assert (ours.image_mean, ours.image_std) == (ref.image_mean, ref.image_std)
    assert (ours.size_divisible, ours.fixed_size) == (ref.size_divisible, ref.fixed_size)
    for attr in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"):
        assert getattr(pretrained, attr) == getattr(reference_pretrained, attr), attr
    anchors, ref_anchors = pretrained.anchor_generator, reference_pretrained.anchor_generator
    assert anchors.sizes == ref_anchors.sizes
    assert anchors.aspect_ratios == ref_anchors.aspect_ratios
    matcher, ref_matcher = pretrained.proposal_matcher, reference_pretrained.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold) == (
        ref_matcher.high_threshold,
        ref_matcher.low_threshold,
    )


def test_uint8_input_matches_float_input(pretrained):
    """The model's transform takes uint8 images as floats scaled to [0, 1]."""
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g)
    as_bytes, _ = pretrained.transform([image])
    as_floats, _ = pretrained.transform([image.float() / 255])
    assert as_bytes.tensors.shape == as_floats.tensors.shape
    assert torch.allclose(as_bytes.tensors, as_floats.tensors, atol=1e-5)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "resnet18"])
def test_wrong_state_dict_is_a_user_error(resnet_state, change):
    state = dict(resnet_state)
    if change == "missing":
        del state["layer4.2.conv3.weight"]
        named = "layer4.2.conv3.weight"
    elif change == "extra":
        state["layer5.0.conv1.weight"] = torch.zeros(1)
        named = "layer5.0.conv1.weight"
    elif change == "shape":
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
        named = "conv1.weight"
    else:
        state = torchvision.models.resnet18().state_dict()
        named = "layer1.0.conv3.weight"  # ResNet-50 has bottleneck blocks, ResNet-18 has not
    with pytest.raises(UserError, match="ResNet-50") as err:
        build_model(SMALL, state)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_reuse_constants_false_is_torchvisions_own_modules(resnet_state):
    model = build_model(ModelConfig(min_size=64, max_size=64, reuse_constants=False), resnet_state)
    norms = {type(m) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert norms == {FrozenBatchNorm2d}
    assert type(model.anchor_generator) is AnchorGenerator
    assert isinstance(build_model(SMALL, resnet_state).anchor_generator, ReusedAnchors)


def frozen_pair(channels: int = 8) -> tuple[FrozenNorm, FrozenBatchNorm2d]:
    g = torch.Generator().manual_seed(3)
    reference = FrozenBatchNorm2d(channels)
    for buffer in reference.buffers():
        buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.25)
    ours = FrozenNorm(channels)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def test_frozen_norm_is_torchvisions_bit_for_bit_and_follows_its_buffers():
    ours, reference = frozen_pair()
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours(x), reference(x))
    assert torch.equal(ours(x), reference(x))  # from the cache
    # Every way the buffers change is seen: a state dict loaded, a buffer written in place,
    # the module cast.
    changed = {k: v * 1.5 for k, v in reference.state_dict().items()}
    reference.load_state_dict(changed)
    ours.load_state_dict(changed)
    assert torch.equal(ours(x), reference(x))
    reference.running_var.add_(1.0)
    ours.running_var.add_(1.0)
    assert torch.equal(ours(x), reference(x))
    ours, reference = ours.double(), reference.double()
    assert ours(x.double()).dtype == torch.float64
    assert torch.equal(ours(x.double()), reference(x.double()))


def test_frozen_norm_cached_in_inference_mode_serves_training():
    ours, reference = frozen_pair()
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours(x)  # fills the cache in inference mode, as an evaluation does
    leaf = x.clone().requires_grad_()
    ours(leaf).square().sum().backward()  # fails if the cache holds inference tensors
    expected = x.clone().requires_grad_()
    reference(expected).square().sum().backward()
    assert torch.equal(leaf.grad, expected.grad)


def test_reused_anchors_equal_torchvisions_for_every_shape():
    reference = AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    ours = ReusedAnchors(reference.sizes, reference.aspect_ratios)
    ours.SHAPES = 2
    for height, width in [(64, 96), (96, 64), (64, 96), (128, 128), (64, 96)]:
        images = ImageList(torch.zeros(3, 3, height, width), [(height, width)] * 3)
        features = [torch.zeros(3, 4, height // s, width // s) for s in (8, 16)]
        got, expected = ours(images, features), reference(images, features)
        assert len(got) == len(expected) == 3
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
        assert len(ours._cache) <= 2  # bounded: the oldest shape goes


def test_fast_paths_give_torchvisions_training_step():
    """Every fast path at once (batched transform, reused constants, batched loss) against every
    reference switch: the same losses and gradients on a batch of mixed image sizes."""
    g = torch.Generator().manual_seed(6)
    # A ResNet-50 as initialised, with frozen statistics that are not the identity (the random
    # fixture's blow the activations up to inf).
    torch.manual_seed(0)
    resnet_state = torchvision.models.resnet50().state_dict()
    for key, value in resnet_state.items():
        if key.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand(value.shape, generator=g) * 0.5 + 0.5 * key.endswith("var"))
    sizes = [(48, 64), (40, 64), (48, 64), (64, 48)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    targets = [
        {
            "boxes": torch.tensor([[2.0, 3, 30, 40], [20, 5, 60, 30]]),
            "labels": torch.tensor([3, 7]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[10.0, 10, 20, 22]]), "labels": torch.tensor([90])},
        {"boxes": torch.tensor([[1.0, 1, 47, 63]]), "labels": torch.tensor([1])},
    ]
    reference = {"transform": "torchvision", "loss": "torchvision", "reuse_constants": False}
    results = []
    for settings in ({}, reference):
        model = build_model(ModelConfig(min_size=64, max_size=96, **settings), resnet_state)
        model.train()
        for _ in range(2):  # the second step runs from the caches
            model.zero_grad()
            losses = model(images, targets)
            sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (losses, grads), (ref_losses, ref_grads) = results
    for key, value in losses.items():
        torch.testing.assert_close(value, ref_losses[key], rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        ref = ref_grads[name]
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
