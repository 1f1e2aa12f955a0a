"""The batched loss gives torchvision's numbers: the same matches, losses and gradients.

The reference is torchvision's own `RetinaNet.compute_loss`, run by the same model instance
with `loss_impl = "torchvision"`, on the anchors that instance makes for a small image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from retinaperf.config import ModelConfig
from retinaperf.model import loss
from retinaperf.model.loss import match_anchors, match_batch, pad_targets, retinanet_loss
from retinaperf.model.network import NUM_CLASSES, RetinaPerfNet, build_model

SIZE = 128  # anchors of a 128×128 image: 9 × (16² + 8² + 4² + 2² + 1) = 3069
MATCHER = Matcher(0.5, 0.4, allow_low_quality_matches=True)


@pytest.fixture(scope="module")
def model() -> RetinaPerfNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(min_size=64, max_size=96, backbone_weights="none"), None)


def make_anchors(model: RetinaPerfNet, batch: int, device: str = "cpu") -> list[Tensor]:
    """The model's anchors for a batch of SIZE×SIZE images (P3-P7: strides 8 to 128)."""
    features = [torch.empty(batch, 1, SIZE // s, SIZE // s) for s in (8, 16, 32, 64, 128)]
    images = ImageList(torch.empty(batch, 3, SIZE, SIZE), [(SIZE, SIZE)] * batch)
    return [a.to(device) for a in model.anchor_generator(images, features)]


def target(boxes: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    labels = torch.randint(1, NUM_CLASSES, (len(boxes),), generator=generator)
    return {"boxes": boxes.float(), "labels": labels}


def random_boxes(count: int, generator: torch.Generator) -> Tensor:
    corner = torch.rand(count, 2, generator=generator) * SIZE
    size = torch.rand(count, 2, generator=generator) * 60 + 1
    return torch.cat([corner, corner + size], 1).clamp(max=SIZE)


def hard_targets() -> list[dict[str, Tensor]]:
    """The cases the matcher must get right, one image each."""
    g = torch.Generator().manual_seed(1)
    border = torch.tensor([[0, 0, 128, 40], [100, 90, 128, 128], [0, 0, 128, 128], [0, 60, 9, 70]])
    return [
        target(torch.zeros(0, 4), g),  # no boxes: every anchor background
        # so small that no anchor reaches 0.4: matched by the low-quality rule only
        target(torch.tensor([[60.0, 60.0, 61.5, 61.5], [8, 8, 50, 40]]), g),
        target(torch.tensor([[30.0, 30, 70, 80], [30, 30, 70, 80], [5, 90, 40, 120]]), g),  # ties
        target(random_boxes(100, g), g),  # a hundred boxes
        target(border, g),  # on the image's border
        target(random_boxes(3, g), g),
    ]


def far_box_targets() -> list[dict[str, Tensor]]:
    """torchvision's quirk: a box far from every anchor has highest IoU 0, so the low-quality
    rule gives every anchor with IoU 0 with it (all of them) its best box, box 0 where it
    touches none."""
    g = torch.Generator().manual_seed(2)
    boxes = torch.tensor([[20.0, 20, 60, 50], [5000, 5000, 5010, 5010]])
    return [target(boxes, g), target(random_boxes(4, g), g)]


def torchvision_matches(targets: list[dict[str, Tensor]], anchors: list[Tensor]) -> Tensor:
    """As torchvision's RetinaNet.compute_loss matches, image by image."""
    matches = []
    for t, a in zip(targets, anchors, strict=True):
        if len(t["boxes"]) == 0:
            matches.append(torch.full((len(a),), -1, dtype=torch.int64, device=a.device))
        else:
            matches.append(MATCHER(box_iou(t["boxes"], a)))
    return torch.stack(matches)


def head_outputs(batch: int, anchors: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "cls_logits": (torch.randn(batch, anchors, NUM_CLASSES, generator=generator) * 2 - 2),
        "bbox_regression": torch.randn(batch, anchors, 4, generator=generator),
    }


@contextlib.contextmanager
def loss_impl(model: RetinaPerfNet, impl: str) -> Iterator[None]:
    saved = model.loss_impl
    model.loss_impl = impl
    try:
        yield
    finally:
        model.loss_impl = saved


def losses_and_grads(
    model: RetinaPerfNet, impl: str, targets, outputs: dict[str, Tensor], anchors: list[Tensor]
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The model's losses with `impl`, and their sum's gradient w.r.t. the head's outputs."""
    inputs = {k: v.detach().clone().requires_grad_() for k, v in outputs.items()}
    with loss_impl(model, impl):
        losses = model.compute_loss(targets, inputs, anchors)
    grads = torch.autograd.grad(sum(losses.values()), list(inputs.values()))
    return losses, list(grads)


def assert_same_losses(ours, reference) -> None:
    (losses, grads), (ref_losses, ref_grads) = ours, reference
    assert losses.keys() == ref_losses.keys() == {"classification", "bbox_regression"}
    for key, value in losses.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ref_losses[key], rtol=1e-5, atol=0)
    for grad, ref in zip(grads, ref_grads, strict=True):
        # Elements far below the largest differ by float32 roundings inside torchvision's
        # formula (1 - p_t computed as 1 - (1 - p)); relative to the largest: 1e-5.
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_hard_cases_are_really_hard(model):
    """The cases exercise what they claim to, in torchvision's own matcher."""
    targets = hard_targets()
    anchors = make_anchors(model, len(targets))
    matches = torchvision_matches(targets, anchors)
    tiny = box_iou(targets[1]["boxes"][:1], anchors[1])
    assert tiny.max() < 0.4 and (matches[1] == 0).any()  # low-quality match only
    assert (matches[2] == 0).any() and not (matches[2] == 1).any()  # ties go to the first box
    far = far_box_targets()
    far_matches = torchvision_matches(far, anchors[: len(far)])
    assert (far_matches[0] >= 0).all()  # every anchor restored


@pytest.mark.parametrize("cases", [hard_targets, far_box_targets])
def test_matches_equal_torchvision_matcher(model, cases):
    targets = cases()
    anchors = make_anchors(model, len(targets))
    expected = torchvision_matches(targets, anchors)
    boxes, _, valid = pad_targets(targets)
    stacked = torch.stack(anchors)
    counts = [len(t["boxes"]) for t in targets]
    assert torch.equal(match_batch(boxes, valid, stacked, 0.5, 0.4), expected)  # padded
    assert torch.equal(match_batch(boxes, valid, stacked, 0.5, 0.4, counts), expected)


def test_iou_is_torchvision_bit_for_bit(model):
    """Every IoU value equal, not merely close: the matcher compares them with == and >=."""
    g = torch.Generator().manual_seed(11)
    boxes = random_boxes(300, g) * 1.37  # fractional coordinates: roundings everywhere
    anchors = make_anchors(model, 1)[0]
    assert torch.equal(loss.box_iou(boxes[None], anchors[None])[0], box_iou(boxes, anchors))


def test_padding_takes_no_part_in_matching(model):
    """Whatever the padded rows hold (here boxes that overlap every anchor), only valid boxes
    are matched."""
    targets = hard_targets()
    anchors = make_anchors(model, len(targets))
    boxes, _, valid = pad_targets(targets)
    boxes = torch.where(valid[..., None], boxes, torch.tensor([0.0, 0, SIZE, SIZE]))
    assert torch.equal(
        match_anchors(boxes, valid, torch.stack(anchors), 0.5, 0.4),
        torchvision_matches(targets, anchors),
    )


def test_matching_in_anchor_chunks(model, monkeypatch):
    """Chunks of a few anchors (each box's highest IoU found across chunks) match the same."""
    targets = hard_targets()
    anchors = make_anchors(model, len(targets))
    boxes, _, valid = pad_targets(targets)
    monkeypatch.setattr(loss, "CPU_CHUNK", 97 * valid.numel())
    assert torch.equal(
        match_anchors(boxes, valid, torch.stack(anchors), 0.5, 0.4),
        torchvision_matches(targets, anchors),
    )


@pytest.mark.parametrize("cases", [hard_targets, far_box_targets])
@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_losses_and_gradients_equal_torchvision(model, cases, path, monkeypatch):
    if path == "accelerator":  # what an accelerator runs: the padded batch, logits in few chunks
        monkeypatch.setattr(loss, "match_per_image", lambda device: False)
        monkeypatch.setattr(loss, "CPU_CHUNK", loss.DEVICE_CHUNK)
    targets = cases()
    anchors = make_anchors(model, len(targets))
    outputs = head_outputs(len(targets), len(anchors[0]), torch.Generator().manual_seed(3))
    assert_same_losses(
        losses_and_grads(model, "batched", targets, outputs, anchors),
        losses_and_grads(model, "torchvision", targets, outputs, anchors),
    )


def test_focal_loss_in_chunks(model, monkeypatch):
    """The focal pass over the logits in many chunks sums and writes its gradient alike."""
    monkeypatch.setattr(loss, "CPU_CHUNK", 4 * NUM_CLASSES * 50)
    targets = hard_targets()
    anchors = make_anchors(model, len(targets))
    outputs = head_outputs(len(targets), len(anchors[0]), torch.Generator().manual_seed(4))
    assert_same_losses(
        losses_and_grads(model, "batched", targets, outputs, anchors),
        losses_and_grads(model, "torchvision", targets, outputs, anchors),
    )


def test_extreme_logits_stay_finite_and_equal(model):
    """Logits out to ±40: softplus and sigmoid at their limits, as in a diverging run."""
    targets = hard_targets()
    anchors = make_anchors(model, len(targets))
    outputs = head_outputs(len(targets), len(anchors[0]), torch.Generator().manual_seed(5))
    outputs["cls_logits"] = outputs["cls_logits"] * 10
    ours = losses_and_grads(model, "batched", targets, outputs, anchors)
    assert all(torch.isfinite(v) for v in ours[0].values())
    assert all(torch.isfinite(g).all() for g in ours[1])
    assert_same_losses(ours, losses_and_grads(model, "torchvision", targets, outputs, anchors))


def test_low_precision_outputs_are_computed_in_float32(model):
    targets = hard_targets()
    anchors = make_anchors(model, len(targets))
    outputs = head_outputs(len(targets), len(anchors[0]), torch.Generator().manual_seed(6))
    half = {k: v.bfloat16() for k, v in outputs.items()}
    widened = {k: v.float() for k, v in half.items()}
    losses, grads = losses_and_grads(model, "batched", targets, half, anchors)
    expected, _ = losses_and_grads(model, "batched", targets, widened, anchors)
    assert all(losses[k].dtype == torch.float32 for k in losses)
    assert all(torch.equal(losses[k], expected[k]) for k in losses)
    assert all(g.dtype == torch.bfloat16 for g in grads)


def test_second_backward_through_the_same_graph_fails(model):
    """The gradient is kept once and scaled in place: a second backward must fail, not lie."""
    targets = hard_targets()
    anchors = make_anchors(model, len(targets))
    outputs = head_outputs(len(targets), len(anchors[0]), torch.Generator().manual_seed(7))
    logits = outputs["cls_logits"].requires_grad_()
    with loss_impl(model, "batched"):
        loss = model.compute_loss(targets, outputs, anchors)["classification"]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_no_data_dependent_operation(model):
    """On the meta device every value-dependent op (.item(), nonzero, mask indexing, one-argument
    where, a tensor in an `if`) raises: the loss needs none, so it never synchronises."""
    batch, num_anchors = 3, 500
    targets = [
        {
            "boxes": torch.empty(n, 4, device="meta"),
            "labels": torch.empty(n, dtype=torch.int64, device="meta"),
        }
        for n in (0, 1, 7)
    ]
    outputs = {
        "cls_logits": torch.empty(batch, num_anchors, NUM_CLASSES, device="meta"),
        "bbox_regression": torch.empty(batch, num_anchors, 4, device="meta"),
    }
    for tensor in outputs.values():
        tensor.requires_grad_()
    anchors = [torch.empty(num_anchors, 4, device="meta")] * batch
    losses = retinanet_loss(
        targets,
        outputs,
        anchors,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.4,
        box_coder=model.head.regression_head.box_coder,
    )
    assert {k: v.shape for k, v in losses.items()} == {
        "classification": torch.Size([]),
        "bbox_regression": torch.Size([]),
    }
    grads = torch.autograd.grad(sum(losses.values()), list(outputs.values()))
    assert [g.shape for g in grads] == [v.shape for v in outputs.values()]
    boxes, _, valid = pad_targets(targets)
    padded = match_anchors(boxes, valid, torch.stack(anchors), 0.5, 0.4)
    assert padded.shape == (batch, num_anchors)


def test_first_training_step_losses_equal_torchvision(model):
    """The whole model in training mode, as `retinaperf run` takes its first step."""
    g = torch.Generator().manual_seed(8)
    images = [torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6, 40, 50], [50, 10, 95, 63], [70, 30, 71, 31]]),
         "labels": torch.tensor([1, 18, 90])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip
    model.train()
    results = {}
    for impl in ("batched", "torchvision"):
        with loss_impl(model, impl):
            results[impl] = model(images, targets)
    for key, value in results["batched"].items():
        torch.testing.assert_close(value, results["torchvision"][key], rtol=1e-5, atol=0)


def test_compiles_without_recompiling_for_new_box_counts(model):
    """The model's `compile` wraps the loss in torch.compile(dynamic=True): the same numbers,
    and one graph for batches whose box counts differ (0 and 1 included)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = torch.compile(retinanet_loss, dynamic=True)
    anchors = make_anchors(model, 3)
    g = torch.Generator().manual_seed(9)
    counters.clear()
    for counts in [(3, 5, 2), (0, 1, 4), (6, 0, 9)]:
        targets = [target(random_boxes(n, g), g) for n in counts]
        outputs = head_outputs(3, len(anchors[0]), g)
        kwargs = {
            "fg_iou_thresh": 0.5,
            "bg_iou_thresh": 0.4,
            "box_coder": model.head.regression_head.box_coder,
        }
        inputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
        losses = compiled(targets, inputs, anchors, **kwargs)
        grads = torch.autograd.grad(sum(losses.values()), list(inputs.values()))
        assert_same_losses(
            (losses, list(grads)),
            losses_and_grads(model, "torchvision", targets, outputs, anchors),
        )
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
def test_cuda_without_synchronisation(model):
    """On CUDA, with any synchronising call an error, the loss equals torchvision's."""
    targets = [{k: v.cuda() for k, v in t.items()} for t in hard_targets()]
    anchors = make_anchors(model, len(targets), "cuda")
    cpu_outputs = head_outputs(len(targets), len(anchors[0]), torch.Generator().manual_seed(10))
    outputs = {k: v.cuda().requires_grad_() for k, v in cpu_outputs.items()}
    box_coder = model.head.regression_head.box_coder
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = retinanet_loss(
            targets, outputs, anchors, fg_iou_thresh=0.5, bg_iou_thresh=0.4, box_coder=box_coder
        )
        grads = torch.autograd.grad(sum(losses.values()), list(outputs.values()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # compute_loss uses no parameter: the CPU model computes torchvision's loss on CUDA tensors.
    reference = losses_and_grads(model, "torchvision", targets, outputs, anchors)
    assert_same_losses((losses, list(grads)), reference)
