"""docs/faults.md: every fault it lists names tests, and every test it names exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_every_fault_row_names_tests_that_exist():
    rows = [
        line
        for line in (ROOT / "docs" / "faults.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| fault", "| ---"))
    ]
    assert len(rows) >= 30
    for row in rows:
        references = REFERENCE.findall(row.rsplit("|", 2)[1])
        assert references, f"no test named for: {row[:80]}"
        for path, name in references:
            tree = ast.parse((ROOT / path).read_text())
            defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert name in defined, f"{path}::{name} (named in docs/faults.md) does not exist"
