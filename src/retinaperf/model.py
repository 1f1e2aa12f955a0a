"""RetinaNet ResNet-50-FPN (v1), built as torchvision's `retinanet_resnet50_fpn` builds it.

We assemble it from torchvision's public parts rather than call the builder only because the
builder can load backbone weights from torchvision's URL alone; the result is the same network:
with ImageNet weights, frozen batch norm and the first two stages frozen (3 trainable layers); with
random init (`none`), ordinary batch norm and every layer trainable. `random` builds the first
structure with random values: the same work per step as the real recipe, without its download.
91 classes: COCO category ids are used as labels directly.

`RetinaPerfNet` is torchvision's RetinaNet with two of its methods computed for the whole batch at
once: the loss (`loss.py`: no host synchronisation) and the selection of detections
(`postprocess.py`: one pass over each level's logits, float32 box decoding; top-k and NMS per
image). The same numbers; `loss=torchvision` / `postprocess=torchvision` give torchvision's own
code back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from . import loss, postprocess
from .config import ModelConfig
from .errors import UserError

NUM_CLASSES = 91  # COCO category ids run 1..90; 0 is background.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Uint8Transform(GeneralizedRCNNTransform):
    """The model's own resize and normalisation, taking uint8 images as they come off the loader.

    Converting here, on the device, keeps decoding workers and host-to-device copies on bytes.
    The batched images take the network's memory format, so that no convolution converts them.
    """

    memory_format: torch.memory_format = torch.contiguous_format

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            image = image.float().div_(255)
        return super().normalize(image)

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        return (
            super()
            .batch_images(images, size_divisible)
            .contiguous(memory_format=self.memory_format)
        )


class RetinaPerfNet(RetinaNet):
    """torchvision's RetinaNet; loss and post-processing batched unless configured otherwise."""

    def __init__(self, backbone: nn.Module, config: ModelConfig) -> None:
        super().__init__(
            backbone, num_classes=NUM_CLASSES, min_size=config.min_size, max_size=config.max_size
        )
        self.transform = Uint8Transform(
            config.min_size, config.max_size, list(IMAGENET_MEAN), list(IMAGENET_STD)
        )
        self.loss_impl = config.loss
        self.postprocess_impl = config.postprocess
        self.loss_fn = loss.retinanet_loss  # replaced by its compiled form under `compile`

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not (self.training and self.loss_impl == "batched"):
            return super().forward(images, targets)
        # torchvision's training path without its input checks, one of which synchronises with
        # the device once per image (`degenerate_boxes.any()`); the loader already drops boxes
        # without area on the host (data._kept_boxes), and resizing and flipping keep them so.
        batch, targets = self.transform(images, targets)
        features = list(self.backbone(batch.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        return self.compute_loss(targets, head_outputs, anchors)

    def use_channels_last(self) -> None:
        """Weights and batched input in channels-last memory format (NHWC convolutions)."""
        self.to(memory_format=torch.channels_last)
        self.transform.memory_format = torch.channels_last

    def compile_parts(self) -> None:
        """Backbone with FPN, head and loss through torch.compile, in place (state-dict keys keep
        their names); the Python glue between them stays eager. Every size is a dynamic
        dimension from the first compilation on: COCO batches vary in image size, batch size and
        box count, and a graph per size would compile again and again. Training and evaluation
        compile once each (the modules' mode is part of the graph)."""
        self.backbone.compile(dynamic=True)
        self.head.compile(dynamic=True)
        self.loss_fn = torch.compile(loss.retinanet_loss, dynamic=True)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
    ) -> dict[str, Tensor]:
        if self.loss_impl == "torchvision":
            return super().compute_loss(targets, head_outputs, anchors)
        return self.loss_fn(
            targets,
            head_outputs,
            anchors,
            fg_iou_thresh=self.proposal_matcher.high_threshold,
            bg_iou_thresh=self.proposal_matcher.low_threshold,
            box_coder=self.head.regression_head.box_coder,
        )

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.postprocess_impl == "torchvision":
            return super().postprocess_detections(head_outputs, anchors, image_shapes)
        return postprocess.select_detections(
            head_outputs,
            anchors,
            image_shapes,
            box_coder=self.box_coder,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img,
            topk_candidates=self.topk_candidates,
        )


def build_model(
    config: ModelConfig, backbone_state: dict[str, torch.Tensor] | None
) -> RetinaPerfNet:
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
    return RetinaPerfNet(backbone, config)
