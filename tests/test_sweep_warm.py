"""The warm local executor (issue 20): points forked from one warm driver are as isolated as
separate processes; the process-per-point executor stays selectable. Through the real CLI."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.test_sweep_local import make_project, point_records, sweep_record

#: A node that misbehaves in the ways a point must not pass on to the next one.
HOSTILE = '''"""Nodes that crash the interpreter, leak globals, change cwd (warm executor tests)."""

import atexit
import ctypes
import dataclasses
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy

from phd_flow import Node, node

IMPORT_PID = os.getpid()  # the process that imported this module
LEAKED: list[str] = []
SHARED = Path(tempfile.mkdtemp())  # made at import; removed when the importing process exits
atexit.register(shutil.rmtree, SHARED, True)


@dataclasses.dataclass
class HostileArgs(node.Args):
    mode: str = "check"  # leak | chdir | exit | segfault | check
    out_dir: str = ""  # <out_dir>/<mode>.json: what the point saw


class Hostile(Node[HostileArgs, str]):
    """Misbehave according to --mode, after writing what this process looks like."""

    def _run(self) -> str:
        seen = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "import_pid": IMPORT_PID,
            "leaked": list(LEAKED),
            "env": os.environ.get("HOSTILE_LEAK"),
            "cwd": os.getcwd(),
            "numpy": float(numpy.random.rand()),
            "random": random.random(),
            "shared": SHARED.is_dir(),
        }
        (Path(self.args.out_dir) / f"{self.args.mode}.json").write_text(json.dumps(seen))
        self.log_metric("seen", 1.0)
        if self.args.mode == "leak":
            atexit.register((Path(self.args.out_dir) / "leak.atexit").touch)  # the point's own handler
            LEAKED.append(str(self.key))
            os.environ["HOSTILE_LEAK"] = str(self.key)
        elif self.args.mode == "chdir":
            os.chdir(Path(self.args.out_dir))
        elif self.args.mode == "exit":
            os._exit(3)
        elif self.args.mode == "segfault":
            ctypes.string_at(0)
        return self.args.mode
'''


def hostile_project(root: Path) -> Path:
    project = make_project(root)
    (project / "my_project" / "hostile.py").write_text(HOSTILE)
    return project


def test_a_point_that_crashes_leaks_or_changes_cwd_does_not_affect_the_next(tmp_path: Path) -> None:
    project = hostile_project(tmp_path / "proj")
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    modes = ["leak", "chdir", "exit", "segfault", "check"]
    proc = cli(
        project,
        "sweep",
        "Hostile",
        "--out_dir",
        str(seen_dir),
        "--grid",
        f"mode={','.join(modes)}",
        "--max-parallel",
        "1",
    )
    assert proc.returncode == 1, proc.stderr  # two points died
    record = sweep_record(project)
    assert record["executor"]["kind"] == "local"
    statuses = {p["params"]["mode"]: p["status"] for p in record["points"]}
    assert statuses == {
        "leak": "completed",
        "chdir": "completed",
        "exit": "killed",
        "segfault": "killed",
        "check": "completed",
    }
    seen = {mode: json.loads((seen_dir / f"{mode}.json").read_text()) for mode in modes}
    # warm: the node's module was imported once, by the driver, and every point is its child
    driver = seen["check"]["ppid"]
    assert {s["ppid"] for s in seen.values()} == {driver} and {s["import_pid"] for s in seen.values()} == {driver}
    assert len({s["pid"] for s in seen.values()}) == len(modes)
    # isolated: nothing the earlier points did reached the last one
    assert seen["check"]["leaked"] == [] and seen["check"]["env"] is None
    assert seen["check"]["cwd"] == str(project)
    assert seen["check"]["shared"]  # the driver's exit handlers did not run at a point's exit ...
    assert (seen_dir / "leak.atexit").exists()  # ... the point's own did
    assert len({s["numpy"] for s in seen.values()}) == len(modes)  # numpy reseeded in every point
    assert len({s["random"] for s in seen.values()}) == len(modes)
    # a point that died without recording its end is killed, and says how it ended
    runs = point_records(project)
    by_mode = {p["params"]["mode"]: runs[p["key"]] for p in record["points"]}
    assert by_mode["exit"]["status"] == "killed" and "exit code 3" in by_mode["exit"]["error"]
    assert by_mode["segfault"]["status"] == "killed" and "SIGSEGV" in by_mode["segfault"]["error"]
    assert "killed by SIGSEGV" in proc.stdout and "exit code 3" in proc.stdout
    assert by_mode["check"]["status"] == "completed"


def test_sigterm_to_a_warm_sweep_stops_the_running_point_and_marks_the_rest_killed(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_"))}
    argv = ["sweep", "Nap", "--marker_dir", str(markers), "--grid", "seconds=60,61,62", "--max-parallel", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "my_project", *argv],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(list(markers.iterdir())) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted: 3 killed" in out
    record = sweep_record(project)
    assert [p["status"] for p in record["points"]] == ["killed"] * 3 and record["status"] == "killed"
    runs = point_records(project)  # the two running points recorded their own end; the third never ran
    assert sorted(runs) == sorted(p["key"] for p in record["points"][:2])
    assert {r["status"] for r in runs.values()} == {"killed"}


def test_the_process_executor_stays_selectable_and_is_recorded_for_resume(tmp_path: Path) -> None:
    project = hostile_project(tmp_path / "proj")
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    proc = cli(
        project, "sweep", "Hostile", "--out_dir", str(seen_dir), "--grid", "mode=leak,check", "--executor", "process"
    )
    assert proc.returncode == 0, proc.stderr
    record = sweep_record(project)
    assert record["executor"]["kind"] == "process"
    seen = [json.loads((seen_dir / f"{m}.json").read_text()) for m in ("leak", "check")]
    assert all(s["import_pid"] == s["pid"] for s in seen)  # each point imported the node itself
    assert {p["status"] for p in record["points"]} == {"completed"}
    (project / "config" / "default.toml").write_text(
        (project / "config" / "default.toml").read_text() + '[executor]\nkind = "process"\n'
    )
    failing = cli(project, "sweep", "Scale", "--fail_seed", "1", "--grid", "seed=1")
    assert failing.returncode == 1 and "RuntimeError: seed 1 is set to fail" in failing.stdout
    (key,) = [d.name for d in (project / "data_storage").glob("Sweep_*") if d.name != record["key"]]
    assert f"sweep --resume {key} --executor process" in failing.stderr


#: A node whose answer comes from a helper function; the test edits the helper mid-sweep.
EDITED = '''"""A node and a helper the test edits while the sweep runs."""

import dataclasses
import time
from pathlib import Path

from phd_flow import Node, node


def answer() -> int:
    return 1


@dataclasses.dataclass
class AskArgs(node.Args):
    go: str = ""  # wait for this file before answering
    n: int = 0


class Ask(Node[AskArgs, int]):
    def _run(self) -> int:
        (Path(self.args.go).parent / f"started-{self.args.n}").touch()
        while not Path(self.args.go).exists():
            time.sleep(0.05)
        return answer()
'''


def test_a_warm_point_records_the_code_it_ran_not_an_edit_made_mid_sweep(tmp_path: Path) -> None:
    """A forked point runs the module the driver imported; its fingerprint must say so (an edit
    saved during the sweep is not the code it ran: the record would lie and the cache would
    later reuse its result for the edited code)."""
    project = make_project(tmp_path / "proj")
    module = project / "my_project" / "ask.py"
    module.write_text(EDITED)
    go = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_"))}
    argv = ["sweep", "Ask", "--go", str(go), "--grid", "n=1,2", "--max-parallel", "1"]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "my_project", *argv],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "started-1").exists():
        assert time.monotonic() < deadline and sweep.poll() is None, "the first point never started"
        time.sleep(0.05)
    module.write_text(EDITED.replace("return 1", "return 2"))  # the user saves an edit mid-sweep
    go.touch()
    out, err = sweep.communicate(timeout=180)
    assert sweep.returncode == 0, out + err
    runs = point_records(project)
    by_n = {int(r["args"]["n"]): (key, r) for key, r in runs.items()}
    results = {
        n: pickle.loads((project / "data_storage" / key / "results.pickle").read_bytes())
        for n, (key, _) in by_n.items()
    }
    assert results == {1: 1, 2: 1}, "warm points run the code the driver imported"
    code = {n: r["fingerprint"]["inputs"]["code"] for n, (_, r) in by_n.items()}
    assert code[1] == code[2], "the second point's record claims the edited code it never ran"


@pytest.mark.slow
def test_a_local_sweep_waits_once_for_mlflow_and_returns_with_every_point_in_it(tmp_path: Path) -> None:
    """Points end without waiting for MLflow (the one feeder takes them as they end); the sweep
    waits once, at its end: when it returns, MLflow has every point whole (issue 20)."""
    from mlflow.tracking import MlflowClient

    config = 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "sweeps"\n'
    project = make_project(tmp_path / "proj", config)
    env = {"PHD_FLOW_WAIT_MLFLOW": "false"}  # the suite's default is to wait in every run
    proc = cli(project, "sweep", "Scale", "--alpha", "3", "--grid", "seed=1,2,3,4", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = point_records(project)
    assert {r["mlflow"]["state"] for r in runs.values()} == {"synced"}
    client = MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    assert experiment is not None
    fed = [r for r in client.search_runs([experiment.experiment_id]) if "phd_flow.kind" not in r.data.tags]
    assert sorted(r.data.tags["phd_flow.key"] for r in fed) == sorted(runs)  # (and the sweep's own run)
    assert {r.info.status for r in fed} == {"FINISHED"}
    assert sorted(r.data.metrics["value"] for r in fed) == [3.0, 6.0, 9.0, 12.0]
    # one feeder for the whole sweep: a point queuing itself while the feeder another point
    # started is still starting up does not start a second one (4 points once started 3)
    (log,) = (project / "data_storage" / ".phd_flow" / "mlflow-feed").glob("*/feeder.log")
    assert log.read_text().count("Feeder pid") == 1, log.read_text()
    # the sweep's own MLflow run is closed by that feeder too: the sweep never imports mlflow
    sweep_key = sweep_record(project)["key"]
    assert f"{sweep_key}: done" in log.read_text(), log.read_text()
    (parent,) = [r for r in client.search_runs([experiment.experiment_id]) if "phd_flow.kind" in r.data.tags]
    assert parent.data.tags["phd_flow.key"] == sweep_key and parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_parent_run_with_its_points_nested_and_sync_adds_no_run(tmp_path: Path) -> None:
    """MLflow shows a sweep as one parent run (grid as params, final status) with every point
    nested under it; `sync` never turns the sweep record into a run of its own (issue 16)."""
    from mlflow.tracking import MlflowClient

    config = 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "sweeps"\n'
    project = make_project(tmp_path / "proj", config)
    proc = cli(project, "sweep", "Scale", "--alpha", "2", "--grid", "seed=1,2,3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cli(project, "sync").returncode == 0
    sweep_key = sweep_record(project)["key"]
    shown = cli(project, "show", sweep_key)
    assert shown.returncode == 0 and "3 points" in shown.stdout and "host ?" not in shown.stdout, shown.stdout
    client = MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    assert experiment is not None
    fed = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in fed if r.data.tags.get("phd_flow.key") == sweep_key]
    points = [r for r in fed if r is not parent]
    assert len(fed) == 4 and parent.data.tags["phd_flow.kind"] == "sweep"
    assert parent.data.params == {"grid.seed": "1,2,3"} and parent.info.status == "FINISHED"
    assert {r.data.tags.get("mlflow.parentRunId") for r in points} == {parent.info.run_id}
    assert sorted(r.data.tags["phd_flow.key"] for r in points) == sorted(point_records(project))
