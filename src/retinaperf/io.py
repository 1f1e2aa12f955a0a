"""Files written so that nothing half-written ever has the name, JSON read with one clear error,
and the run directory's default name and emptiness. The lowest layer: imports nothing of the
package but its errors."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from retinaperf.errors import UserError

RUNS = Path("runs")
"""Where runs go when no output_dir is given."""


def read_json(
    path: Path,
    what: str,
    *,
    if_missing: str = "",
    if_invalid: str = "",
    decode: Callable[[bytes], Any] = json.loads,
) -> Any:
    """The JSON value in the file at `path`, or a one-line UserError (`json_error`) when it does
    not exist, cannot be read or is not JSON. `what` begins the message: who reads the file
    ("data", "report", "--resume"); `if_missing` and `if_invalid` say what to do then. `decode`
    parses the bytes: json.loads, or msgspec.json.decode where a file is large (COCO's)."""
    try:
        content = Path(path).read_bytes()
    except OSError as err:
        raise json_error(path, what, err, if_missing=if_missing) from None
    try:
        return decode(content)
    except ValueError as err:  # json's JSONDecodeError and UnicodeDecodeError; msgspec's errors
        raise json_error(path, what, err, if_invalid=if_invalid) from None


def json_error(
    path: Path,
    what: str,
    err: OSError | ValueError,
    *,
    if_missing: str = "",
    if_invalid: str = "",
) -> UserError:
    """`read_json`'s one line for `err`, which reading (an OSError) or parsing (a ValueError, whose
    words give the position) the JSON file `path` raised; for readers that read or parse a file
    their own way (coco_index maps it and decodes it into typed records)."""
    if isinstance(err, FileNotFoundError):
        return UserError(_then(f"{what}: {path} does not exist", if_missing))
    if isinstance(err, OSError):
        return UserError(f"{what}: cannot read {path}: {err.strerror or err}")
    return UserError(_then(f"{what}: {path} is not valid JSON ({err})", if_invalid))


def _then(problem: str, what_to_do: str) -> str:
    return f"{problem}: {what_to_do}" if what_to_do else problem


def timestamped_dir(parent: Path = RUNS) -> Path:
    """`parent/<YYYYmmdd-HHMMSS>`, this moment in local time: a run directory's default name."""
    return Path(parent) / time.strftime("%Y%m%d-%H%M%S")


def require_empty(folder: Path, what: str, what_to_do: str) -> None:
    """Refuse (one-line UserError starting with `what`, ending with `what_to_do`) a `folder` that
    exists and holds anything, or is not a folder: what it holds is never overwritten."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder: {what_to_do}")
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{what}: {folder} is not empty: {what_to_do}")


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
