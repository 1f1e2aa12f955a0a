"""Reading a run's results.json, of whichever version wrote it, in the current schema's shape
(`report.results`): every reader (the report, rounds, the run directory's checks, the GPU check)
goes through `load_results`, so that none needs to know which version wrote a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from retinaperf import invocation
from retinaperf.errors import UserError
from retinaperf.files import read_json
from retinaperf.report.results import RESULTS, check
from retinaperf.report.upgrade import upgrade

_STATUS_WORDS = {"interrupted": "was interrupted"}


def load_results(run_dir: Path, completed_only: bool = True) -> dict:
    """A run's results.json in the current schema's shape, whichever version wrote it (see
    `report.results`); by default only a completed run's, since the numbers of a run that
    stopped early do not stand beside others."""
    path = Path(run_dir) / RESULTS
    results = read_json(
        path, "report", if_missing="give finished runs' directories or a `run --repeat` folder"
    )
    if not isinstance(results, dict):
        raise UserError(f"report: {path} is not a JSON object: it is not a retinaperf results file")
    try:
        results = check(upgrade(results))
    except UserError as err:
        raise UserError(f"report: {path}: {err}") from None
    status = results["status"]
    if completed_only and status != "completed":
        raise UserError(
            f"report: {run_dir} is a run that {_STATUS_WORDS.get(status, status)} "
            f"({results['reason']}): resume it "
            f"with `{invocation.command('run', '--resume', run_dir)}`, or leave it out"
        )
    # Read as the JSON it is: its readers index it by name, whatever the schema version.
    return cast(dict[str, Any], results)
