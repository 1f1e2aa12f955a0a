"""The preset files shipped in `retinaperf/presets/`: their names, what each is for, and their
tables (checked key by key where they are resolved, `resolver.py`)."""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from retinaperf.errors import UserError


def preset_names() -> list[str]:
    folder = resources.files("retinaperf") / "presets"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def preset_description(name: str) -> str:
    """The first comment line of a preset file, which says what it is for."""
    text = (resources.files("retinaperf") / "presets" / f"{name}.toml").read_text()
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()


def read_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    path = resources.files("retinaperf") / "presets" / f"{name}.toml"
    return tomllib.loads(path.read_text())
