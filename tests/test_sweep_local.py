"""Sweeps with the local executor, through the real CLI: grid, sweep record, failures, resume, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from phd_flow.errors import ArgsError
from phd_flow.sweeps.grid import parse_grid
from tests.conftest import EXAMPLES, cli, nothing_created, run_dirs, write_config
from tests.nodes import Add
from tests.sweep_nodes import Scale

NODES = Path(__file__).with_name("sweep_nodes.py")
NO_MLFLOW = 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n'


def make_project(root: Path, config: str = NO_MLFLOW) -> Path:
    """A minimal project: my_project with only the sweep test nodes (no pandas/sklearn to import)."""
    package = root / "my_project"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Sweep test project."""\n')
    (package / "__main__.py").write_text((EXAMPLES / "my_project" / "__main__.py").read_text())
    (package / "sweep_nodes.py").write_text(NODES.read_text())
    write_config(root, config)
    return root


def sweep_record(project: Path) -> dict[str, Any]:
    (sweep_dir,) = [d for d in run_dirs(project / "data_storage") if d.name.startswith("Sweep_")]
    return dict(json.loads((sweep_dir / "run.json").read_text()))


def point_records(project: Path) -> dict[str, dict[str, Any]]:
    dirs = [d for d in run_dirs(project / "data_storage") if not d.name.startswith("Sweep_")]
    return {d.name: json.loads((d / "run.json").read_text()) for d in dirs}


@pytest.fixture
def sproject(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def test_3x2_grid_runs_six_points_with_their_own_keys_and_a_sweep_record(sproject: Path) -> None:
    proc = cli(sproject, "sweep", "Scale", "--grid", "seed=1,2,3", "--grid", "alpha=0.5,2", "--max-parallel", "3")
    assert proc.returncode == 0, proc.stderr
    record = sweep_record(sproject)
    assert record["kind"] == "sweep" and record["node"] == "Scale" and record["status"] == "completed"
    assert record["grid"] == {"seed": ["1", "2", "3"], "alpha": ["0.5", "2"]}
    assert record["executor"] == {"kind": "local", "max_parallel": 3}
    params = [p["params"] for p in record["points"]]
    assert params == [{"seed": s, "alpha": a} for s in (1, 2, 3) for a in (0.5, 2.0)]
    runs = point_records(sproject)
    assert sorted(runs) == sorted(p["key"] for p in record["points"])  # 6 distinct, pre-assigned keys
    for point in record["points"]:
        run = runs[point["key"]]
        assert (run["status"], run["sweep"]) == ("completed", record["key"])
        assert run["args"]["seed"] == point["params"]["seed"]
        assert run["args"]["alpha"] == point["params"]["alpha"] and point["status"] == "completed"
        assert f"completed {point['key']}" in proc.stdout
    assert "finished: 6 completed" in proc.stdout


@pytest.mark.slow
def test_a_failing_point_is_reported_and_resume_reruns_only_it_in_the_same_mlflow_run(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "proj", 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "sweeps"\n'
    )
    allow = tmp_path / "allow"
    proc = cli(project, "sweep", "Scale", "--fail_seed", "2", "--allow_file", str(allow), "--grid", "seed=1,2")
    assert proc.returncode == 1
    assert "1 completed, 1 failed" in proc.stdout and "RuntimeError: seed 2 is set to fail" in proc.stdout
    record = sweep_record(project)
    ok, failed = (p["key"] for p in record["points"])
    assert [p["status"] for p in record["points"]] == ["completed", "failed"]
    assert record["status"] == "failed" and f"sweep --resume {record['key']}" in proc.stderr
    before = point_records(project)

    allow.touch()
    proc = cli(project, "sweep", "--resume", record["key"][:20])
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 runs to run (1 completed" in proc.stdout
    after = point_records(project)
    assert sorted(after) == sorted(before)  # same keys, no new run directories
    assert after[failed]["status"] == "completed" and after[failed]["resumed"] is True
    assert after[ok]["started_at"] == before[ok]["started_at"]  # not run again
    assert sweep_record(project)["status"] == "completed"
    status = cli(project, "sweep", "--status", record["key"])
    assert status.returncode == 0 and "(2 completed)" in status.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    tagged = client.search_runs([experiment.experiment_id], f"tags.`phd_flow.sweep` = '{record['key']}'")
    assert sorted(r.data.tags["phd_flow.key"] for r in tagged) == sorted([ok, failed])  # the retry reused its run
    assert {r.info.status for r in tagged} == {"FINISHED"}
    assert after[failed]["mlflow"]["run_id"] == before[failed]["mlflow"]["run_id"]


def test_bad_grid_fails_before_anything_runs_and_without_importing_mlflow(sproject: Path) -> None:
    code = (
        "import sys\nfrom phd_flow.cli import main\n"
        "code = main('my_project', sys.argv[1:])\n"
        "print('HEAVY', sorted(m for m in ('mlflow', 'submitit', 'optuna') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    procs = {}
    for args, code_expected in ((("--grid", "seed=1,x"), 2), (("--help",), 0)):
        proc = procs[args[0]] = subprocess.run(
            [sys.executable, "-c", code, "sweep", "Scale", *args],
            cwd=sproject,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == code_expected, (args, proc.stderr)
        assert "HEAVY []" in proc.stdout and "Traceback" not in proc.stderr
    assert "error: --grid seed: 'x' is not a valid int for Scale's argument 'seed'" in procs["--grid"].stderr
    assert "--grid FIELD=V1,V2" in procs["--help"].stdout and "--fail_seed" in procs["--help"].stdout
    assert nothing_created(sproject / "data_storage")


@pytest.mark.parametrize(
    ("base", "grid", "message"),
    [
        ([], ["seed=1,x"], "'x' is not a valid int for Scale's argument 'seed'"),
        ([], ["sed=1,2"], "Scale has no argument 'sed'. Did you mean 'seed'?"),
        (
            [],
            ["mode=fast,slwo"],
            "'slwo' is not accepted for Scale's argument 'mode'. Did you mean 'slow'? Accepted values: fast, slow",
        ),
        ([], ["seed"], "write it as FIELD=V1,V2"),
        ([], [], "at least one --grid"),
        ([], ["seed=1", "seed=2"], "given twice"),
        (["--bogus", "1"], ["seed=1"], "unrecognized arguments: --bogus 1"),
    ],
)
def test_bad_grids_name_the_field_and_the_fix(base: list[str], grid: list[str], message: str) -> None:
    with pytest.raises(ArgsError) as caught:
        parse_grid(Scale, base, grid)
    assert message in str(caught.value)


def test_grid_values_are_parsed_with_the_node_parsers_types() -> None:
    (lr, b) = parse_grid(Add, ["--a", "1"], ["lr=0.1,1e-3", "b=3,4"])
    assert (lr.name, lr.option, lr.values) == ("lr", "--lr", (0.1, 0.001))
    assert (b.option, b.values) == ("-b", (3, 4))  # simple-parsing: one-letter fields get one dash
    (verbose,) = parse_grid(Scale, [], ["verbose=true,no"])
    assert verbose.values == (True, False)
    (dotted,) = parse_grid(Add, ["--a", "1"], ["optim.momentum=0.5"])
    assert dotted.option == "--momentum"
    with pytest.raises(ArgsError, match="arguments are required: -a"):
        parse_grid(Add, [], ["b=1"])  # every point is parsed in full
    (a,) = parse_grid(Add, [], ["a=1,2"])  # ... and a grid may supply a required field
    assert a.values == (1, 2)


def test_slurm_executor_without_sbatch_is_one_clear_error(sproject: Path) -> None:
    proc = cli(
        sproject,
        "sweep",
        "Scale",
        "--grid",
        "seed=1",
        "--executor",
        "slurm",
        env={"PATH": str(Path(sys.executable).parent)},
    )
    assert proc.returncode == 2
    assert "sbatch, which is not on PATH" in proc.stderr and "Traceback" not in proc.stderr
    assert nothing_created(sproject / "data_storage")


def test_ctrl_c_stops_the_sweep_and_marks_unfinished_points_killed(sproject: Path, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_"))}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "my_project",
            "sweep",
            "Nap",
            "--marker_dir",
            str(markers),
            "--grid",
            "seconds=60,61,62",
            "--max-parallel",
            "1",
        ],
        cwd=sproject,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(markers.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: 3 killed" in out
    record = sweep_record(sproject)
    assert [p["status"] for p in record["points"]] == ["killed"] * 3 and record["status"] == "killed"
    (started,) = point_records(sproject).values()  # the running point recorded its own end
    assert started["status"] == "killed" and started["key"] == record["points"][0]["key"]


def test_resume_keeps_the_recorded_executor_options_unless_overridden_and_hints_the_exact_command(
    tmp_path: Path,
) -> None:
    """Issue 19 row 2 (local half): the sweep records executor and parallelism; --resume uses them,
    an explicit --max-parallel overrides (and is recorded), and every hint is the full command."""
    project = make_project(tmp_path / "proj")
    allow = tmp_path / "allow"
    argv = (
        "sweep",
        "Scale",
        "--fail_seed",
        "2",
        "--allow_file",
        str(allow),
        "--grid",
        "seed=1,2",
        "--max-parallel",
        "1",
    )
    proc = cli(project, *argv)
    assert proc.returncode == 1
    key = sweep_record(project)["key"]
    hint = f"python -m my_project sweep --resume {key} --executor local"
    assert hint in proc.stderr
    shown = cli(project, "sweep", "--status", key)
    assert hint in shown.stdout and "RuntimeError: seed 2 is set to fail" in shown.stdout
    allow.touch()
    resumed = cli(project, "sweep", "--resume", key, "--max-parallel", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "on local" in resumed.stdout
    assert sweep_record(project)["executor"] == {"kind": "local", "max_parallel": 3}


@pytest.mark.parametrize(
    "statuses",
    [{"completed"}, {"failed"}, {"killed"}, {"completed", "failed"}, {"completed", "killed"}, {"failed", "killed"}],
)
def test_a_sweeps_mlflow_status_is_the_status_of_its_record(statuses: set[str]) -> None:
    """A sweep whose points ended says the same in its record and in MLflow (one failed and one
    killed point: the record said failed, MLflow said KILLED)."""
    from phd_flow.sweeps.grid import mlflow_close_status, overall_status

    assert mlflow_close_status(statuses) == overall_status(dict.fromkeys(statuses, 1), "running")
