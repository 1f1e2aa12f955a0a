"""RetinaNet ResNet-50-FPN (v1), built as torchvision's `retinanet_resnet50_fpn` builds it.

We assemble it from torchvision's public parts rather than call the builder only because the
builder can load backbone weights from torchvision's URL alone; the result is the same network:
with ImageNet weights, frozen batch norm and the first two stages frozen (3 trainable layers); with
random init (`none`), ordinary batch norm and every layer trainable. `random` builds the first
structure with random values: the same work per step as the real recipe, without its download.
91 classes: COCO category ids are used as labels directly.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .config import ModelConfig
from .errors import UserError

NUM_CLASSES = 91  # COCO category ids run 1..90; 0 is background.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Uint8Transform(GeneralizedRCNNTransform):
    """The model's own resize and normalisation, taking uint8 images as they come off the loader.

    Converting here, on the device, keeps decoding workers and host-to-device copies on bytes.
    """

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            image = image.float().div_(255)
        return super().normalize(image)


def build_model(config: ModelConfig, backbone_state: dict[str, torch.Tensor] | None) -> RetinaNet:
    """The detection model; `backbone_state` is an ImageNet ResNet-50 state dict or None (random
    values: in the pretrained structure if `config.backbone_weights` is `random`)."""
    pretrained = backbone_state is not None or config.random_backbone == "random"
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
        trainable_layers=3 if pretrained else 5,
        returned_layers=[2, 3, 4],  # P3-P5; P2 would make too many anchors (RetinaNet paper)
        extra_blocks=LastLevelP6P7(256, 256),
    )
    if backbone_state is not None:
        # The FPN body is the ResNet without its classifier: drop fc.* and load the rest strictly.
        body_state = {k: v for k, v in backbone_state.items() if not k.startswith("fc.")}
        try:
            backbone.body.load_state_dict(body_state, strict=True)
        except RuntimeError as err:
            raise UserError(
                "backbone weights: not a torchvision ResNet-50 state dict "
                f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})"
            ) from None
    model = RetinaNet(
        backbone, num_classes=NUM_CLASSES, min_size=config.min_size, max_size=config.max_size
    )
    model.transform = Uint8Transform(
        config.min_size, config.max_size, list(IMAGENET_MEAN), list(IMAGENET_STD)
    )
    return model
