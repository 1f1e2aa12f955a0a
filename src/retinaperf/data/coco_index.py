"""A COCO instances file as a compact, validated index: numpy columns, cached on disk.

COCO2017's train annotation file is ~300 MB of JSON, most of it polygon segmentations the
benchmark never reads. Loading it with `json.load` takes tens of seconds and gigabytes of Python
objects, on every rank. This module reads only what training uses, into numpy columns:

- per image, in the file's order: `image_ids`, `file_names`, `widths`, `heights`;
- per annotation, in the file's order: `ann_images` (the index of its image in those columns),
  `ann_categories`, `ann_boxes` (COCO's x, y, width, height, float32 as training uses them) and
  `ann_crowd`.

Reading (`build`): msgspec decodes the file against typed structs, so the fields the index does
not keep (segmentations, areas, URLs) are skipped without being allocated. A first pass decodes the
images and categories and leaves the annotation list as raw bytes; the list is then decoded in
pieces of a few MB, cut before a `}, {` between two annotations, so that only one piece's Python
objects are alive at a time: the peak is the file's bytes plus the columns, not millions of
objects. A cut inside a string or a nested value would make a piece fail to decode (a piece that
starts at an annotation decodes only if it also ends at one); any failure decodes the whole list at
once, which gives the real error with its position, or the list if the cut was merely unlucky.

Every check the JSON loader before this index made is made on a build: each annotation, crowd or
not, names a listed image and a listed category within COCO's ids 1..90 and has a box of no
negative size; image ids are unique; a field that is missing or of the wrong type, or JSON that
is not JSON, is refused in a `UserError` naming the file and the entry. The image files are not
part of the index: `data` checks them whenever it makes records of an index, cached or not.

Cache (`cached`): one `.npz` per annotation file under `<cache_dir>/coco-index/`, named after the
file and a hash of its absolute path, written atomically (a reader never sees half a file). It
holds the columns and its key: the format version, the file's absolute path, size and
modification time in nanoseconds. A cache whose key differs from the file's (the file was
changed or replaced, or an older format), or that cannot be read or is inconsistent (truncated,
corrupt, edited), is rebuilt from the file and replaced, never trusted. (A file rewritten at the
same size within one tick of the file system's clock, a few milliseconds, keeps its key: no
download or edit does that.) Arrays are loaded without pickle: a cache folder shared with others
cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import msgspec
import numpy as np

from retinaperf.errors import UserError
from retinaperf.files import atomic_file, json_error

# COCO category ids are the model's labels as they are (model.network.NUM_CLASSES = 91, 0 the
# background): an annotation's category must be one of 1..90.
CATEGORY_IDS = range(1, 91)
# Bump when the columns, their meaning or the checks of a build change: older caches are rebuilt.
FORMAT_VERSION = 1
# Bytes of annotation JSON decoded at a time: large enough that the Python work per piece is
# amortised, small enough that a piece's objects (~3x its bytes) stay a small share of the peak.
PIECE_BYTES = 4 << 20
# Between two annotations of the list: the end of one object, a comma, the start of the next.
_BETWEEN = re.compile(rb"\}\s*,\s*\{")
# What to do with an annotation file that is not JSON: it was cut short or damaged in transfer.
REEXTRACT = "re-extract the file"


# The fields the index reads; msgspec skips every other field without allocating it. gc=False:
# these hold no reference cycles, and the collector need not track a million of them.
class _Image(msgspec.Struct, gc=False):
    id: int
    file_name: str
    width: int
    height: int


class _Category(msgspec.Struct, gc=False):
    id: int


class _Annotation(msgspec.Struct, gc=False):
    image_id: int
    bbox: tuple[int | float, int | float, int | float, int | float]  # as written, for messages
    category_id: int
    iscrowd: int | bool | None = 0
    id: int | None = None


class _Layout(msgspec.Struct):
    """The first pass: the annotation list left as the file's bytes (zero-copy)."""

    images: list[_Image]
    annotations: msgspec.Raw
    categories: list[_Category]


class _Instances(msgspec.Struct):
    images: list[_Image]
    annotations: list[_Annotation]
    categories: list[_Category]


# strict=False: numbers written as strings or integral floats are read as the old json-based
# loader's int() and float() read them.
_LAYOUT = msgspec.json.Decoder(_Layout, strict=False)
_INSTANCES = msgspec.json.Decoder(_Instances, strict=False)
_PIECE = msgspec.json.Decoder(list[_Annotation], strict=False)


@dataclass(frozen=True)
class CocoIndex:
    """The columns of one annotation file (see the module docstring); rows in the file's order."""

    image_ids: np.ndarray  # int64 [I]
    file_names: list[str]  # [I]
    widths: np.ndarray  # int64 [I]
    heights: np.ndarray  # int64 [I]
    ann_images: np.ndarray  # int32 [A], into the image columns
    ann_categories: np.ndarray  # int32 [A]
    ann_boxes: np.ndarray  # float32 [A, 4], x, y, width, height
    ann_crowd: np.ndarray  # bool [A]


def build(path: Path) -> CocoIndex:
    """The index of the instances file at `path`, read and checked (see the module docstring)."""
    content = _map(path)
    layout = _decode(_LAYOUT, content, path)
    columns = _Columns(path, layout.images, layout.categories)
    raw = layout.annotations
    del layout  # the image structs: the columns hold what they said
    try:
        for piece in _pieces(memoryview(raw)):
            _drop_pages(content)
            columns.add(_PIECE.decode(piece))
    except msgspec.MsgspecError:
        whole = _decode(_INSTANCES, content, path)
        columns = _Columns(path, whole.images, whole.categories)
        columns.add(whole.annotations)
    return columns.finish()


def from_content(content: dict, path: Path) -> CocoIndex:
    """The index of an instances file already read whole (`data.coco.read_annotations`), with the
    same checks as `build`; `path` names the file in errors."""
    try:
        instances = msgspec.convert(content, _Instances, strict=False)
    except msgspec.ValidationError as err:
        raise _invalid(path, err) from None
    columns = _Columns(path, instances.images, instances.categories)
    columns.add(instances.annotations)
    return columns.finish()


def cached(path: Path, cache_dir: Path) -> CocoIndex:
    """The index of `path` from the cache under `cache_dir` when it matches the file, else built
    (`build`) and cached. A cache that cannot be written is a warning: the run goes on."""
    path = Path(path).absolute()
    key = _key(path)
    target = cache_path(path, cache_dir)
    index = _load(target, key)
    if index is not None:
        return index
    index = build(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target, "wb") as f:
            np.savez(f, key=np.array(key), **_arrays(index))
    except OSError as err:
        warnings.warn(
            f"data: cannot write the index cache {target} ({err.strerror}): every run reads "
            f"{path} again; set cache_dir (or $RETINAPERF_CACHE) to a writable folder",
            stacklevel=2,
        )
    return index


def cache_path(path: Path, cache_dir: Path) -> Path:
    """Where the index of the annotation file `path` is cached: one file per absolute path."""
    path = Path(path).absolute()
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return Path(cache_dir) / "coco-index" / f"{path.stem}-{digest}.npz"


def _map(path: Path) -> mmap.mmap | bytes:
    """The file's bytes, mapped: the pages already decoded can be given back (`_drop_pages`),
    and nothing is copied. (A file truncated by another process while it is read ends the
    process with SIGBUS, where reading it would give a JSON error: COCO's files do not change.)"""
    try:
        with open(path, "rb") as f:
            try:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # ValueError: an empty file; OSError: a file system
                return f.read()  # that cannot map files
    except OSError as err:
        raise json_error(path, "data", err) from None


def _drop_pages(content: mmap.mmap | bytes) -> None:
    """Unmap the file's pages from this process: they stay in the page cache, and those of the
    next piece come back on access. Without it, the resident set keeps every page ever read, and
    the decoding of the pieces ends holding the whole file a second time beside the columns."""
    if isinstance(content, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        content.madvise(mmap.MADV_DONTNEED)


def _decode(decoder: msgspec.json.Decoder, content: mmap.mmap | bytes, path: Path) -> Any:
    try:
        return decoder.decode(content)
    except msgspec.ValidationError as err:
        raise _invalid(path, err) from None
    except msgspec.DecodeError as err:
        # msgspec's stub makes DecodeError a plain Exception; it is a ValueError at run time.
        raise json_error(path, "data", err, if_invalid=REEXTRACT) from None  # type: ignore[arg-type]


def _invalid(path: Path, err: msgspec.ValidationError) -> UserError:
    return UserError(
        f"data: {path} is not a COCO instances file as the benchmark reads it ({err}): fix that "
        "entry or use the file as COCO distributes it"
    )


def _pieces(body: memoryview) -> Iterator[bytes]:
    """The JSON array `body` (`[...]`) as arrays of consecutive elements of about PIECE_BYTES,
    each cut before a `}, {` (see the module docstring for why a wrong cut cannot pass)."""
    if (
        body[:1].tobytes() != b"["
    ):  # not an array: decoded as one, it fails, and the whole file says why
        yield bytes(body)
        return
    inner, start = body[1:-1], 0
    while True:
        found = (
            _BETWEEN.search(inner, start + PIECE_BYTES)
            if start + PIECE_BYTES < len(inner)
            else None
        )
        end = found.start() + 1 if found else len(inner)
        yield b"".join((b"[", inner[start:end], b"]"))
        if not found:
            return
        start = found.end() - 1


class _Columns:
    """Annotations checked and turned into columns, one decoded piece at a time."""

    def __init__(self, path: Path, images: list[_Image], categories: list[_Category]) -> None:
        self.path = path
        self.image_ids = np.fromiter((im.id for im in images), np.int64, len(images))
        self.file_names = [im.file_name for im in images]
        self.widths = np.fromiter((im.width for im in images), np.int64, len(images))
        self.heights = np.fromiter((im.height for im in images), np.int64, len(images))
        # Annotations name images by id: a sorted copy finds their row by binary search.
        self.order = np.argsort(self.image_ids, kind="stable")
        self.sorted_ids = self.image_ids[self.order]
        twice = np.flatnonzero(self.sorted_ids[1:] == self.sorted_ids[:-1])
        if len(twice):
            raise UserError(
                f"data: {path}: image {self.sorted_ids[twice[0]]} is listed more than once in "
                "'images': list each image once"
            )
        self.categories = np.unique(
            np.fromiter((c.id for c in categories), np.int64, len(categories))
        )
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, annotations: list[_Annotation]) -> None:
        count = len(annotations)
        image_ids = np.fromiter((a.image_id for a in annotations), np.int64, count)
        categories = np.fromiter((a.category_id for a in annotations), np.int64, count)
        boxes = np.array([a.bbox for a in annotations], np.float64).reshape(count, 4)
        crowd = np.fromiter((a.iscrowd for a in annotations), bool, count)
        found = np.minimum(np.searchsorted(self.sorted_ids, image_ids), len(self.sorted_ids) - 1)
        known = (
            self.sorted_ids[found] == image_ids if len(self.sorted_ids) else np.zeros(count, bool)
        )
        # Checked like the others (a broken box is a broken file either way), crowd boxes too.
        problems = (
            ~known,
            (boxes[:, 2] < 0) | (boxes[:, 3] < 0),
            ~np.isin(categories, self.categories),
            (categories < CATEGORY_IDS[0]) | (categories > CATEGORY_IDS[-1]),
        )
        bad = np.logical_or.reduce(problems)
        if bad.any():
            first = int(np.argmax(bad))
            kind = next(k for k, problem in enumerate(problems) if problem[first])
            raise UserError(self._message(annotations[first], kind))
        self.parts.append(
            (
                self.order[found].astype(np.int32),
                categories.astype(np.int32),
                boxes.astype(np.float32),
                crowd,
            )
        )

    def _message(self, ann: _Annotation, kind: int) -> str:
        where = f"data: {self.path}: annotation {ann.id}"
        if kind == 0:
            return f"{where} refers to image {ann.image_id}, which is not in 'images'"
        if kind == 1:
            # A box of zero width or height is allowed (COCO has some; it is dropped from the
            # targets), a negative one is not: no clamping makes sense of it.
            return (
                f"{where} has a negative width or height (bbox {list(ann.bbox)}): fix or remove it"
            )
        if kind == 2:
            return (
                f"{where} has category_id {ann.category_id}, which is not in 'categories': fix "
                "the annotation or add its category"
            )
        return (
            f"{where} has category_id {ann.category_id}, outside {CATEGORY_IDS[0]}.."
            f"{CATEGORY_IDS[-1]}, the ids the model's 91 classes hold (COCO's): number the "
            "categories as COCO does"
        )

    def finish(self) -> CocoIndex:
        # `add` ran at least once (an empty list is one empty piece).
        images, categories, boxes, crowd = (
            np.concatenate(part) for part in zip(*self.parts, strict=True)
        )
        return CocoIndex(
            self.image_ids,
            self.file_names,
            self.widths,
            self.heights,
            images,
            categories,
            boxes,
            crowd,
        )


def _key(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError as err:
        raise json_error(path, "data", err) from None
    return json.dumps(
        {
            "format": FORMAT_VERSION,
            "path": str(path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
    )


# The columns as the cache stores them: file names as their UTF-8 bytes, end to end.
_ARRAYS = {
    "image_ids": (np.int64, 1),
    "widths": (np.int64, 1),
    "heights": (np.int64, 1),
    "name_bytes": (np.uint8, 1),
    "name_ends": (np.int64, 1),
    "ann_images": (np.int32, 1),
    "ann_categories": (np.int32, 1),
    "ann_boxes": (np.float32, 2),
    "ann_crowd": (np.bool_, 1),
}


class _CacheArrays(TypedDict):
    """The arrays of a cached index, by their names in the .npz file (beside its `key`)."""

    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    name_bytes: np.ndarray
    name_ends: np.ndarray
    ann_images: np.ndarray
    ann_categories: np.ndarray
    ann_boxes: np.ndarray
    ann_crowd: np.ndarray


def _arrays(index: CocoIndex) -> _CacheArrays:
    # surrogatepass: a JSON string may hold a lone surrogate (\ud800); it round-trips.
    encoded = [name.encode("utf-8", "surrogatepass") for name in index.file_names]
    return {
        "image_ids": index.image_ids,
        "widths": index.widths,
        "heights": index.heights,
        "name_bytes": np.frombuffer(b"".join(encoded), np.uint8),
        "name_ends": np.cumsum([len(e) for e in encoded], dtype=np.int64),
        "ann_images": index.ann_images,
        "ann_categories": index.ann_categories,
        "ann_boxes": index.ann_boxes,
        "ann_crowd": index.ann_crowd,
    }


def _load(target: Path, key: str) -> CocoIndex | None:
    """The cached index at `target` if its key is `key` and its arrays are whole and consistent;
    None otherwise (missing, stale, unreadable or corrupt: the caller rebuilds it)."""
    if not target.is_file():
        return None
    try:
        with np.load(target, allow_pickle=False) as stored:
            if stored["key"].shape != () or str(stored["key"]) != key:
                return None
            arrays = {name: stored[name] for name in _ARRAYS}
    except Exception:
        # Whatever a damaged file raises (zipfile's CRC check, numpy's header parser, a .npy
        # where an archive should be, a byte that names no compression method): it is rebuilt.
        return None
    for name, (dtype, ndim) in _ARRAYS.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != ndim:
            return None
    images, annotations = len(arrays["image_ids"]), len(arrays["ann_images"])
    ends = arrays["name_ends"]
    consistent = (
        all(len(arrays[n]) == images for n in ("widths", "heights", "name_ends"))
        and all(len(arrays[n]) == annotations for n in ("ann_categories", "ann_crowd"))
        and arrays["ann_boxes"].shape == (annotations, 4)
        and bool(np.all((arrays["ann_images"] >= 0) & (arrays["ann_images"] < images)))
        and bool(np.all(np.diff(ends, prepend=0) >= 0))
        and (ends[-1] if images else 0) == len(arrays["name_bytes"])
    )
    if not consistent:
        return None
    blob = arrays["name_bytes"].tobytes()
    try:
        names = [
            blob[start:end].decode("utf-8", "surrogatepass")
            for start, end in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)
        ]
    except UnicodeDecodeError:
        return None
    return CocoIndex(
        arrays["image_ids"],
        names,
        arrays["widths"],
        arrays["heights"],
        arrays["ann_images"],
        arrays["ann_categories"],
        arrays["ann_boxes"],
        arrays["ann_crowd"],
    )
