"""Stages: loading a stage from an earlier run (key, prefix, latest, MLflow run id; local copy,
shared directory, S3), skip_log, the fingerprint cache, verification and rule errors."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from phd_flow import Config, RunFailedError, RunOptions, StageError, load_config
from tests.conftest import REPO, cli, run_dirs, write_config
from tests.s3_fixtures import S3Server, make_bucket, moto_server  # noqa: F401
from tests.stage_nodes import Broken, Prepare


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "".join(f"{i},{i * i % 7}\n" for i in range(40)))
    return path


def make_config(tmp_path: Path, text: str = "", remote: str | None = "local", mlflow: bool = False) -> Config:
    """A real config file in tmp_path (so errors can name its lines)."""
    head = f'local_path = "{tmp_path / "store"}"\n'
    if remote == "local":
        head += f'[storage]\nbackend = "local"\nremote = "{tmp_path / "remote"}"\n'
    elif remote is not None:
        head += remote
    head += "[mlflow]\n" + ("" if mlflow else "enabled = false\n")
    path = write_config(tmp_path, head + textwrap.dedent(text))
    return load_config(tmp_path, path)


def s3_config(server: S3Server) -> str:
    bucket = make_bucket(server)
    return f'[storage]\nbackend = "s3"\nbucket = "{bucket}"\nprefix = "p"\nendpoint_url = "{server.endpoint_url}"\n'


def run(config: Config, dataset: Path, seed: int = 0, note: str = "", **options: Any) -> Prepare:
    node = Prepare({"dataset": str(dataset), "seed": seed, "note": note}, config=config, options=RunOptions(**options))
    node.run()
    return node


def stages(node: Any) -> dict[str, Any]:
    return dict(json.loads((node.output_dir / "run.json").read_text())["stages"])


def log_of(node: Any) -> str:
    return str((node.output_dir / "output.log").read_text())


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "source_local"),
    [("local", True), ("local", False), ("s3", False)],
    ids=["local-copy", "shared-dir", "s3"],
)
def test_second_run_loads_the_first_runs_stage(
    tmp_path: Path, dataset: Path, request: pytest.FixtureRequest, backend: str, source_local: bool
) -> None:
    if backend == "s3":
        config = make_config(tmp_path, remote=s3_config(request.getfixturevalue("moto_server")))
    else:
        config = make_config(tmp_path)
    first = run(config, dataset, seed=0)
    key = str(first.key)
    train = (first.output_dir / "load_data" / "train.csv").read_bytes()
    recorded = stages(first)
    if not source_local:
        shutil.rmtree(first.output_dir)  # only the remote has it now

    second = run(config, dataset, seed=1, load={"load_data": key[:-3]})  # a unique key prefix works

    assert (second.output_dir / "load_data" / "train.csv").read_bytes() == train  # seed 0's sample
    info = stages(second)
    assert info["load_data"]["loaded"] is True and info["load_data"]["loaded_from"] == key
    assert info["load_data"]["sha256"] == recorded["load_data"]["sha256"]
    assert info["load_data"]["files"] == recorded["load_data"]["files"]
    assert info["summary"]["loaded"] is False  # computed, from the loaded data ...
    assert info["summary"]["fingerprint"] == recorded["summary"]["fingerprint"]  # ... so same inputs
    assert f"Stage 'load_data': loaded from {key} (--load load_data={key[:-3]})" in log_of(second)
    assert not list(second.output_dir.glob("*phd_flow-part*"))
    if not source_local:  # "latest" finds runs that are only in the remote, too
        shutil.rmtree(second.output_dir)
        third = run(config, dataset, seed=0, load={"load_data": "latest"})  # seed 0: its inputs
        assert stages(third)["load_data"]["loaded_from"] == str(second.key)
        assert (third.output_dir / "load_data" / "train.csv").read_bytes() == train


def test_latest_loads_the_newest_completed_run_with_that_stage(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path, '[stages.load_data]\nload_from = "latest"\n')
    first = run(config, dataset, seed=0)
    assert stages(first)["load_data"]["loaded"] is False
    assert "Stage 'load_data': no completed Prepare run has it yet" in log_of(first)
    plain = make_config(tmp_path)  # the same local_path, without the rule
    newest = run(plain, dataset, seed=1, load={"load_data": str(first.key)})  # completed, has it
    with pytest.raises(RunFailedError):  # newer, but failed inside load_data
        run(plain, dataset.with_name("missing.csv"), seed=2)
    with pytest.raises(RunFailedError):  # another node with a stage of that name: not "latest"
        Broken({}, config=plain).run()

    third = run(config, dataset, seed=0)  # newest's load_data was made with seed 0 (issue 19)

    assert stages(third)["load_data"]["loaded_from"] == str(newest.key)
    assert (config.where("stages.load_data.load_from") + " [stages.load_data] load_from = 'latest'") in log_of(third)


@pytest.mark.slow
def test_load_by_mlflow_run_id_from_another_experiment_or_a_plain_mlflow_run(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    import phd_flow

    source_config = make_config(tmp_path, mlflow=True)
    source_config.mlflow.experiment = "preprocessing"
    first = run(source_config, dataset)
    mlflow_id = json.loads((first.output_dir / "run.json").read_text())["mlflow"]["run_id"]
    config = make_config(tmp_path, mlflow=True)
    config.mlflow.experiment = "training"

    second = run(config, dataset, seed=5, load={"load_data": mlflow_id}, skip_log=["report"])

    assert stages(second)["load_data"]["loaded_from"] == str(first.key)
    client = MlflowClient(config.tracking_uri())
    mine = client.get_run(json.loads((second.output_dir / "run.json").read_text())["mlflow"]["run_id"])
    assert client.get_run(mlflow_id).info.experiment_id != mine.info.experiment_id
    tags = mine.data.tags
    assert tags["phd_flow.stage.load_data.loaded_from"] == str(first.key)
    assert tags["phd_flow.stage.load_data.logged"] == "true"
    assert tags["phd_flow.stage.report.logged"] == "false"
    assert "phd_flow.stage.summary.loaded_from" not in tags

    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts in ./mlruns
    mlflow.set_tracking_uri(config.tracking_uri())
    # a plain MLflow script, e.g. an old mlflowhelper one
    with mlflow.start_run() as plain, phd_flow.managed_artifact("train.csv", stage="load_data") as artifact:
        artifact.get_path().write_text("x,y\n1,2\n3,4\n")
    mlflow.set_tracking_uri(None)

    third = run(config, dataset, load={"load_data": plain.info.run_id})

    assert (third.output_dir / "load_data" / "train.csv").read_text() == "x,y\n1,2\n3,4\n"
    assert stages(third)["load_data"]["loaded_from"] == plain.info.run_id


# --- skip_log -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_skip_log_stage_stays_local_and_is_absent_from_the_remote(
    tmp_path: Path, dataset: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    rule = "[stages.load_data]\nskip_log = true\n"
    if backend == "s3":
        server = request.getfixturevalue("moto_server")
        storage = s3_config(server)
        config = make_config(tmp_path, rule, remote=storage)
    else:
        config = make_config(tmp_path, rule)

    node = run(config, dataset)

    assert (node.output_dir / "load_data" / "train.csv").is_file()
    assert stages(node)["load_data"]["skip_log"] is True
    if backend == "s3":
        bucket = re.search(r'bucket = "([^"]+)"', storage).group(1)  # type: ignore[union-attr]
        listing = server.client().list_objects_v2(Bucket=bucket, Prefix=f"p/{node.key}/")
        names = [obj["Key"].split("/", 2)[2] for obj in listing["Contents"]]
    else:
        root = tmp_path / "remote" / str(node.key)
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert "summary/describe.csv" in names and "run.json" in names
    assert not [n for n in names if n.startswith("load_data")]


# --- fingerprint cache --------------------------------------------------------------------------


def test_cache_reuses_a_stage_by_fingerprint_and_says_why(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path, "[stages.load_data]\ncache = true\n[stages.summary]\ncache = true\n")
    first = run(config, dataset, seed=0, note="a")
    assert "Stage 'load_data': recomputed because no completed run has stage 'load_data' yet." in log_of(first)

    second = run(config, dataset, seed=0, note="b")  # note is not an input of load_data

    assert stages(second)["load_data"]["cached"] is True
    assert stages(second)["load_data"]["loaded_from"] == str(first.key)
    assert (
        f"Stage 'load_data': reused from {first.key} because the fingerprint matched "
        f"(dataset={str(dataset)!r}, seed=0, same code of tests.stage_nodes)."
    ) in log_of(second)
    assert f"Stage 'summary': reused from {first.key}" in log_of(second)
    assert (second.output_dir / "report" / "plots" / "note.txt").read_text() == "b\n"

    third = run(config, dataset, seed=1)

    assert stages(third)["load_data"]["cached"] is False
    assert f"Stage 'load_data': recomputed because seed changed 0 → 1 (compared with {first.key})." in log_of(third)
    assert "Stage 'summary': recomputed because stage load_data changed" in log_of(third)
    assert (third.output_dir / "load_data" / "train.csv").read_bytes() != (
        first.output_dir / "load_data" / "train.csv"
    ).read_bytes()

    forced = run(config, dataset, seed=0, cache=False)

    assert stages(forced)["load_data"]["loaded"] is False
    assert "Stage 'load_data': recomputed because --no-cache was given." in log_of(forced)


CACHED_MODULE = """
import dataclasses
from phd_flow import Node, node


@dataclasses.dataclass
class CountArgs(node.Args):
    n: int = 3


class Count(Node[CountArgs, str]):
    def _run(self) -> str:
        with self.stage("numbers", depends_on=["n"]) as st:
            if not st.loaded:
                (st.path / "n.txt").write_text(" ".join(map(str, range(self.args.n))))
        return (st.path / "n.txt").read_text()
"""


def test_changed_code_recomputes_a_cached_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"stagemod_{uuid.uuid4().hex[:8]}"
    source = tmp_path / f"{name}.py"
    source.write_text(CACHED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    config = make_config(tmp_path, remote=None)
    options = RunOptions(cache=True)
    first = module.Count({}, config=config, options=options)
    first.run()
    reused = module.Count({}, config=config, options=RunOptions(cache=True))
    reused.run()
    assert stages(reused)["numbers"]["cached"] is True

    source.write_text(CACHED_MODULE + "\n# a comment: not code\n")  # comments do not count
    commented = module.Count({}, config=config, options=RunOptions(cache=True))
    commented.run()
    assert stages(commented)["numbers"]["cached"] is True

    source.write_text(CACHED_MODULE.replace("range(self.args.n)", "range(1, self.args.n + 1)"))
    changed = module.Count({}, config=config, options=RunOptions(cache=True))
    changed.run()

    assert stages(changed)["numbers"]["cached"] is False
    block = f"{name}.Count._run [stage numbers]"
    explain = f"Stage 'numbers': recomputed because code of {block} changed (compared with {first.key})."
    assert explain in log_of(changed)


# --- verification and rule errors ----------------------------------------------------------------


def test_corrupted_source_file_is_detected_and_nothing_is_used(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path)
    first = run(config, dataset)
    damaged = first.output_dir / "load_data" / "train.csv"
    data = bytearray(damaged.read_bytes())
    data[5] ^= 0x01
    damaged.write_bytes(bytes(data))

    second = Prepare({"dataset": str(dataset)}, config=config, options=RunOptions(load={"load_data": str(first.key)}))
    with pytest.raises(RunFailedError) as info:
        second.run()

    cause = info.value.__cause__
    assert isinstance(cause, StageError)
    assert f"run {first.key}" in str(cause) and "train.csv does not match its recorded sha256" in str(cause)
    assert list((second.output_dir / "load_data").iterdir()) == []  # nothing used
    assert not list(second.output_dir.glob("*phd_flow-part*"))
    assert stages(second)["load_data"]["status"] == "failed"


def test_rules_pointing_at_failed_runs_or_missing_stages_fail_before_the_run(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path)
    good = run(config, dataset)
    with pytest.raises(RunFailedError):
        Broken({}, config=config).run()
    broken = next(d.name for d in run_dirs(config.local_path) if d.name.startswith("Broken"))
    before = len(run_dirs(config.local_path))

    with pytest.raises(StageError, match=rf"--load report={broken}: run {broken} is failed, not completed"):
        run(config, dataset, load={"report": broken})  # a failed run without that completed stage
    with pytest.raises(
        StageError, match=r"--load sumary=.*: no code of tests opens a stage 'sumary'\. Did you mean 'summary'"
    ):
        run(config, dataset, load={"sumary": str(good.key)})

    assert len(run_dirs(config.local_path)) == before  # nothing was created


BAD_DEPENDS = """
import dataclasses
from phd_flow import Node, node


@dataclasses.dataclass
class BadArgs(node.Args):
    n: int = 3


class Bad(Node[BadArgs, int]):
    def _run(self) -> int:
        with self.stage("first", depends_on=["m"]):
            return 1
"""


def test_depends_on_must_name_args_or_earlier_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"stagebad_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(BAD_DEPENDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)

    with pytest.raises(RunFailedError) as info:
        module.Bad({}, config=make_config(tmp_path, remote=None)).run()

    assert isinstance(info.value.__cause__, StageError)
    assert "Bad.stage('first', depends_on=...): 'm' is neither a field of BadArgs (n)" in str(info.value.__cause__)
    with pytest.raises(StageError, match=r"Stage name 'run\.json' is not allowed"):
        run(make_config(tmp_path, remote=None), tmp_path / "d.csv", load={"run.json": "latest"})


def test_stage_name_typos_in_rules_fail_before_the_run(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path, "[stages.laod_data]\nskip_log = true\n")

    with pytest.raises(
        StageError, match=r"\[stages\.laod_data\] .*opens a stage 'laod_data'\. Did you mean 'load_data'"
    ):
        run(config, dataset)
    with pytest.raises(StageError, match=r"--skip-log laod_dat: .*Did you mean 'load_data'"):
        run(make_config(tmp_path), dataset, skip_log=["laod_dat"])

    assert run_dirs(config.local_path) == []  # nothing was created


DYNAMIC = """
import dataclasses
from phd_flow import Node, node


@dataclasses.dataclass
class DynamicArgs(node.Args):
    name: str = "load_data"


class Dynamic(Node[DynamicArgs, int]):
    def _run(self) -> int:
        with self.stage(self.args.name) as st:
            (st.path / "x.txt").write_text("x")
        return 1
"""


@pytest.mark.slow
def test_unused_rules_of_dynamically_named_stages_are_listed_in_a_warning_at_the_end(project: Path) -> None:
    (project / "my_project" / "dynamic.py").write_text(DYNAMIC)
    write_config(
        project,
        'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n[stages.laod_data]\nskip_log = true\n',
    )

    done = cli(project, "run", "Dynamic", "--skip-log", "plots")

    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stderr.splitlines() if "Stage rules not used" in line)
    assert "WARNING" in line and "it opened: load_data" in line
    assert "[stages.laod_data] (" in line and "--skip-log plots" in line


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def stage_project(project: Path) -> Path:
    # over the example's prepare.py (the same Prepare), so the package has one Prepare, plus Broken
    shutil.copy(REPO / "tests" / "stage_nodes.py", project / "my_project" / "prepare.py")
    write_config(project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    return project


def test_a_rule_pointing_at_nothing_exits_2_naming_the_config_line(stage_project: Path) -> None:
    config = write_config(
        stage_project,
        'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n\n'
        '[stages.load_data]\nload_from = "Prepare_2020"\n',
    )
    done = cli(stage_project, "run", "Prepare", "--dataset", "data/diabetes.csv")
    assert done.returncode == 2, done.stderr
    assert f"{config}:6 [stages.load_data] load_from = 'Prepare_2020'" in done.stderr
    assert "No run key starts with 'Prepare_2020'" in done.stderr and "Traceback" not in done.stderr
    assert run_dirs(stage_project / "data_storage") == []

    write_config(stage_project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    done = cli(stage_project, "run", "Prepare", "--dataset", "data/diabetes.csv", "--load", "summary=nope")
    assert done.returncode == 2 and "--load summary=nope: No run key starts with 'nope'" in done.stderr


def test_parallel_runs_with_managed_artifacts_do_not_clash(stage_project: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "my_project", "run", "Prepare", "--dataset", "data/diabetes.csv", "--note", note],
            cwd=stage_project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for note in ("first", "second")
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    dirs = run_dirs(stage_project / "data_storage")
    notes = sorted((d / "report" / "plots" / "note.txt").read_text() for d in dirs)
    assert notes == ["first\n", "second\n"]


def test_stages_doc_examples_are_the_tested_code() -> None:
    section = (REPO / "docs" / "stages.md").read_text()
    tested = "".join(
        (REPO / "tests" / name).read_text()
        for name in ("stage_nodes.py", "test_stages_mlflowhelper.py", "test_mlflowhelper_dropin.py")
    )
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        for line in block.splitlines():
            assert line.strip() in tested, f"README line not in the tested code: {line!r}"
    toml = re.findall(r"```toml\n(.*?)```", section, re.S)
    from phd_flow.config import parse_config

    for block in toml:
        parse_config(block, REPO)
