"""RetinaNet ResNet-50-FPN (v1), built as torchvision's `retinanet_resnet50_fpn` builds it.

We assemble it from torchvision's public parts rather than call the builder only because the
builder can load backbone weights from torchvision's URL alone; the result is the same network:
with ImageNet weights, frozen batch norm and the first two stages frozen (3 trainable layers); with
random init (`none`), ordinary batch norm and every layer trainable. `random` builds the first
structure with random values: the same work per step as the real recipe, without its download.
91 classes: COCO category ids are used as labels directly.

`RetinaPerfNet` is torchvision's RetinaNet with three of its steps computed for the whole batch
at once: the input transform (`transform.py`: once per distinct image size), the loss (`loss.py`:
no host synchronisation) and the selection of detections (`postprocess.py`: one pass over each
level's logits, float32 box decoding; top-k and NMS per image); and with what does not change
between steps computed once (`reuse_constants`: frozen batch norm's scale and shift, anchors per
batch shape). The same numbers; `transform=torchvision`, `loss=torchvision`,
`postprocess=torchvision` and `reuse_constants=false` give torchvision's own code back.

Each of these cuts the operators the host dispatches per step (see benchmarks/bench_host.py): an
accelerator computes a step in tens of milliseconds, and a host that needs longer to enqueue it
leaves the accelerator waiting.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinaperf.config import ModelConfig
from retinaperf.errors import UserError
from retinaperf.model import loss, postprocess
from retinaperf.model.transform import Uint8Transform
from retinaperf.torch_compat import version_counter

NUM_CLASSES = 91  # COCO category ids run 1..90; 0 is background.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d, its scale and shift computed once rather than per call.

    torchvision recomputes `scale = w * rsqrt(var + eps)` and `shift = b - mean * scale` from
    the four buffers at every call: 11 dispatched operators per layer, 53 layers. They are
    frozen, so this keeps both, by the same operations (the same values), and applies
    `x * scale + shift`: 2 operators. The buffers can still change (a state dict loaded, the
    model moved or cast, DDP's broadcast from rank 0): each of those changes a buffer's version
    counter or storage, which the cache's key holds, so the next call computes them again.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)
        # (key, scale, shift); a plain attribute: no buffer, so out of state dicts and `.to()`.
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return super().forward(x)  # compiled, the formula fuses into the kernels anyway
        scale, shift = self._scale_shift()
        return x * scale + shift

    def _scale_shift(self) -> tuple[Tensor, Tensor]:
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple((version_counter(b), b.data_ptr(), b.device, b.dtype) for b in buffers)
        cached = self._cache
        if cached is None or cached[0] != key:
            # Made outside autograd and inference mode: usable in training and evaluation alike.
            with torch.inference_mode(False), torch.no_grad():
                w, b, rm, rv = (t.reshape(1, -1, 1, 1) for t in buffers)
                scale = w * (rv + self.eps).rsqrt()
                cached = (key, scale, b - rm * scale)
            self._cache = cached
        return cached[1], cached[2]


class ReusedAnchors(AnchorGenerator):
    """torchvision's AnchorGenerator, whose anchors are computed once per batch shape.

    An image's anchors depend only on the padded batch's size and the feature maps' sizes (every
    image of a batch gets the same ones); torchvision computes them at every call, about 120
    operators. This keeps the most recent `SHAPES` results, keyed by those sizes, the dtype and
    the device, and hands every image the same tensor (nothing writes into anchors).
    """

    SHAPES = 64  # an epoch of COCO sees tens of padded batch shapes; ~3 MB each at 800x1344

    def __init__(
        self, sizes: tuple[tuple[int, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...]
    ) -> None:
        super().__init__(sizes, aspect_ratios)
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()  # most recently used last

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        key = (
            tuple(image_list.tensors.shape[-2:]),
            tuple(tuple(f.shape[-2:]) for f in feature_maps),
            feature_maps[0].dtype,
            feature_maps[0].device,
        )
        cache = self._cache
        if key in cache:
            cache.move_to_end(key)
        else:
            with torch.inference_mode(False), torch.no_grad():
                one = ImageList(image_list.tensors[:1], image_list.image_sizes[:1])
                cache[key] = super().forward(one, feature_maps)[0]
            if len(cache) > self.SHAPES:
                cache.popitem(last=False)
        return [cache[key]] * len(image_list.image_sizes)


class RetinaPerfNet(RetinaNet):
    """torchvision's RetinaNet; loss and post-processing batched unless configured otherwise."""

    def __init__(self, backbone: nn.Module, config: ModelConfig) -> None:
        super().__init__(
            backbone, num_classes=NUM_CLASSES, min_size=config.min_size, max_size=config.max_size
        )
        self.transform = Uint8Transform(
            config.min_size, config.max_size, list(IMAGENET_MEAN), list(IMAGENET_STD)
        )
        self.transform.batched = config.transform == "batched"
        if config.reuse_constants:
            reused = ReusedAnchors(self.anchor_generator.sizes, self.anchor_generator.aspect_ratios)
            self.anchor_generator: AnchorGenerator = reused
        self.loss_impl = config.loss
        self.postprocess_impl = config.postprocess
        self.loss_fn = loss.retinanet_loss  # replaced by its compiled form under `compile`
        self.cuda_graphs = False  # whether the compiled parts replay as CUDA graphs

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.cuda_graphs and self.training:
            # A new training step: the CUDA graphs' previous outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        if not (self.training and self.loss_impl == "batched"):
            return super().forward(images, targets)
        # torchvision's training path without its input checks, one of which synchronises with
        # the device once per image (`degenerate_boxes.any()`); the loader already drops boxes
        # without area on the host (data.coco._records), and resizing and flipping keep them so.
        batch, targets = self.transform(images, targets)
        features = list(self.backbone(batch.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        return self.compute_loss(targets, head_outputs, anchors)

    def use_channels_last(self) -> None:
        """Weights and batched input in channels-last memory format (NHWC convolutions)."""
        self.to(memory_format=torch.channels_last)
        self.transform.memory_format = torch.channels_last

    def compile_parts(self, mode: str = "default") -> None:
        """Backbone with FPN, head and loss through torch.compile, in place (state-dict keys keep
        their names); the Python glue between them stays eager. Every size is a dynamic
        dimension from the first compilation on: COCO batches vary in image size, batch size and
        box count, and a graph per size would compile again and again. Training and evaluation
        compile once each (the modules' mode is part of the graph). `reduce-overhead` also
        replays each part as a CUDA graph, recorded once per batch shape."""
        self.backbone.compile(dynamic=True, mode=mode)
        self.head.compile(dynamic=True, mode=mode)
        self.loss_fn = torch.compile(loss.retinanet_loss, dynamic=True, mode=mode)
        self.cuda_graphs = mode == "reduce-overhead"

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
    values: in the pretrained structure if the config's `random_backbone` is `random`)."""
    pretrained = backbone_state is not None or config.random_backbone == "random"
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        norm_layer=(FrozenNorm if config.reuse_constants else FrozenBatchNorm2d)
        if pretrained
        else nn.BatchNorm2d,
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
