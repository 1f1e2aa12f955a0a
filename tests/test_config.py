"""Configuration: precedence, key syntax, typing, validation and the shipped presets."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retinaperf import config
from retinaperf.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    parse_overrides,
    resolve,
    resolver,
)
from retinaperf.errors import UserError

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _fake_preset(monkeypatch: pytest.MonkeyPatch, table: dict) -> None:
    """Make every preset name read `table` instead of the shipped file."""
    monkeypatch.setattr(resolver, "read_preset", lambda name: table)


# --- precedence -------------------------------------------------------------------------------


def test_defaults_apply_where_preset_and_overrides_say_nothing(monkeypatch):
    _fake_preset(monkeypatch, {})
    cfg = resolve("A100-1x1", {})
    assert cfg.train.lr == TrainConfig().lr
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert cfg.model.min_size == ModelConfig().min_size
    assert cfg.data.hflip_prob == DataConfig().hflip_prob
    assert cfg.eval.eval_batch_size == EvalConfig().eval_batch_size
    assert cfg.nodes == RunConfig().nodes


def test_preset_beats_defaults_and_overrides_beat_preset(monkeypatch):
    _fake_preset(
        monkeypatch,
        {"nodes": 3, "train": {"lr": 0.5, "epochs": 7}, "model": {"min_size": 64, "max_size": 96}},
    )
    cfg = resolve("smoke", parse_overrides(["lr=0.25", "nodes=5"]))
    assert cfg.train.lr == 0.25  # override over preset
    assert cfg.nodes == 5  # override over preset (root key)
    assert cfg.train.epochs == 7  # preset over default (26)
    assert (cfg.model.min_size, cfg.model.max_size) == (64, 96)
    assert cfg.train.momentum == 0.9  # untouched default
    assert cfg.preset == "smoke"


def test_shipped_smoke_preset_overrides_defaults_and_command_line_overrides_it():
    cfg = resolve("smoke", {})
    assert cfg.model.backbone_weights == "none"
    assert cfg.train.batch_size == 8
    cfg = resolve("smoke", parse_overrides(["batch_size=2", "model.backbone_weights=/w.pth"]))
    assert cfg.train.batch_size == 2
    assert cfg.model.backbone_weights == "/w.pth"
    assert cfg.train.lr == 0.01  # still the preset's


# --- key syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bare", "qualified", "value", "expected"),
    [
        ("lr", "train.lr", "0.02", 0.02),
        ("batch_size", "train.batch_size", "4", 4),
        ("min_size", "model.min_size", "64", 64),
        ("hflip_prob", "data.hflip_prob", "0.25", 0.25),
        ("eval_batch_size", "eval.eval_batch_size", "3", 3),
        ("data_dir", "data.data_dir", "/coco", "/coco"),
    ],
)
def test_bare_and_qualified_keys_mean_the_same(bare, qualified, value, expected):
    assert parse_overrides([f"{bare}={value}"]) == {bare: expected}
    assert parse_overrides([f"{qualified}={value}"]) == {bare: expected}


def test_values_are_typed():
    parsed = parse_overrides(
        ["lr=1e-3", "epochs=3", "deterministic=true", "device=cpu", "lr_steps=16,22"]
    )
    assert parsed == {
        "lr": 0.001,
        "epochs": 3,
        "deterministic": True,
        "device": "cpu",
        "lr_steps": (16, 22),
    }
    assert type(parsed["lr"]) is float
    assert type(parsed["epochs"]) is int
    assert type(parsed["lr_steps"]) is tuple


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), (" true", True)])
def test_bool_spellings(text, expected):
    assert parse_overrides([f"deterministic={text}"]) == {"deterministic": expected}


@pytest.mark.parametrize("text", ["yes", "no", "1", "0", "on", "off", "", "True", "FALSE"])
def test_bool_takes_true_or_false_alone(text):
    # The keys' list says true|false, and that is what is taken: a preset file holds TOML's
    # true/false, which has no other spelling either.
    (deterministic,) = [key for key in config.all_keys() if key.name == "train.deterministic"]
    assert deterministic.kind == "true|false"
    with pytest.raises(UserError) as err:
        parse_overrides([f"deterministic={text}"])
    assert str(err.value) == f"--set: deterministic={text!r} is not valid: use true or false"


def test_lr_steps_reaches_the_config_as_a_tuple():
    cfg = resolve("smoke", parse_overrides(["lr_steps=3,5"]))
    assert cfg.train.lr_steps == (3, 5)


def test_value_may_contain_equals_sign():
    assert parse_overrides(["data_dir=/a=b"]) == {"data_dir": "/a=b"}


# --- bad overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize("pair", ["bogus=1", "train.bogus=1", "nodes.x=1"])
def test_unknown_key_is_refused_naming_it(pair):
    key = pair.partition("=")[0]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        parse_overrides([pair])


def test_empty_key_is_refused():
    with pytest.raises(UserError, match="unknown key"):
        parse_overrides(["=1"])


def test_key_in_wrong_section_is_refused():
    # lr lives in train: model.lr must not silently set train.lr.
    with pytest.raises(UserError, match=r"model\.lr"):
        parse_overrides(["model.lr=0.1"])


@pytest.mark.parametrize(
    ("pair", "key", "value"),
    [
        ("batch_size=abc", "batch_size", "abc"),
        ("batch_size=1.5", "batch_size", "1.5"),
        ("lr=fast", "lr", "fast"),
        ("deterministic=maybe", "deterministic", "maybe"),
        ("lr_steps=16,x", "lr_steps", "16,x"),
    ],
)
def test_wrong_typed_value_is_refused_naming_key_and_value(pair, key, value):
    with pytest.raises(UserError) as err:
        parse_overrides([pair])
    assert key in str(err.value)
    assert value in str(err.value)


@pytest.mark.parametrize("pairs", [["lr=0.1", "lr=0.2"], ["lr=0.1", "train.lr=0.2"]])
def test_key_given_twice_is_refused(pairs):
    with pytest.raises(UserError, match="lr"):
        parse_overrides(pairs)


def test_missing_equals_sign_is_refused_naming_the_pair():
    with pytest.raises(UserError, match=r"lr0\.1"):
        parse_overrides(["lr0.1"])


def test_preset_is_not_settable_as_a_key():
    # resolve() takes the preset name from its argument; `--set preset=...` would be ignored.
    with pytest.raises(UserError, match="preset"):
        parse_overrides(["preset=A100-1x1"])


def test_unknown_preset_is_refused_naming_it():
    with pytest.raises(UserError, match="no-such-preset"):
        resolve("no-such-preset", {})


# --- validation in __post_init__ --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "key"),
    [
        ("precision=fp8", "precision"),
        ("batch_size=0", "batch_size"),
        ("epochs=0", "epochs"),
        ("lr=0", "lr"),
        ("lr=-0.1", "lr"),
        ("momentum=-1", "momentum"),
        ("hflip_prob=1.5", "hflip_prob"),
        ("target_map=2", "target_map"),
        ("lr_steps=22,16", "lr_steps"),
        ("aspect_ratio_group_factor=-2", "aspect_ratio_group_factor"),
        ("num_workers=-1", "num_workers"),
        ("synth_image_size=16", "synth_image_size"),
        ("synth_train_images=0", "synth_train_images"),
        ("min_size=16", "min_size"),
        ("eval_batch_size=0", "eval_batch_size"),
        ("nodes=-1", "nodes"),
        ("devices_per_node=-1", "devices_per_node"),
    ],
)
def test_invalid_value_is_refused_naming_key(pair, key):
    with pytest.raises(UserError) as err:
        resolve("smoke", parse_overrides([pair]))
    assert key in str(err.value)


def test_max_size_below_min_size_is_refused():
    with pytest.raises(UserError, match="max_size"):
        resolve("smoke", parse_overrides(["min_size=200", "max_size=100"]))
    with pytest.raises(UserError, match="max_size"):
        ModelConfig(min_size=800, max_size=799)
    assert ModelConfig(min_size=800, max_size=800).max_size == 800


def test_every_choice_key_lists_its_choices_as_words():
    """A bad choice is answered with the choices comma-separated, never a Python tuple."""
    choice_keys = [key for key in config.all_keys() if "|" in key.kind and key.kind != "true|false"]
    assert {key.name for key in choice_keys} >= {"train.precision", "data.synth_profile"}
    for key in choice_keys:
        with pytest.raises(UserError) as err:
            parse_overrides([f"{key.name}=bogus"])
        need = str(err.value).partition(" is not valid: ")[2]
        assert need == f"use one of {key.kind.replace('|', ', ')}"


def test_every_precision_choice_is_accepted():
    for name in ("auto", "fp32", "fp32-strict", "tf32", "amp", "bf16", "fp16"):
        assert TrainConfig(precision=name).precision == name


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (
            "precision=fp8",
            "precision='fp8' is not valid: use one of auto, fp32, fp32-strict, tf32, amp, bf16, "
            "fp16",
        ),
        ("loss=fast", "loss='fast' is not valid: use one of batched, torchvision"),
        ("channels_last=yes", "channels_last='yes' is not valid: use one of auto, on, off"),
        ("batch_size=0", "batch_size=0 is not valid: use 1 or more"),
        ("lr=0", "lr=0.0 is not valid: use a positive number"),
        ("hflip_prob=1.5", "hflip_prob=1.5 is not valid: use a value in [0, 1]"),
        (
            "aspect_ratio_group_factor=-2",
            "aspect_ratio_group_factor=-2 is not valid: use -1 or more",
        ),
        ("epochs=1.5", "epochs='1.5' is not valid: use an integer"),
        ("lr_steps=16,x", "lr_steps='16,x' is not valid: use integers, e.g. 16,22"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_what_to_use(pair, message):
    with pytest.raises(UserError) as err:
        parse_overrides([pair])
    assert str(err.value) == f"--set: {message}"


def test_direct_construction_is_checked_and_typed_too():
    # Code that builds a section itself (tests, benchmarks) gets the checks of --set.
    with pytest.raises(UserError, match=r"config: loss='fast' is not valid: use one of batched"):
        ModelConfig(loss="fast")
    with pytest.raises(UserError, match=r"config: batch_size=True is not valid: use an integer"):
        TrainConfig(batch_size=True)
    built = TrainConfig(lr=1, lr_steps=[3, 5])
    assert type(built.lr) is float and built.lr_steps == (3, 5)


# --- a value of the key's type, never a look-alike, from every source --------------------------


def _given(
    source: str, key: str, value: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> RunConfig:
    """A configuration built with `key` (a train key) set to `value` the way `source` gives it:
    a preset file's table, a saved run's config.json, or code building the section itself."""
    if source == "preset":
        _fake_preset(monkeypatch, {"train": {key: value}})
        return resolve("smoke", {})
    if source == "config.json":
        saved = resolve("smoke", {}).to_dict()
        saved["train"][key] = value
        path = tmp_path / "config.json"
        path.write_text(json.dumps(saved))
        return config.load_saved(path, {})
    return RunConfig(train=TrainConfig(**{key: value}))


SOURCES = ["preset", "config.json", "code"]


def _where(source: str, tmp_path: Path) -> str:
    """How a refusal names the source."""
    return {
        "preset": "preset file smoke.toml",
        "config.json": str(tmp_path / "config.json"),
        "code": "config",
    }[source]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    ("key", "value", "need"),
    [
        ("epochs", True, "use an integer"),  # a bool is no integer, though Python says it is
        ("epochs", 3.0, "use an integer"),  # nor is a float, however whole
        ("epochs", "3", "use an integer"),
        ("deterministic", 1, "use true or false"),
        ("deterministic", "true", "use true or false"),
        ("lr", True, "use a number"),
        ("lr", "0.1", "use a number"),
        ("lr_steps", [16, True], "use integers, e.g. 16,22"),
        ("lr_steps", [16.0, 22.0], "use integers, e.g. 16,22"),
        ("lr_steps", 16, "use integers, e.g. 16,22"),
        ("precision", 32, "use one of auto, fp32, fp32-strict, tf32, amp, bf16, fp16"),
    ],
)
def test_a_look_alike_of_the_type_is_refused_as_given(
    source, key, value, need, tmp_path, monkeypatch
):
    with pytest.raises(UserError) as err:
        _given(source, key, value, tmp_path, monkeypatch)
    assert str(err.value) == f"{_where(source, tmp_path)}: {key}={value!r} is not valid: {need}"


@pytest.mark.parametrize("source", SOURCES)
def test_an_integer_for_a_number_and_a_list_for_integers_are_taken(source, tmp_path, monkeypatch):
    built = _given(source, "lr", 1, tmp_path, monkeypatch).train
    assert type(built.lr) is float and built.lr == 1.0
    built = _given(source, "lr_steps", [3, 5], tmp_path, monkeypatch).train
    assert built.lr_steps == (3, 5)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    ("key", "value", "shown", "need"),
    [
        ("lr", 0, "0.0", "use a positive number"),  # shown as the key holds it: a float
        ("lr", float("nan"), "nan", "use a positive number"),
        ("momentum", -1, "-1.0", "use 0 or more"),
        ("target_map", 1.5, "1.5", "use a value in [0, 1]"),
        ("batch_size", 0, "0", "use 1 or more"),
    ],
)
def test_a_value_out_of_range_is_refused_as_the_key_holds_it(
    source, key, value, shown, need, tmp_path, monkeypatch
):
    with pytest.raises(UserError) as err:
        _given(source, key, value, tmp_path, monkeypatch)
    assert str(err.value) == f"{_where(source, tmp_path)}: {key}={shown} is not valid: {need}"


@pytest.mark.parametrize(
    "pair",
    [
        "hflip_prob=0",
        "hflip_prob=1",
        "target_map=0",
        "lr=1e-12",
        "batch_size=1",
        "num_workers=0",
        "aspect_ratio_group_factor=-1",
        "min_size=32",
        "seed=-5",
    ],
)
def test_a_range_holds_its_bounds(pair):
    # >= and <= take the bound itself (> does not: lr=0 is refused above).
    key, _, text = pair.partition("=")
    assert parse_overrides([pair]) == {key: json.loads(text)}
    resolve("smoke", parse_overrides([pair]))  # and the configuration takes it


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("epochs=3", 3),
        ("epochs= 3 ", 3),
        ("lr=1", 1.0),
        ("lr=1e-3", 0.001),
        ("lr_steps=16, 22", (16, 22)),
        ("lr_steps=7", (7,)),
    ],
)
def test_set_text_is_read_as_the_key_s_type(pair, expected):
    key = pair.partition("=")[0]
    value = parse_overrides([pair])[key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("pair", "need"),
    [
        ("epochs=3.0", "use an integer"),  # a whole float is still no integer
        ("epochs=1e3", "use an integer"),
        ("epochs=true", "use an integer"),
        ("lr=true", "use a number"),
        ("lr=inf", "use a number"),  # no setting has a use for an infinite number
        ("lr_steps=16,22,", "use integers, e.g. 16,22"),
        ("lr_steps=[16,22]", "use integers, e.g. 16,22"),
        ("lr_steps=16],[22", "use integers, e.g. 16,22"),
    ],
)
def test_set_text_of_another_type_is_refused_as_written(pair, need):
    key, _, text = pair.partition("=")
    with pytest.raises(UserError) as err:
        parse_overrides([pair])
    assert str(err.value) == f"--set: {key}={text!r} is not valid: {need}"


# --- keys -------------------------------------------------------------------------------------


def test_every_key_name_is_unique_across_sections():
    names = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for cls in SECTIONS.values():
        names += [f.name for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert not set(names) & set(SECTIONS)  # a section name is not also a key


def test_all_keys_lists_every_settable_key_qualified_with_help_and_default():
    rows = config.all_keys()
    listed = {key.name for key in rows}
    expected = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    root = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS) - {"preset"}
    assert listed == expected | root
    assert all(key.help and key.kind for key in rows)
    defaults = RunConfig().to_dict()
    for key in rows:  # the default as listed, given to --set, is the default
        section, _, bare = key.name.rpartition(".")
        default = (defaults[section] if section else defaults)[bare]
        assert parse_overrides([f"{key.name}={key.default}"]) == {bare: default}
    by_name = {key.name: key for key in rows}
    assert by_name["train.precision"].kind == "auto|fp32|fp32-strict|tf32|amp|bf16|fp16"
    assert by_name["train.lr_steps"].default == "16,22"
    assert by_name["data.num_workers"].help == (
        "DataLoader worker processes per rank; 0 loads in the training process."
    )


def test_help_texts_need_no_source_file(tmp_path):
    # An installation may hold only .pyc files: the help texts must not come from the source.
    package = tmp_path / "retinaperf"
    shutil.copytree(Path(config.__file__).parent.parent, package)  # the whole package
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-b", str(package)], check=True)
    for source in package.rglob("*.py"):
        source.unlink()
    probe = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from retinaperf import config; "
        f"assert config.__file__.endswith('.pyc'), config.__file__; "
        "print(dict((k.name, k.help) for k in config.all_keys())['train.lr'])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Peak learning rate after warm-up."


# --- what may change on resume, and between rounds ---------------------------------------------


def test_keys_that_leave_the_workload_are_tagged_on_their_fields():
    # place: rounds of one configuration may differ in it; conduct: a resumed run may change it,
    # but rounds compare it (it may change the speed measured).
    assert {"output_dir", "cache_dir", "save_model"} <= config.PLACE_KEYS
    # What the MLPerf log says of who ran the run, where, in which division.
    assert {"mlperf_org", "mlperf_platform", "mlperf_division"} <= config.PLACE_KEYS
    assert {"num_workers", "log_every", "profile_steps"} <= config.RUN_KEYS - config.PLACE_KEYS
    assert config.PLACE_KEYS < config.RUN_KEYS
    flat = config.workload(resolve("smoke", {}))
    assert "lr" in flat and "precision" in flat
    assert not set(flat) & config.RUN_KEYS


def test_resume_may_change_run_keys_only(tmp_path):
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(resolve("smoke", {}).to_dict()))
    resumed = config.load_saved(saved, parse_overrides(["num_workers=1", "output_dir=/x"]))
    assert (resumed.data.num_workers, resumed.output_dir) == (1, "/x")
    with pytest.raises(UserError, match=r"--set lr would change the workload"):
        config.load_saved(saved, parse_overrides(["lr=0.5"]))


# --- shipped presets --------------------------------------------------------------------------


def test_shipped_presets_are_listed():
    assert set(config.preset_names()) >= {"A100-1x1", "A100-1x8", "A100-2x8", "smoke"}


@pytest.mark.parametrize("name", config.preset_names())
def test_every_shipped_preset_resolves_and_has_a_description(name):
    cfg = resolve(name, {})
    assert cfg.preset == name
    assert config.preset_description(name)
    assert not config.preset_description(name).startswith("#")


@pytest.mark.parametrize(
    ("name", "nodes", "devices", "batch", "lr"),
    [
        ("A100-1x1", 1, 1, 16, 0.04),
        ("A100-1x8", 1, 8, 16, 0.08),
        ("A100-2x8", 2, 8, 16, 0.08),
    ],
)
def test_a100_presets_carry_the_seed_numbers(name, nodes, devices, batch, lr):
    cfg = resolve(name, {})
    assert (cfg.nodes, cfg.devices_per_node) == (nodes, devices)
    assert cfg.train.batch_size == batch
    assert cfg.train.lr == pytest.approx(lr)
    assert cfg.train.precision == "fp32"
    # The fixed workload (docs/metrics.md, "The workload") is left at its defaults.
    assert cfg.train.momentum == 0.9
    assert cfg.train.weight_decay == pytest.approx(1e-4)
    assert cfg.train.epochs == 26
    assert cfg.train.lr_steps == (16, 22)
    assert cfg.train.target_map == pytest.approx(0.35)
    assert cfg.data.hflip_prob == 0.5
    assert cfg.data.aspect_ratio_group_factor == 3
    assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333)
    assert cfg.model.backbone_weights == config.BACKBONE_URL


# --- bad preset files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"train": {"bogus": 1}}, "bogus"),
        ({"bogus": 1}, "bogus"),
        ({"model": {"lr": 0.1}}, "lr"),  # a real key in the wrong section
        ({"lr": 0.1}, "lr"),  # a section key at the root
        ({"unknown_section": {"lr": 0.1}}, "unknown_section"),
    ],
)
def test_preset_with_unknown_key_is_refused_naming_file_and_key(monkeypatch, table, key):
    _fake_preset(monkeypatch, table)
    with pytest.raises(UserError) as err:
        resolve("A100-1x8", {})
    assert "A100-1x8.toml" in str(err.value)
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"train": {"batch_size": "16"}}, "batch_size"),
        ({"train": {"batch_size": 16.0}}, "batch_size"),
        ({"train": {"batch_size": True}}, "batch_size"),
        ({"train": {"deterministic": "yes"}}, "deterministic"),
        ({"train": {"lr": "0.1"}}, "lr"),
        ({"train": {"lr_steps": [16, "22"]}}, "lr_steps"),
        ({"train": {"precision": 32}}, "precision"),
        ({"nodes": "2"}, "nodes"),
    ],
)
def test_preset_with_wrong_typed_value_is_refused_naming_file_and_key(monkeypatch, table, key):
    _fake_preset(monkeypatch, table)
    with pytest.raises(UserError) as err:
        resolve("A100-2x8", {})
    assert "A100-2x8.toml" in str(err.value)
    assert key in str(err.value)


def test_preset_values_are_converted_to_the_field_types(monkeypatch):
    _fake_preset(monkeypatch, {"train": {"lr": 1, "lr_steps": [3, 4]}})
    cfg = resolve("smoke", {})
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0
    assert cfg.train.lr_steps == (3, 4)


def test_preset_with_invalid_value_is_refused_naming_file_and_key(monkeypatch):
    _fake_preset(monkeypatch, {"train": {"precision": "fp8"}})
    with pytest.raises(UserError, match=r"preset file smoke\.toml: precision='fp8' is not valid"):
        resolve("smoke", {})


# --- throughput mode (`run --synthetic`) ------------------------------------------------------


def test_synthetic_mode_sits_between_the_preset_and_the_command_line():
    cfg = resolve("A100-1x1", parse_overrides(["max_steps=7"]), synthetic=True)
    # the preset's recipe is kept ...
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.precision) == (16, 0.04, "fp32")
    assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333)
    # ... on generated COCO-like data, with random weights in the pretrained structure
    assert cfg.data.synth_profile == "coco" and cfg.data.data_dir == ""
    assert cfg.model.backbone_weights == "random" and cfg.throughput_only is True
    assert cfg.train.target_map == 0.0  # never stops early on an accuracy it cannot reach
    assert cfg.train.max_steps == 7  # the command line beats the mode's 200
    assert resolve("A100-1x1", {}, synthetic=True).train.max_steps == 200
    assert resolve("A100-1x1", {}).throughput_only is False  # only when asked


def _dataset(root: Path, info: dict | None) -> Path:
    """A folder whose val2017 annotation file holds `info` (None: no annotation file)."""
    if info is not None:
        (root / "annotations").mkdir(parents=True)
        content = {"info": info, "images": [], "annotations": [], "categories": []}
        (root / "annotations" / "instances_val2017.json").write_text(json.dumps(content))
    return root


def test_synthetic_mode_takes_a_dataset_synth_wrote(tmp_path):
    """`run --synthetic --data-dir D` on what `retinaperf synth` wrote (tests/test_synth.py runs
    on a real one): the throughput mode as it is, on D."""
    root = _dataset(tmp_path / "d", {"description": "retinaperf generated dataset (val), seed 0"})
    cfg = resolve("A100-1x1", parse_overrides([f"data_dir={root}"]), synthetic=True)
    assert cfg.data.data_dir == str(root)
    assert cfg.model.backbone_weights == "random" and cfg.throughput_only is True
    assert (cfg.train.target_map, cfg.train.max_steps) == (0.0, 200)


@pytest.mark.parametrize(
    ("info", "needles"),
    [
        ({"description": "COCO 2017 Dataset"}, ["not a dataset", "'COCO 2017 Dataset'"]),
        ({}, ["not a dataset", "''"]),
        (None, ["does not exist", "synth --profile coco --out"]),
    ],
)
def test_synthetic_mode_refuses_any_other_dataset(tmp_path, info, needles):
    root = _dataset(tmp_path / "coco", info)
    with pytest.raises(UserError) as err:
        resolve("A100-1x1", parse_overrides([f"data_dir={root}"]), synthetic=True)
    message = str(err.value)
    assert message.startswith(f"--synthetic --data-dir {root}: ") and "\n" not in message
    assert all(needle in message for needle in needles), message
    if info is not None:
        assert "drop --synthetic to train on this dataset" in message
    # Without --synthetic the same folder is an ordinary data_dir (checked when the run reads it).
    assert resolve("A100-1x1", parse_overrides([f"data_dir={root}"])).data.data_dir == str(root)


def test_random_weights_need_the_throughput_mode():
    with pytest.raises(UserError, match=r"backbone_weights='random'.*throughput_only=true"):
        resolve("A100-1x1", parse_overrides(["backbone_weights=random"]))
    given = resolve("A100-1x1", parse_overrides(["backbone_weights=/w/resnet50.pth"]), True)
    assert given.model.backbone_weights == "/w/resnet50.pth"  # a weight file is still honoured


@pytest.mark.parametrize(
    ("pair", "needle"),
    [
        ("synth_profile=faces", "synth_profile"),
        ("synth_image_size=16", "synth_image_size"),
        ("timing_warmup_steps=-1", "timing_warmup_steps"),
        ("profile_steps=5-9", "profile_steps"),
        ("profile_steps=0:3", "profile_steps"),
        ("mlperf_org= ", "mlperf_org"),  # MLPerf's checker refuses an empty submission_org
        ("mlperf_division=research", "mlperf_division"),
    ],
)
def test_new_keys_are_checked(pair, needle):
    with pytest.raises(UserError, match=needle):
        resolve("smoke", parse_overrides([pair]))
