"""Issue 19 (rows 1, 3, 5, 8): stage loading respects a stage's inputs, completed stages survive,
child runs are addressable, stage-name typos fail early."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_stages import dataset, log_of, make_config, run, stages  # noqa: F401
from tests.test_sweep_slurm import slurm_lane  # noqa: F401 (the real-SLURM gate)


def test_latest_loads_only_a_run_whose_stage_had_this_runs_inputs(tmp_path: Path, dataset: Path) -> None:  # noqa: F811
    plain = make_config(tmp_path)
    first = run(plain, dataset, seed=0)
    config = make_config(tmp_path, '[stages.load_data]\nload_from = "latest"\n')

    other = run(config, dataset, seed=7)  # the newest run has seed 0's data: not loaded silently

    assert stages(other)["load_data"]["loaded"] is False
    assert "Stage 'load_data': no completed Prepare run has it yet with the same inputs" in log_of(other)
    assert "seed=7" in log_of(other)
    same = run(config, dataset, seed=0, note="again")  # seed 0 again: the newest seed-0 run
    assert stages(same)["load_data"]["loaded_from"] == str(first.key)


def test_load_of_a_stage_made_with_other_inputs_warns_and_records_both(tmp_path: Path, dataset: Path) -> None:  # noqa: F811
    config = make_config(tmp_path)
    first = run(config, dataset, seed=0)

    second = run(config, dataset, seed=5, load={"load_data": str(first.key)})

    info = stages(second)["load_data"]
    assert info["loaded_from"] == str(first.key)
    assert info["inputs"]["args"] == {"dataset": str(dataset), "seed": 5}  # this run's inputs
    assert info["source_inputs"]["args"] == {"dataset": str(dataset), "seed": 0}  # the source's
    assert f"{first.key} made it with other inputs than this run's: seed changed 0 → 5" in log_of(second)


def test_the_cache_explains_a_recompute_against_the_closest_earlier_run(tmp_path: Path, dataset: Path) -> None:  # noqa: F811
    config = make_config(tmp_path)
    closest = run(config, dataset, seed=0, cache=True)
    run(config, dataset, seed=1, cache=True)  # newer, but further away
    other = dataset.with_name("other.csv")
    other.write_text(dataset.read_text() + "99,1\n")

    third = run(config, other, seed=0, cache=True)

    line = next(li for li in log_of(third).splitlines() if "Stage 'load_data': recomputed" in li)
    assert f"(compared with {closest.key})" in line
    assert "dataset changed" in line and "seed changed" not in line


def test_stage_rules_of_a_pipeline_warn_only_for_stages_no_run_of_it_opened(tmp_path: Path, dataset: Path) -> None:  # noqa: F811
    from tests.stage_nodes import Outer

    config = make_config(tmp_path, "[stages.load_data]\nskip_log = true\n[stages.final]\nskip_log = true\n")
    for _ in range(2):  # the second time the child is reused: its stages count as opened too
        outer = Outer({"dataset": str(dataset)}, config=config)
        outer.run()
        logs = [p.read_text() for p in outer.output_dir.rglob("output.log")]
        assert logs and not any("Stage rules not used" in text for text in logs), logs
    assert "Reusing Prepare" in log_of(outer)


@pytest.mark.slow
def test_child_runs_are_found_by_key_or_prefix_and_rerun_names_are_checked(project: Path) -> None:
    import json
    import shutil

    from tests.conftest import REPO, cli, write_config

    shutil.copy(REPO / "tests" / "stage_nodes.py", project / "my_project" / "prepare.py")
    write_config(project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    done = cli(project, "run", "Outer", "--dataset", "data/diabetes.csv")
    assert done.returncode == 0, done.stderr
    store = project / "data_storage"
    (parent,) = [p for p in store.iterdir() if (p / "run.json").exists()]
    child_path = json.loads((parent / "run.json").read_text())["children"][0]["path"]
    child = child_path.rsplit("/", 1)[-1]

    for ref in (child, child[:-3], f"{parent.name}/{child[:-2]}"):
        shown = cli(project, "show", ref)
        assert shown.returncode == 0 and child in shown.stdout, (ref, shown.stderr)
    result = cli(project, "result", child[:-2])
    assert result.returncode == 0, result.stderr
    loaded = cli(project, "run", "Prepare", "--dataset", "data/diabetes.csv", "--load", f"load_data={child}")
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded from {child_path}" in loaded.stderr + loaded.stdout

    listed = cli(project, "ls", "--children")
    assert listed.returncode == 0 and child_path in listed.stdout, listed.stderr
    assert child_path not in cli(project, "ls").stdout
    typo = cli(project, "run", "Outer", "--dataset", "data/diabetes.csv", "--rerun", "Prepar")
    assert typo.returncode == 2 and "Did you mean 'Prepare'?" in typo.stderr, typo.stderr


def test_rm_warns_about_runs_that_reused_the_run_through_require(project: Path) -> None:
    import json
    import shutil

    from tests.conftest import REPO, cli, write_config

    shutil.copy(REPO / "tests" / "stage_nodes.py", project / "my_project" / "prepare.py")
    write_config(project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    for _ in range(2):
        done = cli(project, "run", "Outer", "--dataset", "data/diabetes.csv")
        assert done.returncode == 0, done.stderr
    first, second = sorted(p for p in (project / "data_storage").iterdir() if (p / "run.json").exists())
    child = json.loads((first / "run.json").read_text())["children"][0]["path"]
    assert json.loads((second / "run.json").read_text())["children"][0] == {
        "node": "Prepare",
        "path": child,
        "reused": True,
    }

    asked = cli(project, "rm", first.name)  # no answer on stdin: nothing is deleted

    assert f"WARNING: run {second.name} reused {child} through require()" in asked.stderr, asked.stderr
    assert first.exists()


def test_stage_name_typos_in_config_and_skip_log_exit_2_before_the_run(project: Path) -> None:
    from tests.conftest import cli, nothing_created, write_config

    base = 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n'
    write_config(project, base + "[stages.laod_data]\nskip_log = true\n")
    typo = cli(project, "run", "Prepare", "--dataset", "data/diabetes.csv")
    assert typo.returncode == 2 and "Did you mean 'load_data'?" in typo.stderr, typo.stderr
    assert "[stages.laod_data]" in typo.stderr
    write_config(project, base)
    typo = cli(project, "run", "Prepare", "--dataset", "data/diabetes.csv", "--skip-log", "sumary")
    assert typo.returncode == 2 and "--skip-log sumary" in typo.stderr and "Did you mean 'summary'?" in typo.stderr
    assert nothing_created(project / "data_storage")


def test_a_rerun_key_keeps_the_completed_stages_of_the_failed_attempt(tmp_path: Path) -> None:
    import pytest

    from phd_flow import RunFailedError, RunOptions
    from tests.conftest import run_dirs
    from tests.stage_nodes import Flaky

    config = make_config(tmp_path)
    counter, marker = tmp_path / "counter.txt", tmp_path / "crash"
    marker.write_text("crash once")
    args = {"counter": str(counter), "crash_marker": str(marker)}
    with pytest.raises(RunFailedError):
        Flaky(args, config=config).run()
    (failed,) = run_dirs(config.local_path)

    again = Flaky(args, config=config, options=RunOptions(key=failed.name))
    assert again.run() == len("expensive\n")

    assert counter.read_text() == "computed\n"  # load_data was not computed again
    assert "Stage 'load_data': kept from the earlier attempt" in log_of(again)
    info = stages(again)["load_data"]
    assert info["status"] == "completed" and info["kept"] is True and info["loaded_from"] is None


def test_a_failed_runs_completed_stage_can_be_loaded_and_cached(tmp_path: Path) -> None:
    import pytest

    from phd_flow import RunFailedError, RunOptions
    from tests.conftest import run_dirs
    from tests.stage_nodes import Flaky

    config = make_config(tmp_path)
    counter, marker = tmp_path / "counter.txt", tmp_path / "crash"
    marker.write_text("crash once")
    args = {"counter": str(counter), "crash_marker": str(marker)}
    with pytest.raises(RunFailedError):
        Flaky(args, config=config).run()
    (failed,) = run_dirs(config.local_path)

    cached = Flaky(args, config=config, options=RunOptions(cache=True))
    cached.run()
    loaded = Flaky(args, config=config, options=RunOptions(load={"load_data": failed.name}))
    loaded.run()

    assert counter.read_text() == "computed\n"  # computed once, by the failed run
    for node in (cached, loaded):
        info = stages(node)["load_data"]
        assert info["loaded_from"] == failed.name and info["source_status"] == "failed"
        assert f"{failed.name} is a failed run; its stage completed and its files verified" in log_of(node)
    assert stages(cached)["load_data"]["cached"] is True


OTHER_PACKAGE = """
import dataclasses

from phd_flow import Node, node
from tests.stage_nodes import Prepare, PrepareArgs


@dataclasses.dataclass
class ReportArgs(node.Args):
    dataset: str


class Report(Node[ReportArgs, int]):
    def _run(self) -> int:
        rows = self.require(Prepare, PrepareArgs(dataset=self.args.dataset))
        with self.stage("final") as st:
            (st.path / "rows.txt").write_text(f"{rows}\\n")
        return rows
"""


def test_stage_rules_count_the_stages_of_required_nodes_in_other_packages(
    tmp_path: Path,
    dataset: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The typo check reads the packages of the nodes a node requires too: a rule for a stage only
    a required node of another package opens is neither an error nor a warning."""
    import importlib
    import uuid

    from phd_flow import StageError

    name = f"lab_{uuid.uuid4().hex[:8]}"
    (tmp_path / "src" / name).mkdir(parents=True)
    (tmp_path / "src" / name / "__init__.py").write_text("")
    (tmp_path / "src" / name / "report.py").write_text(OTHER_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    report = importlib.import_module(f"{name}.report").Report
    config = make_config(tmp_path, "[stages.summary]\nskip_log = true\n[stages.final]\nskip_log = true\n")

    node = report({"dataset": str(dataset)}, config=config)
    node.run()

    logs = [p.read_text() for p in node.output_dir.rglob("output.log")]
    assert logs and not any("Stage rules not used" in text for text in logs), logs
    typo = make_config(tmp_path, "[stages.sumary]\nskip_log = true\n")
    with pytest.raises(StageError, match=r"\[stages\.sumary\].*Did you mean 'summary'"):
        report({"dataset": str(dataset)}, config=typo).run()


def test_rm_of_a_child_run_is_refused_naming_the_pipeline_run(project: Path) -> None:
    import json
    import shutil

    from tests.conftest import REPO, cli, write_config

    shutil.copy(REPO / "tests" / "stage_nodes.py", project / "my_project" / "prepare.py")
    write_config(project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    done = cli(project, "run", "Outer", "--dataset", "data/diabetes.csv")
    assert done.returncode == 0, done.stderr
    (parent,) = [p for p in (project / "data_storage").iterdir() if (p / "run.json").exists()]
    child = json.loads((parent / "run.json").read_text())["children"][0]["path"].rsplit("/", 1)[-1]

    refused = cli(project, "rm", child[:-2], "--force")

    assert refused.returncode == 2, refused.stderr
    assert f"{child} is a child run of {parent.name}" in refused.stderr
    assert f"`rm {parent.name}`" in refused.stderr and "Traceback" not in refused.stderr
    assert (parent / child / "run.json").is_file()  # nothing deleted
    assert cli(project, "rm", parent.name, "--force").returncode == 0
    assert not parent.exists()


@pytest.mark.slow
def test_a_child_run_only_in_storage_is_found_by_key_or_prefix(project: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from tests.conftest import REPO, cli, write_config

    shared = tmp_path / "shared"
    shutil.copy(REPO / "tests" / "stage_nodes.py", project / "my_project" / "prepare.py")
    config = f'local_path = "${{PROJECT_ROOT}}/data_storage"\n[mlflow]\nenabled = false\n[storage]\nbackend = "local"\nremote = "{shared}"\n'
    write_config(project, config)
    done = cli(project, "run", "Outer", "--dataset", "data/diabetes.csv")
    assert done.returncode == 0, done.stderr
    (parent,) = [p for p in (project / "data_storage").iterdir() if (p / "run.json").exists()]
    child_path = json.loads((parent / "run.json").read_text())["children"][0]["path"]
    child = child_path.rsplit("/", 1)[-1]
    assert (shared / child_path / "run.json").is_file()
    other = tmp_path / "machine2"  # another machine: the runs are only in storage
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("data_storage", "__pycache__"))

    for ref in (child, child[:-3], f"{parent.name[:-2]}/{child[:-2]}"):
        shown = cli(other, "show", ref)
        assert shown.returncode == 0 and child in shown.stdout, (ref, shown.stderr)
        assert "(only in storage)" in shown.stdout and "load_data/train.csv" in shown.stdout
    result = cli(other, "result", child[:-2], "--trust-remote", env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout.strip().isdigit(), result.stderr
    listed = cli(other, "ls", "--remote", "--children")
    assert listed.returncode == 0 and child_path in listed.stdout, listed.stderr
    loaded = cli(other, "run", "Prepare", "--dataset", "data/diabetes.csv", "--load", f"load_data={child[:-2]}")
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded from {child_path}" in loaded.stderr + loaded.stdout


STAGED = '''
import dataclasses
import time
from pathlib import Path

from phd_flow import Node, node


@dataclasses.dataclass
class StagedArgs(node.Args):
    counter: str  # one line per computation of stage load_data
    allow_file: str = ""  # while set and missing, the run fails after load_data
    marker_dir: str = ""  # <marker_dir>/<key> appears once load_data completed
    hold_seconds: float = 0.0  # the first attempt then waits this long (to be preempted)
    n: int = 0


class Staged(Node[StagedArgs, int]):
    """An expensive stage load_data, then work that fails or is preempted once."""

    def _run(self) -> int:
        with self.stage("load_data", depends_on=["counter", "n"]) as st:
            if not st.loaded:
                with open(self.args.counter, "a") as handle:
                    handle.write(f"{self.key}\\n")
                (st.path / "data.txt").write_text("expensive\\n")
        if self.args.marker_dir:
            (Path(self.args.marker_dir) / self.key).touch()
        end = time.time() + (0 if self.resumed else self.args.hold_seconds)
        while time.time() < end:
            time.sleep(0.05)
        if self.args.allow_file and not Path(self.args.allow_file).exists():
            raise RuntimeError("the work after load_data is set to fail")
        return len((st.path / "data.txt").read_text())
'''


def staged_project(root: Path) -> Path:
    from tests.test_sweep_local import make_project

    project = make_project(root)
    (project / "my_project" / "staged.py").write_text(STAGED)
    return project


def assert_kept(project: Path, key: str, counter: Path) -> None:
    import json

    run = json.loads((project / "data_storage" / key / "run.json").read_text())
    assert run["status"] == "completed" and run["resumed"] is True
    assert run["stages"]["load_data"]["kept"] is True and run["stages"]["load_data"]["loaded"] is True
    assert counter.read_text().splitlines() == [key]  # computed once, by the first attempt
    log = (project / "data_storage" / key / "output.log").read_text()
    assert "Stage 'load_data': kept from the earlier attempt (files verified)." in log


def test_a_resumed_sweep_point_keeps_its_completed_stages(tmp_path: Path) -> None:
    from tests.conftest import cli
    from tests.test_sweep_local import sweep_record

    project = staged_project(tmp_path / "proj")
    counter, allow = tmp_path / "counter.txt", tmp_path / "allow"
    proc = cli(project, "sweep", "Staged", "--counter", str(counter), "--allow_file", str(allow), "--grid", "n=1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    record = sweep_record(project)
    (point,) = record["points"]
    assert point["status"] == "failed" and len(counter.read_text().splitlines()) == 1

    allow.touch()
    resumed = cli(project, "sweep", "--resume", record["key"], "--wait")

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_kept(project, point["key"], counter)


def _job_logs(project: Path) -> str:
    """The tail of every submitit log of the project's jobs (what the attempts printed)."""
    logs = sorted((project / "data_storage" / ".slurm").glob("*/*/*_log.*"))
    return "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_lane")
def test_a_requeued_slurm_point_keeps_its_completed_stages(tmp_path: Path) -> None:
    """SLURM preempts the point after load_data completed; the requeued attempt keeps it."""
    import subprocess

    from tests.conftest import cli
    from tests.test_sweep_local import sweep_record
    from tests.test_sweep_slurm import _nudged, squeue, status_of, until

    project = staged_project(tmp_path / "proj")
    counter, markers = tmp_path / "counter.txt", tmp_path / "markers"
    markers.mkdir()
    proc = cli(
        project,
        *("sweep", "Staged", "--counter", str(counter), "--marker_dir", str(markers), "--hold_seconds", "120"),
        *("--grid", "n=1", "--executor", "slurm"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (point,) = sweep_record(project)["points"]
    key, job = point["key"], point["slurm_job_id"]
    until(lambda: (markers / key).exists(), 60, "load_data to complete in the first attempt")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # preemption: requeued
    until(
        lambda: _nudged(job) and status_of(project, key) == "completed",
        240,
        "the requeued attempt to complete",
        lambda: f"run {status_of(project, key)}, squeue {squeue(job)!r}, job logs: {_job_logs(project)}",
    )
    assert_kept(project, key, counter)
    until(lambda: not squeue(job).strip(), 30, "the job to leave the queue")
