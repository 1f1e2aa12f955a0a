"""RetinaNet's detection selection for the whole batch at once: torchvision's detections, faster.

torchvision's `RetinaNet.postprocess_detections` works image by image and level by level: the
sigmoid of every logit (91 per anchor, 18 M per 800×1344 image), `score > score_thresh`, the top
`topk_candidates` (k) per level, decoding, clipping, class-wise NMS, the first
`detections_per_img`. Scoring every logit is most of its time, yet few scores matter: a trained
network puts only a few thousand above the threshold, and where an early one puts hundreds of
thousands there (4 % of its logits), only the top k of each level go on. Here, per level:

1. One pass over the whole batch's logits takes the largest logit of each group of 3 anchors.
2. Each image gets a cut: the logit above which its anchors are gathered. It is
   `logit_floor(score_thresh)`, a logit-space threshold set a little low so that every score
   above the threshold has a logit above it (checked over every float32 near it), unless k
   groups have a maximum more than `_CUT_MARGIN` above that: then the cut is raised to
   `_CUT_MARGIN` under the k-th largest group maximum, so that at least k logits lie above it
   while only about k groups do (2–3 % more with an early network's scores, where the floor lets
   through nearly all of them).
3. The anchors with a logit above their image's cut are gathered, their logits cast up to float32
   and scored; `score > score_thresh` is torchvision's own test. At the floor, the anchors let
   through that have no score above the threshold add nothing, so each image's candidates come
   out as torchvision's: the same scores in the same (anchor, class) order, whatever the batch.
4. Each image's top k are taken by `topk` on exactly that vector, as torchvision does. This is
   not a detail: torch's CPU `topk` orders equal scores (and picks among those tied at the k-th
   place) by its selection algorithm, neither by index nor stably, so the same call on the same
   vector is the only way to get its candidates where scores tie. Any other set of inputs (a
   padded batch, a smaller preselection) can reorder ties, and with them NMS's choices.
5. Above a raised cut, an image's candidates are a part of torchvision's vector that holds every
   score above `score_bound(cut)`. If the k-th largest of them is above that bound and its top
   k + 1 are all different, there is no tie for any `topk` to order: the top k of the part are
   those of the whole vector, in the same order. That is checked on the device, for all images
   of the level at once. Where it fails (ties: a quarter of the raised levels with float32 logits
   like an early network's, nearly all with bfloat16 ones), the image's level is taken as in 3–4,
   from a pass over its logits alone (`_level_candidates`): gathering every anchor's row would
   cost ~4× more where most of them hold a candidate.
6. Boxes are decoded for every image and level at once, in float32 whatever the head's dtype (a
   bfloat16 decode at 800–1333 px moves box edges in steps of 4–8 px), and clipped to each
   image's size; then torchvision's `batched_nms` per image, on the same inputs as in
   torchvision (one NMS over the whole batch measured 5x slower).

Scores equal torchvision's up to one float32 ulp: torch's CPU sigmoid gives a few elements at the
end of each thread's chunk of a tensor (its scalar tail) a value one ulp away from its vector
code's, so even torchvision's own scores change with the tensor's size and the thread count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

from retinaperf.torch_compat import BoxCoder

# How far below the exact logit of the score threshold the anchor prefilter starts. The float32
# sigmoid is within a few ulp of the true one, i.e. within ~1e-6 in logit space near any usable
# threshold: 1e-3 leaves a wide margin, and lets through a negligible number of extra anchors.
_LOGIT_MARGIN = 1e-3

# How far a raised cut sits under the k-th largest group maximum. The k-th score has to exceed
# `score_bound(cut)`, the sigmoid of cut + _LOGIT_MARGIN: ten margins make sure it does, and let
# through only 2–3 % more groups than the k (at the density of an early network's top scores).
_CUT_MARGIN = 10 * _LOGIT_MARGIN

# The highest cut: `score_bound` holds while a step of _LOGIT_MARGIN moves the sigmoid by many
# float32 ulps (~170 at this cut, where the bound is 0.99; under two at 0.9999).
_MAX_CUT = math.log(0.99 / 0.01) - _LOGIT_MARGIN

# torch's CPU sigmoid computes the last < 2 × 16 elements of a contiguous tensor in its scalar
# code (see the end of the module docstring): padding scores computed apart by this many values
# keeps those last elements out of the candidates.
_SCALAR_TAIL = 32


def logit_floor(score_thresh: float) -> float:
    """A logit at or below which no float32 sigmoid exceeds `score_thresh`.

    Anchors whose largest logit does not exceed it cannot hold a candidate. The exact test,
    `sigmoid(x) > score_thresh`, is then made on the scores of the anchors that remain.
    """
    if score_thresh <= 0:
        return -math.inf
    if score_thresh >= 1:
        return math.inf
    return math.log(score_thresh / (1 - score_thresh)) - _LOGIT_MARGIN


def score_bound(cut: Tensor) -> Tensor:
    """The score (float64) that no float32 sigmoid of a logit at or below `cut` exceeds: the
    inverse of `logit_floor`, for cuts up to `_MAX_CUT`."""
    return torch.sigmoid(cut.double() + _LOGIT_MARGIN)


def _group_size(num_anchors: int) -> int:
    return 3 if num_anchors % 3 == 0 else 1  # RetinaNet has 9 anchors per location


def _group_maxima(logits: Tensor) -> Tensor:
    """The largest logit of each group of anchors of `logits` [B, A, C], float32 [B, A / group].

    This is the one pass over all the logits (`_level_candidates` makes another over the levels
    of images it redoes). It takes the maximum over groups of 3 anchors' 273
    logits rather than each anchor's 91: torch's CPU amax pays a cost per reduced row, so this
    runs ~3x faster (P3 of a batch of 16 at 800×1344, one thread: 32 ms against 105 ms), close to
    the time of reading the memory once. amax is exact in any dtype; comparing its maxima in
    float32 keeps cuts from being rounded to the logits' dtype (by up to 1/128 in bfloat16 near
    -3).
    """
    group = _group_size(logits.shape[1])
    return logits.unflatten(1, (-1, group)).flatten(2).amax(dim=2).float()


def _cuts(group_max: Tensor, floor: float, topk_candidates: int) -> Tensor:
    """Per image, the logit above which its anchors are gathered, float32 [B].

    `floor`, or if that is lower, `_CUT_MARGIN` under the k-th largest group maximum (k being
    `topk_candidates`), at most `_MAX_CUT`. Then at least k logits lie above the cut, one in each
    of those groups, and above `floor` by `_CUT_MARGIN`, so above the threshold's logit: the
    image's part of torchvision's vector holds at least k scores.
    """
    cuts = torch.full(group_max.shape[:1], floor, dtype=torch.float32, device=group_max.device)
    if topk_candidates == 0:
        return cuts
    # Only images with k groups above the floor need the top k of their groups: taking them for
    # every image costs ~4 ms a batch of 16, 6 % of a trained network's whole post-processing.
    # (Summing the bools into int32: into int64, torch's CPU sum is ~100x slower.)
    above = (group_max > floor).sum(dim=1, dtype=torch.int32)
    crowded = (above >= topk_candidates).nonzero().squeeze(1)
    if crowded.numel():
        kth = group_max[crowded].topk(topk_candidates, dim=1, sorted=False).values.amin(dim=1)
        cuts[crowded] = torch.maximum(cuts[crowded], (kth - _CUT_MARGIN).clamp(max=_MAX_CUT))
    return cuts


def _hopeful_anchors(
    logits: Tensor, group_max: Tensor, cuts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The anchors of `logits` [B, A, C] with a logit above their image's cut (`cuts` [B];
    `group_max` from `_group_maxima`): their image, their index (ordered by image, then anchor)
    and their logits [rows, C] (a copy).

    The groups whose maximum is above the cut are gathered, then their anchors are looked at one
    by one.
    """
    _, num_anchors, num_classes = logits.shape
    group = _group_size(num_anchors)
    grouped = logits.unflatten(1, (-1, group)).flatten(2)  # [B, A / group, group * C], a view
    group_image, group_index = (group_max > cuts[:, None]).nonzero(as_tuple=True)
    rows = grouped[group_image, group_index].view(-1, num_classes)
    row_image = group_image.repeat_interleave(group)
    offsets = torch.arange(group, device=logits.device)
    row_anchor = (group_index[:, None] * group + offsets).flatten()
    hopeful = rows.amax(dim=1).float() > cuts[row_image]
    return row_image[hopeful], row_anchor[hopeful], rows[hopeful]


def _level_candidates(
    logits: Tensor, floor: float, score_thresh: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One image's candidates at one level, `logits` [A, C]: torchvision's vector (the scores
    above `score_thresh`, in (anchor, class) order), their anchors and their labels.

    One pass compares every logit with `floor`, in the logits' own dtype (a float32 copy of a
    bfloat16 level would cost more than the pass): `floor` is lowered by 2 eps |floor| of that
    dtype first, at least two of its ulps, so that rounding it to the dtype cannot move it above
    itself. Only the logits above it are scored, with `_SCALAR_TAIL` values after them, so that
    no candidate's score comes from the sigmoid's scalar tail, as none of torchvision's does
    (with one thread, its tail is the level's last anchor's last classes).
    """
    num_classes = logits.shape[1]
    flat = logits.flatten()
    lowered = floor - 2 * torch.finfo(logits.dtype).eps * abs(floor)
    index = (flat > lowered).nonzero().squeeze(1)
    count = index.numel()
    values = torch.zeros(count + _SCALAR_TAIL, device=logits.device)
    values[:count] = flat.index_select(0, index)  # index_select: ~1.5x faster than flat[index]
    scores = values.sigmoid_()[:count]
    passed = (scores > score_thresh).nonzero().squeeze(1)
    index = index.index_select(0, passed)
    return scores.index_select(0, passed), index // num_classes, index % num_classes


def _unambiguous(top: Tensor, bound: Tensor, k: int) -> Tensor:
    """Whether the top k of a vector are `top[:k]`, in this order, whatever `topk` takes them:
    `top` is the largest min(k + 1, n) of n >= k scores, decreasing, from a part of the vector
    that holds every score above `bound`. So the k-th must be above the bound, and the first
    k + 1 all different: no tie to order, neither within the k nor at the k-th place."""
    return (top[k - 1] > bound) & (top[:-1] > top[1:]).all()


def select_detections(
    head_outputs: dict[str, list[Tensor]],
    anchors: list[list[Tensor]],
    image_shapes: list[tuple[int, int]],
    *,
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    topk_candidates: int,
) -> list[dict[str, Tensor]]:
    """torchvision's `RetinaNet.postprocess_detections`, for the whole batch at once.

    `head_outputs["cls_logits"][level]` is [B, A_level, C], `head_outputs["bbox_regression"]
    [level]` is [B, A_level, 4], in any float dtype; `anchors[image][level]` is [A_level, 4];
    `image_shapes[image]` is (height, width). Returns per image `boxes` [N, 4] float32, `scores`
    [N] float32 and `labels` [N] int64, in torchvision's order (decreasing score).
    """
    num_images = len(image_shapes)
    if num_images == 0:
        return []
    floor = logit_floor(score_thresh)
    # Per image, per level: candidates' scores, labels, box codes and anchors, in level order.
    picked: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] = [[] for _ in range(num_images)]
    for level, (logits, codes) in enumerate(
        zip(head_outputs["cls_logits"], head_outputs["bbox_regression"], strict=True)
    ):
        tops = _level_top_k(logits, floor, score_thresh, topk_candidates)
        for image, (score, anchor, label) in enumerate(tops):
            picked[image].append(
                (score, label, codes[image, anchor], anchors[image][level][anchor])
            )
    boxes, scores, labels, counts = _decode_and_clip(picked, image_shapes, box_coder)
    return _nms_per_image(boxes, scores, labels, counts, nms_thresh, detections_per_img)


def _level_top_k(
    logits: Tensor, floor: float, score_thresh: float, k: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image of `logits` [B, A, C] (one level), the top k of torchvision's vector: their
    scores, anchors and labels, as its `topk` takes them (steps 1–5 of the module docstring)."""
    group_max = _group_maxima(logits)
    cuts = _cuts(group_max, floor, k)
    parts, raised = _image_parts(logits, group_max, cuts, floor, score_thresh)
    bounds = score_bound(cuts)
    tops = []
    checks: dict[int, Tensor] = {}  # image: whether its part's top k are the whole's
    for image, (score, anchor, label) in enumerate(parts):
        if raised[image] and score.numel() >= k:
            score, top = score.topk(min(k + 1, score.numel()))
            checks[image] = _unambiguous(score, bounds[image], k)
            tops.append((score[:k], anchor[top[:k]], label[top[:k]]))
        else:  # the whole vector (a raised cut's part short of k, see _cuts: redone below)
            tops.append(_top_k(score, anchor, label, k))
    # One synchronisation for the level's checks.
    results = torch.stack(list(checks.values())).tolist() if checks else []
    settled = {image for image, ok in zip(checks, results, strict=True) if ok}
    for image in range(len(tops)):
        if raised[image] and image not in settled:
            tops[image] = _top_k(*_level_candidates(logits[image], floor, score_thresh), k)
    return tops


def _image_parts(
    logits: Tensor, group_max: Tensor, cuts: Tensor, floor: float, score_thresh: float
) -> tuple[list[tuple[Tensor, Tensor, Tensor]], list[int]]:
    """Per image of `logits` [B, A, C], its part of torchvision's vector at this level: the
    scores above `score_thresh` among its anchors above its cut, with their anchors and labels,
    in (anchor, class) order; and whether its cut was raised above `floor` (1) or not (0)."""
    num_images = logits.shape[0]
    row_image, row_anchor, rows = _hopeful_anchors(logits, group_max, cuts)
    scores = rows.float().sigmoid_()  # [rows, C]; rows is a fresh tensor, or a cast of one
    passed = scores > score_thresh
    entry_row, entry_label = passed.nonzero(as_tuple=True)  # by row, then class
    entry_score = scores[passed]
    entry_anchor = row_anchor[entry_row]
    # Entries are ordered by (image, anchor, class): each image's run is its flat
    # (anchor * C + class) order, its part of the vector torchvision takes the top-k of.
    per_image, raised = torch.stack(
        (torch.bincount(row_image[entry_row], minlength=num_images), (cuts > floor).long())
    ).tolist()
    parts = zip(
        entry_score.split(per_image),
        entry_anchor.split(per_image),
        entry_label.split(per_image),
        strict=True,
    )
    return list(parts), raised


def _top_k(score: Tensor, anchor: Tensor, label: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top k of a vector of scores (all of them if fewer), with their anchors and labels."""
    score, top = score.topk(min(k, score.numel()))
    return score, anchor[top], label[top]


def _decode_and_clip(
    picked: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]],
    image_shapes: list[tuple[int, int]],
    box_coder: BoxCoder,
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Every candidate of the batch decoded and clipped at once, images one after the other:
    boxes, scores and labels, and each image's count of them (step 6)."""
    counts = [sum(p[0].numel() for p in per_level) for per_level in picked]
    scores, labels, codes, anchor_boxes = (
        torch.cat([p[i] for per_level in picked for p in per_level]) for i in range(4)
    )
    boxes = box_coder.decode_single(codes.float(), anchor_boxes.float())
    sizes = torch.tensor(image_shapes, dtype=boxes.dtype, device=boxes.device).flip(1)  # (w, h)
    limits = sizes.repeat(1, 2).repeat_interleave(
        torch.tensor(counts, device=boxes.device), dim=0, output_size=boxes.shape[0]
    )
    boxes = torch.minimum(boxes.clamp(min=0), limits)  # torchvision's clip_boxes_to_image
    return boxes, scores, labels, counts


def _nms_per_image(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    counts: list[int],
    nms_thresh: float,
    detections_per_img: int,
) -> list[dict[str, Tensor]]:
    """torchvision's class-wise NMS, image by image, and each image's first
    `detections_per_img` detections."""
    detections = []
    for image_boxes, image_scores, image_labels in zip(
        boxes.split(counts), scores.split(counts), labels.split(counts), strict=True
    ):
        keep = box_ops.batched_nms(image_boxes, image_scores, image_labels, nms_thresh)
        keep = keep[:detections_per_img]
        detections.append(
            {"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]}
        )
    return detections
