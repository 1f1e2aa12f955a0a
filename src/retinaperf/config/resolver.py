"""Resolving a configuration: every key by its bare name, `--set` pairs, the precedence
(defaults < preset < `--set`), a saved run's configuration, and what a key's role allows."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from retinaperf import files, invocation
from retinaperf.config.fields import (
    Role,
    as_text,
    from_text,
    settings_of,
    type_name,
    valid,
)
from retinaperf.config.presets import read_preset
from retinaperf.config.settings import (
    THROUGHPUT_MODE,
    RunConfig,
)
from retinaperf.errors import UserError

_SECTIONS: dict[str, type] = {
    name: kind
    for name, kind in typing.get_type_hints(RunConfig).items()
    if isinstance(kind, type) and dataclasses.is_dataclass(kind)
}


class _Key(NamedTuple):
    section: str | None  # None: a key of RunConfig itself
    field: dataclasses.Field
    kind: Any


def _index() -> dict[str, _Key]:
    index = {f.name: _Key(None, f, kind) for f, kind in settings_of(RunConfig)}
    for section, cls in _SECTIONS.items():
        for f, kind in settings_of(cls):
            assert f.name not in index, f"config key {f.name} is defined twice"
            index[f.name] = _Key(section, f, kind)
    return index


_KEYS = _index()  # bare name -> where it lives and what it takes


# The choices of two keys, which other modules name.
PRECISIONS: tuple[str, ...] = typing.get_args(_KEYS["precision"].kind)


SYNTH_PROFILES: tuple[str, ...] = typing.get_args(_KEYS["synth_profile"].kind)


def _flatten(table: dict[str, Any], where: str) -> dict[str, Any]:
    """{section: {key: value}} or {key: value}, as a preset file or a run's config.json holds
    them -> {bare key: typed value}, each key and value checked; `where` names the source."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key in _SECTIONS:
            for sub, subvalue in value.items():
                if sub not in _KEYS or _KEYS[sub].section != key:
                    raise UserError(f"{where}: unknown key {key}.{sub}")
                flat[sub] = valid(_KEYS[sub].field, _KEYS[sub].kind, subvalue, where)
        elif key in _KEYS and _KEYS[key].section is None:
            flat[key] = valid(_KEYS[key].field, _KEYS[key].kind, value, where)
        else:
            raise UserError(f"{where}: unknown key {key}")
    return flat


def parse_overrides(pairs: list[str], flag: str = "--set") -> dict[str, Any]:
    """`["lr=0.02", "train.epochs=3"]` -> `{"lr": 0.02, "epochs": 3}`, each checked; errors name
    `flag`, the option the pairs came from."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"{flag} {pair!r}: write KEY=VALUE, e.g. {flag} lr=0.02")
        section, _, bare = key.rpartition(".")
        if bare == "preset":
            raise UserError(f"{flag} {key}: choose the preset with --preset NAME, not {flag}")
        if bare not in _KEYS or (section and _KEYS[bare].section != section):
            raise UserError(
                f"{flag} {key}: unknown key; `{invocation.command('presets', '--keys')}` lists "
                "the valid keys"
            )
        if bare in overrides:
            raise UserError(f"{flag} {key}: given twice; give each key once")
        entry = _KEYS[bare]
        overrides[bare] = valid(entry.field, entry.kind, from_text(text, entry.kind), flag)
    return overrides


def is_list_key(name: str) -> bool:
    """Whether the key `name` (bare) takes a list of values, written with commas (lr_steps)."""
    return typing.get_origin(_KEYS[name].kind) is tuple


def resolve(preset: str, overrides: dict[str, Any], synthetic: bool = False) -> RunConfig:
    """Defaults < preset file < throughput mode (if `synthetic`) < overrides, validated."""
    mode = THROUGHPUT_MODE if synthetic else {}
    preset_values = _flatten(read_preset(preset), f"preset file {preset}.toml")
    values = {**preset_values, **mode, **overrides, "preset": preset}
    if synthetic and values.get("data_dir"):
        _check_generated(values["data_dir"])
    return _build(values)


# How `retinaperf synth` begins the description in its annotation files' `info` (data/synth.py
# writes it; tests/test_synth.py holds the two together). Datasets written before this check
# existed carry it too.
GENERATED_DESCRIPTION = "retinaperf generated"


class _Annotations(msgspec.Struct):
    """The one field of an instances file the check reads; msgspec skips the rest unbuilt."""

    info: dict[str, Any] = {}


def _check_generated(data_dir: str) -> None:
    """`run --synthetic --data-dir D` takes D only if `retinaperf synth` wrote it: on real data a
    throughput run's random weights and mAP-less results would pass for a measurement of it."""
    path = Path(data_dir) / "annotations" / "instances_val2017.json"
    what = f"--synthetic --data-dir {data_dir}"
    synth = invocation.command("synth", "--profile", "coco", "--out", data_dir)
    write_one = f"write one with `{synth}`"
    content = files.read_json(
        path,
        what,
        if_missing=write_one,
        if_invalid=write_one,
        decode=lambda raw: msgspec.json.decode(raw, type=_Annotations),
    )
    description = str(content.info.get("description", ""))
    if not description.startswith(GENERATED_DESCRIPTION):
        raise UserError(
            f"{what}: not a dataset `retinaperf synth` wrote ({path} describes itself as "
            f"{description!r}): --synthetic runs on generated data only; drop --synthetic to "
            "train on this dataset"
        )


def _build(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from {bare key: typed value}; every section's checks run."""
    root: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in values.items():
        section = _KEYS[key].section
        (sections[section] if section else root)[key] = value
    built = {name: cls(**sections[name]) for name, cls in _SECTIONS.items()}
    return RunConfig(**root, **built)


def _keys_of_role(*roles: Role) -> frozenset[str]:
    return frozenset(name for name, key in _KEYS.items() if key.field.metadata["role"] in roles)


# Keys a resumed run may change (`run --resume --set`): any other would make the halves of the
# run different workloads.
RUN_KEYS = _keys_of_role("conduct", "place")


# Keys in which rounds of one configuration may differ (report/spread.py): they change neither what
# a run computes nor how fast.
PLACE_KEYS = _keys_of_role("place")


def workload(config: RunConfig) -> dict[str, Any]:
    """The configuration less RUN_KEYS, flat: what a checkpoint must share with the run that
    loads it."""
    flat = _flatten(config.to_dict(), "configuration")
    return {key: value for key, value in flat.items() if key not in RUN_KEYS}


def load_saved(path: Path, overrides: dict[str, Any]) -> RunConfig:
    """The configuration a run saved (`config.json` in its run directory), with `overrides` of
    RUN_KEYS only: `run --resume` continues the same workload."""
    saved = files.read_json(
        path,
        "--resume",
        if_missing="give the run directory of a run this version started (it saves its "
        "configuration there)",
    )
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} holds no JSON object: it is not a run's config.json")
    changed = sorted(key for key in overrides if key not in RUN_KEYS)
    if changed:
        raise UserError(
            f"--resume: --set {changed[0]} would change the workload of the run being resumed; "
            f"only these keys may change: {', '.join(sorted(RUN_KEYS - {'output_dir'}))}"
        )
    return _build({**_flatten(saved, str(path)), **overrides})


class Key(NamedTuple):
    """A settable key as `retinaperf presets --keys` lists it."""

    name: str  # qualified: section.key, or the key alone at the root
    kind: str  # what it takes
    default: str  # as `--set` would write it
    help: str


def all_keys() -> list[Key]:
    """Every key `--set` takes (all but `preset`), from the settings' metadata."""
    return [
        Key(
            f"{key.section}.{name}" if key.section else name,
            type_name(key.kind),
            as_text(key.field.default),
            key.field.metadata["help"],
        )
        for name, key in _KEYS.items()
        if name != "preset"
    ]
