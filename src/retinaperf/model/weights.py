"""Backbone weights: from a URL, a file:// URL or a path, verified, cached, loaded safely.

torchvision names its weight files `<name>-<hex>.pth` where <hex> is the start of the file's
sha256; we check that prefix for every file named that way. A file named otherwise cannot be
checked: it is used with a warning, and its sha256 is recorded in the results either way.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retinaperf import files
from retinaperf.errors import UserError

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
DOWNLOAD_TIMEOUT_S = 60.0
"""How long a download waits for the server (to connect, or for the next bytes) before failing."""


@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    path: str
    sha256: str


def expected_prefix(name: str) -> str | None:
    match = HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def fetch(source: str, cache_dir: Path) -> Path:
    """A local, verified file for `source` (URL, file:// URL or path), downloading if needed."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        name = Path(parsed.path).name
        for candidate in (Path(cache_dir) / "weights" / name, _torch_hub_file(name)):
            if candidate.is_file():
                _verify(candidate)
                return candidate
        return _download(source, Path(cache_dir) / "weights" / name)
    path = (
        Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(source)
    )
    if parsed.scheme not in ("", "file") and not Path(source).exists():
        raise UserError(
            f"backbone weights: unsupported source {source!r}: use http(s)://, file:// or a path"
        )
    if not path.is_file():
        raise UserError(
            f"backbone weights: {path} does not exist: give the path of resnet50-0676ba61.pth "
            "(or `none` / `random` for random values)"
        )
    _verify(path)
    return path


def load(source: str, cache_dir: Path) -> LoadedWeights | None:
    """The state dict for `source`, or None for `none` and `random` (random values; see
    ModelConfig.backbone_weights)."""
    if source.strip().lower() in ("none", "random"):
        return None
    path = fetch(source, cache_dir)
    state = load_tensors(path, "backbone weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone weights: {path} does not hold a state dict of tensors")
    return LoadedWeights(state, str(path), files.sha256_of(path))


def load_tensors(path: Path, what: str) -> Any:
    """What torch.load reads from `path` as data only: tensors in plain containers. `what` names
    the file in messages ("backbone weights", "checkpoint")."""
    try:
        # weights_only: a weights file is data; never let it run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            # torch's restricted unpickler met a global it does not allow: an object, maybe code.
            raise UserError(
                f"{what}: {path} holds pickled objects other than tensors (possibly code): "
                "refused, since weights are loaded as data only (weights_only=True); use a file "
                "saved from a state dict"
            ) from None
        raise UserError(f"{what}: cannot load {path}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _torch_hub_file(name: str) -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME, where torchvision itself would have cached it.
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _verify(path: Path) -> None:
    """Check the file `path` against the hash prefix in its name."""
    prefix = _prefix_or_warn(path.name)
    if prefix is not None:
        actual = files.sha256_of(path)
        if not actual.startswith(prefix):
            raise _mismatch(str(path), prefix, actual)


def _prefix_or_warn(name: str) -> str | None:
    """The sha256 prefix that the file name `name` promises; None, with a warning, if none."""
    prefix = expected_prefix(name)
    if prefix is None:
        warnings.warn(
            f"backbone weights: {name} has no hash in its name (torchvision names files "
            "<name>-<sha256 prefix>.pth), so it cannot be verified; its sha256 is recorded",
            stacklevel=3,
        )
    return prefix


def _mismatch(shown: str, prefix: str, actual: str) -> UserError:
    return UserError(
        f"backbone weights: {shown} has sha256 {actual[: len(prefix)]}..., but its name expects "
        f"{prefix}: the file is corrupt or not the named one; download it again"
    )


def _download(url: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = _prefix_or_warn(target.name)
    try:
        # torch writes a temporary file beside `target` and gives it the name only once its
        # sha256 starts with `prefix`: a bad download never stands in the cache.
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix, progress=False)
    except RuntimeError as err:
        # torch's words for a file whose sha256 does not start with `prefix` hold the digest;
        # any other RuntimeError is no mistake of the user's, and keeps its traceback.
        digest = re.search(r'invalid hash value .*got "([0-9a-f]+)"', str(err))
        if prefix is None or digest is None:
            raise
        shown = f"{target.name} downloaded from {url}"
        raise _mismatch(shown, prefix, digest.group(1)) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise UserError(
            f"backbone weights: cannot download {target.name} from {url} ({reason}): download it "
            f"where there is network and put it at {target}, or pass "
            f"--backbone-weights /path/to/{target.name}"
        ) from None
    return target


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Sockets opened in the block give up after `seconds` without progress. download_url_to_file
    takes no timeout, and a server that stops answering would hang the run (local rank 0, with
    the node's other ranks waiting for it)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
