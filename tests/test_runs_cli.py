"""The run commands through the real CLI: ls, show, compare, rm, result, ui, stale detection."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from phd_flow import RunFailedError, load_config
from tests.conftest import EXAMPLES, REPO, cli, popen_cli, write_config

CONFIG = (
    'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\n'
    "[runs]\nheartbeat_seconds = 0.2\nstale_after_seconds = 30\n"
)
SLEEP_NODE = '''
import dataclasses, time
from phd_flow import Node, node


@dataclasses.dataclass
class NapArgs(node.Args):
    marker: str = ""


class Nap(Node[NapArgs, int]):
    """Sleep until killed."""

    def _run(self) -> int:
        open(self.args.marker, "w").close()
        time.sleep(120)
        return 0
'''


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project with real runs (made in-process, tracked in sqlite MLflow): Add a=1 and a=2,
    a failed Fail, and an Evaluate pipeline (children Train -> Prepare)."""
    from tests.nodes import Add, AddArgs, Fail, FailArgs
    from tests.pipeline_nodes import Evaluate, EvaluateArgs

    root = tmp_path_factory.mktemp("runs_cli") / "proj"
    shutil.copytree(EXAMPLES / "my_project", root / "my_project", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "my_project" / "extra.py").write_text(SLEEP_NODE)
    write_config(root, CONFIG)
    config = load_config(root)
    saved = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    Add(AddArgs(a=1), config=config).run()
    Add(AddArgs(a=2), config=config).run()
    with pytest.raises(RunFailedError):
        Fail(FailArgs(message="kaputt"), config=config).run()
    Evaluate(EvaluateArgs(lr=0.1), config=config).run()
    if saved is None:
        os.environ.pop("MLFLOW_DISABLE_TELEMETRY")
    yield root


@pytest.fixture
def project(history: Path, tmp_path: Path) -> Path:
    """A private copy of the history project, for tests that change runs."""
    copy = tmp_path / "proj"
    shutil.copytree(history, copy)
    return copy


def answer(project: Path, reply: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with ``reply`` (and a newline) on its stdin (a pipe, as when a user types it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_TRACKING"))}
    proc = popen_cli(project, *args, env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdin=subprocess.PIPE)
    out, err = proc.communicate(reply + "\n", timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def keys(project: Path, *filters: str) -> list[str]:
    proc = cli(project, "ls", "--json", *filters)
    assert proc.returncode == 0, proc.stderr
    return [run["key"] for run in json.loads(proc.stdout)]


def record(project: Path, key: str) -> dict:  # type: ignore[type-arg]
    return json.loads((project / "data_storage" / key / "run.json").read_text())  # type: ignore[no-any-return]


def forget_mlflow(project: Path, *run_keys: str) -> None:
    """Drop the MLflow section of runs, so that deleting them needs no MLflow."""
    for key in run_keys:
        data = record(project, key)
        data["mlflow"] = {"state": "disabled"}
        (project / "data_storage" / key / "run.json").write_text(json.dumps(data))


def mlflow_run(project: Path, run_id: str):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}").get_run(run_id)


def mlflow_children(project: Path, parent_id: str) -> list[str]:
    """The MLflow run ids below ``parent_id`` (children, grandchildren ...), by their
    ``mlflow.parentRunId`` tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}")
    experiment = client.get_run(parent_id).info.experiment_id
    found: list[str] = []
    todo = [parent_id]
    while todo:
        runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{todo.pop()}'")
        todo += [run.info.run_id for run in runs]
        found += [run.info.run_id for run in runs]
    return sorted(found)


# --- ls -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ls_table_json_and_status_filters(history: Path) -> None:
    proc = cli(history, "ls")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["KEY", "STATUS", "STARTED", "DURATION", "SYNCED", "ARGS"]
    assert [row.split()[1] for row in rows] == ["completed", "completed", "failed", "completed"]
    assert "a=1" in rows[0] and "a=2" in rows[1]
    runs = json.loads(cli(history, "ls", "--json").stdout)
    assert set(runs[0]) >= {"key", "node", "status", "started_at", "ended_at", "synced", "args"}
    assert [r["node"] for r in runs] == ["Add", "Add", "Fail", "Evaluate"]
    assert runs[0]["args"]["optim"] == {"lr": 0.1, "momentum": 0.9} and runs[0]["synced"] is True
    assert keys(history, "--failed") == [runs[2]["key"]]
    assert keys(history, "--failed", "--completed") == [r["key"] for r in runs]
    assert keys(history, "--running", "--killed", "--stale") == []


def test_ls_where_prefix_and_time_window(project: Path) -> None:
    add1, add2, *_ = keys(project)
    assert keys(project, "--where", "a=2") == [add2]
    assert keys(project, "--where", "optim.lr=0.1", "--where", "a=1") == [add1]
    assert keys(project, "Add") == [add1, add2]
    old = project / "data_storage" / add1 / "run.json"
    data = json.loads(old.read_text())
    data["started_at"] = "2020-01-01T00:00:00+00:00"
    old.write_text(json.dumps(data))
    assert keys(project, "--last", "2d", "Add") == [add2]
    assert keys(project, "Add") == [add1, add2]
    proc = cli(project, "ls", "--where", "seed=1")
    assert proc.returncode == 0 and "no listed run has the arg seed; args are: a, b, " in proc.stderr


def test_bad_input_is_one_paragraph_with_exit_2(history: Path) -> None:
    proc = cli(history, "ls", "--last", "3x")
    assert proc.returncode == 2 and "s (seconds), m (minutes), h (hours), d (days) or w (weeks)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli(history, "show", "Add")
    assert proc.returncode == 2 and "'Add' matches 2 runs: Add_" in proc.stderr
    proc = cli(history, "show", "Nope")
    assert proc.returncode == 2 and "No run key starts with 'Nope'" in proc.stderr and "Newest runs:" in proc.stderr
    proc = cli(history, "ls", "--where", "a")
    assert proc.returncode == 2 and "FIELD=VALUE" in proc.stderr
    proc = cli(history, "ls", "--fix")
    assert proc.returncode == 2 and "ls --stale --fix" in proc.stderr


def test_a_corrupt_run_json_is_reported_and_the_listing_goes_on(project: Path) -> None:
    add1, *rest = keys(project)
    (project / "data_storage" / add1 / "run.json").write_text('{"status": ')
    proc = cli(project, "ls", "--json")
    assert proc.returncode == 0
    assert [r["key"] for r in json.loads(proc.stdout)] == rest
    assert f"warning: {project / 'data_storage' / add1 / 'run.json'} is unreadable" in proc.stderr


def test_ls_show_compare_do_not_import_mlflow(history: Path) -> None:
    add1, add2, *_ = keys(history)
    code = (
        "import sys, phd_flow.cli as c\n"
        f"for argv in (['ls'], ['ls', '--json'], ['show', '{add1}'], ['compare', '{add1}', '{add2}']):\n"
        "    assert c.main('my_project', argv) == 0\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
        "assert 'pandas' not in sys.modules, 'pandas imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=history, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


# --- show, compare, result ----------------------------------------------------------------------


def test_show_a_completed_pipeline_run(history: Path) -> None:
    evaluate = keys(history, "Evaluate")[0]
    proc = cli(history, "show", evaluate[:-3])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    data = record(history, evaluate)
    assert out.startswith(evaluate) and "status   completed" in out and f"pid {data['pid']}" in out
    assert f"run {data['mlflow']['run_id']} in experiment test" in out
    assert f"/#/experiments/{data['mlflow']['experiment_id']}/runs/{data['mlflow']['run_id']}" in out
    assert "args\n  lr    0.1\n  fail  false" in out
    assert "  run.json " in out and "  results.pickle " in out
    assert "children\n  └─ Train_" in out and "     └─ Prepare_" in out and "completed" in out
    assert "output.log" not in out.split("files")[0]  # no log tail for a completed run


def test_show_a_failed_run_tails_its_log_and_shows_stages_and_slurm(project: Path) -> None:
    add1, _, failed, _ = keys(project)
    path = project / "data_storage" / failed / "run.json"
    data = json.loads(path.read_text())
    data["stages"] = {"load_data": {"loaded": True, "loaded_from": add1, "sha256": "ab" * 32}}
    data["slurm"] = {"job_id": "4242", "array_job_id": "4240", "array_task_id": "2", "node": "c07"}
    path.write_text(json.dumps(data))
    out = cli(project, "show", failed).stdout
    assert "error    ValueError: kaputt" in out
    assert f"  load_data  loaded from {add1}  sha256 abababababab" in out
    assert "slurm    job 4242 (array 4240_2) on c07" in out
    tail = out.split("lines of output.log\n")[1]
    assert len(tail.splitlines()) >= 20 and "ValueError: kaputt" in tail


def test_show_a_sweep_lists_its_points(project: Path) -> None:
    add1, add2, *_ = keys(project)
    sweep_dir = project / "data_storage" / "Sweep_2026-01-01T00-00-00.000000Z_abcdefgh"
    sweep_dir.mkdir()
    points = [
        {"key": add1, "params": {"a": 1}, "status": "running"},
        {"key": add2, "params": {"a": 2}, "status": "running"},
    ]
    (sweep_dir / "run.json").write_text(
        json.dumps(
            {
                "key": sweep_dir.name,
                "node": "Sweep",
                "kind": "sweep",
                "status": "completed",
                "started_at": "2026-01-01T00:00:00+00:00",
                "grid": {"a": [1, 2]},
                "points": points,
            }
        )
    )
    for key in (add1, add2):
        data = record(project, key)
        (project / "data_storage" / key / "run.json").write_text(json.dumps({**data, "sweep": sweep_dir.name}))
    out = cli(project, "show", "Sweep").stdout
    assert 'grid: {"a": [1, 2]}' in out
    assert f"{add1}  completed  a=1" in out and f"{add2}  completed  a=2" in out  # live status
    assert keys(project, "--sweep", "Sweep_2026") == [add1, add2]


def test_compare_shows_differing_args_and_final_metrics(history: Path) -> None:
    add1, add2, *_ = keys(history)
    proc = cli(history, "compare", add1, add2[:-2])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"[1] {add1}  completed" and lines[1] == f"[2] {add2}  completed"
    assert "  a  1    2" in lines and "same in all: b=2, optim.lr=0.1, optim.momentum=0.9" in lines
    assert ["total", "3", "4", "*"] in [line.split() for line in lines]  # higher total is better: [2] marked


def test_result_prints_the_verified_result(project: Path, tmp_path: Path) -> None:
    add1, _, failed, _ = keys(project)
    proc = cli(project, "result", add1, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "AddResult(total=3)", proc.stderr
    # the class of the result lives in tests.nodes: not importable without the repository root
    proc = cli(project, "result", add1, env=_pythonpath_without_tests(tmp_path))
    assert proc.returncode == 2 and "(AddResult) cannot be unpickled here: No module named 'tests'" in proc.stderr
    proc = cli(project, "result", failed)
    assert proc.returncode == 2 and "is failed (ValueError: kaputt), so it has no result" in proc.stderr
    (project / "data_storage" / add1 / "results.pickle").write_bytes(b"not the pickle")
    proc = cli(project, "result", add1)
    assert proc.returncode == 2 and "does not match the sha256" in proc.stderr


def _pythonpath_without_tests(tmp_path: Path) -> dict[str, str]:
    """The inherited PYTHONPATH (a developer's may hold the repository root, to import a
    worktree's phd_flow), with the repository root replaced by a folder that holds only
    ``phd_flow``: the same phd_flow is imported, the ``tests`` package is not importable."""
    only = tmp_path / "only_phd_flow"
    only.mkdir(exist_ok=True)
    if not (only / "phd_flow").exists():
        (only / "phd_flow").symlink_to(REPO / "phd_flow")
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    kept = [str(only) if Path(e).resolve() == REPO.resolve() else e for e in entries]
    return {"PYTHONPATH": os.pathsep.join(kept)}


# --- rm -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rm_asks_and_deletes_local_dir_and_mlflow_runs(project: Path) -> None:
    add1, add2, failed, evaluate = keys(project)
    proc = answer(project, "n", "rm", "--failed")
    assert proc.returncode == 1 and "Nothing deleted." in proc.stdout
    assert f"{failed}  failed: local dir (" in proc.stdout and "MLflow run " in proc.stdout
    assert (project / "data_storage" / failed).is_dir()
    parent_id = record(project, evaluate)["mlflow"]["run_id"]
    children = mlflow_children(project, parent_id)  # asked of MLflow, not of rm's own plan
    nested = {
        json.loads(path.read_text())["mlflow"]["run_id"]
        for path in (project / "data_storage" / evaluate).rglob("run.json")
        if path.parent.name != evaluate
    }
    assert len(children) >= 2 and nested == set(children), (children, nested)
    assert all(mlflow_run(project, run_id).info.lifecycle_stage == "active" for run_id in [parent_id, *children])
    proc = answer(project, "y", "rm", evaluate[:-2])
    assert proc.returncode == 0 and "Deleted 1 run(s)." in proc.stdout, proc.stderr
    assert not (project / "data_storage" / evaluate).exists()
    assert keys(project) == [add1, add2, failed]
    stages = {run_id: mlflow_run(project, run_id).info.lifecycle_stage for run_id in [parent_id, *children]}
    assert set(stages.values()) == {"deleted"}, f"every MLflow run of the pipeline must be deleted: {stages}"
    assert proc.stdout.count("MLflow run ") == 1 and all(run_id in proc.stdout for run_id in children)


def test_rm_force_no_match_and_bad_keys(project: Path) -> None:
    add1, add2, failed, evaluate = keys(project)
    proc = cli(project, "rm", "--killed")
    assert proc.returncode == 0 and "No run matches: nothing deleted." in proc.stdout
    proc = cli(project, "rm", "Nope", add1)
    assert proc.returncode == 2 and "No run key starts with 'Nope'" in proc.stderr
    proc = cli(project, "rm")
    assert proc.returncode == 2 and "never deletes everything" in proc.stderr
    assert keys(project) == [add1, add2, failed, evaluate]
    forget_mlflow(project, failed)  # (deleting MLflow runs is tested above; this one is fast)
    proc = cli(project, "rm", "--force", "--failed")
    assert proc.returncode == 0 and keys(project) == [add1, add2, evaluate]


def test_rm_warns_loudly_about_runs_that_loaded_a_stage_from_it(project: Path) -> None:
    add1, add2, *_ = keys(project)
    path = project / "data_storage" / add2 / "run.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "stages": {"data": {"loaded": True, "loaded_from": add1}}}))
    proc = answer(project, "n", "rm", add1)
    assert f"WARNING: run {add2} loaded its stage 'data' from {add1}" in proc.stderr
    assert proc.returncode == 1 and (project / "data_storage" / add1).is_dir()
    proc = answer(project, "n", "rm", add1, add2)  # both would go: nobody is left depending
    assert proc.returncode == 1 and "WARNING" not in proc.stderr


def test_rm_remote_deletes_the_copy_in_storage(project: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    write_config(project, CONFIG + f'[storage]\nbackend = "local"\nremote = "{shared}"\n')
    add1, add2, *_ = keys(project)
    forget_mlflow(project, add1, add2)
    assert cli(project, "sync", add1, add2).returncode == 0
    assert (shared / add1 / "run.json").is_file()
    proc = cli(project, "rm", add1, "--force")
    assert "its copy in storage is kept" in proc.stdout and (shared / add1).is_dir()
    proc = cli(project, "ls", "--remote", "--json")
    assert {r["key"]: r["where"] for r in json.loads(proc.stdout)}[add1] == "remote"
    proc = cli(project, "rm", add1, add2, "--remote", "--force")
    assert proc.returncode == 0, proc.stderr
    assert f"files in {shared}" in proc.stdout
    assert not (shared / add1).exists() and not (shared / add2).exists()
    assert not (project / "data_storage" / add2).exists()


# --- remote listing -----------------------------------------------------------------------------


def test_ls_remote_lists_runs_of_another_machine(project: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    storage = f'[storage]\nbackend = "local"\nremote = "{shared}"\n'
    write_config(project, CONFIG + storage)
    assert cli(project, "sync", *keys(project)).returncode == 0
    other = tmp_path / "machine2"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("data_storage", "__pycache__"))
    assert keys(other) == []
    proc = cli(other, "ls", "--remote")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert "WHERE" in header.split() and [r.split()[6] for r in rows] == ["remote"] * 4
    add1 = rows[0].split()[0]
    out = cli(other, "show", add1[:-3]).stdout
    assert "(only in storage)" in out and "  results.pickle " in out
    proc = cli(other, "result", add1, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "--trust-remote" in proc.stderr  # no signing key configured
    proc = cli(other, "result", add1, "--trust-remote", env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "AddResult(total=3)", proc.stderr


def test_ls_remote_reads_run_records_in_parallel_within_the_backends_limit(tmp_path: Path) -> None:
    """The first listing fetches run.json with as many threads as the backend's own transfers
    (``max_workers``): all of them at once (a barrier that only that many readers pass), never more."""
    import threading

    from phd_flow import Config
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.listing import remote_records
    from phd_flow.storage.local import LocalRemote

    class CountingRemote(LocalRemote):
        max_workers = 4

        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.barrier = threading.Barrier(self.max_workers, timeout=30)
            self.lock, self.inside, self.most = threading.Lock(), 0, 0

        def read_small(self, key: str, limit: int = 1 << 20) -> bytes | None:
            if not key.endswith("/run.json"):
                return super().read_small(key, limit)
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                self.barrier.wait()  # sequential reads would never get here together
                return super().read_small(key, limit)
            finally:
                with self.lock:
                    self.inside -= 1

    (tmp_path / "template").mkdir()
    template = RunRecord.create(tmp_path / "template", node="Add").data
    remote_root = tmp_path / "remote"
    keys = [f"Add_2026-01-01T00-00-{i:02d}.000000Z_{i:08d}" for i in range(40)]
    for key in keys:
        (remote_root / key).mkdir(parents=True)
        record = {**template, "key": key, "status": "completed", "ended_at": template["started_at"]}
        (remote_root / key / "run.json").write_text(json.dumps(record))
    remote = CountingRemote(remote_root)
    config = Config(local_path=tmp_path / "local", project_root=tmp_path)
    listed = list(remote_records(config, remote, refresh=True))
    assert [record.key for record in listed if isinstance(record, RunRecord)] == keys
    assert remote.most == remote.max_workers


# --- honest status ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_run_is_stale_and_fix_marks_it_killed(project: Path, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_TRACKING"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "my_project", "run", "Nap", "--marker", str(marker)],
        cwd=project,
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.1)
        (nap,) = keys(project, "Nap", "--running")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert keys(project, "--running") == [] and keys(project, "--stale") == [nap]
    assert record(project, nap)["status"] == "running"
    proc_fix = cli(project, "ls", "--stale", "--fix")
    assert proc_fix.returncode == 0 and f"{nap}: marked killed in run.json and in MLflow" in proc_fix.stdout
    data = record(project, nap)
    assert data["status"] == "killed" and data["ended_at"] == data["heartbeat_at"]
    assert mlflow_run(project, data["mlflow"]["run_id"]).info.status == "KILLED"
    assert keys(project, "--stale") == [] and keys(project, "--killed") == [nap]
    # Its partial files are still syncable, once a remote is configured.
    shared = tmp_path / "shared"
    config = project / "config" / "default.toml"
    config.write_text(config.read_text() + f'\n[storage]\nbackend = "local"\nremote = "{shared}"\n')
    proc_sync = cli(project, "sync", nap)
    assert proc_sync.returncode == 0, proc_sync.stderr
    assert (shared / nap / "output.log").read_bytes() == (project / "data_storage" / nap / "output.log").read_bytes()
    assert json.loads((shared / nap / "run.json").read_text())["status"] == "killed"


@pytest.mark.slow
def test_ui_starts_mlflow_on_the_tracking_store_and_answers(history: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "my_project", "ui", "--port", str(port)],
        cwd=history,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}" in line and "mlflow.db" in line
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow ui did not answer"
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


# --- gc and rm --purge (issue 19 row 4) ----------------------------------------------------------


def _edit(project: Path, key: str, **fields: object) -> None:
    path = project / "data_storage" / key / "run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _mlflow_gone(project: Path, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_run(project, run_id)
    except MlflowException as exc:
        return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc)
    return False


@pytest.mark.slow
def test_gc_is_a_dry_run_by_default_and_keeps_what_kept_runs_loaded_or_reused(project: Path) -> None:
    add1, add2, failed, evaluate = keys(project)
    old = "2020-01-01T00:00:00+00:00"
    for key in (add1, add2, failed):
        _edit(project, key, started_at=old)
    data = record(project, evaluate)
    _edit(
        project,
        evaluate,
        stages={**(data.get("stages") or {}), "data": {"loaded": True, "loaded_from": add1}},
        children=[*(data.get("children") or []), {"node": "Add", "path": add2, "reused": True}],
    )
    proc = cli(project, "gc")
    assert proc.returncode == 2 and "at least one of --older-than" in proc.stderr

    dry = cli(project, "gc", "--older-than", "30d")
    assert dry.returncode == 0, dry.stderr
    assert f"kept  {add1}: {evaluate} loaded its stage 'data' from it" in dry.stdout
    assert f"kept  {add2}: {evaluate} reused its Add result" in dry.stdout
    assert "Would remove 1 run(s)" in dry.stdout and f"  {failed}  failed" in dry.stdout
    assert "Dry run: nothing deleted" in dry.stdout and keys(project) == [add1, add2, failed, evaluate]

    held = cli(project, "gc", "--node", "Add", "--status", "completed", "--yes")
    assert held.returncode == 0 and "every match is held by a kept run" in held.stdout

    failed_mlflow = record(project, failed)["mlflow"]["run_id"]
    done = cli(project, "gc", "--older-than", "30d", "--status", "failed", "--yes", "--purge")
    assert done.returncode == 0 and "Deleted 1 run(s)." in done.stdout, done.stdout + done.stderr
    assert keys(project) == [add1, add2, evaluate]
    assert _mlflow_gone(project, failed_mlflow)  # purged, not only marked deleted


@pytest.mark.slow
def test_rm_purge_deletes_the_mlflow_runs_for_good(project: Path) -> None:
    add1, add2, *_ = keys(project)
    soft, hard = record(project, add1)["mlflow"]["run_id"], record(project, add2)["mlflow"]["run_id"]
    assert cli(project, "rm", add1, "--force").returncode == 0
    assert mlflow_run(project, soft).info.lifecycle_stage == "deleted"  # MLflow's soft delete
    # a new interpreter, as a user's: rm imports mlflow itself (every other rm is forked from a
    # server that has it imported, tests/cli_client.py:server_for)
    proc = cli(project, "rm", add2, "--force", "--purge", subprocess=True)
    assert proc.returncode == 0, proc.stderr
    assert _mlflow_gone(project, hard)
