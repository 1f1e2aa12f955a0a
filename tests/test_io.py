"""The base layer's file helpers: JSON read with one clear line, the run directory's default name,
and the refusal of a folder that already holds something."""

import json
import re
import time
from pathlib import Path

import msgspec
import pytest

from retinaperf import io
from retinaperf.errors import UserError


def test_read_json_gives_the_value(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"x": [1, 2.5, None]}))
    assert io.read_json(path, "report") == {"x": [1, 2.5, None]}


def test_a_missing_file_is_one_line_saying_what_to_do(tmp_path):
    path = tmp_path / "nowhere" / "a.json"
    with pytest.raises(UserError) as err:
        io.read_json(path, "report", if_missing="give a finished run", if_invalid="unused")
    assert str(err.value) == f"report: {path} does not exist: give a finished run"


@pytest.mark.parametrize("decode", [json.loads, msgspec.json.decode], ids=["json", "msgspec"])
@pytest.mark.parametrize("content", [b'{"x": 1,\n "y": }', b"\xff\xfe\x00 not text"])
def test_a_file_that_is_not_json_is_one_line_with_the_parsers_position(tmp_path, decode, content):
    path = tmp_path / "a.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        io.read_json(path, "data", if_missing="unused", if_invalid="re-extract it", decode=decode)
    message = str(err.value)
    assert message.startswith(f"data: {path} is not valid JSON (")
    assert message.endswith("): re-extract it")
    assert re.search(r"line \d+ column \d+|position \d+|byte \d+", message)
    assert "\n" not in message


def test_a_file_that_cannot_be_read_says_why(tmp_path):
    with pytest.raises(UserError) as err:
        io.read_json(tmp_path, "--resume")
    assert str(err.value) == f"--resume: cannot read {tmp_path}: Is a directory"


def test_the_default_run_directory_is_named_after_the_moment(tmp_path):
    before = time.strftime("%Y%m%d-%H%M%S")
    named = io.timestamped_dir()
    assert named.parent == io.RUNS == Path("runs")
    assert re.fullmatch(r"\d{8}-\d{6}", named.name) and named.name >= before
    assert io.timestamped_dir(tmp_path).parent == tmp_path


def test_a_new_or_empty_folder_is_taken_and_any_other_refused(tmp_path):
    io.require_empty(tmp_path / "new", "output", "choose another")
    io.require_empty(tmp_path, "output", "choose another")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as err:
        io.require_empty(tmp_path, "output", "choose a new --output-dir")
    assert str(err.value) == f"output: {tmp_path} is not empty: choose a new --output-dir"
    with pytest.raises(UserError) as err:
        io.require_empty(tmp_path / "file", "synth", "give a folder")
    assert str(err.value) == f"synth: {tmp_path / 'file'} is not a folder: give a folder"
