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


@pytest.mark.parametrize(
    ("baseline_s", "ours_s", "goal", "met"), [(3.0, 1.0, 2.5, True), (3.0, 1.5, 2.5, False)]
)
def test_a_speedup_is_the_baselines_time_over_ours_and_meets_its_goal_or_not(
    baseline_s, ours_s, goal, met
):
    row = common.speedup("x", "w", "base", baseline_s, "ours", ours_s, goal).to_dict()
    assert row["ratio"] == pytest.approx(baseline_s / ours_s)
    assert row["met"] is met and row["unit"] == "s"


def test_a_table_names_a_missed_goal():
    row = common.speedup("loss", "w", "torchvision", 2.0, "ours", 1.0, goal=10).to_dict()
    assert not row["met"] and "**no**" in common.table([row])
    assert "2.00×" in common.table([row]) and "≥ 10×" in common.table([row])
