"""The generated dataset: layout, determinism, content and atomic, cached generation."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinaperf import cli
from retinaperf.data import coco, synth, synth_coco, synth_shapes
from retinaperf.data.synth import SynthSpec, cached, generate
from retinaperf.errors import UserError

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


def _annotations_with_image_sizes(root: Path) -> Iterator[tuple[dict, int, int]]:
    """Every annotation of both splits, with the width and height of its image."""
    for split in SPLITS:
        coco = _coco(root, split)
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for ann in coco["annotations"]:
            yield (ann, *sizes[ann["image_id"]])


def test_boxes_lie_inside_their_image(dataset):
    tolerance = 0.011  # x, y, w, h are each rounded to 2 decimals
    for ann, width, height in _annotations_with_image_sizes(dataset):
        x, y, w, h = ann["bbox"]
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
    real = synth.draw_image
    calls = {"n": 0}

    def draw_then_fail(rng, short_side):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("disk on fire")
        return real(rng, short_side)

    monkeypatch.setattr(synth, "draw_image", draw_then_fail)
    target = tmp_path / "cache" / "coco"
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(SynthSpec(train_images=3, val_images=3, image_size=32), target)
    assert calls["n"] == 5  # it did fail midway, in the val split
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written staging folder


def test_cached_generates_once_then_reuses(tmp_path, monkeypatch, capsys):
    spec = SynthSpec(seed=2, train_images=2, val_images=1, image_size=32)
    first = cached(spec, tmp_path)
    assert first.parent == tmp_path
    # one line says what is being generated, where, before it starts; none when reused
    (line,) = capsys.readouterr().out.splitlines()
    assert "generating the shapes dataset (2 training + 1 validation images, 32 px" in line
    assert line.endswith(f"into {first}; later runs reuse it")
    assert (first / "annotations" / "instances_train2017.json").is_file()
    before = _tree(first)
    stamp = (first / "annotations" / "instances_val2017.json").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached() regenerated an existing dataset")

    monkeypatch.setattr(synth, "generate", must_not_run)
    assert cached(spec, tmp_path) == first
    assert capsys.readouterr().out == ""
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
        patch.setattr(synth, "draw_image", fail)
        with pytest.raises(RuntimeError):
            cached(spec, tmp_path)
    assert list(tmp_path.iterdir()) == []
    out = cached(spec, tmp_path)
    assert len(_coco(out, "train")["images"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"image_size": 16}, "16"),
        ({"image_size": 16, "profile": "coco"}, "16"),
        ({"train_images": 0}, "train"),
        ({"val_images": 0}, "val"),
        ({"seed": -1}, "seed -1"),
    ],
)
def test_bad_spec_is_refused(kwargs, word):
    with pytest.raises(UserError, match=word):
        SynthSpec(**kwargs)


# The coco profile: COCO2017's statistics, for throughput runs.

COCO_SPEC = SynthSpec(seed=0, train_images=200, val_images=50, image_size=640, profile="coco")
# COCO2017's 80 category ids, as the COCO API lists them.
COCO_IDS = {
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
}  # fmt: skip


@pytest.fixture(scope="module")
def coco_sample(tmp_path_factory) -> Path:
    return generate(COCO_SPEC, tmp_path_factory.mktemp("synth") / "coco", workers=2)


def _all(root: Path, key: str) -> list[dict]:
    return [item for split in SPLITS for item in _coco(root, split)[key]]


def test_coco_profile_image_sizes_and_aspect_ratios_follow_coco(coco_sample):
    images = _all(coco_sample, "images")
    long_sides = [max(im["width"], im["height"]) for im in images]
    assert max(long_sides) == 640
    assert sum(side == 640 for side in long_sides) >= 0.85 * len(images)
    assert min(long_sides) < 640  # a few smaller images, as in COCO
    landscape = sum(im["width"] > im["height"] for im in images) / len(images)
    portrait = sum(im["width"] < im["height"] for im in images) / len(images)
    square = sum(im["width"] == im["height"] for im in images) / len(images)
    assert 0.57 < landscape < 0.77
    assert 0.17 < portrait < 0.35
    assert 0 < square < 0.1
    ratios = {round(im["width"] / im["height"], 2) for im in images}
    assert {1.33, 1.5, 0.75} <= ratios  # 4:3, 3:2 and 3:4 at least
    for split in SPLITS:
        for im in _coco(coco_sample, split)["images"]:
            with Image.open(coco_sample / f"{split}2017" / im["file_name"]) as picture:
                assert picture.size == (im["width"], im["height"])


def test_coco_profile_objects_per_image_follow_coco(coco_sample):
    per_image = dict.fromkeys((im["id"] for im in _all(coco_sample, "images")), 0)
    for ann in _all(coco_sample, "annotations"):
        per_image[ann["image_id"]] += 1
    counts = np.array(list(per_image.values()))
    assert 5.7 < counts.mean() < 8.9  # COCO: 7.3 (+- 3 standard errors of 250 images)
    assert 3 <= np.median(counts) <= 5  # COCO: 4
    assert counts.max() > 30  # a long tail
    # The tail and the empty images are too rare for 250 images: check the distribution itself.
    many = synth_coco._object_counts(np.random.default_rng(0), 200_000)
    assert 7.2 < many.mean() < 7.4
    assert np.median(many) == 4
    assert 0.008 < (many == 0).mean() < 0.012
    assert 0.001 < (many > 50).mean() < 0.01
    assert many.max() == 93  # capped at COCO's maximum


def test_coco_profile_box_areas_follow_coco(coco_sample):
    anns = [a for a in _all(coco_sample, "annotations") if not a["iscrowd"]]
    areas = np.array([a["area"] for a in anns])
    small = (areas < 32**2).mean()
    medium = ((areas >= 32**2) & (areas < 96**2)).mean()
    large = (areas >= 96**2).mean()
    assert abs(small - 0.41) < 0.05
    assert abs(medium - 0.34) < 0.05
    assert abs(large - 0.24) < 0.05


def test_coco_profile_boxes_fit_their_area_and_image(coco_sample):
    tolerance = 0.011  # x, y, w, h are each rounded to 2 decimals
    touching = 0
    for ann, width, height in _annotations_with_image_sizes(coco_sample):
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0
        assert x + w <= width + tolerance and y + h <= height + tolerance
        # `area` is the outline's, which its bounding box holds
        assert 0 < ann["area"] <= (w + tolerance) * (h + tolerance)
        assert len(ann["segmentation"][0]) >= 6
        touching += x == 0 or y == 0 or x + w >= width - 0.01 or y + h >= height - 0.01
    assert touching > 0  # objects cut by the image border, as in COCO


def test_coco_profile_categories_and_crowds_follow_coco(coco_sample):
    coco = _coco(coco_sample, "val")
    assert {c["id"] for c in coco["categories"]} == COCO_IDS
    names = {c["id"]: (c["name"], c["supercategory"]) for c in coco["categories"]}
    assert names[1] == ("person", "person")
    assert names[90] == ("toothbrush", "indoor")
    anns = _all(coco_sample, "annotations")
    frequency = Counter(a["category_id"] for a in anns)
    assert set(frequency) <= COCO_IDS
    assert frequency.most_common(1)[0][0] == 1  # person
    assert 0.22 < frequency[1] / len(anns) < 0.38
    assert len(frequency) > 40  # the long tail is drawn too
    crowd = sum(a["iscrowd"] for a in anns) / len(anns)
    assert 0.002 < crowd < 0.025  # COCO: ~1 %


def test_coco_profile_jpeg_sizes_are_in_coco_range(coco_sample):
    sizes = [
        (coco_sample / f"{split}2017" / im["file_name"]).stat().st_size
        for split in SPLITS
        for im in _coco(coco_sample, split)["images"]
        if (im["width"], im["height"]) == (640, 480)
    ]
    assert len(sizes) > 50
    assert 135_000 < np.mean(sizes) < 190_000  # COCO: ~160 KB at 640x480


def test_load_split_reads_a_coco_profile_dataset(coco_sample):
    records, _ = coco.load_split(coco_sample, "val", drop_empty=False)
    assert len(records) == COCO_SPEC.val_images
    train, _ = coco.load_split(coco_sample, "train", drop_empty=True)
    assert 0.95 * COCO_SPEC.train_images <= len(train) <= COCO_SPEC.train_images
    for record in records + train:
        boxes = record.boxes
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= record.width).all() and (boxes[:, 3] <= record.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert set(record.labels.tolist()) <= COCO_IDS


@pytest.mark.parametrize(
    "spec",
    [
        SynthSpec(seed=1, train_images=10, val_images=4, image_size=48),
        SynthSpec(seed=1, train_images=10, val_images=4, image_size=128, profile="coco"),
    ],
    ids=["shapes", "coco"],
)
def test_the_number_of_workers_does_not_change_the_output(spec, tmp_path):
    one = _tree(generate(spec, tmp_path / "one", workers=1))
    two = _tree(generate(spec, tmp_path / "two", workers=2))
    assert one.keys() == two.keys()
    assert one == two


def test_a_failure_in_a_drawing_process_leaves_nothing(tmp_path):
    spec = SynthSpec(seed=0, train_images=6, val_images=2, image_size=32)
    # A seed numpy refuses, smuggled past the check: every image fails, in the worker processes.
    object.__setattr__(spec, "seed", -1)
    with pytest.raises(ValueError):
        generate(spec, tmp_path / "cache" / "coco", workers=2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_shapes_cache_key_is_the_one_from_before_profiles():
    # The formula of the keys before profiles existed: asdict of the four other fields + version.
    fields = {"seed": 0, "train_images": 512, "val_images": 96, "image_size": 128}
    text = json.dumps({**fields, "version": synth_shapes.GENERATOR_VERSION}, sort_keys=True)
    assert SynthSpec().cache_key() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert SynthSpec().image_size == 128


def test_image_size_zero_is_the_profile_default():
    assert SynthSpec(image_size=0) == SynthSpec(image_size=128)
    coco = SynthSpec(profile="coco")
    assert coco.image_size == 640
    assert coco.cache_key() == SynthSpec(image_size=640, profile="coco").cache_key()
    assert coco.cache_key() != SynthSpec(image_size=640).cache_key()


def test_coco_profile_scales_with_image_size(tmp_path):
    root = generate(
        SynthSpec(train_images=12, val_images=2, image_size=64, profile="coco"), tmp_path
    )
    images = _all(root, "images")
    assert all(max(im["width"], im["height"]) <= 64 for im in images)
    assert sum(max(im["width"], im["height"]) == 64 for im in images) >= 10
    for ann in _all(root, "annotations"):
        assert ann["area"] < 64 * 64


@pytest.mark.parametrize("bad", ["cocoa", "", "COCO"])
def test_an_unknown_profile_is_refused(bad):
    with pytest.raises(UserError) as refused:
        SynthSpec(profile=bad)
    assert repr(bad) in str(refused.value)
    assert "shapes, coco" in str(refused.value)


@pytest.mark.parametrize(("workers", "word"), [(0, "--workers 0"), (-2, "--workers -2")])
def test_a_bad_number_of_workers_is_refused(workers, word, tmp_path):
    with pytest.raises(UserError, match=word):
        generate(SynthSpec(train_images=1, val_images=1, image_size=32), tmp_path, workers)


@pytest.mark.parametrize(
    ("flags", "workers"), [([], synth.default_workers()), (["--workers", "1"], 1)]
)
def test_cli_synth_writes_a_coco_profile_dataset(flags, workers, tmp_path, monkeypatch, capsys):
    calls = []
    real = synth.generate

    def record(spec, out, workers=1):
        calls.append((spec, workers))
        return real(spec, out, workers)

    monkeypatch.setattr(synth, "generate", record)
    out = tmp_path / "ds"
    args = ["synth", "--out", str(out), "--profile", "coco", "--train-images", "3"]
    assert cli.main([*args, "--val-images", "2", *flags]) == 0
    [(spec, used)] = calls
    assert (spec.profile, spec.image_size, used) == ("coco", 640, workers)  # coco's default size
    assert "coco, 640 px" in capsys.readouterr().out
    assert len(list((out / "train2017").iterdir())) == 3
    assert {c["id"] for c in _coco(out, "train")["categories"]} == COCO_IDS
    assert all(max(im["width"], im["height"]) <= 640 for im in _all(out, "images"))


def test_run_synthetic_trains_on_a_dataset_synth_wrote(tiny_run_args, tmp_path, capsys):
    """`synth --profile coco --out D`, then `run --preset A100-1x1 --synthetic --data-dir D` (the
    README's way to a throughput run on a dataset written beforehand), shrunk for a CPU: the
    throughput mode on D, with no download; D with another `info` is refused in one line."""
    from cli_helpers import run_cli  # imports the trainer: only where a run is wanted

    data = tmp_path / "synth"
    synth_args = ["synth", "--out", str(data), "--profile", "coco", "--image-size", "64"]
    counts = ["--train-images", "6", "--val-images", "2", "--workers", "1"]
    assert cli.main([*synth_args, *counts]) == 0
    out = tmp_path / "run"
    args = tiny_run_args(data, out, "--preset", "A100-1x1", "--synthetic", monitor_interval=0)
    assert run_cli(args) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert m["dataset"] == str(data) and (m["train_images"], m["val_images"]) == (6, 2)
    assert m["throughput_only"] is True and m["steps"] == 2
    assert m["backbone_init"].startswith("random values in the pretrained structure")
    assert results["config"]["model"]["backbone_weights"] == "random"

    annotations = data / "annotations" / "instances_val2017.json"
    content = json.loads(annotations.read_text())
    annotations.write_text(json.dumps({**content, "info": {"description": "COCO 2017 Dataset"}}))
    capsys.readouterr()
    assert run_cli(tiny_run_args(data, tmp_path / "refused", "--synthetic")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a dataset `retinaperf synth` wrote" in err
    assert not (tmp_path / "refused").exists()
