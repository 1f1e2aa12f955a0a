"""Files written so that nothing half-written ever has the name, and JSON read with one clear
error. The lowest layer: imports nothing of the package but its errors."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, default=jsonable) + "\n" for record in records)


def write_json_atomic(path: Path, data: dict) -> None:
    """JSON, written atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=jsonable) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through `atomic_file`: readers never see half a file."""
    with atomic_file(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", durable: bool = False) -> Iterator[IO]:
    """A temporary file beside `path` (its name in `.name`), renamed onto `path` when the block
    ends and removed if it raises, so that nothing half-written ever has the name. `durable`:
    the bytes and the rename are on disk (fsync) before this returns, as a checkpoint's must be
    before a crash."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
