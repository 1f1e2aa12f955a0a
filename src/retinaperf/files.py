"""Files written so that nothing half-written ever has the name, JSON read with one clear error,
and folders: a run directory's default name (created, never shared), its emptiness, and one
writer at a time. The lowest layer: imports nothing of the package but its errors."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import filelock

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


def new_timestamped_dir(parent: Path = RUNS) -> Path:
    """A new folder `parent/<YYYYmmdd-HHMMSS>` (this moment, local time), or `...-2`, `-3`... when
    that name is taken: created here, exclusively, so that runs started in the same second each
    get their own (checked, then created, two of them would share one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(parent).mkdir(parents=True, exist_ok=True)
    for suffix in ("", *(f"-{n}" for n in range(2, 10_000))):
        folder = Path(parent) / f"{stamp}{suffix}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise UserError(f"output: {parent} holds 10,000 runs named {stamp}: give --output-dir")


# What `FolderLock` keeps in a folder it guards: never a user's content.
LOCK = ".retinaperf.lock"
OWNER = ".retinaperf.owner.json"


def require_empty(folder: Path, what: str, what_to_do: str) -> None:
    """Refuse (one-line UserError starting with `what`, ending with `what_to_do`) a `folder` that
    exists and holds anything (but a `FolderLock`'s files), or is not a folder: what it holds is
    never overwritten."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder: {what_to_do}")
    if folder.exists() and any(p.name not in (LOCK, OWNER) for p in folder.iterdir()):
        raise UserError(f"{what}: {folder} is not empty: {what_to_do}")


class FolderLock:
    """One writer at a time in a folder: an OS file lock (flock) on a file in it, held while this
    process writes there. The OS releases it when the process ends, however it ends, so a killed
    run leaves no stale lock. Whoever holds it is recorded beside it (process, host, since), so
    that a refusal names it. `beside=True` puts both files next to the folder instead, for a
    folder that appears only at the end (a dataset renamed into place); `wait=True` waits for the
    holder instead of refusing."""

    def __init__(
        self, folder: Path, what: str, what_to_do: str, beside: bool = False, wait: bool = False
    ) -> None:
        folder = Path(folder)
        home, prefix = (folder.parent, f".{folder.name}") if beside else (folder, "")
        self.folder, self.what, self.what_to_do = folder, what, what_to_do
        self._beside = beside
        self._owner = home / f"{prefix}{OWNER}"
        # wait: until the holder releases it (work a second process must not repeat: a cache)
        self._lock = filelock.FileLock(home / f"{prefix}{LOCK}", timeout=-1 if wait else 0)

    def acquire(self) -> FolderLock:
        """Take the lock (creating the folder that holds it), or refuse in one line naming the
        process that has it."""
        try:
            self._owner.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        # Timeout first: it is an OSError too.
        except filelock.Timeout:
            raise UserError(
                f"{self.what}: {self.folder} is in use by {self._holder()}: {self.what_to_do}"
            ) from None
        except OSError as err:
            raise UserError(
                f"{self.what}: cannot write in {self.folder} ({err.strerror or err}): choose a "
                "folder this user can write in"
            ) from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        write_json_atomic(self._owner, owner)
        return self

    def release(self) -> None:
        self._lock.release()
        # In its folder, the lock's files stay: deleting a lock file another process has opened
        # would let a third lock a new file of the same name while the second holds the old one.
        # Beside a folder they go, not to litter the user's; there the folder's rename into
        # place stays the guard (a second rename fails), the lock only names the writer.
        if self._beside:
            self._owner.unlink(missing_ok=True)
            Path(self._lock.lock_file).unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _holder(self) -> str:
        try:
            owner = json.loads(self._owner.read_text(encoding="utf-8"))
            return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"  # it has not recorded itself yet


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, default=jsonable) + "\n" for record in records)


def write_json_atomic(path: Path, data: Mapping[str, object]) -> None:
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
    tmp = _new_file_beside(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
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


def _new_file_beside(path: Path) -> str:
    """Create a new empty file of an unused name beside `path` and return its name. Created with
    mode 0o666 as `open()` creates files, so that the umask alone decides who may read it
    (mkstemp's 0o600 would keep results from the other users of a shared machine)."""
    while True:
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(6)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # a name another writer drew: draw again
            continue
        return tmp


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def claim_folder(folder: Path, what: str, what_to_do: str, check: Callable[[], None]) -> FolderLock:
    """The lock of `folder` (see FolderLock), taken once `check` (which raises UserError) passes:
    checked before the folder is touched, so that a folder it refuses is left as it was (unless
    a lock file there says another process may be writing: then the lock's refusal names it),
    and again under the lock, now that no other process writes there. A refused folder that
    holds nothing but the lock's files is removed."""
    if not (Path(folder) / LOCK).exists():
        check()
    lock = FolderLock(folder, what, what_to_do).acquire()
    try:
        check()
    except UserError:
        lock.release()
        remove_if_unused(folder)
        raise
    return lock


def remove_if_unused(folder: Path) -> None:
    """Remove `folder` if it holds nothing but a FolderLock's files: a run refused before it
    wrote anything leaves no folder behind."""
    folder = Path(folder)
    if folder.is_dir() and all(p.name in (LOCK, OWNER) for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
