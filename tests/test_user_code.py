"""Issue 15: the seeds' users' code as they wrote it: frozen Args, any field name, notebooks in a
subfolder, args from a file, ``storage.download`` returning the local path."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from phd_flow import Config, node
from phd_flow.config import MlflowConfig
from phd_flow.errors import NodeDefinitionError
from tests.conftest import EXAMPLES, cli, run_dirs, write_config
from tests.user_nodes import Collide, FileArgs, FromFile, Frozen, FrozenArgs, FrozenParent

NODES = Path(__file__).with_name("user_nodes.py")
NO_MLFLOW = 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n'
RUN_OPTION_FIELDS = ["key", "load", "skip_log", "cache", "no_cache", "rerun", "sweep", "args_file", "help"]


def local_config(tmp_path: Path) -> Config:
    return Config(local_path=tmp_path / "store", project_root=tmp_path, mlflow=MlflowConfig(enabled=False))


def make_project(root: Path) -> Path:
    """my_project with only tests/user_nodes.py (no pandas/sklearn to import), MLflow off."""
    package = root / "my_project"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Issue 15 test project."""\n')
    (package / "__main__.py").write_text((EXAMPLES / "my_project" / "__main__.py").read_text())
    (package / "user_nodes.py").write_text(NODES.read_text())
    write_config(root, NO_MLFLOW)
    return root


@pytest.fixture
def uproject(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def result_of(run_dir: Path) -> Any:
    return pickle.loads((run_dir / "results.pickle").read_bytes())


# --- 1. frozen Args; Args without @dataclass --------------------------------------------------


def test_frozen_args_define_and_run_from_python_dict_argv_and_require(tmp_path: Path) -> None:
    assert Frozen(FrozenArgs(x=3), config=local_config(tmp_path)).run() == 6
    assert Frozen({"x": 4}, config=local_config(tmp_path)).run() == 8
    assert Frozen(["--x", "5"], config=local_config(tmp_path)).run() == 10
    assert FrozenParent({"x": 1}, config=local_config(tmp_path)).run() == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        FrozenArgs().x = 2  # type: ignore[misc]


@pytest.mark.slow
def test_frozen_args_from_the_cli_and_a_sweep(uproject: Path) -> None:
    proc = cli(uproject, "run", "Frozen", "--x", "21")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(uproject / "data_storage")
    assert result_of(run_dir) == 42
    proc = cli(uproject, "sweep", "Frozen", "--grid", "x=1,2")
    assert proc.returncode == 0, proc.stderr
    results = sorted(result_of(d) for d in run_dirs(uproject / "data_storage") if d.name.startswith("Frozen_"))
    assert results == [2, 4, 42]


def test_args_without_dataclass_are_refused_at_class_definition_with_the_fix() -> None:
    class Plain(node.Args):
        name: str = "Bodo"

    with pytest.raises(NodeDefinitionError) as info:

        class Greet(node.Node[Plain, str]):
            def _run(self) -> str:
                return self.args.name

    message = str(info.value)
    assert "\n" not in message and "add `@dataclasses.dataclass` above `class Plain`" in message


def test_an_undecorated_subclass_of_dataclass_args_is_refused_too() -> None:
    class More(FrozenArgs):
        extra: int = 0

    with pytest.raises(NodeDefinitionError, match=r"@dataclasses\.dataclass"):

        class UsesMore(node.Node[More, int]):
            pass


# --- 2. any field name -----------------------------------------------------------------------


def test_fields_named_like_run_options_parse_in_python(tmp_path: Path) -> None:
    argv = ["--key", "K", "--load", "L", "--skip_log", "true", "--cache", "C", "--rerun", "3"]
    argv += ["--sweep", "S", "--args_file", "F", "--config", "X", "--help", "H", "--no_cache", "true"]
    result = Collide(argv, config=local_config(tmp_path)).run()
    assert result == {
        "key": "K",
        "load": "L",
        "skip_log": True,
        "cache": "C",
        "no_cache": True,
        "rerun": 3,
        "sweep": "S",
        "args_file": "F",
        "config": "X",
        "seed": 0,
        "help": "H",
        "verbose": False,
    }


def test_help_of_a_node_whose_fields_are_named_like_run_options(uproject: Path) -> None:
    proc = cli(uproject, "run", "Collide", "-h")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "conflicting" not in proc.stderr
    for name in RUN_OPTION_FIELDS:
        assert f"--{name}" in proc.stdout, name
    assert "before the node name" in proc.stdout


@pytest.mark.parametrize("field", RUN_OPTION_FIELDS)
def test_each_run_option_name_as_a_field_goes_to_the_node_after_its_name(uproject: Path, field: str) -> None:
    value = {"skip_log": "true", "no_cache": "true", "rerun": "7"}.get(field, "VALUE")
    proc = cli(uproject, "run", "Collide", f"--{field}", value)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(uproject / "data_storage")
    got = json.loads((run_dir / "args.json").read_text())[field]
    assert str(got).lower() == value.lower()


def test_run_options_before_the_node_name_reach_phd_flow_even_when_a_field_has_their_name(uproject: Path) -> None:
    proc = cli(uproject, "run", "--key", "Mine_1", "--no-cache", "Collide", "--key", "for-the-node", "--cache", "c2")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(uproject / "data_storage")
    assert run_dir.name == "Mine_1"
    args = json.loads((run_dir / "args.json").read_text())
    assert args["key"] == "for-the-node" and args["cache"] == "c2"


def test_documented_run_options_after_the_node_name_still_work(uproject: Path) -> None:
    proc = cli(uproject, "run", "Frozen", "--x", "2", "--key", "Frozen_doc", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(uproject / "data_storage")
    assert run_dir.name == "Frozen_doc" and result_of(run_dir) == 4


# --- 3. one config discovery -----------------------------------------------------------------


def _src_layout_project(root: Path) -> Path:
    """root/config/default.toml, the package in root/src/nbproj, a notebook dir root/notebooks."""
    write_config(root, NO_MLFLOW)
    package = root / "src" / "nbproj"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "user_nodes.py").write_text(NODES.read_text())
    (root / "notebooks").mkdir()
    return root


NOTEBOOK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "../src")
    import phd_flow
    from nbproj.user_nodes import Frozen

    n = Frozen({"x": 5})
    n.run()
    runs = phd_flow.find_runs()
    print("RUN_DIR", n.output_dir)
    print("FOUND", len(runs), phd_flow.load_result(runs[-1].key) if len(runs) else None)
    """
)


def _clean_env() -> dict[str, str]:
    drop = ("PHD_FLOW_CONFIG", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent)])
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def test_a_notebook_in_a_subfolder_sees_the_runs_it_makes(tmp_path: Path) -> None:
    root = _src_layout_project(tmp_path / "project")
    proc = subprocess.run(
        [sys.executable, "-c", NOTEBOOK],
        cwd=root / "notebooks",
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"RUN_DIR {root / 'data_storage'}" in proc.stdout, proc.stdout
    assert "FOUND 1 10" in proc.stdout, proc.stdout + proc.stderr
    assert not (root / "notebooks" / "data_storage").exists() and not (root / "src" / "data_storage").exists()
    # the log names the file and why it was chosen
    assert f"{root / 'config' / 'default.toml'}" in proc.stderr
    assert "nearest config/default.toml" in proc.stderr


def test_config_discovery_order_package_then_cwd_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phd_flow.project import discover_config

    proj = _src_layout_project(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(proj / "src"))
    found = discover_config("nbproj")
    assert found.root == proj and found.file == proj / "config" / "default.toml"
    assert "nbproj" in found.reason
    # no package: from the cwd upwards
    monkeypatch.chdir(proj / "notebooks")
    found = discover_config(None)
    assert found.root == proj and "current directory" in found.reason
    # nothing found: $PHD_FLOW_CONFIG
    monkeypatch.chdir(elsewhere)
    env_file = tmp_path / "env.toml"
    env_file.write_text(NO_MLFLOW)
    monkeypatch.setenv("PHD_FLOW_CONFIG", str(env_file))
    found = discover_config(None)
    assert found.file == env_file and "PHD_FLOW_CONFIG" in found.reason


# --- 4. --args-file --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["json", "toml", "yaml"])
def test_args_file_gives_the_args_and_cli_values_override_it(uproject: Path, suffix: str) -> None:
    data: dict[str, Any] = {"dataset": "d.csv", "epochs": 5, "verbose": True, "inner": {"lr": 0.5, "layers": [3, 4]}}
    path = uproject / f"args.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(data))
    elif suffix == "toml":
        path.write_text('dataset = "d.csv"\nepochs = 5\nverbose = true\n[inner]\nlr = 0.5\nlayers = [3, 4]\n')
    else:
        path.write_text("dataset: d.csv\nepochs: 5\nverbose: true\ninner:\n  lr: 0.5\n  layers: [3, 4]\n")
    proc = cli(uproject, "run", "FromFile", "--args-file", str(path), "--epochs", "7")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(uproject / "data_storage")
    assert result_of(run_dir) == {**data, "epochs": 7}
    proc = cli(uproject, "run", "--args-file", str(path), "FromFile", "--lr", "0.25")
    assert proc.returncode == 0, proc.stderr
    latest = run_dirs(uproject / "data_storage")[-1]
    assert result_of(latest)["inner"] == {"lr": 0.25, "layers": [3, 4]}


def test_args_file_errors_name_the_file_and_the_field(uproject: Path) -> None:
    path = uproject / "bad.json"
    path.write_text(json.dumps({"dataset": "d", "epoch": 3}))
    proc = cli(uproject, "run", "FromFile", "--args-file", str(path))
    assert proc.returncode == 2
    assert "bad.json" in proc.stderr and "'epoch'" in proc.stderr and "Traceback" not in proc.stderr


def test_args_file_from_python(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"dataset": "x", "epochs": 2}))
    n = FromFile(["--args-file", str(path), "--verbose", "true"], config=local_config(tmp_path))
    assert n.args == FileArgs(dataset="x", epochs=2, verbose=True)


# --- 6. storage.download returns the local path ----------------------------------------------


def test_storage_download_returns_the_local_path_and_keeps_the_report(tmp_path: Path) -> None:
    from phd_flow.project import Project

    shared = tmp_path / "shared"
    config_a = tmp_path / "a.toml"
    config_a.write_text(f'local_path = "{tmp_path / "a"}"\n[storage]\nremote = "{shared}"\n[mlflow]\nenabled = false\n')
    config_b = tmp_path / "b.toml"
    config_b.write_text(f'local_path = "{tmp_path / "b"}"\n[storage]\nremote = "{shared}"\n[mlflow]\nenabled = false\n')
    first = Project(None, config_a).storage
    (first.local_path / "datasets" / "mine").mkdir(parents=True)
    (first.local_path / "datasets" / "mine" / "x.csv").write_text("a,b\n1,2\n")
    first.upload("datasets/mine")
    second = Project(None, config_b).storage
    got = second.download("datasets/mine")
    assert isinstance(got, Path) and got == tmp_path / "b" / "datasets" / "mine"
    assert (got / "x.csv").read_text() == "a,b\n1,2\n"
    assert second.last_report is not None and len(second.last_report.transferred) == 1
    one = second.download("datasets/mine/x.csv")
    assert one == tmp_path / "b" / "datasets" / "mine" / "x.csv" and one.read_text() == "a,b\n1,2\n"


def test_args_file_in_a_sweep(uproject: Path) -> None:
    path = uproject / "args.json"
    path.write_text(json.dumps({"dataset": "d.csv", "inner": {"lr": 0.5}}))
    proc = cli(uproject, "sweep", "FromFile", "--args-file", str(path), "--grid", "epochs=1,2")
    assert proc.returncode == 0, proc.stderr
    results = [result_of(d) for d in run_dirs(uproject / "data_storage") if d.name.startswith("FromFile_")]
    assert sorted((r["dataset"], r["epochs"], r["inner"]["lr"]) for r in results) == [
        ("d.csv", 1, 0.5),
        ("d.csv", 2, 0.5),
    ]
