"""Resumed attempts in MLflow (issue 20): a run resumed under its key (a SLURM requeue, ``sweep
--resume``, ``run --key``) whose new attempt logs steps an earlier attempt logged ends with one
MLflow run holding one value per (metric, step): the newest attempt's. The earlier MLflow run is
replaced (a new one with the same name, params, tags, parent and start time), tagged and
soft-deleted; a pure continuation is appended as before.

Real CLI subprocesses, a real sqlite store, the background feeder (``PHD_FLOW_WAIT_MLFLOW=false``)
or a live MLflow run (mlflow imported by the node).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, run_dirs
from tests.test_feeder import BACKGROUND, client, feeder_pid, poll, popen, record

#: Every test here runs two attempts of a run through the real CLI and MLflow (10-80 s).
pytestmark = pytest.mark.slow

NODES = '''
import dataclasses
import time
from pathlib import Path

from phd_flow import Node, node


@dataclasses.dataclass
class ResumeArgs(node.Args):
    hold: str = ""  # the first attempt waits here (after logging) until killed
    overlap: bool = True  # the second attempt restarts at step 5 (else it goes on at step 21)
    hold_again: str = ""  # the second attempt waits here (after logging)


def log_attempt(run, direct=None) -> None:
    """Attempt 1: loss at steps 0..20 (value = step), acc once, lr three times at step 0.
    Attempt 2: loss at steps 5..29 or 21..29 (value = 1000 + step), lr three times at step 0."""
    resumed = run.resumed
    first, last = (5 if run.args.overlap else 21, 29) if resumed else (0, 20)
    for step in range(first, last + 1):
        run.log_metric("loss", step + (1000 if resumed else 0), step=step)
        if direct is not None:
            direct.log_metric("direct", step + (1000 if resumed else 0), step=step)
    if not resumed:
        run.log_metric("acc", 0.5, step=0)
    for i in range(3 if run.args.overlap else 0):
        run.log_metric("lr", i + (10 if resumed else 0))
    hold = run.args.hold_again if resumed else run.args.hold
    while hold and not Path(hold).exists():
        time.sleep(0.05)


@dataclasses.dataclass
class FlakyArgs(node.Args):
    seed: int = 0
    allow: str = ""  # fails at step 6 unless this file exists


class Flaky(Node[FlakyArgs, int]):
    def _run(self) -> int:
        for step in range(10):
            if step == 6 and not Path(self.args.allow).exists():
                raise RuntimeError("flaky")
            self.log_metric("loss", step + (1000 if self.resumed else 0), step=step)
        return 1


@dataclasses.dataclass
class LongArgs(node.Args):
    steps: int = 10
    hold: str = ""  # the first attempt waits here (after logging) until killed


class Long(Node[LongArgs, int]):
    """Both attempts log loss at every step (attempt 2: 1000 + step); attempt 1 then holds."""

    def _run(self) -> int:
        for step in range(self.args.steps):
            self.log_metric("loss", step + (1000 if self.resumed else 0), step=step)
        while not self.resumed and self.args.hold and not Path(self.args.hold).exists():
            time.sleep(0.05)
        return 1


@dataclasses.dataclass
class PartArgs(node.Args):
    size: int = 3


class Part(Node[PartArgs, int]):
    def _run(self) -> int:
        self.log_metric("part", 1.0)
        return self.args.size


class Whole(Node[ResumeArgs, int]):
    """A pipeline: its child run is nested under its MLflow run."""

    def _run(self) -> int:
        self.require(Part, PartArgs())
        log_attempt(self)
        return 1


class Resumable(Node[ResumeArgs, int]):
    def _run(self) -> int:
        log_attempt(self)
        return 1


class ResumableDirect(Node[ResumeArgs, int]):
    """Imports mlflow inside _run and logs a metric of its own straight to MLflow."""

    def _run(self) -> int:
        import mlflow

        mlflow.log_param("direct_param", "yes")
        log_attempt(self, mlflow)
        return 1
'''

LIVE = """
import mlflow  # imported with the module: the run's MLflow run is opened in the run's process

from my_project.attempt_nodes import ResumeArgs, log_attempt
from phd_flow import Node


class ResumableLive(Node[ResumeArgs, int]):
    def _run(self) -> int:
        log_attempt(self)
        return 1
"""

LINES_ATTEMPT_1 = 21 + 1 + 3  # loss 0..20, acc, lr x3


@pytest.fixture
def aproject(project: Path) -> Path:
    (project / "my_project" / "attempt_nodes.py").write_text(NODES)
    (project / "my_project" / "attempt_live.py").write_text(LIVE)
    return project


def history(project: Path, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(project).get_metric_history(run_id, name))


def live_runs(project: Path, key: str) -> list[Any]:
    ids = [e.experiment_id for e in client(project).search_experiments()]
    return list(client(project).search_runs(ids, filter_string=f"tags.`phd_flow.key` = '{key}'"))


def two_attempts(project: Path, node: str, *extra: str) -> tuple[Path, str]:
    """Attempt 1 logs, is sent to MLflow whole and is killed (SIGTERM); attempt 2 runs under its
    key to completion. Returns the run dir and attempt 1's MLflow run id."""
    proc = popen(project, "run", node, "--hold", str(project / "never"), *extra)
    try:
        poll(lambda: run_dirs(project / "data_storage"), "the run to start")
        (run_dir,) = run_dirs(project / "data_storage")
        key = run_dir.name
        names = ("loss", "acc", "lr") if "false" not in extra else ("loss", "acc")

        def attempt_1_sent() -> bool:
            found = live_runs(project, key)
            points = sum(len(history(project, found[0].info.run_id, n)) for n in names) if found else 0
            return points == LINES_ATTEMPT_1 - 3 * ("false" in extra)

        poll(attempt_1_sent, "MLflow to get attempt 1's points")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    data = record(run_dir)
    assert data["status"] == "killed"
    first_id = poll(
        lambda: record(run_dir)["mlflow"].get("state") == "synced" and record(run_dir)["mlflow"]["run_id"],
        "attempt 1's MLflow run to be closed",
    )
    again = cli(project, "run", node, "--hold", str(project / "never"), *extra, "--key", data["key"], env=BACKGROUND)
    assert again.returncode == 0, again.stderr[-3000:]
    poll(lambda: record(run_dir)["mlflow"].get("state") == "synced", "MLflow to get attempt 2")
    return run_dir, str(first_id)


NEWEST_LOSS = [(s, float(s)) for s in range(5)] + [(s, 1000.0 + s) for s in range(5, 30)]


def terminated_attempt(project: Path, args: tuple[str, ...], lines: int) -> tuple[Path, str]:
    """Start ``args`` as a real process, SIGTERM it once MLflow has its first ``lines`` metric
    lines, and wait until its MLflow run is closed: (run dir, MLflow run id)."""
    proc = popen(project, *args)
    try:
        poll(lambda: run_dirs(project / "data_storage"), "the run to start")
        (run_dir,) = run_dirs(project / "data_storage")
        poll(lambda: record(run_dir)["mlflow"].get("metrics_sent") == lines, "attempt 1 in MLflow")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    first_id = poll(
        lambda: record(run_dir)["mlflow"].get("state") == "synced" and record(run_dir)["mlflow"]["run_id"],
        "attempt 1 closed",
    )
    return run_dir, str(first_id)


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_replaced(
    project: Path, run_dir: Path, first_id: str, record_files: bool = True, status: str = "FINISHED"
) -> Any:
    """One live MLflow run for the key, newest-wins histories, the old run tagged and deleted."""
    data = record(run_dir)
    (run,) = live_runs(project, data["key"])
    assert run.info.run_id == data["mlflow"]["run_id"] != first_id
    assert history(project, run.info.run_id, "loss") == NEWEST_LOSS
    assert history(project, run.info.run_id, "acc") == [(0, 0.5)]  # only attempt 1 logged it
    assert history(project, run.info.run_id, "lr") == [(0, 10.0), (0, 11.0), (0, 12.0)]  # attempt 2's three
    assert run.info.status == status
    assert run.data.tags["phd_flow.attempts"] == "2" and run.data.tags["phd_flow.replaces"] == first_id
    assert run.data.params["overlap"] == "true" and run.data.params["hold"].endswith("never")
    old = client(project).get_run(first_id)
    assert old.info.lifecycle_stage == "deleted"
    assert old.data.tags["phd_flow.replaced_by"] == run.info.run_id
    assert run.info.start_time == old.info.start_time and run.info.run_name == old.info.run_name
    assert len(data["attempts"]) == 2 and data["attempts"][1]["metrics_from"] == LINES_ATTEMPT_1
    files = {a.path for a in client(project).list_artifacts(run.info.run_id)}
    assert {a.path for a in client(project).list_artifacts(first_id)} <= files
    assert not record_files or {"output.log", "args.json", "run.json"} <= files  # a live run logs none
    return run


def test_a_resumed_run_that_logs_its_steps_again_keeps_one_point_per_step_in_mlflow(aproject: Path) -> None:
    run_dir, first_id = two_attempts(aproject, "Resumable")
    assert_replaced(aproject, run_dir, first_id)
    shown = cli(aproject, "show", run_dir.name)
    assert shown.returncode == 0 and "attempts  2  (earlier: killed " in shown.stdout, shown.stdout
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == LINES_ATTEMPT_1 + 25 + 3  # the record keeps all


def test_a_pure_continuation_is_appended_to_the_same_mlflow_run(aproject: Path) -> None:
    run_dir, first_id = two_attempts(aproject, "Resumable", "--overlap", "false")
    data = record(run_dir)
    (run,) = live_runs(aproject, data["key"])
    assert run.info.run_id == first_id == data["mlflow"]["run_id"]
    assert "phd_flow.replaces" not in run.data.tags and run.data.tags["phd_flow.attempts"] == "2"
    assert history(aproject, first_id, "loss") == [(s, float(s)) for s in range(21)] + [
        (s, 1000.0 + s) for s in range(21, 30)
    ]


def test_metrics_logged_straight_to_mlflow_inside_run_are_carried_over_newest_attempt_first(aproject: Path) -> None:
    run_dir, first_id = two_attempts(aproject, "ResumableDirect")
    run = assert_replaced(aproject, run_dir, first_id)
    assert history(aproject, run.info.run_id, "direct") == NEWEST_LOSS
    assert run.data.params["direct_param"] == "yes"


def test_a_live_mlflow_run_is_replaced_at_the_end_of_the_resumed_attempt(aproject: Path) -> None:
    run_dir, first_id = two_attempts(aproject, "ResumableLive")
    assert_replaced(aproject, run_dir, first_id, record_files=False)


def _back_to_before_the_delete(project: Path, run_dir: Path, first_id: str, new_id: str) -> None:
    """Put MLflow and run.json where a feeder SIGKILLed between completing the new MLflow run
    and deleting the old one leaves them (both live and tagged with the key)."""
    mlflow = client(project)
    mlflow.restore_run(first_id)
    mlflow.delete_tag(first_id, "phd_flow.replaced_by")
    data = record(run_dir)
    data["mlflow"].update(
        state="pending", run_id=first_id, metrics_sent=data["mlflow"]["metrics_sent"], replacement=new_id
    )
    del data["mlflow"]["replaced_at"]
    (run_dir / "run.json").write_text(json.dumps(data))


def test_a_replacement_killed_before_the_old_run_is_deleted_is_finished_by_sync(aproject: Path) -> None:
    run_dir, first_id = two_attempts(aproject, "Resumable")
    new_id = record(run_dir)["mlflow"]["run_id"]
    _back_to_before_the_delete(aproject, run_dir, first_id, new_id)
    assert len(live_runs(aproject, record(run_dir)["key"])) == 2
    synced = cli(aproject, "sync", record(run_dir)["key"])
    assert synced.returncode == 0, synced.stderr[-3000:]
    run = assert_replaced(aproject, run_dir, first_id)
    assert run.info.run_id == new_id  # finished, not replaced again


def test_a_replacement_killed_while_building_the_new_run_is_redone_by_sync(aproject: Path) -> None:
    run_dir, first_id = two_attempts(aproject, "Resumable")
    partial = record(run_dir)["mlflow"]["run_id"]
    _back_to_before_the_delete(aproject, run_dir, first_id, partial)
    client(aproject).delete_tag(partial, "phd_flow.key")  # not complete yet: it never claimed the key
    client(aproject).set_tag(partial, "phd_flow.replacing", record(run_dir)["key"])  # ... and was being filled
    synced = cli(aproject, "sync", record(run_dir)["key"])
    assert synced.returncode == 0, synced.stderr[-3000:]
    run = assert_replaced(aproject, run_dir, first_id)
    assert run.info.run_id != partial
    assert client(aproject).get_run(partial).info.lifecycle_stage == "deleted"


def test_a_run_json_naming_another_mlflow_run_as_its_replacement_never_deletes_it(aproject: Path) -> None:
    """run.json may come from a bucket: a ``mlflow.replacement`` naming some other MLflow run (one
    a colleague logged by hand, no phd_flow tags) is dropped, never deleted."""
    run_dir, _ = two_attempts(aproject, "Resumable")
    mlflow = client(aproject)
    experiment = mlflow.get_run(record(run_dir)["mlflow"]["run_id"]).info.experiment_id
    victim = mlflow.create_run(experiment, run_name="a colleague's run").info.run_id
    data = record(run_dir)
    data["mlflow"].update(state="pending", replacement=victim)
    (run_dir / "run.json").write_text(json.dumps(data))
    synced = cli(aproject, "sync", data["key"])
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert mlflow.get_run(victim).info.lifecycle_stage == "active"
    assert record(run_dir)["mlflow"].get("replacement") is None


def test_a_resumed_sweep_point_stays_nested_under_its_sweep_with_one_point_per_step(aproject: Path) -> None:
    allow = aproject / "allow"
    failed = cli(aproject, "sweep", "Flaky", "--allow", str(allow), "--grid", "seed=1")
    assert failed.returncode == 1, failed.stderr[-3000:]
    (run_dir,) = [d for d in run_dirs(aproject / "data_storage") if record(d).get("sweep")]
    first_id, sweep = record(run_dir)["mlflow"]["run_id"], record(run_dir)["sweep"]
    assert history(aproject, first_id, "loss") == [(s, float(s)) for s in range(6)]
    allow.touch()
    resumed = cli(aproject, "sweep", "--resume", sweep)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = live_runs(aproject, record(run_dir)["key"])
    assert run.info.run_id != first_id and run.data.tags["phd_flow.replaces"] == first_id
    assert history(aproject, run.info.run_id, "loss") == [(s, 1000.0 + s) for s in range(10)]
    (parent,) = live_runs(aproject, sweep)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client(aproject).get_run(first_id).info.lifecycle_stage == "deleted"


@pytest.mark.parametrize("sync_first", [True, False], ids=["sync", "ls-stale-fix"])
def test_a_resumed_attempt_sigkilled_with_its_feeder_is_rebuilt_by_sync_or_ls_stale_fix(
    aproject: Path, sync_first: bool
) -> None:
    """Attempt 2 logs (its overriding points held back), then it and the feeder are SIGKILLed:
    `sync` rebuilds the MLflow run and `ls --stale --fix` gives it its end, or the fix does both."""
    hold = ("--hold", str(aproject / "never"), "--hold_again", str(aproject / "never"))
    run_dir, first_id = terminated_attempt(aproject, ("run", "Resumable", *hold), LINES_ATTEMPT_1)
    proc = popen(aproject, "run", "Resumable", *hold, "--key", run_dir.name)
    try:
        poll(lambda: record(run_dir)["mlflow"].get("metrics_sent") == LINES_ATTEMPT_1 + 28, "attempt 2 fed")
        pid = feeder_pid(aproject)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    (run,) = live_runs(aproject, run_dir.name)
    assert run.info.run_id == first_id  # overriding points held back: no step has two points
    loss = history(aproject, first_id, "loss")
    assert loss == [(s, float(s)) for s in range(21)] + [(s, 1000.0 + s) for s in range(21, 30)]
    if sync_first:
        synced = cli(aproject, "sync", run_dir.name)
        assert synced.returncode in (0, 3), synced.stderr[-3000:]
    fixed = cli(aproject, "ls", "--stale", "--fix")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert_replaced(aproject, run_dir, str(first_id), status="KILLED")


def test_a_feeder_sigkilled_mid_replacement_is_finished_by_sync(aproject: Path) -> None:
    """A real SIGKILL of the feeder while it fills the new MLflow run: `sync` deletes the
    half-built run and builds it again; one live MLflow run. The feeder is caught mid-way by an
    exclusive lock on the store, taken as soon as the record names the replacement (12,000 points
    take it ~2 s to copy, 10 polls), so it cannot finish before the kill."""
    steps = 12_000
    args = ("run", "Long", "--steps", str(steps), "--hold", str(aproject / "never"))
    run_dir, first_id = terminated_attempt(aproject, args, steps)
    again = cli(aproject, *args, "--key", run_dir.name, env=BACKGROUND)
    assert again.returncode == 0, again.stderr[-3000:]
    partial = poll(lambda: record(run_dir)["mlflow"].get("replacement"), "the feeder to start the replacement")
    store = sqlite3.connect(aproject / "data_storage" / "mlflow.db", timeout=60, isolation_level=None)
    try:
        store.execute("BEGIN EXCLUSIVE")  # the feeder's next write waits here
        pid = feeder_pid(aproject)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        poll(lambda: not is_alive(pid), "the feeder to die")
    finally:
        store.close()
    half = client(aproject).get_run(partial)
    assert "phd_flow.key" not in half.data.tags, "the kill came too late: the new run was whole already"
    synced = cli(aproject, "sync", run_dir.name)
    assert synced.returncode == 0, synced.stderr[-3000:]
    (run,) = live_runs(aproject, run_dir.name)
    assert run.info.run_id not in (first_id, partial) and run.info.status == "FINISHED"
    points = client(aproject).get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in points) == [(s, 1000.0 + s) for s in range(steps)]
    assert client(aproject).get_run(partial).info.lifecycle_stage == "deleted"
    assert client(aproject).get_run(str(first_id)).info.lifecycle_stage == "deleted"
    assert record(run_dir)["mlflow"]["run_id"] == run.info.run_id and not record(run_dir)["mlflow"]["replacement"]


def test_a_replaced_pipeline_run_keeps_its_child_runs_nested(aproject: Path) -> None:
    run_dir, first_id = two_attempts(aproject, "Whole")
    run = assert_replaced(aproject, run_dir, first_id)
    ids = [e.experiment_id for e in client(aproject).search_experiments()]
    children = client(aproject).search_runs(ids, filter_string=f"tags.`phd_flow.parent_key` = '{run_dir.name}'")
    assert children, "the pipeline made no child run"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {run.info.run_id}
