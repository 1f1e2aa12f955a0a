"""The folders are layers (docs/architecture.md): a module imports from its own layer and the
layers below it, never from one above, and never another module's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "retinaperf"
# Lowest first. The base modules sit at the package's top level.
LAYERS = {
    "errors": 0,
    "files": 0,
    "invocation": 0,
    "units": 0,
    "clock": 0,
    "config": 0,
    "distributed": 0,
    "torch_compat": 0,
    "model": 1,
    "data": 1,
    "measure": 2,
    "report": 3,
    "run": 4,
    "cli": 5,
    "__main__": 5,
    "__init__": 0,
}


def layer_of(dotted: str) -> int:
    """The layer of `retinaperf.<part>...` (a module, a subpackage or a name in the base)."""
    part = dotted.split(".")[1]
    return LAYERS[part]


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> list[str]:
    """The package's modules that `path` imports, as dotted names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("retinaperf")
        ):
            if node.module == "retinaperf":
                found += [f"retinaperf.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("retinaperf.")]
    return found


def test_every_module_has_a_layer():
    for path in modules():
        assert path.relative_to(PACKAGE).parts[0].removesuffix(".py") in LAYERS, path


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_higher_layer(path: Path):
    own = LAYERS[path.relative_to(PACKAGE).parts[0].removesuffix(".py")]
    higher = [name for name in imports(path) if layer_of(name) > own]
    assert not higher, f"{path.relative_to(PACKAGE)} imports {higher} from a higher layer"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: an import from a higher layer is found (here model/ importing run/)."""
    module = tmp_path / "x.py"
    module.write_text("from retinaperf.run.job import run\nfrom retinaperf import config\n")
    assert [layer_of(name) for name in imports(module)] == [LAYERS["run"], LAYERS["config"]]


def private_imports(path: Path) -> list[str]:
    """The underscore names `path` imports from the package's modules: another module's
    internals, which it may change without notice."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retinaperf")
        for alias in node.names
        if alias.name.startswith("_")
    ]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_underscore_names(path: Path):
    private = private_imports(path)
    assert not private, f"{path.relative_to(PACKAGE)} imports {private}: make them public"


def test_the_private_import_check_sees_one(tmp_path):
    module = tmp_path / "x.py"
    module.write_text("from retinaperf.config.fields import _valid, setting\n")
    assert private_imports(module) == ["retinaperf.config.fields._valid"]
