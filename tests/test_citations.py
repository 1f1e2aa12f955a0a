"""What the code's comments and docstrings cite exists: the repository holds its own contract.

A comment that names `measure.meter.summarize`, `model/transform.py` or docs/metrics.md's
"The workload" must name something that is there: a module renamed or a section moved leaves a
citation that this finds. Cited are: dotted names that start with one of the package's modules
(`report.events.EventLog`), file names (`checkpointer.py`, `benchmarks/bench_host.py`), and
docs/*.md with an optional quoted section.
"""

from __future__ import annotations

import ast
import importlib
import io
import pkgutil
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

import retinaperf

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "retinaperf"
TOP = sorted(module.name for module in pkgutil.iter_modules(retinaperf.__path__))
DOTTED = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})(?:\.[A-Za-z_]\w*)+)")
FILE = re.compile(r"(?<![\w.])([\w/]+\.py)\b")
DOC = re.compile(r"\b(docs/[\w/-]+\.md)(?:, \"([^\"]+)\")?")
# A dotted name that ends in a file's extension names a file (`config.json`), not an attribute.
EXTENSIONS = {"json", "jsonl", "md", "pt", "toml", "log", "png", "txt", "sha256", "damaged"}
# A file is cited by its name, its path in the repository or its path in the package.
PYTHON_FILES = {
    name
    for p in ROOT.rglob("*.py")
    if ".venv" not in p.parts
    for name in (p.name, str(p.relative_to(ROOT)))
} | {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}


def cited(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a module (a string standing as a
    statement: a module's, class's or function's docstring, or an attribute's after it)."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                yield node.lineno, node.value.value


def resolves(dotted: str) -> bool:
    """Whether `retinaperf.<dotted>` is a module, or a name in one (a dataclass's field too)."""
    parts = dotted.split(".")
    if parts[-1] in EXTENSIONS:
        return True
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module("retinaperf." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            fields = getattr(found, "__dataclass_fields__", {})
            if name in fields and not hasattr(found, name):
                return name == parts[-1]  # a field without a default: nothing further to read
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def sections(doc: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in doc.read_text().splitlines() if line[:1] == "#"}


def citations(package: Path = PACKAGE) -> list[tuple[str, str]]:
    """(where, what) for every citation in the package's modules that names nothing."""
    broken = []
    for path in sorted(package.rglob("*.py")):
        for line, text in cited(path):
            where = f"{path}:{line}"
            text = " ".join(text.split())  # a citation may wrap
            broken += [(where, name) for name in DOTTED.findall(text) if not resolves(name)]
            broken += [(where, name) for name in FILE.findall(text) if name not in PYTHON_FILES]
            for doc, section in DOC.findall(text):
                if not (ROOT / doc).exists():
                    broken.append((where, doc))
                elif section and section not in sections(ROOT / doc):
                    broken.append((where, f'{doc}, "{section}"'))
    return broken


def test_every_name_the_code_cites_exists():
    assert citations() == []


def test_no_comment_cites_a_document_outside_the_repository():
    outside = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, text in cited(path)
        if re.search(r"\bSPEC\b", text)
    ]
    assert outside == []


@pytest.mark.parametrize(
    ("text", "broken"),
    [
        ("see `measure.meter.summarize`", []),
        ("(data._kept_boxes)", ["data._kept_boxes"]),
        ("train.py assembles it", ["train.py"]),
        ('docs/metrics.md, "The workload"', []),
        ('docs/metrics.md, "No such section"', ['docs/metrics.md, "No such section"']),
    ],
)
def test_a_citation_of_nothing_is_found(text, broken, tmp_path):
    (tmp_path / "cites.py").write_text(f"# {text}\n")
    assert [name for _, name in citations(tmp_path)] == broken
