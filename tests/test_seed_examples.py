"""The phd_flow seed README's example, verbatim (tests/data/seed_fit_ols.py.txt), runs through the
real CLI with its documented command: users' existing nodes keep working unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli, run_dirs

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.slow
def test_the_seed_readme_example_runs_as_written(project: Path) -> None:
    (project / "my_project" / "fit_ols.py").write_text((DATA / "seed_fit_ols.py.txt").read_text())
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(project / "data_storage")
    key = run_dir.name
    assert "Got 442 samples." in (run_dir / "output.log").read_text()
    assert (project / "data_storage" / "datasets" / key / "datasets.pickle").is_file()
    shown = cli(project, "result", key)
    assert shown.returncode == 0 and shown.stdout.startswith("FitOLSResult(mse="), shown.stderr[-3000:]
