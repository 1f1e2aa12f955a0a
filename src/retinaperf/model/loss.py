"""RetinaNet's training loss for the whole batch at once: torchvision's numbers, no host sync.

torchvision's `RetinaNet.compute_loss` matches anchors to boxes and evaluates the losses one
image at a time, with boolean-mask indexing (a device-to-host synchronisation each) and an
explicit one-hot target as large as the logits. Here instead:

- the boxes of the batch are padded to the batch's largest count, with a validity mask, and the
  anchors matched to them (`match_anchors`: torchvision's Matcher, bit for bit), in chunks of
  anchors so that the [B, G, chunk] temporaries stay small; in eager mode image by image
  (`match_batch`), which launches more kernels but skips the padding's work;
- the focal loss and its gradient come out of one pass over the logits (`_FocalLoss`), with the
  one-hot target implicit: the formula for target 0 everywhere, then the single foreground entry
  of each foreground anchor corrected through gather/scatter;
- the box loss is evaluated for every anchor and masked to the foreground.

All in float32, whatever the dtype of the head's outputs.

Every shape follows from the input shapes and nothing asks the device for a value, so the
function runs under torch.compile and in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from retinaperf.model.transfer import host_to_device
from retinaperf.torch_compat import BoxCoder

ALPHA = 0.25  # torchvision's sigmoid_focal_loss defaults; gamma = 2 is written into the formulas
BACKGROUND = -1  # torchvision's Matcher.BELOW_LOW_THRESHOLD
IGNORED = -2  # torchvision's Matcher.BETWEEN_THRESHOLDS

# Elements per chunk of eager work: on the CPU small enough that a chunk's temporaries stay in
# cache (each op is then a pass over cache, not memory); on an accelerator only a bound on
# temporary memory (1 GiB of float32 temporaries), large so that few chunks (each ~20 operators
# for the host to dispatch) cover a batch: 4 for 16 images at 800x1333. Under torch.compile
# nothing is chunked: the ops fuse into kernels without temporaries, and a chunk count that
# depends on sizes would specialise the compiled graph.
CPU_CHUNK = 2**20
DEVICE_CHUNK = 2**28


def retinanet_loss(
    targets: list[dict[str, Tensor]],
    head_outputs: dict[str, Tensor],
    anchors: list[Tensor],
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    box_coder: BoxCoder,
) -> dict[str, Tensor]:
    """torchvision's `RetinaNet.compute_loss` (focal loss and L1 box loss, each normalised per
    image by its foreground count, averaged over images), computed for the batch at once.

    head_outputs: `cls_logits` [B, A, K] and `bbox_regression` [B, A, 4] (computed in float32
    whatever their dtype); anchors: B tensors [A, 4]; targets: per image `boxes` [G_i, 4] (xyxy)
    and `labels` [G_i], G_i possibly 0.
    """
    boxes, labels, valid = pad_targets(targets)
    stacked = torch.stack(anchors)
    counts = [len(t["boxes"]) for t in targets] if match_per_image(stacked.device) else None
    matched = match_batch(boxes, valid, stacked, fg_iou_thresh, bg_iou_thresh, counts)
    return _batch_loss(
        matched,
        labels,
        boxes,
        head_outputs["cls_logits"],
        head_outputs["bbox_regression"],
        stacked,
        box_coder,
    )


@torch.compiler.disable
def pad_targets(targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's boxes [B, G, 4] and labels [B, G], padded to G = the largest count (at least
    1), and the mask [B, G] of real boxes.

    The boxes of all images are concatenated and copied into their padded rows at once, the rows
    computed on the host from the box counts (shapes, no device read): a few operators for the
    batch rather than a few per image. Kept out of torch.compile: traced, each image's box count
    would be a guarded input size (0 and 1 are always specialised), and nearly every batch would
    recompile. Padded, only the batch's largest count is.
    """
    counts = np.array([len(t["boxes"]) for t in targets])
    batch, count = len(targets), max(1, int(counts.max(initial=0)))
    boxes = torch.cat([t["boxes"] for t in targets])  # [N, 4]
    labels = torch.cat([t["labels"] for t in targets])
    # Box k of image i goes to row i * count + k of the flattened [B * G] layout.
    starts = np.arange(batch) * count - np.concatenate([[0], counts.cumsum()[:-1]])
    rows = torch.from_numpy(np.arange(len(boxes)) + np.repeat(starts, counts))
    rows = host_to_device(rows, boxes.device)
    padded_boxes = boxes.new_zeros(batch * count, 4).index_copy_(0, rows, boxes)
    padded_labels = labels.new_zeros(batch * count).index_copy_(0, rows, labels)
    valid = torch.zeros(batch * count, dtype=torch.bool, device=boxes.device)
    valid.index_fill_(0, rows, True)
    return (
        padded_boxes.view(batch, count, 4),
        padded_labels.view(batch, count),
        valid.view(batch, count),
    )


def _batch_loss(
    matched: Tensor,
    labels: Tensor,
    boxes: Tensor,
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    box_coder: BoxCoder,
) -> dict[str, Tensor]:
    """The two losses, given each anchor's match [B, A] to the padded boxes [B, G, 4]."""
    foreground = matched >= 0
    num_images = matched.shape[0]
    # Each image's losses are divided by max(1, its foreground count), their sum by B.
    image_weight = 1 / (foreground.sum(1).clamp(min=1) * num_images).to(torch.float32)
    index = matched.clamp(min=0)

    # Classification: anchors between the thresholds take no part.
    anchor_weight = torch.where(matched != IGNORED, image_weight[:, None], 0.0)
    anchor_labels = torch.where(foreground, labels.gather(1, index), 0)
    classification = _FocalLoss.apply(cls_logits.float(), anchor_labels, foreground, anchor_weight)

    # Box regression, foreground only. Other anchors are encoded against themselves (targets 0),
    # not against the box at index 0: in an image without boxes that is padding of width 0,
    # whose encoding is infinite (masked out, but better never made).
    gt = boxes.gather(1, index[..., None].expand(-1, -1, 4))
    gt = torch.where(foreground[..., None], gt, anchors)
    target = encode(gt, anchors, box_coder.weights)
    error = (bbox_regression.float() - target).abs()
    error = torch.where(foreground[..., None], error, 0.0)
    bbox = (error.sum((1, 2)) * image_weight).sum()
    return {"classification": classification, "bbox_regression": bbox}


def encode(boxes: Tensor, anchors: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """torchvision's `BoxCoder.encode_single(boxes, anchors)` for [..., 4] tensors, in its order
    of operations. Its weights stay Python numbers: `encode_single` copies them to the device
    each call, a host-device copy that synchronises."""
    wx, wy, ww, wh = weights
    ex_widths = anchors[..., 2] - anchors[..., 0]
    ex_heights = anchors[..., 3] - anchors[..., 1]
    ex_ctr_x = anchors[..., 0] + 0.5 * ex_widths
    ex_ctr_y = anchors[..., 1] + 0.5 * ex_heights
    gt_widths = boxes[..., 2] - boxes[..., 0]
    gt_heights = boxes[..., 3] - boxes[..., 1]
    gt_ctr_x = boxes[..., 0] + 0.5 * gt_widths
    gt_ctr_y = boxes[..., 1] + 0.5 * gt_heights
    dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    dw = ww * torch.log(gt_widths / ex_widths)
    dh = wh * torch.log(gt_heights / ex_heights)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def box_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU [B, G, N] of boxes [B, G, 4] with anchors [B, N, 4], both xyxy.

    The operations and their order are those of torchvision's `box_iou`, so that each value is
    torchvision's bit for bit, and so is every comparison the matcher makes with it.
    """
    area1 = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area2 = (anchors[..., 2] - anchors[..., 0]) * (anchors[..., 3] - anchors[..., 1])
    lt = torch.max(boxes[:, :, None, :2], anchors[:, None, :, :2])
    rb = torch.min(boxes[:, :, None, 2:], anchors[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union


def match_anchors(boxes: Tensor, valid: Tensor, anchors: Tensor, high: float, low: float) -> Tensor:
    """torchvision's `Matcher(high, low, allow_low_quality_matches=True)` for a padded batch:
    [B, A] int64, the index of each anchor's box, or -1 (background: best IoU below `low`, or
    no boxes) or -2 (ignored: best IoU in [low, high)).

    As torchvision: an anchor's box is the first of its highest IoU; the low-quality rule gives
    back its box to every anchor that attains some box's highest IoU (ties included; a box whose
    highest IoU is 0 so restores every anchor it does not touch). Padded boxes have IoU -1: they
    never win a maximum over real boxes (IoU >= 0) and are kept out of the low-quality rule.
    """
    batch, count = valid.shape
    chunk = _chunk_size(anchors.shape[1], batch * count * 2, anchors.device)  # [B, G, n, 2]
    best_anchor = []  # per chunk: each anchor's highest IoU and the first box with it, [B, n]
    best_box = []  # per chunk: each box's highest IoU within the chunk, [B, G]
    attains = []  # per chunk: which anchors attain that, [B, G, n] bool
    for part in anchors.split(chunk, dim=1):
        iou = torch.where(valid[:, :, None], box_iou(boxes, part), -1.0)
        best_anchor.append(iou.max(dim=1))
        highest = iou.amax(dim=2)
        best_box.append(highest)
        attains.append(iou == highest[:, :, None])
    # Padded boxes get NaN as their highest IoU: no anchor is restored by them.
    highest = torch.stack(best_box).amax(dim=0)
    highest = torch.where(valid, highest, torch.nan)

    matches = []
    for (values, index), local, attained in zip(best_anchor, best_box, attains, strict=True):
        match = torch.where(values < low, BACKGROUND, index)
        match = torch.where((values >= low) & (values < high), IGNORED, match)
        # An anchor attains a box's overall highest IoU if it attains the highest of its chunk
        # and that equals the overall one.
        restore = (attained & (local == highest)[:, :, None]).any(dim=1)
        matches.append(torch.where(restore, index, match))
    return torch.cat(matches, dim=1)


def match_per_image(device: torch.device) -> bool:
    """Whether to match image by image (the CPU, eager) or the padded batch at once (accelerators,
    and under torch.compile): see `match_batch`."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def match_batch(
    boxes: Tensor,
    valid: Tensor,
    anchors: Tensor,
    high: float,
    low: float,
    counts: list[int] | None = None,
) -> Tensor:
    """`match_anchors` for the padded batch, or, given each image's box count (known on the
    host: no synchronisation), image by image against its own boxes only.

    The same numbers either way. Image by image saves the padding's work (B x the largest count
    of pairs, 4 to 10 times the real ones on COCO batches) for ~15 operators per image: a good
    trade on the CPU, which computes what it dispatches. An accelerator computes the padding's
    work in microseconds, while its host dispatches each operator in tens of them: there the
    padded batch goes at once. Compiled, one padded graph is better too (and a box count, a
    guarded size, would recompile it). An image without boxes keeps one padded box: it matches
    nothing.
    """
    if counts is None:
        return match_anchors(boxes, valid, anchors, high, low)
    return torch.cat(
        [
            match_anchors(
                boxes[i : i + 1, : max(1, n)],
                valid[i : i + 1, : max(1, n)],
                anchors[i : i + 1],
                high,
                low,
            )
            for i, n in enumerate(counts)
        ]
    )


def _chunk_size(rows: int, elements_per_row: int, device: torch.device) -> int:
    """Rows per chunk of eager work, given the elements of temporaries per row (see CPU_CHUNK)."""
    if torch.compiler.is_compiling():
        return max(rows, 1)
    budget = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
    return max(1, min(rows, budget // max(1, elements_per_row)))


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), from vectorised exp and log only:
    torch's softplus and log1p run a scalar loop on the CPU, 10 to 50 times slower.

    log1p(r) is log(1 + r) * r / ((1 + r) - 1) (Goldberg): exact to a few ulps, where log(1 + r)
    alone would lose r's low bits. Where 1 + r rounds to 1 (|x| > 16.6) it gives 0 instead of
    r < 6e-8: s(x) loses nothing for x > 0, and for x < -16.6 the focal terms, of order p^2 s
    and p^3 with p < 6e-8, are below anything float32 sums can see.
    """
    r = x.abs().neg_().exp_()
    v = r + 1
    s = torch.log(v)
    r.div_(v.sub_(1).clamp_(min=torch.finfo(v.dtype).tiny))
    s.mul_(r)
    return s.add_(torch.clamp(x, min=0, out=v))


def _background_terms(x: Tensor, weight: Tensor, grad: Tensor | None) -> Tensor:
    """Sum over logits x [n, K] of weight [n, 1] times the target-0 focal term; its gradient
    written into `grad` (see _FocalLoss)."""
    p = torch.sigmoid(x)
    s = _softplus(x)
    scale = p.square().mul_(weight)  # (1 - a) w p^2
    # The terms go through `grad`'s memory (overwritten below): no temporary.
    total = torch.mul(scale, s, out=torch.empty_like(x) if grad is None else grad).sum()
    if grad is not None:
        s.addcmul_(s, p, value=-1)  # (1 - p) s
        torch.mul(p.add_(s, alpha=2), scale, out=grad)  # (1 - a) w p^2 (p + 2 (1 - p) s)
    return total


class _FocalLoss(torch.autograd.Function):
    """Sum of torchvision's `sigmoid_focal_loss` (alpha 0.25, gamma 2) over the logits [B, A, K]
    against one-hot targets of `labels` [B, A] on the `foreground` anchors [B, A] (zero
    elsewhere), each anchor weighted by `weight` [B, A].

    Forward computes the gradient too, in the same pass (the transcendental functions are
    shared), and keeps it: one [B, A, K] tensor, the least the gradient needs. With p the
    sigmoid of a logit x and s the softplus:
      target 0: loss (1 - a) p^2 s(x),   gradient (1 - a) p^2 (p + 2 (1 - p) s(x))
      target 1: loss a (1 - p)^2 s(-x),  gradient -a (1 - p)^2 ((1 - p) + 2 p s(-x))
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, foreground: Tensor, weight: Tensor) -> Tensor:
        classes = logits.shape[-1]
        x = logits.reshape(-1, classes)
        background_weight = (weight * (1 - ALPHA)).reshape(-1, 1)
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None

        # Target 0 everywhere, chunk by chunk.
        partial_sums = []
        chunk = _chunk_size(x.shape[0], 4 * classes, x.device)  # about 4 [n, K] temporaries
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            out = None if grad is None else grad[rows]
            partial_sums.append(_background_terms(x[rows], background_weight[rows], out))
        total = torch.stack(partial_sums).sum() if partial_sums else x.new_zeros(())

        # The foreground entries: swap their target-0 terms for target-1 ones.
        label = labels.reshape(-1, 1)
        xl = x.gather(1, label)
        p = torch.sigmoid(xl)
        q = 1 - p
        w = weight.reshape(-1, 1)
        fg = foreground.reshape(-1, 1)
        loss0 = (1 - ALPHA) * p.square() * _softplus(xl)
        loss1 = ALPHA * q.square() * _softplus(-xl)
        total = total + torch.where(fg, (loss1 - loss0) * w, 0.0).sum()
        if grad is not None:
            grad1 = -ALPHA * q.square() * (q + 2 * p * _softplus(-xl)) * w
            grad.scatter_(1, label, torch.where(fg, grad1, grad.gather(1, label)))
            ctx.save_for_backward(grad.view_as(logits))
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        # Scaled in place: no second [B, A, K] tensor. A second backward through the same graph
        # (retain_graph) then fails autograd's version check instead of giving wrong values.
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output), None, None, None
