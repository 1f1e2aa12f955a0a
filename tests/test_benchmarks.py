"""The README's benchmark table is generated from benchmarks/results/latest.json, never typed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
common = importlib.util.module_from_spec(_spec)
sys.modules["bench_common"] = common  # dataclasses look their module up while being made
_spec.loader.exec_module(common)


def test_readme_table_is_the_rendering_of_latest_json():
    latest = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    readme = (ROOT / "README.md").read_text()
    section = common.readme_section(latest)
    assert section in readme
    assert common.replace_readme_section(readme, section) == readme


def test_every_comparison_says_whether_it_met_its_goal():
    latest = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    for c in latest["comparisons"]:
        assert c["met"] == (c["ratio"] >= c["goal"]), c["name"]
        if c["unit"] == "s":  # a speed-up: the baseline's time over ours
            assert c["ratio"] == pytest.approx(c["baseline_value"] / c["ours_value"])


def test_a_table_names_a_missed_goal():
    row = common.speedup("loss", "w", "torchvision", 2.0, "ours", 1.0, goal=10).to_dict()
    assert not row["met"] and "**no**" in common.table([row])
    assert "2.00×" in common.table([row]) and "≥ 10×" in common.table([row])
