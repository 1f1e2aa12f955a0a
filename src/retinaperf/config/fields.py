"""What a configuration key is (`setting`: default, help, range, role) and the one check of a
value against its key's type and range, wherever the value comes from: msgspec checks and converts
the value, this module says in one line what to use instead."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field
from typing import Annotated, Any, Literal

import msgspec

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
    # The range as msgspec's constraint (no bound: no constraint), declared once: msgspec checks
    # values against the key's type annotated with it, and `_range_need` reads it back.
    # msgspec takes a lower bound as ge or gt, not both (None: no bound).
    bounds = msgspec.Meta(gt=gt, le=le) if gt is not None else msgspec.Meta(ge=ge, le=le)
    return field(default=default, metadata={"help": help, "role": role, "bounds": bounds})


class Checked:
    """Checks every setting against its type and range when a configuration is made, however it
    is made; a subclass's `__post_init__` adds the checks that involve more than one key."""

    def __post_init__(self) -> None:
        cls: type = type(self)
        for f, kind in settings_of(cls):
            # Stored as the type holds it: an int given for a float, a list for a tuple.
            setattr(self, f.name, valid(f, kind, getattr(self, f.name), "config"))


def check(condition: bool, key: str, value: object, need: str) -> None:
    """A check beyond one key's type and range (a `__post_init__`'s): UserError unless
    `condition`, in the one-line form of every other."""
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
    bounds: msgspec.Meta = f.metadata["bounds"]
    try:
        # strict: a value of the type or what JSON would hold for it (an int for a float, a list
        # for a tuple), never a look-alike (True for an int, 16.0 for an int, "16" for an int).
        return msgspec.convert(value, type=Annotated[kind, bounds], strict=True)
    except msgspec.ValidationError:
        pass
    try:
        typed = msgspec.convert(value, type=kind, strict=True)
    except msgspec.ValidationError:
        raise _invalid(where, f.name, value, _type_need(kind)) from None
    # Of the type but out of its range: shown as the type holds it (0.0, not 0, for a float).
    raise _invalid(where, f.name, typed, _range_need(bounds))


def _type_need(kind: Any) -> str:
    """What to use instead of a value that is not of the type `kind`."""
    if typing.get_origin(kind) is Literal:
        return f"use one of {', '.join(typing.get_args(kind))}"
    if typing.get_origin(kind) is tuple:
        return "use integers, e.g. 16,22"
    return _PLAIN_TYPES[kind][1]


def _range_need(bounds: msgspec.Meta) -> str:
    """What to use instead of a value outside `bounds`."""
    if bounds.le is not None:
        return f"use a value in [{bounds.ge}, {bounds.le}]"
    if bounds.gt is not None:
        return "use a positive number" if bounds.gt == 0 else f"use a number above {bounds.gt}"
    return f"use {bounds.ge} or more"


def from_text(text: str, kind: Any) -> Any:
    """The value a preset file would hold for the `--set` text, or the text itself where it is
    none of the type's (then `valid` says what to use). A string or a choice is the text as
    given; true, false and numbers are read as JSON spells them (as a preset file does, though
    TOML would also take `+3`, `1_000` or `inf`): `True`, `yes` or `1` is no bool, `1.5` or `1e3`
    no integer; a list of integers is written bare, `16,22`."""
    if kind is str or typing.get_origin(kind) is Literal:
        return text
    spelled = f"[{text}]" if typing.get_origin(kind) is tuple else text
    try:
        return msgspec.json.decode(spelled, type=kind)
    except msgspec.DecodeError:  # not JSON, or JSON of another type (ValidationError)
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
