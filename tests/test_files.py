"""The base layer's file helpers: JSON read with one clear line, the run directory's default name,
and the refusal of a folder that already holds something."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from retinaperf import files
from retinaperf.errors import UserError


def test_read_json_gives_the_value(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"x": [1, 2.5, None]}))
    assert files.read_json(path, "report") == {"x": [1, 2.5, None]}


def test_a_missing_file_is_one_line_saying_what_to_do(tmp_path):
    path = tmp_path / "nowhere" / "a.json"
    with pytest.raises(UserError) as err:
        files.read_json(path, "report", if_missing="give a finished run", if_invalid="unused")
    assert str(err.value) == f"report: {path} does not exist: give a finished run"


@pytest.mark.parametrize("decode", [json.loads, msgspec.json.decode], ids=["json", "msgspec"])
@pytest.mark.parametrize("content", [b'{"x": 1,\n "y": }', b"\xff\xfe\x00 not text"])
def test_a_file_that_is_not_json_is_one_line_with_the_parsers_position(tmp_path, decode, content):
    path = tmp_path / "a.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        files.read_json(
            path, "data", if_missing="unused", if_invalid="re-extract it", decode=decode
        )
    message = str(err.value)
    assert message.startswith(f"data: {path} is not valid JSON (")
    assert message.endswith("): re-extract it")
    assert re.search(r"line \d+ column \d+|position \d+|byte \d+", message)
    assert "\n" not in message


def test_a_file_that_cannot_be_read_says_why(tmp_path):
    with pytest.raises(UserError) as err:
        files.read_json(tmp_path, "--resume")
    assert str(err.value) == f"--resume: cannot read {tmp_path}: Is a directory"


def test_the_default_run_directory_is_named_after_the_moment_and_created(tmp_path):
    before = time.strftime("%Y%m%d-%H%M%S")
    named = files.new_timestamped_dir(tmp_path)
    assert named.parent == tmp_path and named.is_dir()
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", named.name) and named.name >= before
    assert files.RUNS == Path("runs")


def test_directories_made_in_the_same_second_are_all_different(tmp_path):
    """Created exclusively, not checked then created: many at once, from several processes,
    never share one."""
    code = "import sys; from retinaperf import files; print(files.new_timestamped_dir(sys.argv[1]))"
    starts = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(6)
    ]
    made = [p.communicate()[0].decode().strip() for p in starts]
    assert all(p.returncode == 0 for p in starts)
    assert len(set(made)) == 6 and all(Path(m).is_dir() for m in made)


def test_a_locked_folder_is_refused_naming_its_holder_and_free_once_released(tmp_path):
    holder = files.FolderLock(tmp_path / "run", "output", "choose another").acquire()
    second = files.FolderLock(tmp_path / "run", "output", "choose another")
    with pytest.raises(UserError) as err:
        second.acquire()
    message = str(err.value)
    assert message.startswith(f"output: {tmp_path / 'run'} is in use by process {os.getpid()}")
    assert message.endswith(": choose another") and "\n" not in message
    holder.release()
    second.acquire().release()  # free now
    files.require_empty(tmp_path / "run", "output", "x")  # the lock's files are not content


def test_the_lock_of_a_killed_process_does_not_hold(tmp_path):
    """An OS lock: the process's death releases it; no stale lock to remove by hand."""
    code = (
        "import sys, time; from retinaperf import files; "
        "held = files.FolderLock(sys.argv[1], 'output', 'x').acquire(); print('held', flush=True); "
        "time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE
    )
    assert child.stdout.readline().strip() == b"held"
    with pytest.raises(UserError, match=f"in use by process {child.pid} "):
        files.FolderLock(tmp_path / "run", "output", "x").acquire()
    child.kill()
    child.wait()
    files.FolderLock(tmp_path / "run", "output", "x").acquire().release()


def test_a_lock_beside_a_folder_leaves_nothing_behind(tmp_path):
    with files.FolderLock(tmp_path / "data", "synth", "x", beside=True):
        assert sorted(p.name for p in tmp_path.iterdir())  # its files lie beside the folder
    assert list(tmp_path.iterdir()) == []


def test_a_new_or_empty_folder_is_taken_and_any_other_refused(tmp_path):
    files.require_empty(tmp_path / "new", "output", "choose another")
    files.require_empty(tmp_path, "output", "choose another")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as err:
        files.require_empty(tmp_path, "output", "choose a new --output-dir")
    assert str(err.value) == f"output: {tmp_path} is not empty: choose a new --output-dir"
    with pytest.raises(UserError) as err:
        files.require_empty(tmp_path / "file", "synth", "give a folder")
    assert str(err.value) == f"synth: {tmp_path / 'file'} is not a folder: give a folder"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_permissions_open_gives(tmp_path, umask):
    """mkstemp's 0o600 would keep results.json, report.md and config.json from the other users
    of a shared machine: an atomic file is created as `open()` creates one."""
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        files.write_text_atomic(tmp_path / "report.md", "x")
        files.write_json_atomic(tmp_path / "results.json", {"a": 1})
        with files.atomic_file(tmp_path / "step-1.pt", "wb", durable=True) as f:
            f.write(b"x")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    for name in ("report.md", "results.json", "step-1.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.txt", "report.md", "results.json", "step-1.pt",
    ]  # fmt: skip


def test_an_atomic_file_that_fails_leaves_neither_file_nor_temporary(tmp_path):
    (tmp_path / "results.json").write_text("old")
    with pytest.raises(RuntimeError), files.atomic_file(tmp_path / "results.json") as f:
        f.write("half")
        raise RuntimeError("disk gone")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert (tmp_path / "results.json").read_text() == "old"
