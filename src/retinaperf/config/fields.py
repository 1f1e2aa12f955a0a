"""What a configuration key is (`setting`: default, help, range, role) and the one check of a
value against its key's type and range, wherever the value comes from."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field
from typing import Any, Literal

from retinaperf.errors import UserError

# What a key is about. "workload": what a run computes. "conduct": how the run is carried out and
# kept alive (workers, logging, profiling, checkpoints, timeouts): the same numbers, perhaps not
# the same speed. "place": where a run writes and what it records on the side: neither the
# numbers nor the speed.
Role = Literal["workload", "conduct", "place"]


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    role: Role = "workload",
) -> Any:
    """A configuration key: a dataclass field whose metadata hold its help text (for `retinaperf
    presets --keys`; kept here, not in the source, which an installation may lack), the range
    its value must lie in (>= ge, > gt, <= le) and its role."""
    return field(
        default=default, metadata={"help": help, "role": role, "ge": ge, "gt": gt, "le": le}
    )


class Checked:
    """Checks every setting against its type and range when a configuration is made, however it
    is made; a subclass's `__post_init__` adds the checks that involve more than one key."""

    def __post_init__(self) -> None:
        for f, kind in settings_of(type(self)):
            # Stored as the type holds it: an int given for a float, a list for a tuple.
            setattr(self, f.name, valid(f, kind, getattr(self, f.name), "config"))


def check(condition: bool, key: str, value: object, need: str) -> None:
    if not condition:
        raise _invalid("config", key, value, need)


def _invalid(where: str, key: str, value: object, need: str) -> UserError:
    return UserError(f"{where}: {key}={value!r} is not valid: {need}")


@functools.cache
def settings_of(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved type) of each setting of `cls`: the fields with a help text."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata)


# The plain types of keys: the name `presets --keys` gives each, and what to use instead of a value
# of another type.
_PLAIN_TYPES = {
    bool: ("true|false", "use true or false"),
    int: ("integer", "use an integer"),
    float: ("number", "use a number"),
    str: ("string", "use a string"),
}


def valid(f: dataclasses.Field, kind: Any, value: Any, where: str) -> Any:
    """`value` as the setting `f` of type `kind` holds it (a float for an int, a tuple for a
    list), or UserError naming `where` it came from, the key, the value and what to use."""
    need = None
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        need = None if value in choices else f"use one of {', '.join(choices)}"
    elif typing.get_origin(kind) is tuple:
        ints = isinstance(value, (list, tuple)) and all(type(v) is int for v in value)
        value, need = (tuple(value), None) if ints else (value, "use integers, e.g. 16,22")
    elif type(value) is kind or (kind is float and type(value) is int):  # not bool for int
        value = kind(value)
        need = _range_need(f.metadata, value)
    else:
        need = _PLAIN_TYPES[kind][1]
    if need:
        raise _invalid(where, f.name, value, need)
    return value


def _range_need(metadata: typing.Mapping[str, Any], value: float) -> str | None:
    """What to use when `value` lies outside a setting's bounds, else None."""
    ge, gt, le = metadata["ge"], metadata["gt"], metadata["le"]
    if (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le):
        return None
    if le is not None:
        return f"use a value in [{ge}, {le}]"
    if gt is not None:
        return "use a positive number" if gt == 0 else f"use a number above {gt}"
    return f"use {ge} or more"


def from_text(text: str, kind: Any) -> Any:
    """The value a preset file would hold for the `--set` text, or the text itself where it is
    none of the type's (then `valid` says what to use)."""
    try:
        if kind is bool:
            # Exactly what the keys' list says (true|false), as TOML spells them: `True` or `yes`
            # is refused with what to use, not taken.
            return {"true": True, "false": False}.get(text.strip(), text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is tuple:
            return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        pass
    return text


def type_name(kind: Any) -> str:
    """What a key takes, as `retinaperf presets --keys` shows it."""
    if typing.get_origin(kind) is Literal:
        return "|".join(typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return "integers"
    return _PLAIN_TYPES[kind][0]


def as_text(value: Any) -> str:
    """A default as `--set` would write it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)
