"""Indexing COCO2017 at full size: time and host memory from the command's start to training.

Generates (once, cached under the system's temporary folder) an annotation file of COCO2017-train's
size: 118,287 images, 860,001 annotations with polygon segmentations (crowd regions as RLE), about
300 MB like the real file, and a val split of val2017's size (5,000 images, 36,781 annotations);
every image is a hard link to one tiny real JPEG of its size. Then runs `retinaperf run` on it in
fresh processes, stopped when training would start: once with an empty cache (the index is built
from the JSON file) and once more (the index is loaded from the cache), and once on a tiny dataset
for the baseline memory (torch, the model and the rest of a run, without COCO's annotations).

Goals (issue 15): from the command's start to training (`init_time`, as results.json defines it)
at most 10 s, and at most 0.4 GiB of host memory above the model's (peak resident set at the start
of training, less the tiny run's), cold and warm; every other rank of a node loads the index
as the warm run does. Each is a Comparison of the budget against the measurement: ratio =
budget / measured, met when ≥ 1. The notes add how long the data set-up took, how much indexing
alone raised the resident set, and what `json.load` alone cost the loader before the index.

    .venv/bin/python benchmarks/bench_index.py [--repeats 2] [--skip-old]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import msgspec
import numpy as np
from PIL import Image

from common import Comparison, print_comparisons
from retinaperf.data import synth, synth_coco

SEED = 0
TRAIN_IMAGES, TRAIN_ANNOTATIONS = 118_287, 860_001  # COCO2017 train
VAL_IMAGES, VAL_ANNOTATIONS = 5_000, 36_781  # COCO2017 val
# Bump when the generated files change, so that a cached copy of an older generator is not used.
GENERATOR_VERSION = 1
INIT_BUDGET_S = 10.0
MEMORY_BUDGET_GIB = 0.4
GIB = 2**30
P_EMPTY = 0.009  # COCO2017 train: 1,021 of its images have no annotation
P_CROWD = 0.01
P_DEGENERATE = 0.0005  # a few boxes of zero width or height, as COCO has
CHUNK = 20_000  # annotations encoded at a time: bounds the generator's memory


def dataset(cache: Path) -> Path:
    """The generated COCO2017-sized dataset under `cache`, generated on first use."""
    root = cache / f"coco-v{GENERATOR_VERSION}-seed{SEED}"
    if (root / "annotations" / "instances_val2017.json").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".coco.", dir=cache))
    try:
        rng = np.random.default_rng(SEED)
        (staging / "annotations").mkdir()
        first_id = 1
        for split, images, annotations in (
            ("train", TRAIN_IMAGES, TRAIN_ANNOTATIONS),
            ("val", VAL_IMAGES, VAL_ANNOTATIONS),
        ):
            _write_split(rng, staging, split, images, annotations, first_id)
            first_id += images
        os.replace(staging, root)
        # Flushed now: the runs measured next would otherwise share the disk with the writeback
        # of ~300 MB and 123k new inodes (it doubled their times here).
        os.sync()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _write_split(
    rng: np.random.Generator, root: Path, split: str, count: int, annotations: int, first_id: int
) -> None:
    folder = root / f"{split}2017"
    folder.mkdir()
    jpegs = root / f".jpegs-{split}"  # one tiny JPEG per image size, hard-linked for each image
    jpegs.mkdir()
    sizes = np.array([(w, h) for w, h, _ in synth_coco.COCO_IMAGE_SIZES])
    size_of = rng.choice(len(sizes), count, p=synth_coco.COCO_SIZE_SHARES)
    # COCO's image ids are sparse (up to 581,929) and its lists are in no particular order.
    ids = rng.permutation(first_id + np.sort(rng.choice(5 * count, count, replace=False)))
    images = []
    for image_id, size in zip(ids.tolist(), size_of.tolist(), strict=True):
        width, height = sizes[size].tolist()
        source = jpegs / f"{width}x{height}.jpg"
        if not source.exists():
            Image.new("RGB", (width, height), (120, 110, 100)).save(source, quality=50)
        name = f"{image_id:012d}.jpg"
        os.link(source, folder / name)
        images.append(
            {"license": 3, "file_name": name,
             "coco_url": f"http://images.cocodataset.org/{split}2017/{name}",
             "height": height, "width": width, "date_captured": "2013-11-14 11:18:45",
             "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg",
             "id": image_id}
        )  # fmt: skip
    owner = _owners(rng, count, annotations)
    with open(root / "annotations" / f"instances_{split}2017.json", "wb") as f:
        f.write(b'{"info":{"description":"retinaperf bench_index, COCO2017-sized"},"licenses":[],')
        f.write(b'"images":' + msgspec.json.encode(images) + b',"annotations":[')
        for start in range(0, annotations, CHUNK):
            chunk = owner[start : start + CHUNK]
            drawn = _annotations(rng, chunk, ids[chunk], sizes[size_of[chunk]], start + 1)
            f.write((b"," if start else b"") + msgspec.json.encode(drawn)[1:-1])
        categories = [
            {"id": i, "name": n, "supercategory": s} for i, n, s, _ in synth_coco.COCO_CATEGORIES
        ]
        f.write(b'],"categories":' + msgspec.json.encode(categories) + b"}")
    shutil.rmtree(jpegs)  # the links keep the files


def _owners(rng: np.random.Generator, count: int, annotations: int) -> np.ndarray:
    """The image (index) of each annotation: none for ~1 % of the images, at least one for the
    others, the rest over-dispersed (COCO's median is 4 objects, its mean 7.3), in random order."""
    used = np.flatnonzero(rng.random(count) >= P_EMPTY)
    weights = rng.gamma(0.6, size=len(used))
    rest = rng.choice(used, annotations - len(used), p=weights / weights.sum())
    return rng.permutation(np.concatenate([used, rest]))


def _annotations(
    rng: np.random.Generator,
    owner: np.ndarray,
    image_ids: np.ndarray,
    sizes: np.ndarray,
    first: int,
) -> list[dict]:
    """COCO annotations of the images `owner`: boxes of COCO's size statistics inside their image,
    a polygon of 4..26 points in each (an RLE for crowd regions), ids from `first` on."""
    n = len(owner)
    side = np.clip(
        rng.lognormal(np.log(synth_coco.AREA_SIDE_MEDIAN), synth_coco.AREA_SIDE_SIGMA, n), 2, 640
    )
    stretch = np.exp(np.clip(rng.normal(0, synth_coco.OBJECT_ASPECT_SIGMA, n), -1.6, 1.6) / 2)
    w = np.minimum(side * stretch, sizes[:, 0])
    h = np.minimum(side / stretch, sizes[:, 1])
    x = rng.uniform(0, 1, n) * (sizes[:, 0] - w)
    y = rng.uniform(0, 1, n) * (sizes[:, 1] - h)
    w[rng.random(n) < P_DEGENERATE] = 0
    crowd = rng.random(n) < P_CROWD
    category = rng.choice(synth_coco.COCO_IDS, n, p=synth_coco.COCO_WEIGHTS)
    points = rng.integers(4, 27, n)
    angles = rng.uniform(0, 2 * np.pi, points.sum())
    # A polygon on the ellipse inside each box, rounded as COCO's coordinates are.
    centre_x, centre_y = np.repeat(x + w / 2, points), np.repeat(y + h / 2, points)
    xs = np.round(centre_x + np.repeat(w / 2, points) * np.cos(angles), 2)
    ys = np.round(centre_y + np.repeat(h / 2, points) * np.sin(angles), 2)
    polygon = np.stack([xs, ys], axis=1).ravel().tolist()
    ends = np.cumsum(2 * points).tolist()
    boxes = np.round(np.stack([x, y, w, h], axis=1), 2).tolist()
    areas = np.round(w * h * 0.7, 2).tolist()
    drawn = []
    for i in range(n):
        if crowd[i]:
            counts = rng.integers(1, 400, int(rng.integers(50, 300))).tolist()
            segmentation = {"counts": counts, "size": sizes[i, ::-1].tolist()}
        else:
            segmentation = [polygon[ends[i] - 2 * points[i] : ends[i]]]
        drawn.append(
            {"segmentation": segmentation, "area": areas[i], "iscrowd": int(crowd[i]),
             "image_id": int(image_ids[i]), "bbox": boxes[i], "category_id": int(category[i]),
             "id": first + i}
        )  # fmt: skip
    return drawn


# Runs `retinaperf run` (its own CLI, with its own clock) and stops it where training would start,
# writing what it measured to $BENCH_INDEX_OUT: init_time as results.json defines it (the meter's
# training start less the command's start), the peak resident set then, and the resident set
# before `build.build_data` and its peak at the end of it (what indexing alone added).
DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    from retinaperf import cli  # first: its clock is the command's start, before torch
    import psutil
    from retinaperf.measure import memory
    from retinaperf.measure import meter
    from retinaperf.run import build

    peak = memory.peak_resident_bytes  # not ru_maxrss, which keeps the parent's at the fork

    found = {}
    build_data = build.build_data

    def measured(*args, **kwargs):
        found["rss_before_data"] = psutil.Process().memory_info().rss
        start = time.perf_counter()
        loaders = build_data(*args, **kwargs)
        found["data_s"] = time.perf_counter() - start
        found["peak_after_data"] = peak()
        return loaders

    def stop(meter):
        started(meter)
        found["init_time"] = meter.train_start - meter.command_start
        found["peak_at_training"] = peak()
        with open(os.environ["BENCH_INDEX_OUT"], "w") as f:
            json.dump(found, f)
        os._exit(0)

    build.build_data = measured
    started, meter.Meter.train_started = meter.Meter.train_started, stop
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def run_until_training(root: Path, out: Path, cache: Path) -> dict:
    """`retinaperf run` on `root` in a fresh process, stopped when training would start."""
    settings = {
        "throughput_only": "true",
        "max_steps": 1,
        "min_size": 64,
        "max_size": 86,
        "batch_size": 2,
        "num_workers": 0,
        "cache_dir": cache,
    }
    command = [sys.executable, "-c", DRIVER, "run", "--data-dir", str(root)]
    command += ["--output-dir", str(out), "--backbone-weights", "random"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    found = out.parent / f"{out.name}.json"
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "BENCH_INDEX_OUT": str(found)}
    )
    if done.returncode != 0 or not found.exists():
        raise RuntimeError(f"retinaperf run on {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(found.read_text())


OLD_PATH = textwrap.dedent(
    """
    import json, sys, time
    def peak_resident_bytes():  # memory.peak_resident_bytes, without importing torch
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
    before = peak_resident_bytes()
    start = time.perf_counter()
    with open(sys.argv[1], "rb") as f:
        json.load(f)
    seconds = time.perf_counter() - start
    print(seconds, peak_resident_bytes() - before)
    """
)


def old_path(path: Path) -> tuple[float, float]:
    """Seconds and peak bytes of `json.load` alone on `path` (what the old loader began with)."""
    done = subprocess.run(
        [sys.executable, "-c", OLD_PATH, str(path)], capture_output=True, text=True, check=True
    )
    seconds, peak = done.stdout.split()
    return float(seconds), float(peak)


def benchmark(repeats: int = 2, old: bool = True) -> list[Comparison]:
    root = dataset(Path(tempfile.gettempdir()) / "retinaperf-bench-index")
    train_file = root / "annotations" / "instances_train2017.json"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = synth.generate(
            synth.SynthSpec(seed=0, train_images=8, val_images=4, image_size=64), tmp / "tiny"
        )
        # The run on a tiny dataset holds what every run holds (torch, the model, its FLOP
        # count): the baseline of memory. First, so that the COCO runs find the libraries read.
        base = run_until_training(tiny, tmp / "tiny-run", tmp / "tiny-cache")
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        for repeat in range(repeats):
            cache = tmp / f"cache-{repeat}"  # empty: the first run builds the index
            for kind in ("cold", "warm"):
                runs[kind].append(run_until_training(root, tmp / f"{kind}-{repeat}", cache))
    old_s, old_peak = old_path(train_file) if old else (None, None)
    size = train_file.stat().st_size
    workload = (
        f"`retinaperf run` to training, COCO2017-sized train ({TRAIN_IMAGES:,} images, "
        f"{TRAIN_ANNOTATIONS:,} annotations, {size / 2**20:.0f} MiB JSON) and val"
    )
    comparisons = []
    for kind, how in (("cold", "index built from the JSON"), ("warm", "index from the cache")):
        best = min(runs[kind], key=lambda r: r["init_time"])
        peak = max(r["peak_at_training"] for r in runs[kind])
        above = peak - base["peak_at_training"]
        indexing = max(r["peak_after_data"] - r["rss_before_data"] for r in runs[kind])
        notes = (
            f"{how}: data set-up {best['data_s']:.2f} s of the init_time (best of {repeats}); "
            f"peak resident set at training {peak / GIB:.2f} GiB, the tiny dataset's "
            f"{base['peak_at_training'] / GIB:.2f} GiB (init {base['init_time']:.1f} s); "
            "indexing alone raised the resident set by at most "
            f"{indexing / GIB:.2f} GiB over what the process held before it"
        )
        if old_s is not None and kind == "cold":
            notes += (
                f"; before (json.load alone, fresh process): {old_s:.1f} s and "
                f"{old_peak / GIB:.2f} GiB"
            )
        comparisons += [
            Comparison(
                f"index {kind} init", workload, "budget (issue 15)", INIT_BUDGET_S, f"{kind} run",
                best["init_time"], "s", INIT_BUDGET_S / best["init_time"], 1.0, notes,
            ),
            Comparison(
                f"index {kind} memory", "peak host memory above the same run on a tiny dataset",
                "budget (issue 15)", MEMORY_BUDGET_GIB, f"{kind} run", above / GIB, "GiB",
                MEMORY_BUDGET_GIB / max(above / GIB, 1e-3), 1.0,
            ),
        ]  # fmt: skip
    return comparisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind (best kept)")
    parser.add_argument("--skip-old", action="store_true", help="do not time json.load")
    args = parser.parse_args()
    print_comparisons(benchmark(args.repeats, old=not args.skip_old))


if __name__ == "__main__":
    main()
