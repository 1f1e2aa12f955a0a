"""retinaperf's batched post-processing gives torchvision's detections.

The reference is torchvision's own `RetinaNet.postprocess_detections` on the same inputs. Two
settings make the comparison exact rather than approximate, and why: torch's CPU sigmoid gives the
last < 32 elements of each thread's share of a tensor (its scalar tail) values one ulp away from
its vector code's, so a score depends on where its logit sits in the tensor. With one thread, the
only tails are the ends of the tensors, that is the last classes of the last anchor (of a level,
in torchvision; of the gathered rows, in ours, or padding after the logits of a level taken
alone); classes from `SILENT` up never score above the threshold here, so no candidate sits in a
tail on either side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet

from retinaperf.config import ModelConfig
from retinaperf.model import postprocess
from retinaperf.model.network import NUM_CLASSES, RetinaPerfNet, build_model
from retinaperf.model.postprocess import (
    _MAX_CUT,
    _cuts,
    _group_maxima,
    _hopeful_anchors,
    _unambiguous,
    logit_floor,
    score_bound,
    select_detections,
)

PADDED = (128, 160)  # the batch's padded size (a multiple of 32, as the transform pads)
SILENT = 60  # classes SILENT.. are kept below the threshold (see the module docstring)
THRESHOLD_LOGIT = math.log(0.05 / 0.95)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> RetinaPerfNet:
    torch.manual_seed(0)
    config = ModelConfig(min_size=PADDED[0], max_size=PADDED[1], backbone_weights="none")
    return build_model(config, None).eval()


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """P3–P7 sizes: strides 8, 16, 32, then two stride-2 convolutions (ceil halving)."""
    sizes = [(height // s, width // s) for s in (8, 16, 32)]
    for _ in range(2):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


def split_anchors(model: RetinaPerfNet, image_sizes: list[tuple[int, int]]) -> list[list[Tensor]]:
    """The model's anchors for a padded batch, split per level as RetinaNet.forward splits them."""
    batch = len(image_sizes)
    sizes = level_sizes(*PADDED)
    features = [torch.empty(batch, 1, h, w) for h, w in sizes]  # only their shapes are read
    images = ImageList(torch.empty(batch, 3, *PADDED), image_sizes)
    per_level = [h * w * 9 for h, w in sizes]
    return [list(a.split(per_level)) for a in model.anchor_generator(images, features)]


def random_head_outputs(
    batch: int, generator: torch.Generator, step: float | None = 0.125, mean: float = -4
) -> dict[str, list[Tensor]]:
    """Logits ~ N(`mean`, 1.5²) (at -4, a quarter of them above logit(0.05)), on a grid of `step`
    so that many scores tie exactly (`None`: no grid); box codes wide enough that many boxes cross
    the image's edges."""
    outputs: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_regression": []}
    for h, w in level_sizes(*PADDED):
        anchors = h * w * 9
        logits = torch.randn(batch, anchors, NUM_CLASSES, generator=generator) * 1.5 + mean
        if step is not None:
            logits = (logits / step).round() * step
        logits[..., SILENT:] = -8
        outputs["cls_logits"].append(logits)
        outputs["bbox_regression"].append(torch.randn(batch, anchors, 4, generator=generator))
    return outputs


def ours(model: RetinaPerfNet, outputs, anchors, image_sizes) -> list[dict[str, Tensor]]:
    assert model.postprocess_impl == "batched"  # the default: select_detections
    return model.postprocess_detections(outputs, anchors, image_sizes)


def torchvisions(model: RetinaPerfNet, outputs, anchors, image_sizes) -> list[dict[str, Tensor]]:
    return RetinaNet.postprocess_detections(model, outputs, anchors, image_sizes)


def assert_same(got: list[dict[str, Tensor]], expected: list[dict[str, Tensor]]) -> None:
    """Labels and scores equal, in the same order; boxes to 1e-3 px (torch's exp, like its
    sigmoid, may differ by an ulp between its vector and scalar code)."""
    assert len(got) == len(expected)
    for image, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a["boxes"].dtype == torch.float32, image
        assert a["scores"].dtype == torch.float32, image
        assert a["labels"].dtype == torch.int64, image
        assert torch.equal(a["labels"], b["labels"]), f"image {image}: labels"
        assert torch.equal(a["scores"], b["scores"]), f"image {image}: scores"
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)


def test_random_logits_give_torchvisions_detections(model: RetinaPerfNet) -> None:
    image_sizes = [(128, 160), (100, 150), (128, 117), (96, 160)]  # clipping differs per image
    generator = torch.Generator().manual_seed(1)
    outputs = random_head_outputs(len(image_sizes), generator)
    for level in outputs["cls_logits"]:
        level[2] = level[2].clamp(max=THRESHOLD_LOGIT - 0.01)  # image 2: nothing above 0.05
    anchors = split_anchors(model, image_sizes)

    expected = torchvisions(model, outputs, anchors, image_sizes)
    assert_same(ours(model, outputs, anchors, image_sizes), expected)

    # The cases the inputs are meant to hold, so that the comparison above covers them.
    candidates = (outputs["cls_logits"][0].sigmoid() > 0.05).flatten(1).sum(1)
    assert candidates.max() > 3 * model.topk_candidates  # the top-k cuts a level
    assert len(expected[2]["scores"]) == 0
    limit = model.detections_per_img
    assert [len(d["scores"]) for d in expected] == [limit, limit, 0, limit]
    try:
        model.detections_per_img = 10**6
        survivors = [len(d["scores"]) for d in torchvisions(model, outputs, anchors, image_sizes)]
    finally:
        model.detections_per_img = limit
    assert min(survivors[:2] + survivors[3:]) > 2 * limit  # the 300 are a cut of more
    scores = expected[0]["scores"]
    assert len(scores.unique()) < len(scores) / 2  # many exact ties
    for d, (h, w) in zip(expected, image_sizes, strict=True):
        if len(d["boxes"]):
            assert (d["boxes"][:, 2] == w).any() and (d["boxes"][:, 3] == h).any()  # clipped
            assert (d["boxes"][:, 0] == 0).any() and (d["boxes"][:, 1] == 0).any()


@pytest.mark.parametrize(
    ("step", "dtype", "parts_suffice"),
    [(None, torch.float32, True), (0.125, torch.float32, False), (None, torch.bfloat16, False)],
)
def test_dense_logits_give_torchvisions_detections(
    model: RetinaPerfNet,
    monkeypatch: pytest.MonkeyPatch,
    step: float | None,
    dtype: torch.dtype,
    parts_suffice: bool,
) -> None:
    """An early network's scores: logits ~ N(-5.5, 1.5²), 4 % of them above logit(0.05), so that
    the candidates of a level are many times k (here 100, for a small image). Images 0 and 1 raise
    their cuts at P3 and P4 (P5 has fewer groups than k); image 2 (logits 3 lower) does not. With
    continuous float32 logits the parts above the cuts hold the top k without a tie; on a grid of
    1/8 or in bfloat16 they tie, and each of those levels is taken from its full vector."""
    monkeypatch.setattr(model, "topk_candidates", 100)
    checks: list[bool] = []
    redone: list[int] = []
    unambiguous, level_candidates = postprocess._unambiguous, postprocess._level_candidates

    def checked(*args):
        result = unambiguous(*args)
        checks.append(bool(result))
        return result

    def counted(*args):
        redone.append(1)
        return level_candidates(*args)

    monkeypatch.setattr(postprocess, "_unambiguous", checked)
    monkeypatch.setattr(postprocess, "_level_candidates", counted)
    image_sizes = [(128, 160), (100, 150), (128, 117)]
    outputs = random_head_outputs(3, torch.Generator().manual_seed(7), step=step, mean=-5.5)
    for level in outputs["cls_logits"]:
        level[2] -= 3
    half = {k: [t.to(dtype) for t in v] for k, v in outputs.items()}
    upcast = {k: [t.float() for t in v] for k, v in half.items()}
    anchors = split_anchors(model, image_sizes)

    expected = torchvisions(model, upcast, anchors, image_sizes)
    assert_same(ours(model, half, anchors, image_sizes), expected)

    assert checks == [parts_suffice] * 4  # images 0 and 1, at P3 and P4
    assert len(redone) == (0 if parts_suffice else 4)
    candidates = (upcast["cls_logits"][0].sigmoid() > 0.05).flatten(1).sum(1)
    assert candidates[:2].min() > 50 * model.topk_candidates and candidates[2] < 100
    assert [len(d["scores"]) for d in expected[:2]] == [model.detections_per_img] * 2
    assert 0 < len(expected[2]["scores"]) < model.detections_per_img


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_head_outputs_decode_in_float32(model: RetinaPerfNet, dtype: torch.dtype) -> None:
    """Half-precision head outputs: float32 scores and boxes, equal to torchvision's on the same
    values cast up to float32 (decoding in bfloat16 would move edges by 4–8 px at 800–1333 px)."""
    image_sizes = [(128, 160), (112, 140)]
    outputs = random_head_outputs(2, torch.Generator().manual_seed(3), step=1 / 1024)
    half = {k: [t.to(dtype) for t in v] for k, v in outputs.items()}
    upcast = {k: [t.float() for t in v] for k, v in half.items()}
    anchors = split_anchors(model, image_sizes)

    got = ours(model, half, anchors, image_sizes)
    expected = torchvisions(model, upcast, anchors, image_sizes)
    assert_same(got, expected)
    assert len(expected[0]["scores"].unique()) < len(expected[0]["scores"])  # ties, from rounding


def test_scores_at_the_threshold(model: RetinaPerfNet) -> None:
    """Logits on both sides of the threshold's logit, one float32 step apart: the same ones pass."""
    image_sizes = [(128, 160)]
    outputs = random_head_outputs(1, torch.Generator().manual_seed(6))
    for level in outputs["cls_logits"]:
        level.fill_(-8)
    center = torch.tensor(THRESHOLD_LOGIT, dtype=torch.float32).view(torch.int32)
    near = torch.arange(int(center) - 120, int(center) + 120, dtype=torch.int32)
    near = near.view(torch.float32)  # 240 consecutive float32 logits around logit(0.05)
    p3 = outputs["cls_logits"][0][0]
    anchors_at = torch.arange(len(near)) * (p3.shape[0] // len(near))
    p3[anchors_at, torch.arange(len(near)) % SILENT] = near
    anchors = split_anchors(model, image_sizes)

    expected = torchvisions(model, outputs, anchors, image_sizes)
    assert_same(ours(model, outputs, anchors, image_sizes), expected)
    passing = int((near.sigmoid() > 0.05).sum())
    assert 0 < passing < len(near)
    assert len(expected[0]["scores"]) > passing / 2  # most of them survive NMS
    assert expected[0]["scores"].min() < 0.05 + 1e-7  # down to the threshold's first float


def test_logit_floor_never_drops_a_score_above_the_threshold() -> None:
    """Every float32 from -16 (sigmoid < 2e-7) up to the floor scores at most the threshold: all
    of them through torch's vector sigmoid, the 4096 nearest the floor also one by one (its
    scalar code). And the floor is close under the threshold's logit: the prefilter filters."""
    for thresh in (0.05, 0.001):
        floor = torch.tensor(logit_floor(thresh), dtype=torch.float32)
        bits = torch.arange(  # negative floats: the bit pattern grows with the magnitude
            int(floor.view(torch.int32)),
            int(torch.tensor(-16.0).view(torch.int32)) + 1,
            dtype=torch.int32,
        )
        values = bits.view(torch.float32)
        assert values[0] == floor and values[-1] == -16
        assert (values.sigmoid() <= thresh).all(), thresh
        nearest = values[:4096]
        assert all(float(x.reshape(1).sigmoid()) <= thresh for x in nearest), thresh
        above = floor + 2e-3
        assert float(above.sigmoid()) > thresh, thresh


@pytest.mark.parametrize("num_anchors", [9, 7])  # in groups of 3, and one by one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hopeful_anchors_are_those_with_a_logit_above_their_images_cut(
    num_anchors: int, dtype: torch.dtype
) -> None:
    logits = torch.full((3, num_anchors, 5), -9.0)
    hits = [(0, 0, 4), (0, 2, 1), (0, 3, 0), (2, num_anchors - 1, 2), (2, 4, 3), (2, 4, 0)]
    for image, anchor, label in hits:
        logits[image, anchor, label] = -1.0
    logits[1, 5, 2] = -2.0  # below image 1's cut, -1.5
    logits[2, 5, 1] = -1.375  # above -1.5, not above image 2's cut (in the group of a hit)
    logits = logits.to(dtype)
    cuts = torch.tensor([-1.5, -1.5, -1.25])
    image, anchor, rows = _hopeful_anchors(logits, _group_maxima(logits), cuts)
    expected = sorted({(i, a) for i, a, _ in hits})
    assert list(zip(image.tolist(), anchor.tolist(), strict=True)) == expected
    assert torch.equal(rows, logits[image, anchor])


def test_cuts_rise_under_the_kth_largest_group_maximum_where_k_groups_pass() -> None:
    floor = logit_floor(0.05)
    group_max = torch.tensor(
        [
            [-9.0, 0.25, 0.5, -5.0, 1.0],  # 3 groups above the floor: the cut rises under 0.25
            [-9.0, -1.0, -8.0, -7.0, 1.0],  # 2: it stays at the floor
            [-9.0, 12.0, 10.0, 11.0, -5.0],  # high up: no higher than _MAX_CUT
            [-9.0, -2.94, -2.94, -2.94, -5.0],  # 3 above the floor by less than the margin
        ]
    )
    assert -2.95 < floor < -2.94
    cuts = _cuts(group_max, floor, 3)
    expected = torch.tensor([0.25 - 1e-2, floor, _MAX_CUT, floor])
    torch.testing.assert_close(cuts, expected, rtol=0, atol=1e-6)
    assert cuts.dtype == torch.float32
    assert torch.equal(_cuts(group_max, floor, 6), torch.full((4,), floor))  # fewer groups than k


def test_unambiguous_needs_distinct_top_scores_above_the_bound() -> None:
    bound = torch.tensor(0.25, dtype=torch.float64)
    assert _unambiguous(torch.tensor([0.9, 0.8, 0.7, 0.6]), bound, 3)
    assert _unambiguous(torch.tensor([0.9, 0.8, 0.7]), bound, 3)  # no k + 1-th: n = k
    assert not _unambiguous(torch.tensor([0.9, 0.8, 0.7, 0.7]), bound, 3)  # tie at the k-th
    assert not _unambiguous(torch.tensor([0.9, 0.9, 0.7, 0.6]), bound, 3)  # tie within the k
    assert not _unambiguous(torch.tensor([0.9, 0.8, 0.25, 0.2]), bound, 3)  # k-th at the bound
    assert _unambiguous(torch.tensor([0.9, 0.8, 0.3, 0.25]), bound, 3)  # k + 1-th may be there


def test_score_bound_is_above_every_score_at_or_below_the_cut() -> None:
    """The 2^20 float32 logits nearest at or below each cut (up to the highest, `_MAX_CUT`) score
    at most its bound: all of them through torch's vector sigmoid, the 4096 nearest also one by
    one. And the bound is close: a logit 2e-3 above the cut scores above it."""
    for cut in (logit_floor(0.05), -0.5, 0.5, 2.0, _MAX_CUT):
        cut = torch.tensor(cut, dtype=torch.float32)
        bound = score_bound(cut)
        # Decreasing floats from the cut: for negative ones the bit pattern grows with magnitude.
        start, step = int(cut.view(torch.int32)), (1 if cut < 0 else -1)
        bits = torch.arange(start, start + step * 2**20, step, dtype=torch.int32)
        values = bits.view(torch.float32)
        assert values[0] == cut and (values[1:] < values[:-1]).all()
        assert (values.sigmoid() <= bound).all(), float(cut)
        assert all(float(x.reshape(1).sigmoid()) <= bound for x in values[:4096]), float(cut)
        assert float((cut + 2e-3).sigmoid()) > bound, float(cut)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_level_candidates_are_torchvisions_vector(dtype: torch.dtype) -> None:
    """One image's level taken alone: exactly torchvision's vector, scores bitwise (the last
    anchor's logits score differently in the sigmoid's scalar code, yet match), anchors and
    labels. The threshold puts the floor 0.004 under a bfloat16 logit that scores above it:
    rounded to the nearest bfloat16, the floor would be that logit, and drop it."""
    above = -2.9375  # a bfloat16; logit(thresh) is 0.003 under it, logit_floor(thresh) 0.004
    thresh = 1 / (1 + math.exp(3e-3 - above))
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(300, NUM_CLASSES, generator=generator) * 1.5 - 3
    logits[:, SILENT:] = -8  # torchvision's scalar tail: the last classes of the last anchor
    pool = (torch.rand(4096, generator=generator) * 4 - 1).to(dtype).float()
    scalar = torch.cat([x.reshape(1).sigmoid() for x in pool])
    logits[-1, :SILENT] = pool[pool.sigmoid() != scalar][:SILENT]
    logits[::7, 3] = above
    logits = logits.to(dtype)
    scores = logits.float().sigmoid().flatten()
    index = (scores > thresh).nonzero().squeeze(1)

    score, anchor, label = postprocess._level_candidates(logits, logit_floor(thresh), thresh)
    assert torch.equal(score, scores[index])
    assert torch.equal(anchor, index // NUM_CLASSES) and torch.equal(label, index % NUM_CLASSES)
    assert (label[anchor == 7] == 3).any()  # a logit just above the floor is a candidate
    assert (anchor == 299).sum() == SILENT


def test_model_eval_gives_torchvisions_detections(
    model: RetinaPerfNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: `model(images)` selects the same detections with either implementation."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return select_detections(*args, **kwargs)

    monkeypatch.setattr(postprocess, "select_detections", counted)
    generator = torch.Generator().manual_seed(4)
    images = [
        torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
        for size in ((3, 128, 160), (3, 90, 150), (3, 120, 100))
    ]
    cls_bias = model.head.classification_head.cls_logits.bias
    original = cls_bias.detach().clone()
    try:
        with torch.no_grad():  # a random network scores ~0.01 everywhere: raise it to ~0.1
            bias = cls_bias.view(-1, NUM_CLASSES)
            bias[:, :SILENT] = -2.2
            bias[:, SILENT:] = -20
        results = {}
        for impl in ("batched", "torchvision"):
            model.postprocess_impl = impl
            with torch.no_grad():
                results[impl] = model(images)
    finally:
        model.postprocess_impl = "batched"
        with torch.no_grad():
            cls_bias.copy_(original)
    assert len(calls) == 1  # "batched" ran ours, "torchvision" did not
    expected = results["torchvision"]
    assert all(len(d["scores"]) > 50 for d in expected)
    assert_same(results["batched"], expected)


def test_no_candidates_anywhere(model: RetinaPerfNet) -> None:
    image_sizes = [(128, 160), (64, 64)]
    outputs = random_head_outputs(2, torch.Generator().manual_seed(5))
    for level in outputs["cls_logits"]:
        level.clamp_(max=THRESHOLD_LOGIT - 0.01)
    anchors = split_anchors(model, image_sizes)
    got = ours(model, outputs, anchors, image_sizes)
    assert [len(d["scores"]) for d in got] == [0, 0]
    assert got[0]["boxes"].shape == (0, 4) and got[0]["labels"].dtype == torch.int64
