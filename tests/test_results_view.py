"""Seeing the results (issue 16): metric summaries in run.json, `ls` metric columns, sorting and
the filter language, frames and `load_metrics`, `compare` with best and deltas, PNG plots, and
sweeps summarized in listings. Real runs through the CLI (a sweep over learning rates)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from phd_flow import find_runs, load_config, load_metrics
from phd_flow.errors import ArgsError, UserError
from tests.conftest import EXAMPLES, cli, write_config

TRAIN_NODE = '''
"""A toy training loop: a loss curve per learning rate; the best learning rate is 0.03."""

import dataclasses
import math

from phd_flow import Node, node


@dataclasses.dataclass
class TrainArgs(node.Args):
    lr: float = 0.1  # learning rate
    epochs: int = 10  # steps of the loop


@dataclasses.dataclass
class TrainResult:
    loss: float
    acc: float
    history: list


class Train(Node[TrainArgs, TrainResult]):
    """Decay a loss towards a floor set by how far lr is from 0.03."""

    def _run(self) -> TrainResult:
        floor = abs(math.log10(self.args.lr / 0.03))
        history = []
        for step in range(self.args.epochs):
            loss = floor + math.exp(-step * self.args.lr * 10)
            self.log_metric("loss", loss, step=step)
            history.append(loss)
        acc = 1 / (1 + history[-1])
        self.log_metric("acc", acc)
        return TrainResult(history[-1], acc, history)
'''
LRS = (0.001, 0.01, 0.03, 0.1)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR (and a check that it is one)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Iterator[Path]:
    """The example project with a Train node: a sweep over LRS (4 runs) and one run lr=0.3."""
    root = tmp_path_factory.mktemp("results") / "proj"
    shutil.copytree(EXAMPLES / "my_project", root / "my_project", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "my_project" / "train.py").write_text(TRAIN_NODE)
    write_config(root, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\n')
    (root / "data_storage").mkdir()
    shutil.copy(mlflow_db_template, root / "data_storage" / "mlflow.db")
    grid = "lr=" + ",".join(map(str, LRS))
    swept = cli(root, "sweep", "Train", "--grid", grid, "--max-parallel", "2", timeout=300)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    single = cli(root, "run", "Train", "--lr", "0.3")
    assert single.returncode == 0, single.stderr
    yield root


def records(lab: Path) -> dict[str, dict]:
    found = {}
    for path in (lab / "data_storage").iterdir():
        if (path / "run.json").exists():
            found[path.name] = json.loads((path / "run.json").read_text())
    return found


def key_of(lab: Path, lr: float) -> str:
    return next(k for k, d in records(lab).items() if d.get("args", {}).get("lr") == lr)


def sweep_key(lab: Path) -> str:
    return next(k for k, d in records(lab).items() if d.get("kind") == "sweep")


def in_lab(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(lab)
    monkeypatch.setenv("PHD_FLOW_CONFIG", str(lab / "config" / "default.toml"))
    monkeypatch.syspath_prepend(str(lab))  # results are instances of my_project's classes
    for name in [m for m in sys.modules if m == "my_project" or m.startswith("my_project.")]:
        monkeypatch.delitem(sys.modules, name)  # another test's my_project, imported in this worker


# --- the summary and the Python API -------------------------------------------------------------


@pytest.mark.slow
def test_run_json_holds_a_summary_of_every_metric(lab: Path) -> None:
    for key, data in records(lab).items():
        if data.get("kind") == "sweep":
            assert "metrics" not in data
            continue
        points = [json.loads(line) for line in (lab / "data_storage" / key / "metrics.jsonl").read_text().splitlines()]
        losses = [p["value"] for p in points if p["name"] == "loss"]
        assert data["metrics"]["loss"] == {"last": losses[-1], "min": min(losses), "max": max(losses), "steps": 10}
        assert data["metrics"]["acc"]["steps"] == 1


def test_load_metrics_is_a_per_step_frame(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_lab(lab, monkeypatch)
    key = key_of(lab, 0.03)
    frame = load_metrics(key[-8:])  # a prefix of the suffix works, as everywhere
    assert list(frame.columns) == ["step", "time", "name", "value"]
    assert len(frame) == 11 and sorted(set(frame["name"])) == ["acc", "loss"]
    loss = load_metrics(key, "loss")
    assert list(loss["step"]) == list(range(10)) and loss["value"].is_monotonic_decreasing
    assert str(loss["time"].dt.tz) == "UTC"


def test_to_frame_has_last_metrics_and_asked_for_result_fields(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_lab(lab, monkeypatch)
    frame = find_runs(node="Train").to_frame()
    assert len(frame) == 5  # the sweep record is not a run
    assert "result.loss" not in frame.columns  # results are loaded only when asked
    best = frame.loc[frame["metrics.loss"].idxmin()]
    assert best["args.lr"] == 0.03
    full = find_runs(node="Train").to_frame(results=True)
    assert list(full["result.loss"]) == list(full["metrics.loss"])
    assert "result.acc" in full.columns and "result.history" not in full.columns  # scalars only


def test_find_runs_takes_the_filter_language(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_lab(lab, monkeypatch)

    def lrs(where: object) -> list[float]:
        return sorted(run.args["lr"] for run in find_runs(where=where))  # type: ignore[arg-type]

    assert lrs("lr<0.05") == [0.001, 0.01, 0.03]
    assert lrs(["lr>=0.01", "metrics.acc>0.9"]) == [0.03]
    assert lrs("metrics.loss.max<=1.5") == [0.01, 0.03]  # a summary statistic (lr=0.1 starts at 1.52)
    assert lrs(["status=completed", "lr!=0.1"]) == [0.001, 0.01, 0.03, 0.3]
    assert lrs({"lr": 0.3}) == [0.3]  # the mapping form: equality
    with pytest.raises(ArgsError, match=r"'lr~0\.1' is not a condition"):
        find_runs(where="lr~0.1")
    with pytest.raises(ArgsError, match="metrics are numbers"):
        find_runs(where="metrics.acc>high")


# --- ls ----------------------------------------------------------------------------------------


def table_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


def test_ls_metric_columns_sort_and_n(lab: Path) -> None:
    shown = cli(lab, "ls", "--metrics", "loss,acc", "--sort", "loss", "-n", "2")
    assert shown.returncode == 0, shown.stderr
    header, *rows = table_rows(shown.stdout)
    assert header[5:7] == ["loss", "acc"]
    assert [r[0] for r in rows] == [key_of(lab, 0.03), key_of(lab, 0.1)]  # the two lowest losses
    decimals = {len(r[6].split(".")[1]) for r in rows}  # STARTED is two words
    assert len(decimals) == 1  # one precision per column
    descending = cli(lab, "ls", "--metrics", "all", "--sort=-lr")
    rows = table_rows(descending.stdout)[1:]
    assert [r[0] for r in rows] == [key_of(lab, lr) for lr in (0.3, 0.1, 0.03, 0.01, 0.001)]
    newest = cli(lab, "ls", "-n", "1")
    assert [r[0] for r in table_rows(newest.stdout)[1:]] == [key_of(lab, 0.3)]


def test_ls_where_compares_args_and_metrics(lab: Path) -> None:
    shown = cli(lab, "ls", "--where", "lr<0.05", "--where", "metrics.acc>=0.5", "--json")
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)
    assert sorted(r["args"]["lr"] for r in listed) == [0.01, 0.03]
    assert all(set(r["metrics"]) == {"acc", "loss"} for r in listed)
    bad = cli(lab, "ls", "--where", "lr<<1")
    assert bad.returncode == 2 and "'lr<<1'" in bad.stderr and "Traceback" not in bad.stderr
    unknown = cli(lab, "ls", "--where", "momentum>0")
    assert unknown.returncode == 0 and "no listed run has the arg momentum" in unknown.stderr


def test_a_run_without_a_summary_is_listed_from_its_metrics_file(lab: Path, tmp_path: Path) -> None:
    copy = tmp_path / "proj"
    shutil.copytree(lab, copy)
    key = key_of(copy, 0.01)
    path = copy / "data_storage" / key / "run.json"
    data = json.loads(path.read_text())
    expected = data.pop("metrics")["loss"]["last"]
    path.write_text(json.dumps(data))  # a run made before the summary existed
    shown = cli(copy, "ls", "--metrics", "loss", "--json", "--where", "metrics.loss<5")
    listed = {r["key"]: r for r in json.loads(shown.stdout)}
    assert listed[key]["metrics"]["loss"]["last"] == expected
    assert "metrics" not in json.loads(path.read_text())  # listing writes nothing
    synced = cli(copy, "sync", key)
    assert synced.returncode == 0, synced.stderr
    assert json.loads(path.read_text())["metrics"]["loss"]["last"] == expected  # sync writes it


def test_the_sweep_record_is_not_a_run_row(lab: Path) -> None:
    sweep = sweep_key(lab)
    plain = cli(lab, "ls")
    assert "Sweep_" not in plain.stdout and len(table_rows(plain.stdout)) == 6
    sweeps = cli(lab, "ls", "--sweeps")
    assert sweeps.returncode == 0, sweeps.stderr
    assert sweep in sweeps.stdout and "4 completed" in sweeps.stdout and "lr=0.001,0.01,0.03,0.1" in sweeps.stdout
    suffix = sweep.rsplit("_", 1)[-1]
    for given in (suffix, suffix[:4], sweep[:-3]):  # the suffix, a prefix of it, a prefix of the key
        points = cli(lab, "ls", "--sweep", given, "--json")
        assert len(json.loads(points.stdout)) == 4, given


def test_sweep_status_shows_metrics_and_marks_the_best(lab: Path) -> None:
    shown = cli(lab, "sweep", "--status", sweep_key(lab).rsplit("_", 1)[-1])
    assert shown.returncode == 0, shown.stderr
    best = key_of(lab, 0.03)
    line = next(line for line in shown.stdout.splitlines() if best in line and "completed" in line)
    assert line.count("*") == 2  # best loss and best acc
    assert f"best loss (lowest): {best}  lr=0.03" in shown.stdout
    assert f"best acc (highest): {best}  lr=0.03" in shown.stdout


# --- compare and plots --------------------------------------------------------------------------


def test_compare_aligns_marks_the_best_and_shows_deltas(lab: Path, tmp_path: Path) -> None:
    keys = [key_of(lab, lr) for lr in (0.1, 0.03, 0.001)]
    shown = cli(lab, "compare", *keys, "--plot", str(tmp_path / "cmp.png"))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    loss = next(line for line in lines if line.strip().startswith("loss") and "*" in line)
    values = loss.split()[1:]
    assert values[1:3] == ["0.067206", "*"]  # [2] (lr=0.03) is best, marked
    assert len({len(v.split(".")[1]) for v in values if "." in v}) == 1
    start = lines.index("change against [1]")
    delta = next(line for line in lines[start:] if line.strip().startswith("loss")).split()
    assert delta[1].startswith("-") and delta[2].startswith("(-") and delta[3].startswith("+")
    maximized = cli(lab, "compare", *keys, "--maximize", "loss")
    row = next(line for line in maximized.stdout.splitlines() if line.strip().startswith("loss") and "*" in line)
    assert row.split()[-1] == "*"  # now the highest loss, lr=0.001, is best
    width, height = png_size(tmp_path / "cmp.png")
    assert width > 400 and height > 200
    selected = cli(lab, "compare", "--where", "lr>=0.1")
    assert selected.returncode == 0 and selected.stdout.count("] Train_") == 2


@pytest.mark.slow
def test_plot_commands_write_pngs(lab: Path, tmp_path: Path) -> None:
    curves = tmp_path / "curves.png"
    keys = [key_of(lab, lr) for lr in LRS]
    made = cli(lab, "plot", *keys, "--metric", "loss", "-o", str(curves))
    assert made.returncode == 0, made.stderr
    assert png_size(curves) == (880, 550) and curves.stat().st_size > 20_000
    swept = tmp_path / "acc_lr.png"
    made = cli(lab, "plot", "--sweep", sweep_key(lab)[-8:], "--metric", "acc", "--x", "lr", "-o", str(swept))
    assert made.returncode == 0, made.stderr
    assert png_size(swept)[0] > 400
    missing = cli(lab, "plot", *keys, "--metric", "nope", "-o", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "they logged: acc, loss" in missing.stderr
    assert not (tmp_path / "x.png").exists()


def test_figures_draw_one_line_or_point_per_run(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.collections import PathCollection

    from phd_flow.cli.plot import compare_figure, curves_figure, sweep_figure
    from phd_flow.project import Project

    in_lab(lab, monkeypatch)
    project = Project("my_project", str(lab / "config" / "default.toml"))
    runs = find_runs(node="Train", config=project)
    lines = curves_figure(project, runs, "loss").axes[0].get_lines()
    assert len(lines) == 5 and all(len(line.get_xdata()) == 10 for line in lines)
    assert sorted(line.get_label() for line in lines) == sorted(f"lr={lr}" for lr in (*LRS, 0.3))
    timed = curves_figure(project, runs, "loss", "time").axes[0].get_lines()
    assert len(timed) == 5 and all(line.get_xdata()[0] == 0 for line in timed)
    points = find_runs(sweep=sweep_key(lab), config=project)
    axes = sweep_figure(points, "acc", "lr", lower=False).axes[0]
    dots, star = [c for c in axes.collections if isinstance(c, PathCollection)]
    assert len(dots.get_offsets()) == 4 and list(star.get_offsets()[0]) == pytest.approx(
        [0.03, 1 / (1 + 0.06721)], 1e-3
    )
    assert axes.get_xscale() == "log"
    panels = compare_figure(project, runs[:3], ["acc", "loss"]).axes
    assert len(panels[0].patches) == 3 and len(panels[1].get_lines()) == 3  # acc: one value each, bars
    with pytest.raises(UserError, match="logged the metric 'nope'"):
        sweep_figure(points, "nope", "lr", lower=True)


def test_listing_never_imports_matplotlib(lab: Path) -> None:
    code = (
        "import sys, phd_flow.cli as c; "
        "c.main('my_project', ['ls', '--metrics', 'all']); c.main('my_project', ['compare', '--where', 'lr<1']); "
        "print('matplotlib' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run([sys.executable, "-c", code], cwd=lab, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("False")


@pytest.mark.slow
def test_rm_takes_the_filter_language(lab: Path, tmp_path: Path) -> None:
    copy = tmp_path / "proj"
    shutil.copytree(lab, copy)
    gone = key_of(copy, 0.3)
    removed = cli(copy, "rm", "--where", "lr>0.2", "--force")
    assert removed.returncode == 0, removed.stderr
    assert not (copy / "data_storage" / gone).exists()
    assert len([d for d in records(copy).values() if d.get("kind") != "sweep"]) == 4
    config = load_config(copy)
    assert sorted(run.args["lr"] for run in find_runs(config=config)) == list(LRS)
