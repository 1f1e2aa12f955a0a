"""The COCO index (`coco_index`): the records the JSON path gave, decoding in pieces, the cache and
its invalidation, and the run's pattern of one process per node building it.

The reference is the loader the index replaced (`json.load` and a loop over the annotations),
kept here as it was, on random files full of the cases SPEC §1's filtering is about.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from retinaperf.data import coco, coco_index
from retinaperf.data.coco import ImageRecord, index_split, load_split
from retinaperf.data.synth import SynthSpec, generate
from retinaperf.distributed import DistEnv
from retinaperf.errors import UserError
from retinaperf.run import build


def reference_records(root: Path, split: str, drop_empty: bool) -> list[ImageRecord]:
    """The records of a valid split as the loader before the index made them."""
    with open(coco.annotation_file(root, split), "rb") as f:
        content = json.load(f)
    images = {
        int(im["id"]): (str(im["file_name"]), int(im["width"]), int(im["height"]))
        for im in content["images"]
    }
    per_image: dict[int, list] = {i: [] for i in images}
    for ann in content["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        per_image[int(ann["image_id"])].append(
            ([float(v) for v in ann["bbox"]], int(ann["category_id"]))
        )
    records = []
    for image_id, (file_name, width, height) in images.items():
        found = per_image[image_id]
        if found:
            xywh = np.array([b for b, _ in found], np.float32).reshape(-1, 4)
            labels = np.array([label for _, label in found], np.int64)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
        else:
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        if drop_empty and len(boxes) == 0:
            continue
        records.append(ImageRecord(image_id, file_name, width, height, boxes, labels))
    return records


def assert_same_records(ours: list[ImageRecord], reference: list[ImageRecord]) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert (a.image_id, a.file_name, a.width, a.height) == (
            b.image_id,
            b.file_name,
            b.width,
            b.height,
        )
        assert type(a.image_id) is type(a.width) is type(a.height) is int
        assert a.boxes.dtype == b.boxes.dtype and a.labels.dtype == b.labels.dtype
        assert a.boxes.shape == b.boxes.shape and a.labels.shape == b.labels.shape
        assert np.array_equal(a.boxes, b.boxes)  # bit for bit: same float32 arithmetic
        assert np.array_equal(a.labels, b.labels)


CATEGORIES = (1, 3, 17, 44, 90)


def random_annotations(rng: np.random.Generator, images: list[dict], count: int) -> list[dict]:
    """Annotations with every case the filtering meets: crowd boxes, boxes of zero width or
    height, boxes partly and wholly outside their image, integer and float coordinates, images
    with several boxes, one or none, in shuffled order and with shuffled keys."""
    annotations = []
    for ann_id in range(1, count + 1):
        im = images[int(rng.integers(len(images) - len(images) // 5))]  # the last fifth: none
        width, height = im["width"], im["height"]
        x, y = rng.uniform(-15, width + 5), rng.uniform(-15, height + 5)
        w, h = rng.uniform(0.01, width), rng.uniform(0.01, height)
        kind = rng.integers(6)
        if kind == 0:
            w = 0.0
        elif kind == 1:
            h = 0
        bbox = [round(float(v), 2) for v in (x, y, w, h)]
        if rng.random() < 0.3:
            bbox = [int(v) for v in bbox]
        ann = {
            "segmentation": [rng.uniform(0, 50, 12).round(2).tolist()],
            "area": round(w * h, 2),
            "iscrowd": int(rng.random() < 0.1),
            "image_id": im["id"],
            "bbox": bbox,
            "category_id": int(rng.choice(CATEGORIES)),
            "id": ann_id,
        }
        keys = list(ann)
        rng.shuffle(keys)
        annotations.append({key: ann[key] for key in keys})
    return annotations


def write_random_root(root: Path, seed: int, indent: int | None = None) -> Path:
    """Both splits of a random COCO-layout root; the image files are empty (never decoded)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 60), ("val", 20)):
        ids = rng.choice(10_000, count, replace=False) + 1
        images = [
            {
                "id": int(i),
                "file_name": f"{i:012d}.jpg",
                "width": int(rng.integers(20, 80)),
                "height": int(rng.integers(20, 80)),
            }
            for i in ids
        ]
        write_split(root, split, images, random_annotations(rng, images, 8 * count), indent)
    return root


def write_split(
    root: Path,
    split: str,
    images: list[dict],
    annotations: list[dict],
    indent: int | None = None,
) -> Path:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        (folder / im["file_name"]).touch()
    (root / "annotations").mkdir(exist_ok=True)
    path = coco.annotation_file(root, split)
    content = {
        "info": {"description": "test"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORIES],
    }
    path.write_text(json.dumps(content, indent=indent))
    return path


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of a few annotations, so that small files are decoded in many pieces too."""
    monkeypatch.setattr(coco_index, "PIECE_BYTES", 300)


@pytest.fixture
def whole_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the decodings of a whole file's annotations at once (the fallback of `build`)."""
    calls = []
    decoder = coco_index._INSTANCES

    class Counting:
        def decode(self, content):
            calls.append(1)
            return decoder.decode(content)

    monkeypatch.setattr(coco_index, "_INSTANCES", Counting())
    return calls


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The annotation files `coco_index.build` is called for (it still builds their index)."""
    calls = []
    build = coco_index.build

    def counting(path: Path) -> coco_index.CocoIndex:
        calls.append(Path(path))
        return build(path)

    monkeypatch.setattr(coco_index, "build", counting)
    return calls


# --- the same records as the JSON path ------------------------------------------------------


@pytest.mark.parametrize("pieces", ["default", "small"])
@pytest.mark.parametrize(("seed", "indent"), [(0, None), (1, 2), (2, None)])
def test_index_gives_the_records_of_the_json_path(
    tmp_path, monkeypatch, whole_decodes, seed, indent, pieces
):
    if pieces == "small":
        monkeypatch.setattr(coco_index, "PIECE_BYTES", 300)
    root = write_random_root(tmp_path / "coco", seed, indent)
    for split, drop_empty in (("train", True), ("val", False), ("train", False)):
        reference = reference_records(root, split, drop_empty)
        assert any(len(r.boxes) == 0 for r in reference) != drop_empty
        cached = index_split(root, split, drop_empty=drop_empty, cache_dir=tmp_path / "cache")
        assert_same_records(cached, reference)
        again = index_split(root, split, drop_empty=drop_empty, cache_dir=tmp_path / "cache")
        assert_same_records(again, reference)  # from the cache this time
        assert_same_records(load_split(root, split, drop_empty=drop_empty)[0], reference)
    assert not whole_decodes  # decoded in pieces, never whole


@pytest.mark.parametrize("profile", ["shapes", "coco"])
def test_generated_datasets_give_the_records_of_the_json_path(tmp_path, profile, small_pieces):
    spec = SynthSpec(seed=4, train_images=100, val_images=10, image_size=64, profile=profile)
    root = generate(spec, tmp_path / "coco")
    train_ref = reference_records(root, "train", drop_empty=True)
    if profile == "shapes":  # images without objects, crowd regions, degenerate boxes
        assert len(train_ref) < len(reference_records(root, "train", drop_empty=False))
    for split, drop_empty, reference in (
        ("train", True, train_ref),
        ("val", False, reference_records(root, "val", drop_empty=False)),
    ):
        cached = index_split(root, split, drop_empty=drop_empty, cache_dir=tmp_path / "cache")
        assert_same_records(cached, reference)
        assert_same_records(load_split(root, split, drop_empty=drop_empty)[0], reference)


def test_records_share_read_only_arrays(tmp_path):
    root = write_random_root(tmp_path / "coco", 0)
    records = index_split(root, "train", drop_empty=True, cache_dir=None)
    with pytest.raises(ValueError, match="read-only"):
        records[0].boxes[0, 0] = 1.0
    assert records[0].boxes.base is records[1].boxes.base
    assert records[0].labels.base is records[1].labels.base


# --- pieces -----------------------------------------------------------------------------------


def test_pieces_cover_the_list_in_order(monkeypatch):
    monkeypatch.setattr(coco_index, "PIECE_BYTES", 20)
    items = [{"n": i, "s": "x" * (i % 7)} for i in range(50)]
    spaced = json.dumps(items, separators=(" \t,\r\n ", " : "))
    for text in (json.dumps(items), json.dumps(items, indent=3), spaced):
        pieces = list(coco_index._pieces(memoryview(text.encode())))
        assert len(pieces) > 5
        assert [item for piece in pieces for item in json.loads(piece)] == items
    assert [json.loads(p) for p in coco_index._pieces(memoryview(b"[]"))] == [[]]


@pytest.mark.parametrize(
    "extra",
    [{"note": "a}, {b"}, {"parts": [{"a": 1}, {"b": 2}]}],
    ids=["in-a-string", "in-a-nested-list"],
)
def test_a_cut_inside_an_annotation_falls_back_to_the_whole_list(
    tmp_path, small_pieces, whole_decodes, extra
):
    """Such a cut fails to decode, and the whole list is decoded at once: the same index."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 50, "height": 40} for i in (1, 2)]
    annotations = [
        {"id": i, "image_id": 1 + i % 2, "bbox": [i, 2, 10, 5], "category_id": 3, **extra}
        for i in range(1, 40)
    ]
    root = tmp_path / "coco"
    path = write_split(root, "train", images, annotations)
    index = coco_index.build(path)
    assert whole_decodes == [1]
    assert index.ann_boxes[:, 0].tolist() == list(range(1, 40))
    assert_same_records(
        index_split(root, "train", drop_empty=True, cache_dir=None),
        reference_records(root, "train", drop_empty=True),
    )


def test_errors_in_later_pieces_name_the_entry(tmp_path, small_pieces):
    images = [{"id": 1, "file_name": "1.jpg", "width": 50, "height": 40}]
    annotations = [
        {"id": i, "image_id": 1, "bbox": [1, 2, 10, 5], "category_id": 3} for i in range(1, 60)
    ]
    assert len(list(coco_index._pieces(memoryview(json.dumps(annotations).encode())))) > 5
    root = tmp_path / "coco"
    path = write_split(root, "train", images, annotations)
    coco_index.build(path)  # valid so far

    annotations[50]["bbox"] = [1, 2, -3, 4]
    write_split(root, "train", images, annotations)
    with pytest.raises(UserError, match=r"annotation 51 has a negative width or height \(bbox"):
        coco_index.build(path)

    del annotations[50]["bbox"]
    write_split(root, "train", images, annotations)
    with pytest.raises(UserError, match=r"field `bbox` - at `\$\.annotations\[50\]`"):
        coco_index.build(path)

    text = path.read_text()
    cut = text.index('"id": 45')
    path.write_text(text[:cut] + '"id": 4.5.1' + text[cut + 8 :])
    with pytest.raises(UserError) as err:
        coco_index.build(path)
    assert f"{path} is not valid JSON" in str(err.value)


def test_image_listed_twice_is_refused_naming_it(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 50, "height": 40} for i in (4, 7, 4)]
    path = write_split(tmp_path, "train", images, [])
    with pytest.raises(UserError, match="image 4 is listed more than once"):
        coco_index.build(path)


def test_annotations_that_are_not_a_list_are_refused(tmp_path):
    path = write_split(tmp_path, "train", [], [])
    path.write_text(json.dumps({"images": [], "annotations": {}, "categories": []}))
    with pytest.raises(UserError, match=r"Expected `array`, got `object` - at `\$\.annotations`"):
        coco_index.build(path)


# --- the cache --------------------------------------------------------------------------------


@pytest.fixture
def train_file(tmp_path) -> Path:
    return coco.annotation_file(write_random_root(tmp_path / "coco", 0), "train")


def assert_same_index(a: coco_index.CocoIndex, b: coco_index.CocoIndex) -> None:
    assert a.file_names == b.file_names
    for name in ("image_ids", "widths", "heights", "ann_images", "ann_categories", "ann_crowd"):
        assert getattr(a, name).dtype == getattr(b, name).dtype
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.ann_boxes.dtype == b.ann_boxes.dtype == np.float32
    assert np.array_equal(a.ann_boxes, b.ann_boxes)


def test_cache_hit_reuses_the_index_without_reading_the_file(tmp_path, train_file, monkeypatch):
    first = coco_index.cached(train_file, tmp_path / "cache")
    assert coco_index.cache_path(train_file, tmp_path / "cache").is_file()

    def no_parse(*args):
        raise AssertionError("parsed again")

    fresh = coco_index.build(train_file)
    monkeypatch.setattr(coco_index, "build", no_parse)
    monkeypatch.setattr(coco_index, "_map", no_parse)
    assert_same_index(coco_index.cached(train_file, tmp_path / "cache"), first)
    assert_same_index(first, fresh)


def test_cache_is_keyed_by_the_files_path(tmp_path, train_file, builds):
    cache = tmp_path / "cache"
    coco_index.cached(train_file, cache)
    copy = tmp_path / "elsewhere" / train_file.name
    copy.parent.mkdir()
    copy.write_bytes(train_file.read_bytes())
    os.utime(copy, ns=(train_file.stat().st_atime_ns, train_file.stat().st_mtime_ns))
    coco_index.cached(copy, cache)
    coco_index.cached(train_file, cache)
    coco_index.cached(copy, cache)
    assert builds == [train_file, copy]  # each once
    assert coco_index.cache_path(copy, cache) != coco_index.cache_path(train_file, cache)


@pytest.mark.parametrize("change", ["size", "same-size-later-mtime"])
def test_a_changed_file_is_indexed_again(tmp_path, train_file, builds, change):
    cache = tmp_path / "cache"
    before = coco_index.cached(train_file, cache)
    content = json.loads(train_file.read_text())
    first = content["annotations"][0]
    # Another category of as many digits: the file keeps its size.
    first["category_id"] = {1: 3, 3: 1, 17: 44, 44: 17, 90: 17}[first["category_id"]]
    if change == "size":
        content["annotations"].append({**first, "id": 10**6})
    stat = train_file.stat()
    train_file.write_text(json.dumps(content))
    if change != "size":
        # Written again within the clock's tick, the file may keep its time: it is the edit of
        # a later tick that the cache must see.
        assert train_file.stat().st_size == stat.st_size
        os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    after = coco_index.cached(train_file, cache)
    assert builds == [train_file, train_file]
    assert after.ann_categories[0] == first["category_id"] != before.ann_categories[0]
    grown = 1 if change == "size" else 0
    assert len(after.ann_images) == len(before.ann_images) + grown
    assert_same_index(coco_index.cached(train_file, cache), after)  # and cached again
    assert len(builds) == 2


def corrupt(target: Path, how: str) -> None:
    """Spoil the cache file `target` the way `how` says."""
    if how in ("truncated", "empty", "garbage", "flipped-byte"):
        content = target.read_bytes()
        middle = len(content) // 2
        target.write_bytes(
            {
                "truncated": content[:middle],
                "empty": b"",
                "garbage": b"not a zip file at all",
                "flipped-byte": content[:middle] + bytes([content[middle] ^ 0xFF])
                + content[middle + 1 :],
            }[how]
        )  # fmt: skip
        return
    if how == "an-array-not-an-archive":
        np.save(target.with_suffix(".npy"), np.zeros(3))
        target.with_suffix(".npy").replace(target)
        return
    with np.load(target) as stored:  # a whole archive, with arrays that do not fit together
        arrays = {name: stored[name] for name in stored.files}
    if how == "image-out-of-range":
        arrays["ann_images"] = np.full_like(arrays["ann_images"], 10**6)
    elif how == "short-column":
        arrays["ann_crowd"] = arrays["ann_crowd"][:-1]
    elif how == "wrong-dtype":
        arrays["ann_boxes"] = arrays["ann_boxes"].astype(np.float64)
    elif how == "names-cut":
        arrays["name_bytes"] = arrays["name_bytes"][:-3]
    elif how == "missing-column":
        del arrays["ann_boxes"]
    else:
        assert how == "other-format"
        arrays["key"] = np.array(str(arrays["key"]).replace('"format": ', '"format": 1'))
    with open(target, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "empty",
        "garbage",
        "flipped-byte",
        "an-array-not-an-archive",
        "image-out-of-range",
        "short-column",
        "wrong-dtype",
        "names-cut",
        "missing-column",
        "other-format",
    ],
)
def test_a_corrupt_cache_is_rebuilt_not_trusted(tmp_path, train_file, builds, how):
    cache = tmp_path / "cache"
    fresh = coco_index.cached(train_file, cache)
    corrupt(coco_index.cache_path(train_file, cache), how)
    assert_same_index(coco_index.cached(train_file, cache), fresh)
    assert builds == [train_file, train_file]
    assert_same_index(coco_index.cached(train_file, cache), fresh)  # the rebuilt cache is good
    assert len(builds) == 2


def test_the_cache_is_written_whole_or_not_at_all(tmp_path, train_file, monkeypatch):
    """An interrupted write leaves no cache file (nor a temporary one) behind."""

    def interrupted(f, **arrays):
        f.write(b"PK")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        coco_index.cached(train_file, tmp_path / "cache")
    assert list((tmp_path / "cache" / "coco-index").iterdir()) == []


def test_an_unwritable_cache_warns_and_the_index_is_still_built(tmp_path, train_file):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="cannot write the index cache"):
        index = coco_index.cached(train_file, blocked)
    assert_same_index(index, coco_index.build(train_file))


def test_a_missing_annotation_file_is_refused_naming_it(tmp_path):
    missing = tmp_path / "instances_train2017.json"
    for read in (coco_index.build, lambda path: coco_index.cached(path, tmp_path)):
        with pytest.raises(UserError, match=f"{missing} does not exist"):
            read(missing)


def test_cached_arrays_load_without_pickle(tmp_path, train_file):
    coco_index.cached(train_file, tmp_path / "cache")
    target = coco_index.cache_path(train_file, tmp_path / "cache")
    with zipfile.ZipFile(target) as archive:
        names = sorted(archive.namelist())
    assert names == sorted(f"{n}.npy" for n in ["key", *coco_index._ARRAYS])
    with np.load(target, allow_pickle=False) as stored:
        assert all(stored[n].dtype != object for n in stored.files)


# --- one process per node builds --------------------------------------------------------------


def env(local_rank: int) -> DistEnv:
    return DistEnv(local_rank, 2, local_rank, 2, torch.device("cpu"))


def test_local_rank_0_builds_and_scans_the_others_load_the_cache(tmp_path, builds, monkeypatch):
    root = write_random_root(tmp_path / "coco", 3)
    scans = []
    check = coco._check_image_files
    monkeypatch.setattr(
        coco, "_check_image_files", lambda *args: (scans.append(args[0]), check(*args))
    )
    first = build.train_index(root, env(0), tmp_path / "cache")
    assert builds == [coco.annotation_file(root, "train")]
    assert scans == [coco.image_dir(root, "train")]
    other = build.train_index(root, env(1), tmp_path / "cache")
    assert len(builds) == 1 and len(scans) == 1  # from the cache, no second scan
    assert_same_records(other, first)
    assert_same_records(first, reference_records(root, "train", drop_empty=True))


def test_uncached_index_writes_nothing(tmp_path, monkeypatch):
    root = write_random_root(tmp_path / "coco", 5)
    monkeypatch.setattr(coco_index, "cached", None)  # index_split must not reach for it
    records = index_split(root, "val", drop_empty=False, cache_dir=None)
    assert_same_records(records, reference_records(root, "val", drop_empty=False))


def test_msgspec_skips_what_the_index_does_not_read():
    """Segmentations and other fields are skipped, whatever they hold."""
    text = b'[{"segmentation": {"counts": "a}, {b", "size": [1, 2]}, "image_id": 1, '
    text += b'"bbox": [1, 2, 3, 4], "category_id": 5, "extra": [[{}]]}]'
    (ann,) = msgspec.json.decode(text, type=list[coco_index._Annotation])
    assert (ann.image_id, ann.bbox, ann.category_id, ann.iscrowd, ann.id) == (
        1,
        (1, 2, 3, 4),
        5,
        0,
        None,
    )
