"""How a run ends: its outcome is written once, and what is drawn after it cannot change it."""

import json

from cli_helpers import run_cli

from retinaperf.report import plots
from retinaperf.report.events import read_events
from retinaperf.run import checkpoint


def test_plots_that_cannot_be_drawn_leave_a_completed_run_completed(
    tiny_dataset, tiny_run_args, tmp_path, monkeypatch, capsys
):
    """The plots fail (a full disk) after results.json says `completed`: the run stays
    completed with the numbers it measured, once, and says what was not written."""

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "write_plots", full_disk)
    out = tmp_path / "run"
    assert run_cli(tiny_run_args(tiny_dataset, out, max_steps=2)) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["reason"] is None
    (end,) = [e for e in read_events(out / "events.jsonl") if e["event"] == "run_end"]
    assert end["status"] == "completed"
    measured = {k: v for k, v in results["metrics"].items() if k != "evaluations"}
    assert {k: end[k] for k in measured} == measured  # the numbers of the one outcome
    (note,) = results["notes"]
    assert "No space left on device" in note and "retinaperf report --plots" in note
    assert note in capsys.readouterr().err
    assert (out / "report.md").exists() and not (out / "plots").exists()
    assert not checkpoint.folder(out).exists()  # a completed run's checkpoints still go
