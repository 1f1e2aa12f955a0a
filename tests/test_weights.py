"""Backbone weights: sources, sha256 verification, download cache, torch hub cache, safe loading.

Downloads are served from a local directory over HTTP on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import socket
import threading
from pathlib import Path

import pytest
import torch

from retinaperf.errors import UserError
from retinaperf.model import weights
from retinaperf.model.weights import LoadedWeights, expected_prefix, fetch, load, load_tensors


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, so a real resnet50 file on this machine cannot interfere."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def fake_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_named(obj: object, folder: Path, stem: str = "fake", prefix: str | None = None) -> Path:
    """torch.save `obj` as `<stem>-<first 8 hex of its sha256>.pth` (or a given prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "scratch.tmp"
    torch.save(obj, scratch)
    path = folder / f"{stem}-{prefix or sha256(scratch)[:8]}.pth"
    scratch.rename(path)
    return path


def assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- local sources ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["none", "NONE", " none "])
def test_none_is_random_init(source, cache):
    assert load(source, cache) is None
    assert not cache.exists()


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_local_file_with_hash_in_name(tmp_path, cache, as_url):
    state = fake_state()
    path = save_named(state, tmp_path / "dir with space")
    source = path.as_uri() if as_url else str(path)
    loaded = load(source, cache)
    assert isinstance(loaded, LoadedWeights)
    assert_same_state(loaded.state_dict, state)
    assert loaded.sha256 == sha256(path)
    assert Path(loaded.path) == path
    assert not cache.exists()  # a local file is used where it is, not copied


def test_hash_prefix_of_file_names():
    assert expected_prefix("resnet50-0676ba61.pth") == "0676ba61"
    assert expected_prefix("resnet50-11ad3fa6.pth") == "11ad3fa6"
    assert expected_prefix("resnet50.pth") is None
    assert expected_prefix("my-weights.pth") is None  # not hex


def test_wrong_hash_in_name_is_refused(tmp_path, cache):
    path = save_named(fake_state(), tmp_path)
    actual = sha256(path)
    claimed = "0" * 8 if not actual.startswith("0" * 8) else "1" * 8
    wrong = path.rename(tmp_path / f"fake-{claimed}.pth")
    for source in (str(wrong), wrong.as_uri()):
        with pytest.raises(UserError, match=claimed) as err:
            load(source, cache)
        assert str(wrong) in str(err.value)


def test_file_without_hash_loads_with_a_warning(tmp_path, cache):
    state = fake_state(1)
    path = tmp_path / "my_backbone.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=re.escape("my_backbone.pth")):
        loaded = load(str(path), cache)
    assert_same_state(loaded.state_dict, state)
    assert loaded.sha256 == sha256(path)


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_missing_file(tmp_path, cache, as_url):
    missing = tmp_path / "nowhere" / "resnet50-0676ba61.pth"
    with pytest.raises(UserError, match=re.escape("resnet50-0676ba61.pth")) as err:
        load(missing.as_uri() if as_url else str(missing), cache)
    assert str(missing) in str(err.value)


def test_unsupported_scheme(cache):
    with pytest.raises(UserError, match="ftp://"):
        load("ftp://example.org/resnet50-0676ba61.pth", cache)


class Payload:
    """Unpickling this would create a directory: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("wrapped", [False, True], ids=["object", "inside-dict"])
def test_pickle_with_code_is_refused_not_run(tmp_path, cache, wrapped):
    marker = tmp_path / "code-ran"
    payload = Payload(marker)
    path = save_named(
        {"conv.weight": torch.ones(1), "x": payload} if wrapped else payload, tmp_path
    )
    assert not marker.exists()
    with pytest.raises(UserError) as err:
        load(str(path), cache)
    message = str(err.value)
    assert message.startswith(
        f"backbone weights: {path} holds pickled objects other than tensors (possibly code)"
    )
    assert "weights_only=True" in message and "\n" not in message
    assert not marker.exists()


def test_load_tensors_refuses_code_naming_what_it_loads(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": fake_state(), "epoch": 3, "rng": Payload(marker)}, path)
    with pytest.raises(UserError, match="pickled") as err:
        load_tensors(path, "checkpoint")
    assert str(err.value).startswith(f"checkpoint: {path} holds pickled objects")
    assert not marker.exists()


def test_load_tensors_refuses_a_truncated_file_naming_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": fake_state(), "epoch": 3}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError) as err:
        load_tensors(path, "checkpoint")
    message = str(err.value)
    assert message.startswith(f"checkpoint: cannot load {path}: ")
    assert len(message) > len(f"checkpoint: cannot load {path}: ") and "\n" not in message


def test_load_tensors_returns_tensors_in_plain_containers(tmp_path):
    # What a training checkpoint holds: nested dicts, lists, numbers and strings around tensors.
    state = fake_state(9)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "epoch": 3, "steps": [torch.ones(2)], "name": "x"}, path)
    loaded = load_tensors(path, "checkpoint")
    assert sorted(loaded) == ["epoch", "model", "name", "steps"]
    assert_same_state(loaded["model"], state)
    assert loaded["epoch"] == 3 and loaded["name"] == "x"
    assert torch.equal(loaded["steps"][0], torch.ones(2))


@pytest.mark.parametrize(
    "obj",
    [
        [torch.ones(2)],  # not a dict
        {"model": {"conv.weight": torch.ones(2)}},  # a training checkpoint, not a state dict
        {"conv.weight": torch.ones(2), "epoch": 3},
    ],
    ids=["list", "nested", "non-tensor"],
)
def test_not_a_state_dict(tmp_path, cache, obj):
    path = save_named(obj, tmp_path)
    with pytest.raises(UserError) as err:
        load(str(path), cache)
    assert str(err.value) == f"backbone weights: {path} does not hold a state dict of tensors"


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_not_a_torch_file(tmp_path, cache, kind):
    scratch = tmp_path / "junk"
    if kind == "text":
        scratch.write_bytes(b"this is not a checkpoint\n" * 10)
    else:
        torch.save(fake_state(), scratch)
        scratch.write_bytes(scratch.read_bytes()[: scratch.stat().st_size // 2])
    # Named after the broken file's own hash: it passes verification and fails to load.
    path = scratch.rename(tmp_path / f"fake-{sha256(scratch)[:8]}.pth")
    with pytest.raises(UserError) as err:
        load(str(path), cache)
    assert str(err.value).startswith(f"backbone weights: cannot load {path}: ")
    assert "\n" not in str(err.value)


# --- downloads --------------------------------------------------------------------------------


class Server:
    """A directory served over HTTP on 127.0.0.1, counting requests."""

    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        served = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                served.append(self.path)

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()
        self.running = True

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def shutdown(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=10)
            self.running = False


@pytest.fixture
def served(tmp_path):
    directory = tmp_path / "served"
    directory.mkdir()
    server = Server(directory)
    yield directory, server
    server.shutdown()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_verifies_and_caches(served, cache):
    directory, server = served
    state = fake_state(2)
    path = save_named(state, directory)
    url = server.url(path.name)
    target = cache / "weights" / path.name

    assert fetch(url, cache) == target
    assert target.read_bytes() == path.read_bytes()
    assert files_under(cache) == ["weights", f"weights/{path.name}"]  # no temp file left
    assert len(server.requests) == 1

    # The second time comes from the cache: it works with the server gone.
    server.shutdown()
    loaded = load(url, cache)
    assert Path(loaded.path) == target
    assert_same_state(loaded.state_dict, state)
    assert loaded.sha256 == sha256(path)
    assert len(server.requests) == 1


def test_load_downloads(served, cache):
    directory, server = served
    state = fake_state(3)
    path = save_named(state, directory)
    loaded = load(server.url(path.name), cache)
    assert Path(loaded.path) == cache / "weights" / path.name
    assert_same_state(loaded.state_dict, state)
    assert loaded.sha256 == sha256(path)


def test_download_with_wrong_hash_leaves_nothing(served, cache):
    directory, server = served
    path = save_named(fake_state(4), directory)
    claimed = "0" * 8 if not sha256(path).startswith("0" * 8) else "1" * 8
    lying = path.rename(directory / f"resnet50-{claimed}.pth")
    url = server.url(lying.name)
    with pytest.raises(UserError, match=claimed) as err:
        fetch(url, cache)
    assert url in str(err.value)  # names what was downloaded, not a deleted temporary file
    assert f"/.{lying.name}" not in str(err.value)
    assert len(server.requests) == 1
    assert [p for p in files_under(cache) if p != "weights"] == []  # neither target nor temp


def test_download_without_hash_in_name_warns_and_caches(served, cache):
    directory, server = served
    state = fake_state(8)
    path = directory / "backbone.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning) as record:
        loaded = load(server.url(path.name), cache)
    messages = [str(w.message) for w in record]
    assert any("backbone.pth has no hash" in m for m in messages), messages
    assert not any(f".{path.name}." in m for m in messages), messages  # not the temp file
    assert Path(loaded.path) == cache / "weights" / path.name
    assert_same_state(loaded.state_dict, state)
    assert loaded.sha256 == sha256(path)
    assert files_under(cache) == ["weights", f"weights/{path.name}"]


def test_corrupt_cached_file_is_refused(served, cache):
    directory, server = served
    path = save_named(fake_state(5), directory)
    cached = cache / "weights" / path.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes()[:-10])  # a truncated earlier download
    with pytest.raises(UserError, match=path.name[-12:-4]) as err:
        fetch(server.url(path.name), cache)
    assert str(cached) in str(err.value)


@pytest.mark.parametrize("kind", ["closed-port", "not-found"])
def test_unreachable_url_says_where_to_put_the_file(served, cache, kind):
    _, server = served
    name = "resnet50-0676ba61.pth"
    if kind == "closed-port":
        url = f"http://127.0.0.1:{closed_port()}/{name}"
    else:
        url = server.url(name)  # the server has no such file: 404
    with pytest.raises(UserError) as err:
        fetch(url, cache)
    message = str(err.value)
    assert name in message
    assert url in message
    assert str(cache / "weights" / name) in message
    assert "\n" not in message
    assert [p for p in files_under(cache) if p != "weights"] == []


def test_a_server_that_stops_answering_fails_the_download_in_time(cache, monkeypatch):
    monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT_S", 0.2)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/resnet50-0676ba61.pth"
        with pytest.raises(UserError, match="timed out") as err:
            fetch(url, cache)
    assert url in str(err.value)
    assert socket.getdefaulttimeout() is None  # the process's default is back
    assert [p for p in files_under(cache) if p != "weights"] == []


def test_torch_hub_cache_is_used_without_download(torch_home, cache):
    state = fake_state(6)
    path = save_named(state, torch_home / "hub" / "checkpoints", stem="resnet50")
    url = f"http://127.0.0.1:{closed_port()}/{path.name}"  # a download would fail
    loaded = load(url, cache)
    assert Path(loaded.path) == path
    assert_same_state(loaded.state_dict, state)
    assert loaded.sha256 == sha256(path)
    assert not cache.exists()


def test_torch_hub_file_is_verified_too(torch_home, cache):
    path = save_named(fake_state(7), torch_home / "hub" / "checkpoints", stem="resnet50")
    claimed = "0" * 8 if not sha256(path).startswith("0" * 8) else "1" * 8
    wrong = path.rename(path.with_name(f"resnet50-{claimed}.pth"))
    with pytest.raises(UserError, match=claimed):
        fetch(f"http://127.0.0.1:{closed_port()}/{wrong.name}", cache)
