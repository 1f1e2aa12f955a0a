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
from torchvision.ops import FrozenBatchNorm2d

from retinaperf.config import ModelConfig
from retinaperf.errors import UserError
from retinaperf.model import build_model

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
    return {
        name: type(m)
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
