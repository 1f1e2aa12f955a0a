"""Typed configuration: one dataclass per concern, composed by `RunConfig`.

Precedence, lowest first: the defaults < the preset file < the command line (`--set KEY=VALUE`
and its shortcut flags). Every key has a name unique across sections, so `--set lr=0.02` and
`--set train.lr=0.02` mean the same. Values are checked where they are defined, and again where
they are read (with the file or flag they came from); a bad one raises `UserError` naming the
key, the value and what to use.

    fields.py    what a key is (`setting`) and the check of a value against it (by msgspec)
    settings.py  the settings themselves, their defaults and help texts
    presets.py   the preset files: names, descriptions, tables
    resolver.py  `--set`, the precedence, a saved run's configuration, the keys' roles
    flagperf.py  FlagPerf's case config files read as data, their keys as these settings

This package's namespace is the configuration's public interface: the names below.
"""

from retinaperf.config.presets import preset_description, preset_names
from retinaperf.config.resolver import (
    PLACE_KEYS,
    PRECISIONS,
    RUN_KEYS,
    SYNTH_PROFILES,
    Key,
    all_keys,
    is_list_key,
    load_saved,
    parse_overrides,
    resolve,
    workload,
)
from retinaperf.config.settings import (
    BACKBONE_URL,
    THROUGHPUT_MODE,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    parse_step_window,
)

__all__ = [
    "BACKBONE_URL",
    "PLACE_KEYS",
    "PRECISIONS",
    "RUN_KEYS",
    "SYNTH_PROFILES",
    "THROUGHPUT_MODE",
    "DataConfig",
    "EvalConfig",
    "Key",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "all_keys",
    "is_list_key",
    "load_saved",
    "parse_overrides",
    "parse_step_window",
    "preset_description",
    "preset_names",
    "resolve",
    "workload",
]
