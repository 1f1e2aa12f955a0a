"""The generated dataset: layout, determinism, content and atomic, cached generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from retinaperf import synth
from retinaperf.errors import UserError
from retinaperf.synth import SynthSpec, cached, generate

SPEC = SynthSpec(seed=0, train_images=150, val_images=30, image_size=48)
SPLITS = ("train", "val")


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(SPEC, tmp_path_factory.mktemp("synth") / "coco")


def test_layout_is_coco2017(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["annotations", "train2017", "val2017"]
    assert sorted(p.name for p in (dataset / "annotations").iterdir()) == [
        "instances_train2017.json",
        "instances_val2017.json",
    ]
    for split in SPLITS:
        coco = _coco(dataset, split)
        assert {"images", "annotations", "categories"} <= set(coco)
        assert len(coco["images"]) == {"train": 150, "val": 30}[split]


def test_generate_is_deterministic(dataset, tmp_path):
    again = generate(SPEC, tmp_path / "again")
    first, second = _tree(dataset), _tree(again)
    assert first.keys() == second.keys()
    assert first == second


def test_different_seed_gives_different_images(tmp_path):
    small = SynthSpec(seed=0, train_images=3, val_images=2, image_size=48)
    other = SynthSpec(seed=1, train_images=3, val_images=2, image_size=48)
    a, b = _tree(generate(small, tmp_path / "a")), _tree(generate(other, tmp_path / "b"))
    assert a.keys() == b.keys()  # same file names ...
    jpegs = [name for name in a if name.endswith(".jpg")]
    assert all(a[name] != b[name] for name in jpegs)  # ... different pictures
    assert small.cache_key() != other.cache_key()


def test_an_image_depends_on_its_index_not_on_how_many_are_generated(tmp_path):
    three = generate(SynthSpec(seed=4, train_images=3, val_images=1, image_size=40), tmp_path / "a")
    five = generate(SynthSpec(seed=4, train_images=5, val_images=1, image_size=40), tmp_path / "b")
    for image in _coco(three, "train")["images"]:
        name = image["file_name"]
        assert (three / "train2017" / name).read_bytes() == (five / "train2017" / name).read_bytes()


def test_every_listed_file_is_a_jpeg_of_the_listed_size(dataset):
    for split in SPLITS:
        folder = dataset / f"{split}2017"
        images = _coco(dataset, split)["images"]
        assert {p.name for p in folder.iterdir()} == {im["file_name"] for im in images}
        for im in images:
            path = folder / im["file_name"]
            assert path.read_bytes()[:3] == b"\xff\xd8\xff"
            with Image.open(path) as picture:
                assert picture.format == "JPEG"
                picture.load()  # decodes the whole file
                assert picture.size == (im["width"], im["height"])
                assert picture.mode == "RGB"


def test_image_sizes_follow_the_spec_and_vary_in_aspect_ratio(dataset):
    sizes = {(im["width"], im["height"]) for s in SPLITS for im in _coco(dataset, s)["images"]}
    long_side = round(48 * 4 / 3)
    assert sizes <= {(48, 48), (long_side, 48), (48, long_side)}
    assert len(sizes) >= 2  # the grouped sampler gets more than one aspect ratio


def test_image_and_annotation_ids_are_unique(dataset):
    image_ids = [im["id"] for s in SPLITS for im in _coco(dataset, s)["images"]]
    assert len(image_ids) == len(set(image_ids)) == 180
    for split in SPLITS:
        ann_ids = [a["id"] for a in _coco(dataset, split)["annotations"]]
        assert len(ann_ids) == len(set(ann_ids))


def test_annotations_refer_to_known_images_and_categories(dataset):
    for split in SPLITS:
        coco = _coco(dataset, split)
        image_ids = {im["id"] for im in coco["images"]}
        category_ids = {c["id"] for c in coco["categories"]}
        assert category_ids != set(range(1, len(category_ids) + 1))  # not contiguous, like COCO
        for ann in coco["annotations"]:
            assert ann["image_id"] in image_ids
            assert ann["category_id"] in category_ids
            assert ann["iscrowd"] in (0, 1)
            assert len(ann["bbox"]) == 4


def test_special_cases_are_present(dataset):
    coco = _coco(dataset, "train")
    anns = coco["annotations"]
    assert any(a["iscrowd"] == 1 for a in anns)
    assert any(a["bbox"][2] == 0 or a["bbox"][3] == 0 for a in anns)
    annotated = {a["image_id"] for a in anns}
    assert any(im["id"] not in annotated for im in coco["images"])
    # and most images do have an ordinary box to learn from
    ordinary = {a["image_id"] for a in anns if not a["iscrowd"] and a["bbox"][2] * a["bbox"][3]}
    assert len(ordinary) > 0.8 * len(coco["images"])


def test_boxes_lie_inside_their_image(dataset):
    tolerance = 0.011  # x, y, w, h are each rounded to 2 decimals
    for split in SPLITS:
        coco = _coco(dataset, split)
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert w >= 0 and h >= 0
            if ann["iscrowd"] or w == 0 or h == 0:
                continue
            assert x >= 0 and y >= 0
            assert x + w <= width + tolerance
            assert y + h <= height + tolerance
            # the shape's own area fits its (rounded) box
            assert 0 < ann["area"] <= (w + tolerance) * (h + tolerance)


def test_generating_into_a_non_empty_folder_is_refused(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="busy"):
        generate(SynthSpec(train_images=1, val_images=1, image_size=32), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_generating_into_an_empty_folder_works(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    out = generate(SynthSpec(train_images=1, val_images=1, image_size=32), target)
    assert out == target
    assert (target / "annotations" / "instances_val2017.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no staging folder left


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    real = synth._draw_image
    calls = {"n": 0}

    def draw_then_fail(rng, short_side):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("disk on fire")
        return real(rng, short_side)

    monkeypatch.setattr(synth, "_draw_image", draw_then_fail)
    target = tmp_path / "cache" / "coco"
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(SynthSpec(train_images=3, val_images=3, image_size=32), target)
    assert calls["n"] == 5  # it did fail midway, in the val split
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written staging folder


def test_cached_generates_once_then_reuses(tmp_path, monkeypatch):
    spec = SynthSpec(seed=2, train_images=2, val_images=1, image_size=32)
    first = cached(spec, tmp_path)
    assert first.parent == tmp_path
    assert (first / "annotations" / "instances_train2017.json").is_file()
    before = _tree(first)
    stamp = (first / "annotations" / "instances_val2017.json").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached() regenerated an existing dataset")

    monkeypatch.setattr(synth, "generate", must_not_run)
    assert cached(spec, tmp_path) == first
    assert _tree(first) == before
    assert (first / "annotations" / "instances_val2017.json").stat().st_mtime_ns == stamp


def test_cached_keeps_different_specs_apart(tmp_path):
    a = cached(SynthSpec(seed=0, train_images=1, val_images=1, image_size=32), tmp_path)
    b = cached(SynthSpec(seed=0, train_images=2, val_images=1, image_size=32), tmp_path)
    assert a != b
    assert len(_coco(a, "train")["images"]) == 1
    assert len(_coco(b, "train")["images"]) == 2


def test_cached_retries_after_a_failed_generation(tmp_path, monkeypatch):
    spec = SynthSpec(seed=3, train_images=2, val_images=1, image_size=32)

    def fail(rng, short_side):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(synth, "_draw_image", fail)
        with pytest.raises(RuntimeError):
            cached(spec, tmp_path)
    assert list(tmp_path.iterdir()) == []
    out = cached(spec, tmp_path)
    assert len(_coco(out, "train")["images"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"image_size": 16}, "16"), ({"train_images": 0}, "train"), ({"val_images": 0}, "val")],
)
def test_bad_spec_is_refused(kwargs, word):
    with pytest.raises(UserError, match=word):
        SynthSpec(**kwargs)
