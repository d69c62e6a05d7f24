"""The Python API: build a node from Args, a dict or argv, run it, get the result back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path, PurePosixPath

import pytest

from phd_flow import Config, Node, RunFailedError, node
from phd_flow.config import MlflowConfig
from phd_flow.errors import ArgsError, NodeDefinitionError
from phd_flow.keys import RunKey, new_key
from tests.nodes import Add, AddArgs, Fail, NoGenerics, Optim, Unpicklable


def local_config(tmp_path: Path, mlflow: bool = False) -> Config:
    return Config(local_path=tmp_path / "store", project_root=tmp_path, mlflow=MlflowConfig(enabled=mlflow))


@pytest.mark.parametrize(
    "args",
    [AddArgs(a=1, b=2), {"a": 1, "b": 2}, ["--a", "1", "--b", "2"], ["--a", "1"]],
)
def test_node_runs_from_args_dict_or_argv(tmp_path: Path, args: object) -> None:
    result = Add(args, config=local_config(tmp_path)).run()  # type: ignore[arg-type]
    assert result.total == 3


@pytest.mark.slow
def test_nested_dataclass_args_are_flattened_for_mlflow(tmp_path: Path) -> None:
    n = Add({"a": 1, "optim": {"lr": 0.5}}, config=local_config(tmp_path, mlflow=True))
    n.run()
    assert n.args.optim == Optim(lr=0.5)
    from mlflow.tracking import MlflowClient

    record = n.record.data
    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    run = client.get_run(record["mlflow"]["run_id"])
    assert run.data.params == {"a": "1", "b": "2", "optim.lr": "0.5", "optim.momentum": "0.9"}
    assert run.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "total")[0].value == 3


def test_logs_of_node_stdlib_and_warnings_reach_both_files(tmp_path: Path) -> None:
    n = Add(AddArgs(a=5), config=local_config(tmp_path))
    n.run()
    text = (n.output_dir / "output.log").read_text()
    assert "adding 5 and 2" in text and "stdlib says hi" in text and "a python warning" in text
    jsonl = [json.loads(line)["record"] for line in (n.output_dir / "output.jsonl").read_text().splitlines()]
    bound = [r for r in jsonl if r["message"] == "adding 5 and 2"]
    assert bound and bound[0]["extra"]["key"] == str(n.key) and bound[0]["extra"]["node"] == "Add"


def test_two_runs_in_one_process_do_not_mix_logs(tmp_path: Path) -> None:
    first, second = Add(AddArgs(a=1), config=local_config(tmp_path)), Add(AddArgs(a=7), config=local_config(tmp_path))
    first.run()
    second.run()
    assert "adding 7" not in (first.output_dir / "output.log").read_text()
    assert "adding 1 " not in (second.output_dir / "output.log").read_text()
    from loguru import logger

    logger.info("after both runs")
    assert "after both runs" not in (second.output_dir / "output.log").read_text()


@pytest.mark.slow
def test_failure_is_recorded_and_raised_from_the_original(tmp_path: Path) -> None:
    n = Fail({"message": "kaputt"}, config=local_config(tmp_path, mlflow=True))
    with pytest.raises(RunFailedError, match="kaputt") as info:
        n.run()
    assert isinstance(info.value.__cause__, ValueError)
    record = json.loads((n.output_dir / "run.json").read_text())
    assert record["status"] == "failed" and "ValueError: kaputt" in record["error"]
    log = (n.output_dir / "output.log").read_text()
    assert "Traceback" in log and "raise ValueError(self.args.message)" in log
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert client.get_run(record["mlflow"]["run_id"]).info.status == "FAILED"
    assert not (n.output_dir / "results.pickle").exists()


def test_unpicklable_result_fails_with_a_clear_message(tmp_path: Path) -> None:
    n = Unpicklable(config=local_config(tmp_path))
    with pytest.raises(RunFailedError, match="cannot be pickled"):
        n.run()
    record = json.loads((n.output_dir / "run.json").read_text())
    assert record["status"] == "failed"
    assert "cannot be pickled" in (n.output_dir / "output.log").read_text()
    assert (n.output_dir / "args.json").exists() and (n.output_dir / "reproducible.json").exists()


def test_node_without_generic_parameters_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NodeDefinitionError, match=r"Node\[NoGenericsArgs, NoGenericsResult\]"):
        NoGenerics(config=local_config(tmp_path))


def test_args_that_are_not_a_dataclass_fail_at_class_definition() -> None:
    with pytest.raises(NodeDefinitionError, match="must be a dataclass"):

        class Bad(Node[int, int]):  # type: ignore[type-var]
            def _run(self) -> int:
                return 1


def test_unknown_dict_argument_names_the_closest_field(tmp_path: Path) -> None:
    with pytest.raises(ArgsError, match="Did you mean 'b'"):
        Add({"a": 1, "bb": 2}, config=local_config(tmp_path))


def test_generic_args_type_is_inferred() -> None:
    assert Add.args_type() is AddArgs
    assert Add.result_class.__name__ == "AddResult"


def test_a_node_instance_runs_once(tmp_path: Path) -> None:
    n = Add(AddArgs(a=1), config=local_config(tmp_path))
    n.run()
    with pytest.raises(Exception, match="runs once"):
        n.run()


def test_key_is_path_like_exactly_as_in_the_seed() -> None:
    key = new_key("FitOLS")
    assert isinstance(key, str) and isinstance(key, RunKey)
    assert "datasets" / key / "datasets.pickle" == PurePosixPath(f"datasets/{key}/datasets.pickle")
    assert key / "x" == PurePosixPath(f"{key}/x")
    assert key.node == "FitOLS" and key.created is not None
    keys = {new_key("N") for _ in range(20000)}
    assert len(keys) == 20000
    assert all(":" not in k and "/" not in k for k in keys)


def test_storage_open_upload_and_path_work_as_in_the_seed(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class SeedArgs(node.Args):
        pass

    class Seed(Node[SeedArgs, str]):
        def _run(self) -> str:
            dataset_key = "datasets" / self.key / "datasets.pickle"
            with self.storage.open(dataset_key, "wb") as f:
                f.write(b"data")
            self.storage.upload("datasets" / self.key)
            return str(self.storage / dataset_key)

    n = Seed(config=local_config(tmp_path))
    path = n.run()
    assert Path(path).read_bytes() == b"data"
    assert Path(path) == tmp_path / "store" / "datasets" / n.key / "datasets.pickle"


@pytest.mark.slow
def test_a_run_leaves_mlflow_global_state_as_it_found_it(tmp_path: Path) -> None:
    import os

    Add(AddArgs(a=1), config=local_config(tmp_path, mlflow=True)).run()
    import mlflow

    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.active_run() is None
    second = Add(AddArgs(a=2), config=local_config(tmp_path, mlflow=True))
    second.run()
    assert second.record.data["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
