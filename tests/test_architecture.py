"""The folders are layers (docs/architecture.md): a module imports from its own layer and the
layers below it, never from one above, and the modules of a package never import each other in a
cycle. The rules are import-linter contracts in pyproject.toml, which `lint-imports` (`make lint`)
holds the package to; these tests show, on a small package of the same shape, that the contracts
as written there catch what they are for."""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

import pytest
from importlinter import api, cli

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
FAKE = "fakeperf"  # not `retinaperf`: that name already means the real package in this process


def contracts() -> dict:
    """The project's import-linter configuration, for the package FAKE instead."""
    config = api.read_configuration(str(PYPROJECT))

    def renamed(value):
        if isinstance(value, list):
            return [renamed(v) for v in value]
        return re.sub(r"\bretinaperf\b", FAKE, value)

    return {
        "root_packages": renamed(config["session_options"]["root_packages"]),
        "contracts": [{k: renamed(v) for k, v in c.items()} for c in config["contracts_options"]],
    }


def layers() -> list[list[str]]:
    """The modules of each layer of the layers contract, highest first; optional ones left out."""
    (contract,) = [c for c in contracts()["contracts"] if c["type"] == "layers"]
    return [
        [name.strip() for name in re.split(r"[|:]", layer) if not name.strip().startswith("(")]
        for layer in contract["layers"]
    ]


def write_package(root: Path, modules: dict[str, str]) -> None:
    """FAKE under `root`: its layers' modules, each importing the first of the layer below (which
    the contracts allow), plus `modules` ({"model/x.py": source}) on top."""
    package = root / FAKE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for layer, below in zip(layers(), [*layers()[1:], None], strict=True):
        source = f"from {FAKE} import {below[0]}\n" if below else ""
        for name in layer:
            if name.startswith("__"):  # __main__
                (package / f"{name}.py").write_text(source)
            else:
                (package / name).mkdir()
                (package / name / "__init__.py").write_text(source)
    for path, source in modules.items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(source)


def write_config(path: Path) -> None:
    """The contracts as an INI file (`.importlinter`'s format) that lint-imports reads."""
    config = contracts()
    ini = configparser.RawConfigParser()
    (root,) = config["root_packages"]
    ini["importlinter"] = {"root_package": root}
    for contract in config["contracts"]:
        options = dict(contract)
        ini[f"importlinter:contract:{options.pop('id')}"] = {
            key: "\n".join(value) if isinstance(value, list) else value
            for key, value in options.items()
        }
    with open(path, "w", encoding="utf-8") as f:
        ini.write(f)


def lint(tmp_path: Path, monkeypatch, capsys, modules: dict[str, str]) -> tuple[int, str]:
    write_package(tmp_path / "src", modules)
    write_config(tmp_path / "contracts.ini")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    code = cli.lint_imports(
        config_filename=str(tmp_path / "contracts.ini"), no_cache=True, no_logo=True
    )
    return code, capsys.readouterr().out


def test_a_package_of_the_documented_shape_keeps_the_contracts(tmp_path, monkeypatch, capsys):
    code, out = lint(tmp_path, monkeypatch, capsys, {})
    assert code == 0, out
    assert "2 kept, 0 broken" in out


@pytest.mark.parametrize(
    ("modules", "broken"),
    [
        pytest.param(
            {"model/x.py": f"from {FAKE}.run import y\n"},
            f"{FAKE}.model is not allowed to import {FAKE}.run",
            id="upward-import",
        ),
        pytest.param(
            {"model/x.py": f"from {FAKE}.data import y\n"},
            f"{FAKE}.model is not allowed to import {FAKE}.data",
            id="independent-siblings",
        ),
        pytest.param(
            {"run/a.py": f"from {FAKE}.run import b\n", "run/b.py": f"from {FAKE}.run import a\n"},
            f"No cycles are allowed in {FAKE}.run",
            id="cycle-in-a-layer",
        ),
        pytest.param(
            {
                "measure/devices/__init__.py": "",
                "measure/devices/p.py": f"from {FAKE}.measure.devices import q\n",
                "measure/devices/q.py": f"from {FAKE}.measure.devices import p\n",
            },
            f"No cycles are allowed in {FAKE}.measure.devices",
            id="cycle-in-a-subpackage",
        ),
        pytest.param(
            {
                "config/x.py": f"from {FAKE} import errors\n",
                "errors/x.py": f"import {FAKE}.config\n",
            },
            f"No cycles are allowed in {FAKE}.\n",
            id="cycle-in-the-base",
        ),
        pytest.param(
            {"extra.py": ""},
            f"- {FAKE}.extra",
            id="a-module-in-no-layer",
        ),
    ],
)
def test_the_contracts_catch(tmp_path, monkeypatch, capsys, modules, broken):
    code, out = lint(tmp_path, monkeypatch, capsys, modules)
    assert code != 0
    assert broken in out, out


PACKAGE = Path(__file__).resolve().parent.parent / "src" / "retinaperf"


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


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_module_imports_another_modules_underscore_names(path: Path):
    private = private_imports(path)
    assert not private, f"{path.relative_to(PACKAGE)} imports {private}: make them public"


def test_the_private_import_check_sees_one(tmp_path):
    module = tmp_path / "x.py"
    module.write_text("from retinaperf.config.fields import _valid, setting\n")
    assert private_imports(module) == ["retinaperf.config.fields._valid"]


# Small enough to read in one sitting (the project's style): a module, and a function in it.
MODULE_LINES, FUNCTION_LINES = 450, 80


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_modules_and_functions_stay_readable_in_one_sitting(path: Path):
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MODULE_LINES, f"split {path.name} by concern"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > FUNCTION_LINES
    ]
    assert not long, f"{path.name}: split {long} into named steps"
