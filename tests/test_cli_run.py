"""End to end through the real CLI: what a researcher types and what they get."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import cli, nothing_created, run_dirs, write_config

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| (INFO|DEBUG|WARNING|ERROR)\s* \| [\w.]+:\w+:\d+ - ")


@pytest.mark.slow
def test_run_creates_a_complete_run_directory_and_mlflow_run(project: Path) -> None:
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    key = run_dir.name
    assert re.fullmatch(r"FitOLS_\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{6}Z_[a-z0-9]{8}", key)
    for name in [
        "run.json",
        "args.json",
        "output.log",
        "output.jsonl",
        "reproducible.json",
        "results.pickle",
        "metrics.jsonl",
    ]:
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["key"] == key and record["node"] == "FitOLS"
    assert record["ended_at"] >= record["started_at"]
    assert json.loads((run_dir / "args.json").read_text()) == {
        "dataset": "data/diabetes.csv",
        "target": "target",
        "seed": 0,
    }
    # the seed's text format, and the same records as JSON lines
    log_lines = (run_dir / "output.log").read_text().splitlines()
    assert log_lines and all(LOG_LINE.match(line) for line in log_lines if not line.startswith((" ", "Traceback")))
    assert any("Got 442 samples." in line for line in log_lines)
    jsonl = [json.loads(line) for line in (run_dir / "output.jsonl").read_text().splitlines()]
    assert any(rec["record"]["message"] == "Got 442 samples." for rec in jsonl)
    repro = json.loads((run_dir / "reproducible.json").read_text())
    assert {"git", "python", "platform", "hostname", "hardware", "packages"} <= set(repro)
    assert "mlflow" in {name.lower() for name in repro["packages"]}
    sys.path.insert(0, str(project))
    try:
        result = pickle.loads((run_dir / "results.pickle").read_bytes())
    finally:
        sys.path.remove(str(project))
    assert result.mse > 0 and "fit_intercept" in result.params
    # the seed example's own storage use
    assert (project / "data_storage" / "datasets" / key / "datasets.pickle").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}")
    run = client.get_run(record["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["phd_flow.key"] == key
    assert run.info.run_name == f"FitOLS_{key[7:23]}_{key[-8:]}"  # short, keeps the distinguishing suffix
    assert run.data.params == {"dataset": "data/diabetes.csv", "target": "target", "seed": "0"}
    assert run.data.tags["phd_flow.key"] == key and run.data.tags["phd_flow.node"] == "FitOLS"
    assert run.data.metrics["mse"] == pytest.approx(result.mse)
    assert client.get_experiment(run.info.experiment_id).name == "test"


def test_nodes_lists_nodes_with_their_docstring(project: Path) -> None:
    proc = cli(project, "nodes")
    assert proc.returncode == 0
    assert "FitOLS" in proc.stdout and "Fit an OLS on a csv file" in proc.stdout


def test_unknown_node_lists_known_ones_and_closest_match(project: Path) -> None:
    proc = cli(project, "run", "FitOSL", "--dataset", "x")
    assert proc.returncode == 2
    assert "No node named 'FitOSL'" in proc.stderr and "Did you mean 'FitOLS'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dotted_node_name_works(project: Path) -> None:
    proc = cli(project, "run", "fit_ols.FitOLS", "--help")
    assert proc.returncode == 0
    assert "--dataset" in proc.stdout and "path to csv dataset" in proc.stdout


def test_missing_required_argument_is_a_usage_error(project: Path) -> None:
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv")
    assert proc.returncode == 2
    assert "--target" in proc.stderr and "required" in proc.stderr
    assert nothing_created(project / "data_storage")


def test_bad_argument_value_is_a_usage_error(project: Path) -> None:
    proc = cli(project, "run", "FitOLS", "--dataset", "d", "--target", "t", "--seed", "abc")
    assert proc.returncode == 2 and "invalid int value: 'abc'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "exit_code"),
    [(["--help"], 0), (["nodes"], 0), (["run", "FitOLS", "--help"], 0), (["run", "FitOLS"], 2), (["run", "Nope"], 2)],
)
def test_help_nodes_and_argument_errors_do_not_import_heavy_sdks(
    project: Path, argv: list[str], exit_code: int
) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from phd_flow.cli import main
        try:
            code = main("my_project", {argv!r})
        except SystemExit as exc:
            code = exc.code
        print("EXIT", code or 0)
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"mlflow", "boto3", "b2sdk", "botocore"}})
        print("HEAVY", heavy)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=60, check=False
    )
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert f"EXIT {exit_code}\n" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_config_option_and_env_var_pick_another_config(project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(f'local_path = "{tmp_path / "elsewhere"}"\n[mlflow]\nenabled = false\n')
    proc = cli(project, "--config", str(other), "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert proc.returncode == 0, proc.stderr
    assert len(run_dirs(tmp_path / "elsewhere")) == 1
    proc = cli(
        project,
        "run",
        "FitOLS",
        "--dataset",
        "data/diabetes.csv",
        "--target",
        "target",
        env={"PHD_FLOW_CONFIG": str(other)},
    )
    assert proc.returncode == 0, proc.stderr
    assert len(run_dirs(tmp_path / "elsewhere")) == 2
    assert nothing_created(project / "data_storage")
    record = json.loads((run_dirs(tmp_path / "elsewhere")[0] / "run.json").read_text())
    assert record["mlflow"]["state"] == "disabled"


@pytest.mark.slow
def test_missing_default_config_uses_defaults_and_says_so(project: Path) -> None:
    (project / "config" / "default.toml").unlink()
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert proc.returncode == 0, proc.stderr
    assert "No config file at" in proc.stderr and "using the defaults" in proc.stderr
    assert len(run_dirs(project / "data_storage")) == 1


def test_config_error_exits_2_with_file_and_line(project: Path) -> None:
    write_config(project, 'local_path = "x"\n[mlflow]\nexperimnt = "a"\n')
    proc = cli(project, "run", "FitOLS", "--dataset", "d", "--target", "t")
    assert proc.returncode == 2
    assert "default.toml:3" in proc.stderr and "Did you mean 'experiment'?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_local_remote_mirrors_every_run(project: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    write_config(
        project,
        f'local_path = "${{PROJECT_ROOT}}/data_storage"\n[storage]\nbackend = "local"\nremote = "{shared}"\nprefix = "my_project"\n',
    )
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    mirrored = shared / "my_project" / run_dir.name
    for name in ["run.json", "args.json", "output.log", "results.pickle"]:
        assert (mirrored / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert json.loads((mirrored / "run.json").read_text())["sync"]["state"] == "synced"
    assert (shared / "my_project" / "datasets" / run_dir.name / "datasets.pickle").is_file()


@pytest.mark.slow
def test_sync_checksum_sends_a_same_size_edit_whose_old_mtime_was_restored(project: Path, tmp_path: Path) -> None:
    """docs/storage.md: a plain sync trusts an unchanged size+mtime (like rsync); `sync --checksum`
    (alias `--verify`) re-hashes every local file of every run and sends what differs."""
    shared = tmp_path / "shared"
    write_config(
        project,
        f'local_path = "${{PROJECT_ROOT}}/data_storage"\n[storage]\nbackend = "local"\nremote = "{shared}"\nprefix = "p"\n',
    )
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    local, mirrored = run_dir / "args.json", shared / "p" / run_dir.name / "args.json"
    original = local.read_bytes()
    for flag, word in (("--checksum", b"TARGET"), ("--verify", b"tArGeT")):
        old, before = local.stat(), local.read_bytes()
        edited = original.replace(b"target", word)
        assert edited != before and len(edited) == len(before)
        local.write_bytes(edited)
        os.utime(local, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert cli(project, "sync", run_dir.name).returncode == 0
        assert mirrored.read_bytes() == before  # the documented limit of the size+mtime quick check
        proc = cli(project, "sync", flag)
        assert proc.returncode == 0, proc.stderr
        assert mirrored.read_bytes() == edited, flag


def test_run_imports_only_the_module_that_defines_the_node(project: Path) -> None:
    """`run Light` must not pay for the imports of another node's module (torch, sklearn, ...)."""
    marker = project / "heavy-imported"
    (project / "my_project" / "heavy.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "import dataclasses\nfrom phd_flow import Node, node\n\n\n"
        "@dataclasses.dataclass\nclass HArgs(node.Args):\n    x: int = 1\n\n\n"
        "class Heavy(Node[HArgs, int]):\n    def _run(self) -> int:\n        return 1\n"
    )
    (project / "my_project" / "light.py").write_text(
        "import dataclasses\nfrom phd_flow import Node, node\n\n\n"
        "@dataclasses.dataclass\nclass LArgs(node.Args):\n    x: int = 1\n\n\n"
        "class Light(Node[LArgs, int]):\n    def _run(self) -> int:\n        return self.args.x\n"
    )
    write_config(project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    proc = cli(project, "run", "Light", "--x", "3")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    proc = cli(project, "nodes")  # read from the source: no module of the package is imported
    assert proc.returncode == 0 and "Heavy" in proc.stdout and "Light" in proc.stdout
    assert not marker.exists()
    assert cli(project, "run", "Heavy").returncode == 0
    assert marker.exists()


def test_run_help_lists_the_node_fields_first_and_required_ones_as_such(project: Path) -> None:
    """Issue 16: `(required)` instead of `(default: None)`, no `(default: [])` on run options,
    the node's own fields before phd_flow's options; no INFO line about the config file."""
    proc = cli(project, "run", "FitOLS", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"--dataset str +path to csv dataset \(required\)", out), out
    assert re.search(r"--seed int +random seed of the train/test split \(default: 0\)", out), out
    assert "(default: [])" not in out and "(default: None)" not in out
    assert out.index("--dataset str  ") < out.index("--args-file FILE  ") < out.index("phd_flow run options")
    assert re.search(r"--load STAGE=KEY +load STAGE from run KEY", out), out
    quiet, verbose = cli(project, "ls"), cli(project, "-v", "ls")
    assert quiet.returncode == 0 and "Loading config" not in quiet.stderr
    assert "Loading config from file" in verbose.stderr
