"""COCO loading: filtering (SPEC §1), decoding, flips, grouped sampling, eval sharding, errors.

Every dataset here is hand-written: a few annotations whose expected boxes are worked out by hand.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinaperf.data.coco import (
    CocoDetection,
    ImageRecord,
    LoadFailure,
    check_batch,
    check_root,
    index_split,
    load_split,
)
from retinaperf.data.coco_index import CATEGORY_IDS
from retinaperf.data.sampling import GroupedBatchSampler, aspect_ratio_groups, eval_batches
from retinaperf.errors import UserError
from retinaperf.model.network import NUM_CLASSES

LEFT, RIGHT = (250, 10, 10), (10, 10, 250)  # red left half, blue right half


def image(image_id: int, width: int, height: int) -> dict:
    return {"id": image_id, "file_name": f"{image_id:04d}.jpg", "width": width, "height": height}


def box(ann_id: int, image_id: int, bbox: list[float], category: int = 5, crowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "bbox": bbox,
        "category_id": category,
        "iscrowd": crowd,
        "area": bbox[2] * bbox[3],
    }


def write_jpeg(path: Path, width: int, height: int) -> None:
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, : width // 2] = LEFT
    pixels[:, width // 2 :] = RIGHT
    Image.fromarray(pixels).save(path, quality=95)


def write_split(
    root: Path,
    split: str,
    images: list[dict],
    annotations: list[dict],
    categories: Sequence[int] = (5, 9, 11),
) -> None:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        write_jpeg(folder / im["file_name"], im["width"], im["height"])
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))


def make_root(
    root: Path,
    images: list[dict],
    annotations: list[dict],
    categories: Sequence[int] = (5, 9, 11),
) -> Path:
    """The same hand-written split as train and val."""
    for split in ("train", "val"):
        write_split(root, split, images, annotations, categories)
    return root


def set_file_name(root: Path, split: str, image_id: int, file_name: str) -> None:
    """Give an image of the annotation file another file_name (its JPEG stays where it is)."""
    path = root / "annotations" / f"instances_{split}2017.json"
    coco = json.loads(path.read_text())
    for im in coco["images"]:
        if im["id"] == image_id:
            im["file_name"] = file_name
    path.write_text(json.dumps(coco))


Load = Callable[..., list[ImageRecord]]


@pytest.fixture(params=["json", "index"])
def load(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Load:
    """A split's records, read as the run reads them: `load_split` reads the file whole (rank 0
    reads val2017 so), `index_split` through the cached index (train2017, and val2017 on the other
    ranks). Both must keep the same boxes and refuse the same files with the same messages.
    Called as load(root, split, drop_empty=...)."""
    if request.param == "json":
        return lambda root, split, drop_empty: load_split(root, split, drop_empty=drop_empty)[0]
    cache = tmp_path_factory.mktemp("cache")
    return lambda root, split, drop_empty: index_split(
        root, split, drop_empty=drop_empty, cache_dir=cache
    )


def kept(
    load: Load, root: Path, split: str = "train", drop_empty: bool = False
) -> dict[int, ImageRecord]:
    return {r.image_id: r for r in load(root, split, drop_empty=drop_empty)}


# --- filtering and conversion -----------------------------------------------------------------


def test_xywh_becomes_xyxy(load, tmp_path):
    root = make_root(
        tmp_path,
        [image(1, 40, 30)],
        [box(1, 1, [2, 3, 10, 5]), box(2, 1, [1.5, 2.25, 3.5, 4.75], category=9)],
    )
    record = kept(load, root)[1]
    assert record.boxes.dtype == np.float32
    assert record.boxes.tolist() == [[2, 3, 12, 8], [1.5, 2.25, 5, 7]]
    assert record.labels.tolist() == [5, 9]
    assert (record.width, record.height, record.file_name) == (40, 30, "0001.jpg")


def test_crowd_boxes_are_dropped_from_targets(load, tmp_path):
    root = make_root(
        tmp_path,
        [image(1, 40, 30)],
        [box(1, 1, [0, 0, 20, 20], category=9, crowd=1), box(2, 1, [2, 3, 10, 5], category=11)],
    )
    record = kept(load, root)[1]
    assert record.boxes.tolist() == [[2, 3, 12, 8]]
    assert record.labels.tolist() == [11]


@pytest.mark.parametrize("bbox", [[5, 5, 0, 4], [5, 5, 4, 0], [5, 5, 0, 0]])
def test_boxes_without_area_are_dropped(load, tmp_path, bbox):
    root = make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, bbox), box(2, 1, [1, 1, 2, 2], 9)])
    record = kept(load, root)[1]
    assert record.boxes.tolist() == [[1, 1, 3, 3]]
    assert record.labels.tolist() == [9]


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [
        ([30, 20, 20, 20], [30, 20, 40, 30]),  # past the right and bottom edges
        ([-5, -2, 10, 6], [0, 0, 5, 4]),  # past the left and top edges
        ([-1, -1, 50, 40], [0, 0, 40, 30]),  # larger than the image
    ],
)
def test_box_partly_outside_is_clamped(load, tmp_path, bbox, expected):
    root = make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, bbox)])
    assert kept(load, root)[1].boxes.tolist() == [expected]


@pytest.mark.parametrize(
    "bbox", [[50, 5, 10, 10], [-20, 5, 10, 10], [5, 30, 10, 10], [5, -15, 10, 10]]
)
def test_box_entirely_outside_is_dropped(load, tmp_path, bbox):
    root = make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, bbox), box(2, 1, [1, 1, 2, 2])])
    assert kept(load, root)[1].boxes.tolist() == [[1, 1, 3, 3]]


def test_train_drops_images_left_without_box_and_val_keeps_all(load, tmp_path):
    images = [image(i, 40, 30) for i in (1, 2, 3, 4, 5)]
    annotations = [
        box(1, 1, [2, 3, 10, 5]),  # 1: keeps a box
        box(2, 2, [0, 0, 20, 20], crowd=1),  # 2: only a crowd box
        # 3: no annotation at all
        box(3, 4, [5, 5, 0, 4]),  # 4: only a zero-area box
        box(4, 5, [45, 5, 10, 10]),  # 5: only a box outside the image
    ]
    root = make_root(tmp_path, images, annotations)
    train = kept(load, root, "train", drop_empty=True)
    assert sorted(train) == [1]
    val = kept(load, root, "val", drop_empty=False)
    assert sorted(val) == [1, 2, 3, 4, 5]
    assert val[3].boxes.shape == (0, 4) and val[3].labels.shape == (0,)
    assert val[2].boxes.shape == (0, 4)


def test_load_split_returns_the_annotation_file_content(tmp_path):
    annotations = [box(1, 1, [2, 3, 10, 5]), box(2, 1, [0, 0, 5, 5], crowd=1)]
    root = make_root(tmp_path, [image(1, 40, 30), image(2, 40, 30)], annotations)
    _, coco = load_split(root, "val", drop_empty=False)
    assert coco["annotations"] == annotations  # crowd boxes stay for COCO scoring
    assert [im["id"] for im in coco["images"]] == [1, 2]


def test_split_with_no_usable_image_is_refused(load, tmp_path):
    root = make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, [0, 0, 9, 9], crowd=1)])
    with pytest.raises(UserError, match=r"instances_train2017\.json"):
        load(root, "train", drop_empty=True)


# --- decoding and flips -----------------------------------------------------------------------


@pytest.fixture
def two_images(tmp_path) -> tuple[Path, list[ImageRecord]]:
    root = make_root(
        tmp_path,
        [image(1, 40, 30), image(2, 32, 48)],
        [
            box(1, 1, [2, 3, 10, 5], category=9),
            box(2, 1, [30, 0, 10, 30], category=5),
            box(3, 2, [4, 8, 6, 6]),
        ],
    )
    records, _ = load_split(root, "train", drop_empty=True)
    return root, records


def test_dataset_returns_uint8_chw_images_and_targets(two_images):
    root, records = two_images
    dataset = CocoDetection(root, "train", records, hflip_prob=0.0, seed=0)
    assert len(dataset) == 2
    img, target = dataset[(0, 0)]
    assert img.dtype == torch.uint8
    assert tuple(img.shape) == (3, 30, 40)
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [9, 5]
    assert target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [30, 0, 40, 30]]
    assert target["boxes"].dtype == torch.float32
    # The picture is what was written: red on the left, blue on the right (not transposed).
    left, right = img[:, 15, 5].tolist(), img[:, 15, 35].tolist()
    assert left[0] > 200 and left[2] < 60
    assert right[2] > 200 and right[0] < 60
    img, target = dataset[(0, 1)]
    assert tuple(img.shape) == (3, 48, 32)
    assert target["image_id"] == 2


def test_flip_mirrors_image_and_boxes(two_images):
    root, records = two_images
    plain = CocoDetection(root, "train", records, hflip_prob=0.0, seed=0)
    flipped = CocoDetection(root, "train", records, hflip_prob=1.0, seed=0)
    for index, record in enumerate(records):
        img, target = plain[(3, index)]
        img_f, target_f = flipped[(3, index)]
        assert torch.equal(img_f, torch.flip(img, dims=[-1]))
        width = record.width
        by_hand = [[width - x1, y0, width - x0, y1] for x0, y0, x1, y1 in record.boxes.tolist()]
        assert torch.allclose(target_f["boxes"], torch.tensor(by_hand))
        assert torch.equal(target_f["labels"], target["labels"])
    # first image, 40 px wide: [2, 3, 12, 8] -> [28, 3, 38, 8]; [30, 0, 40, 30] -> [0, 0, 10, 30]
    assert flipped[(0, 0)][1]["boxes"].tolist() == [[28, 3, 38, 8], [0, 0, 10, 30]]
    img_f = flipped[(0, 0)][0]
    assert img_f[2, 15, 5] > 200 and img_f[0, 15, 35] > 200  # now blue left, red right


def _flipped(dataset: CocoDetection, epoch: int, index: int) -> bool:
    boxes = dataset[(epoch, index)][1]["boxes"]
    record = dataset.records[index]
    original = record.boxes.tolist()
    mirrored = [[record.width - x1, y0, record.width - x0, y1] for x0, y0, x1, y1 in original]
    assert mirrored != original  # the boxes tell the flip apart
    assert boxes.tolist() in (original, mirrored)
    return boxes.tolist() == mirrored


def test_flip_depends_only_on_seed_epoch_and_index(two_images):
    root, records = two_images
    keys = [(epoch, index) for epoch in range(30) for index in (0, 1)]
    a = CocoDetection(root, "train", records, hflip_prob=0.5, seed=7)
    first = [_flipped(a, *key) for key in keys]
    again = [_flipped(a, *key) for key in reversed(keys)][::-1]
    fresh = CocoDetection(root, "train", records, hflip_prob=0.5, seed=7)
    assert first == again == [_flipped(fresh, *key) for key in keys]
    other_seed = CocoDetection(root, "train", records, hflip_prob=0.5, seed=8)
    assert first != [_flipped(other_seed, *key) for key in keys]
    per_epoch = [first[i] for i in range(0, len(keys), 2)]  # image 0 across epochs
    assert 0 < sum(per_epoch) < len(per_epoch)  # epochs flip differently


@pytest.mark.parametrize("prob", [0.5, 0.2])
def test_flip_rate_is_near_hflip_prob(two_images, prob):
    root, records = two_images
    dataset = CocoDetection(root, "train", records, hflip_prob=prob, seed=0)
    flips = [_flipped(dataset, epoch, index) for epoch in range(200) for index in (0, 1)]
    assert abs(sum(flips) / len(flips) - prob) < 0.08


# --- grouped batches --------------------------------------------------------------------------


def _epoch(sampler: GroupedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert all(e == epoch for batch in batches for e, _ in batch)
    return [[i for _, i in batch] for batch in batches]


@pytest.mark.parametrize("count", [48, 50, 61])
def test_batches_are_full_and_of_one_group(count):
    groups = [(i * 7) % 3 for i in range(count)]
    sampler = GroupedBatchSampler(groups, batch_size=4, seed=0)
    assert len(sampler) == count // 4
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert len(batch) == 4
            assert len({groups[i] for i in batch}) == 1
            assert all(0 <= i < count for i in batch)


def test_single_group_epoch_is_a_permutation():
    sampler = GroupedBatchSampler([0] * 24, batch_size=4, seed=1)
    batches = _epoch(sampler, 0)
    assert sorted(i for batch in batches for i in batch) == list(range(24))


def test_order_changes_with_epoch_and_seed_but_not_otherwise():
    groups = [i % 2 for i in range(40)]
    a = GroupedBatchSampler(groups, batch_size=4, seed=3)
    b = GroupedBatchSampler(groups, batch_size=4, seed=3)
    c = GroupedBatchSampler(groups, batch_size=4, seed=4)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 5) == _epoch(b, 5)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(c, 0)
    assert _epoch(a, 2) == _epoch(a, 2)  # iterating again repeats the epoch


def test_two_ranks_split_an_epoch_without_overlap():
    count = 48
    ranks = [GroupedBatchSampler([0] * count, 4, seed=2, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    for epoch in (0, 1):
        shards = [[i for batch in _epoch(s, epoch) for i in batch] for s in ranks]
        assert len(shards[0]) == len(shards[1]) == 24
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(count))


@pytest.mark.parametrize("count", [47, 48, 53])
def test_two_ranks_with_groups_overlap_only_by_padding(count):
    groups = [(i * 5) % 3 for i in range(count)]
    ranks = [GroupedBatchSampler(groups, 4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    padding = -count % 2  # repeats added so that both ranks get as many images
    assert len(ranks[0]) == len(ranks[1]) == ((count + padding) // 2) // 4
    for epoch in (0, 3):
        per_rank = [_epoch(s, epoch) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
        shared = {i for b in per_rank[0] for i in b} & {i for b in per_rank[1] for i in b}
        assert len(shared) <= padding
        for batches in per_rank:
            assert all(len(b) == 4 and len({groups[i] for i in b}) == 1 for b in batches)


def test_too_few_images_for_one_batch_is_refused():
    with pytest.raises(UserError, match="batch_size"):
        GroupedBatchSampler([0] * 7, batch_size=4, seed=0, world_size=3)
    # 7 images on 2 ranks: 4 each after padding, which fills one batch of 4
    assert len(GroupedBatchSampler([0] * 7, batch_size=4, seed=0, world_size=2)) == 1


def _records(sizes: list[tuple[int, int]]) -> list[ImageRecord]:
    empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    return [
        ImageRecord(i, f"{i}.jpg", w, h, empty_boxes, empty_labels)
        for i, (w, h) in enumerate(sizes)
    ]


SIZES = [(640, 480), (480, 640), (500, 500), (1000, 300), (300, 1000), (640, 427), (427, 640)]


def test_aspect_ratio_groups_factor_minus_one_is_one_group():
    assert aspect_ratio_groups(_records(SIZES), -1) == [0] * len(SIZES)


@pytest.mark.parametrize("factor", [0, 1, 3])
def test_aspect_ratio_groups_follow_torchvision_bins(factor):
    # torchvision references/detection/group_by_aspect_ratio.py, written out independently.
    bins = [2 ** (-1 + 2 * k / (2 * factor)) for k in range(2 * factor + 1)] if factor else [1.0]
    expected = [bisect.bisect_right(bins, w / h) for w, h in SIZES]
    assert aspect_ratio_groups(_records(SIZES), factor) == expected


def test_aspect_ratio_groups_separate_portrait_and_landscape():
    groups = aspect_ratio_groups(_records(SIZES), 3)
    assert groups[0] == groups[5] != groups[1] == groups[6]  # 4:3 and 3:2 share a bin
    assert len(set(groups)) >= 4


# --- evaluation batches -----------------------------------------------------------------------


EVAL_SIZES = [(40, 30), (30, 40), (32, 32)] * 4 + [(64, 32)]  # 13 images


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_cover_every_image_once(world):
    records = _records(EVAL_SIZES)
    seen = Counter()
    for rank in range(world):
        for batch in eval_batches(records, 3, rank, world):
            assert 1 <= len(batch) <= 3
            seen.update(i for _, i in batch)
    assert seen == Counter(range(len(records)))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_eval_batches_do_not_depend_on_world_size(world):
    records = _records(EVAL_SIZES)
    single = eval_batches(records, 3)
    union = [b for rank in range(world) for b in eval_batches(records, 3, rank, world)]
    assert sorted(union) == sorted(single)


def test_eval_batches_are_sorted_by_aspect_ratio():
    records = _records(EVAL_SIZES)
    batches = [[EVAL_SIZES[i] for _, i in batch] for batch in eval_batches(records, 4)]
    # ratios 0.75 (4 images) < 1 (4) < 1.33 (4) < 2 (1): each batch holds one shape
    assert batches == [[(30, 40)] * 4, [(32, 32)] * 4, [(40, 30)] * 4, [(64, 32)]]


# --- errors -----------------------------------------------------------------------------------


def test_missing_data_dir_is_refused_naming_it(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        check_root(tmp_path / "nowhere")


def test_data_dir_without_annotations_is_refused_naming_the_file(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    with pytest.raises(UserError, match=r"instances_train2017\.json"):
        check_root(tmp_path)


def test_data_dir_without_image_folder_is_refused_naming_it(tmp_path):
    make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, [2, 3, 10, 5])])
    check_root(tmp_path)  # complete: no error
    for path in (tmp_path / "val2017").iterdir():
        path.unlink()
    (tmp_path / "val2017").rmdir()
    with pytest.raises(UserError, match="val2017"):
        check_root(tmp_path)


def test_malformed_json_is_refused_naming_the_file(load, tmp_path):
    make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, [2, 3, 10, 5])])
    path = tmp_path / "annotations" / "instances_train2017.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(UserError, match=r"instances_train2017\.json"):
        load(tmp_path, "train", drop_empty=True)


@pytest.mark.parametrize("content", [{"annotations": [], "categories": []}, [1, 2]])
def test_json_without_images_is_refused_naming_the_file(load, tmp_path, content):
    make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, [2, 3, 10, 5])])
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as err:
        load(tmp_path, "val", drop_empty=False)
    assert "instances_val2017.json" in str(err.value)


def test_annotation_for_unknown_image_is_refused_naming_it(load, tmp_path):
    make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, [2, 3, 10, 5]), box(2, 99, [1, 1, 2, 2])])
    with pytest.raises(UserError) as err:
        load(tmp_path, "train", drop_empty=True)
    assert "99" in str(err.value)
    assert "instances_train2017.json" in str(err.value)


@pytest.mark.parametrize(
    ("annotation", "word"),
    [
        ({"id": 1, "image_id": 1, "category_id": 5}, "bbox"),
        ({"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4]}, "category_id"),
        ({"id": 1, "image_id": 1, "bbox": [1, 2, 3], "category_id": 5}, "bbox"),
        ({"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4, 5], "category_id": 5}, "bbox"),
    ],
)
def test_annotation_lacking_a_field_is_refused_naming_it(load, tmp_path, annotation, word):
    make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, [2, 3, 10, 5]), annotation])
    with pytest.raises(UserError) as err:
        load(tmp_path, "train", drop_empty=True)
    assert word in str(err.value)
    assert "instances_train2017.json" in str(err.value)


@pytest.mark.parametrize("how", ["deleted", "dangling-link", "in-subfolder"])
def test_listed_image_missing_on_disk_is_refused_naming_it(load, tmp_path, how):
    make_root(tmp_path, [image(1, 40, 30), image(2, 40, 30)], [box(1, 1, [2, 3, 10, 5])])
    missing = tmp_path / "val2017" / "0002.jpg"
    missing.unlink()
    if how == "dangling-link":
        missing.symlink_to("gone.jpg")  # would lead inside the folder, but to nothing
    elif how == "in-subfolder":
        (tmp_path / "val2017" / "sub").mkdir()
        set_file_name(tmp_path, "val", 2, "sub/0002.jpg")
    with pytest.raises(UserError, match=r"missing from .*0002\.jpg"):
        load(tmp_path, "val", drop_empty=False)


def test_corrupt_jpeg_gives_load_failure_and_check_batch_names_it(tmp_path):
    make_root(tmp_path, [image(1, 40, 30), image(2, 40, 30)], [box(1, 1, [2, 3, 10, 5])])
    bad = tmp_path / "val2017" / "0002.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    records, _ = load_split(tmp_path, "val", drop_empty=False)
    dataset = CocoDetection(tmp_path, "val", records, hflip_prob=0.0, seed=0)
    good, failure = dataset[(0, 0)], dataset[(0, 1)]
    assert isinstance(failure, LoadFailure)
    assert failure.path.endswith("0002.jpg")
    assert failure.reason
    images, targets = check_batch([good])
    assert images[0].shape == (3, 30, 40) and targets[0]["image_id"] == 1
    with pytest.raises(UserError, match=r"0002\.jpg"):
        check_batch([good, failure])


@pytest.mark.parametrize("kept_bytes", [100, 0.5], ids=["in-header", "half"])
def test_truncated_jpeg_gives_load_failure(tmp_path, kept_bytes):
    # 200x150: large enough that half the file ends in the picture data, not in the header, as
    # an interrupted copy does.
    make_root(tmp_path, [image(1, 200, 150)], [box(1, 1, [2, 3, 10, 5])])
    path = tmp_path / "val2017" / "0001.jpg"
    whole = path.read_bytes()
    path.write_bytes(whole[: int(kept_bytes if kept_bytes >= 1 else len(whole) * kept_bytes)])
    records, _ = load_split(tmp_path, "val", drop_empty=False)
    failure = CocoDetection(tmp_path, "val", records, hflip_prob=0.0, seed=0)[(0, 0)]
    assert isinstance(failure, LoadFailure)
    assert failure.path == str(path)
    assert "truncated" in failure.reason.lower()
    with pytest.raises(UserError) as err:
        check_batch([failure])
    assert str(path) in str(err.value)


def test_jpeg_of_wrong_size_gives_load_failure(tmp_path):
    make_root(tmp_path, [image(1, 40, 30)], [box(1, 1, [2, 3, 10, 5])])
    write_jpeg(tmp_path / "train2017" / "0001.jpg", 30, 40)  # annotations say 40x30
    records, _ = load_split(tmp_path, "train", drop_empty=True)
    failure = CocoDetection(tmp_path, "train", records, hflip_prob=0.0, seed=0)[(0, 0)]
    assert isinstance(failure, LoadFailure)
    assert failure.path.endswith("0001.jpg")
    assert "40x30" in failure.reason and "30x40" in failure.reason
    with pytest.raises(UserError, match=r"0001\.jpg"):
        check_batch([failure])


@pytest.mark.parametrize(
    "bbox", [[5, 5, -3, 4], [5, 5, 4, -0.5], [5, 5, -1, -1]], ids=["width", "height", "both"]
)
@pytest.mark.parametrize("crowd", [0, 1], ids=["plain", "crowd"])
def test_box_of_negative_size_is_refused_naming_it(load, tmp_path, bbox, crowd):
    annotations = [box(1, 1, [2, 3, 10, 5]), box(7, 1, bbox, crowd=crowd)]
    make_root(tmp_path, [image(1, 40, 30)], annotations)
    with pytest.raises(UserError) as err:
        load(tmp_path, "val", drop_empty=False)
    message = str(err.value)
    assert "instances_val2017.json" in message
    assert "annotation 7 has a negative width or height" in message
    assert str(bbox) in message


@pytest.mark.parametrize("crowd", [0, 1], ids=["plain", "crowd"])
def test_category_not_in_categories_is_refused_naming_it(load, tmp_path, crowd):
    annotations = [box(1, 1, [2, 3, 10, 5]), box(4, 1, [1, 1, 2, 2], category=7, crowd=crowd)]
    make_root(tmp_path, [image(1, 40, 30)], annotations)
    with pytest.raises(UserError) as err:
        load(tmp_path, "train", drop_empty=True)
    message = str(err.value)
    assert "instances_train2017.json" in message
    assert "annotation 4 has category_id 7, which is not in 'categories'" in message


@pytest.mark.parametrize("category", [0, 91, -1])
def test_category_outside_the_models_classes_is_refused(load, tmp_path, category):
    assert len(CATEGORY_IDS) + 1 == NUM_CLASSES  # ids 1..90 and the background
    annotations = [box(1, 1, [2, 3, 10, 5]), box(4, 1, [1, 1, 2, 2], category=category)]
    make_root(tmp_path, [image(1, 40, 30)], annotations, categories=(5, category))
    with pytest.raises(UserError) as err:
        load(tmp_path, "train", drop_empty=True)
    message = str(err.value)
    assert "instances_train2017.json" in message
    assert f"annotation 4 has category_id {category}, outside 1..90" in message


def test_categories_at_both_ends_of_the_range_load(load, tmp_path):
    annotations = [box(1, 1, [2, 3, 10, 5], category=1), box(2, 1, [1, 1, 2, 2], category=90)]
    make_root(tmp_path, [image(1, 40, 30)], annotations, categories=(1, 90))
    assert kept(load, tmp_path)[1].labels.tolist() == [1, 90]


# --- image files must stay in their folder ----------------------------------------------------


def _leaving_file_name(root: Path, case: str) -> str:
    """A file_name for image 2 of `root`'s train split that leads out of train2017/, to a real
    JPEG (so it is refused for where it is, not for being missing)."""
    folder = root / "train2017"
    outside = root / "outside.jpg"
    write_jpeg(outside, 40, 30)
    if case == "dot-dot":
        return "../outside.jpg"
    if case == "dot-dot-inside":
        return "0001.jpg/../../outside.jpg"
    if case == "absolute":
        return str(outside)
    if case == "empty":
        return ""
    if case == "link":
        (folder / "0002.jpg").unlink()
        (folder / "0002.jpg").symlink_to(outside)
        return "0002.jpg"
    if case == "relative-link":
        (folder / "0002.jpg").unlink()
        (folder / "0002.jpg").symlink_to("../outside.jpg")
        return "0002.jpg"
    assert case == "linked-subfolder"
    (folder / "sub").symlink_to(root)
    return "sub/outside.jpg"


@pytest.mark.parametrize(
    "case",
    [
        "dot-dot",
        "dot-dot-inside",
        "absolute",
        "empty",
        "link",
        "relative-link",
        "linked-subfolder",
    ],
)
def test_file_name_leading_out_of_the_image_folder_is_refused(load, tmp_path, case):
    root = make_root(
        tmp_path / "coco",
        [image(1, 40, 30), image(2, 40, 30)],
        [box(1, 1, [2, 3, 10, 5]), box(2, 2, [2, 3, 10, 5])],
    )
    name = _leaving_file_name(root, case)
    set_file_name(root, "train", 2, name)
    with pytest.raises(UserError) as err:
        load(root, "train", drop_empty=True)
    message = str(err.value)
    assert "\n" not in message
    assert "instances_train2017.json" in message
    assert f"image 2 has file_name {name!r}" in message
    assert f"file names must name files inside {root / 'train2017'}" in message
    if "link" in case:
        assert f"leads to {(root / 'outside.jpg').resolve()}, outside" in message
    load(root, "val", drop_empty=False)  # val's names are its own, still plain


def _move_and_link(folder: Path, elsewhere: Path) -> None:
    """Move `folder` to `elsewhere` and leave a link to it in its place."""
    elsewhere.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)


def test_image_folder_linked_elsewhere_loads(load, tmp_path):
    root = make_root(tmp_path / "coco", [image(1, 40, 30), image(2, 32, 48)], [])
    _move_and_link(root / "val2017", tmp_path / "big-disk" / "val2017")
    records = load(root, "val", drop_empty=False)
    assert [r.file_name for r in records] == ["0001.jpg", "0002.jpg"]
    img, _ = CocoDetection(root, "val", records, hflip_prob=0.0, seed=0)[(0, 1)]
    assert tuple(img.shape) == (3, 48, 32)


@pytest.mark.parametrize("folder_linked", [False, True], ids=["folder", "linked-folder"])
def test_links_and_subfolders_inside_the_image_folder_load(load, tmp_path, folder_linked):
    images = [image(1, 40, 30), image(2, 40, 30), image(3, 32, 48), image(4, 32, 48)]
    root = make_root(tmp_path / "coco", images, [])
    folder = root / "val2017"
    (folder / "0002.jpg").unlink()
    (folder / "0002.jpg").symlink_to("0001.jpg")  # relative, to a file of the folder
    (folder / "sub").mkdir()
    (folder / "0003.jpg").rename(folder / "sub" / "0003.jpg")
    set_file_name(root, "val", 3, "sub/0003.jpg")
    # Absolute links through the folder's own path: still inside once the folder is moved.
    (folder / "same").symlink_to(folder / "sub")
    (folder / "0004.jpg").unlink()
    (folder / "0004.jpg").symlink_to(folder / "same" / "0003.jpg")
    if folder_linked:
        _move_and_link(folder, tmp_path / "big-disk" / "val2017")
    records = load(root, "val", drop_empty=False)
    assert [r.file_name for r in records] == ["0001.jpg", "0002.jpg", "sub/0003.jpg", "0004.jpg"]
    dataset = CocoDetection(root, "val", records, hflip_prob=0.0, seed=0)
    shapes = [tuple(dataset[(0, i)][0].shape) for i in range(4)]
    assert shapes == [(3, 30, 40), (3, 30, 40), (3, 48, 32), (3, 48, 32)]
