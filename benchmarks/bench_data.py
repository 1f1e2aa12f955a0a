"""Data loading: retinaperf's loader against torchvision's reference recipe, on COCO-sized photos.

retinaperf decodes to uint8 and leaves the float conversion to the model, on the device; the
reference pipeline (torchvision references/detection) converts to float32 in the workers. Both
read the same JPEG files through the same annotation index. Printed: images/s of each (one
process, no workers, so the numbers are the per-worker cost), the bytes each hands to the
host-to-device copy, and the ratios. Goals: retinaperf at least as fast, with 4x fewer bytes.

    .venv/bin/python benchmarks/bench_data.py [--images 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from common import Comparison, print_comparisons
from retinaperf.data.coco import CocoDetection, load_split

PHOTOS = Path(__file__).parent / "photos"
THREADS = torch.get_num_threads()


def make_dataset(root: Path, count: int) -> Path:
    """A COCO2017-layout train split of `count` photo files (copies of the sample photos)."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(count):
        source = photos[i % len(photos)]
        name = f"{i + 1:012d}.jpg"
        shutil.copyfile(source, root / "train2017" / name)
        width, height = Image.open(source).size
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [40, 30, 200, 150],
             "area": 30000.0, "iscrowd": 0}
        )  # fmt: skip
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(coco))
    return root


class ReferenceStyle(CocoDetection):
    """The same index and flip, but images converted to float32 in [0, 1] in the worker, as
    torchvision's references/detection do (PILToTensor + ConvertImageDtype(float))."""

    convert = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def __getitem__(self, key):
        image, target = super().__getitem__(key)
        return self.convert(image), target


def throughput(dataset: CocoDetection, repeats: int) -> tuple[float, int]:
    """Best images/s over `repeats` passes, and bytes of image data per image."""
    best, size = 0.0, 0
    for repeat in range(repeats):
        start = time.perf_counter()
        for index in range(len(dataset)):
            image, _ = dataset[(repeat, index)]
            size = image.numel() * image.element_size()
        best = max(best, len(dataset) / (time.perf_counter() - start))
    return best, size


def benchmark(images: int = 200, repeats: int = 3) -> list[Comparison]:
    torch.set_num_threads(1)  # one DataLoader worker's share
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_dataset(Path(tmp) / "coco", images)
            records, _ = load_split(root, "train", drop_empty=True)
            ours = CocoDetection(root, "train", records, hflip_prob=0.5, seed=0)
            reference = ReferenceStyle(root, "train", records, hflip_prob=0.5, seed=0)
            ref_rate, ref_bytes = throughput(reference, repeats)
            our_rate, our_bytes = throughput(ours, repeats)
    finally:
        torch.set_num_threads(THREADS)
    workload = f"decode + flip of {images} COCO-sized JPEGs, one worker"
    reference_name, ours_name = "float32 in workers (torchvision references)", "retinaperf uint8"
    return [
        Comparison(
            "data speed", workload, reference_name, ref_rate, ours_name, our_rate, "images/s",
            our_rate / ref_rate, 1.0,
        ),
        Comparison(
            "data bytes", "bytes per image handed to the host-to-device copy", reference_name,
            ref_bytes / 2**20, ours_name, our_bytes / 2**20, "MiB/image", ref_bytes / our_bytes,
            4.0,
        ),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_comparisons(benchmark(args.images, args.repeats))


if __name__ == "__main__":
    main()
