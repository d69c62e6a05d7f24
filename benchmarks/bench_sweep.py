"""Local sweeps: phd_flow's warm executor vs its process-per-point executor vs Hydra's basic launcher.

    python benchmarks/bench_sweep.py [--reps 5] [--points 6,24] [--quick] [--profile]

The work is a trivial training loop: 100 steps of ``self.log_metric("loss", ...)`` per point,
over a grid of ``seed`` values. Contenders, each writing to its own sqlite MLflow store (a copy
of one migrated, empty template DB, so nobody pays for creating the schema):

* ``warm``: ``python -m my_project sweep Loop --grid seed=... --max-parallel 2`` (the default
  ``local`` executor: points forked from one warm driver);
* ``process``: the same with ``--executor process`` (a new interpreter per point, as before);
* ``hydra``: ``python hydra_app.py -m seed=...`` with Hydra's basic launcher (sequential), one
  MLflow run per point whose 100 metric points go in one ``log_batch`` (the fastest way MLflow
  offers; Hydra and MLflow are installed in their own venv, ``benchmarks/.venv-hydra``, created
  on first use with ``python -m venv`` + ``pip install hydra-core hydra-submitit-launcher
  mlflow==<ours>``);
* ``slurm`` (only when asked, ``--cases slurm,hydra-slurm``; needs a SLURM cluster, e.g.
  ``../shared/slurm/start_slurm.sh``): ``sweep Loop ... --executor slurm --wait``, one job
  array, at most 2 tasks at once;
* ``hydra-slurm``: the same Hydra app with ``hydra/launcher=submitit_slurm`` (array
  parallelism 2). Both SLURM cases are timed until MLflow shows every point complete.

Each repetition runs every contender once per grid size, in alternating order; printed are the
median and the spread (min-max) of the wall time from launching the command to its return, the
ratio to Hydra, and the marginal wall time per point ((T(big) - T(small)) / (big - small)).
After every command the store is checked: every point is an MLflow run, FINISHED, with all 100
``loss`` points (a contender that misses data fails the benchmark). ``--profile`` prints where a
warm point's time goes (cProfile of one point run the way a forked child runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parent.parent
HYDRA_VENV = Path(__file__).resolve().parent / ".venv-hydra"
STEPS = 100
PARALLEL = 2

NODE = f'''"""The benchmark's node: a trivial training loop."""

import dataclasses

from phd_flow import Node, node


@dataclasses.dataclass
class LoopArgs(node.Args):
    seed: int = 0
    lr: float = 0.1


class Loop(Node[LoopArgs, float]):
    """{STEPS} steps of log_metric."""

    def _run(self) -> float:
        loss = 1.0
        for step in range({STEPS}):
            loss *= 1.0 - self.args.lr / (1 + self.args.seed)
            self.log_metric("loss", loss, step=step)
        return loss
'''

HYDRA_APP = f'''"""Hydra's basic launcher + MLflow, one log_batch per run (the benchmark's peer)."""

import dataclasses
import os
import time

import hydra
from hydra.core.config_store import ConfigStore


@dataclasses.dataclass
class LoopConfig:
    seed: int = 0
    lr: float = 0.1


ConfigStore.instance().store(name="loop", node=LoopConfig)


@hydra.main(version_base=None, config_name="loop")
def main(cfg: LoopConfig) -> float:
    import mlflow
    from mlflow.entities import Metric

    mlflow.set_tracking_uri(os.environ["BENCH_TRACKING_URI"])
    mlflow.set_experiment("hydra")
    with mlflow.start_run(run_name=f"seed={{cfg.seed}}") as run:
        mlflow.log_params({{"seed": cfg.seed, "lr": cfg.lr}})
        loss, metrics = 1.0, []
        for step in range({STEPS}):
            loss *= 1.0 - cfg.lr / (1 + cfg.seed)
            metrics.append(Metric("loss", loss, int(time.time() * 1000), step))
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=metrics)
    return loss


if __name__ == "__main__":
    main()
'''


def _mlflow_version() -> str:
    import mlflow

    return str(mlflow.__version__)


def hydra_python() -> Path:
    """The Hydra venv's python, created (once) with pip from the package index."""
    python = HYDRA_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {HYDRA_VENV} (hydra-core, mlflow=={_mlflow_version()}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(HYDRA_VENV)], check=True)
        (HYDRA_VENV / ".gitignore").write_text("*\n")
        packages = ["hydra-core", "hydra-submitit-launcher", f"mlflow=={_mlflow_version()}"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def make_project(root: Path) -> None:
    package = root / "my_project"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Benchmark project."""\n')
    (package / "__main__.py").write_text('import phd_flow\n\nphd_flow.run_main("my_project")\n')
    (package / "loop.py").write_text(NODE)
    (root / "config").mkdir()
    (root / "config" / "default.toml").write_text(
        'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "bench"\n'
    )
    (root / "hydra_app.py").write_text(HYDRA_APP)


def template_db(root: Path) -> Path:
    """A migrated, empty sqlite MLflow store (with the experiments), copied before each command."""
    from mlflow.tracking import MlflowClient

    db = root / "template.db"
    client = MlflowClient(f"sqlite:///{db}")
    for name in ("bench", "hydra"):
        client.create_experiment(name)
    return db


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_case(case: str, n: int, root: Path, template: Path) -> float:
    """Run one contender on ``n`` points with a fresh store; return the wall time; check MLflow."""
    store = root / "data_storage"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir()
    db = store / "mlflow.db"
    shutil.copy(template, db)
    env = _env()
    seeds = ",".join(str(i) for i in range(n))
    hydra = case.startswith("hydra")
    if hydra:
        env["BENCH_TRACKING_URI"] = f"sqlite:///{db}"
        command = [str(hydra_python()), "hydra_app.py", "-m", f"seed={seeds}", f"hydra.sweep.dir={store / 'multirun'}"]
        command += [f"hydra.run.dir={store / 'outputs'}"]
        if case == "hydra-slurm":
            command += ["hydra/launcher=submitit_slurm", f"hydra.launcher.array_parallelism={PARALLEL}"]
            command += ["hydra.launcher.timeout_min=10", "hydra.launcher.mem_gb=1", "hydra.launcher.cpus_per_task=1"]
            command += [f"hydra.launcher.submitit_folder={store / 'submitit'}"]
    else:
        executor = {"warm": "local", "process": "process", "slurm": "slurm"}[case]
        command = [sys.executable, "-m", "my_project", "sweep", "Loop", "--grid", f"seed={seeds}"]
        command += ["--max-parallel", str(PARALLEL), "--executor", executor, *(["--wait"] if case == "slurm" else [])]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{case} ({n} points) failed:\n{proc.stdout}\n{proc.stderr}")
    try:
        check_store(db, "hydra" if hydra else "bench", n, case)
    except SystemExit:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise
    # on SLURM the figure is "until MLflow shows every point complete" (the store is polled)
    return time.perf_counter() - started if case.endswith("slurm") else seconds


def check_store(db: Path, experiment: str, n: int, case: str) -> None:
    """Every point is a FINISHED MLflow run with all STEPS loss points (polled for 30 s, for a
    tracking view fed after the command returned). Read with sqlite3: MLflow's client caches
    its store per URI, and the DB file is replaced before every command."""
    query = """
        SELECT r.run_uuid, r.status, COUNT(DISTINCT m.step) FROM runs r
        JOIN experiments e ON e.experiment_id = r.experiment_id
        LEFT JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = 'loss'
        WHERE e.name = ? AND r.run_uuid NOT IN (
            SELECT t.run_uuid FROM tags t WHERE t.key = 'phd_flow.kind' AND t.value = 'sweep')
        GROUP BY r.run_uuid"""  # a phd_flow sweep's own (parent) run is not a point
    deadline = time.monotonic() + 30
    while True:
        with contextlib.closing(sqlite3.connect(db)) as con:
            runs = con.execute(query, (experiment,)).fetchall()
        complete = [r for r in runs if r[1] == "FINISHED" and r[2] == STEPS]
        if len(runs) == n and len(complete) == n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{case}: MLflow has {len(complete)} complete runs of {len(runs)}, expected {n}")
        time.sleep(0.5)


def profile_point(root: Path, template: Path) -> None:
    """cProfile one point run as a warm child runs it: the driver's imports first (not profiled),
    then ``main(["run", ...])`` (profiled), in a subprocess with the project's cwd."""
    store = root / "data_storage"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir()
    shutil.copy(template, store / "mlflow.db")
    code = """
import cProfile, pstats, sys, io, time
sys.argv = ["my_project"]
from phd_flow.cli import build_parser, main
from phd_flow.config import load_config
from phd_flow.sweeps import executors
from phd_flow.sweeps.grid import Sweep
from pathlib import Path
build_parser("my_project")
config = load_config(Path.cwd(), None)
executors.warm_up(Sweep(Path("."), {"node_class": "my_project.loop.Loop"}), config)
main("my_project", ["run", "Loop", "--seed", "0"])  # the first point creates what all share (experiment)
import statistics
from my_project.loop import Loop
inner = []
user_run = Loop._run
def timed_run(self):
    started = time.perf_counter()
    try:
        return user_run(self)
    finally:
        inner.append(time.perf_counter() - started)
Loop._run = timed_run
whole = []
for seed in range(10, 20):  # not profiled: the point's overhead on top of its _run
    started = time.perf_counter()
    main("my_project", ["run", "Loop", "--seed", str(seed)])
    whole.append(time.perf_counter() - started)
Loop._run = user_run
overhead = statistics.median(w - i for w, i in zip(whole, inner))
print(f"10 points in process, no profiler: median {statistics.median(whole):.3f} s, of which _run "
      f"{statistics.median(inner):.4f} s: overhead {overhead:.3f} s per point", file=sys.stderr)
for seed in (1, 2):
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    main("my_project", ["run", "Loop", "--seed", str(seed)])
    profile.disable()
    print(f"point {seed}: {time.perf_counter() - started:.3f} s", file=sys.stderr)
out = io.StringIO()
pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(25)
print(out.getvalue(), file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(), capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("20", "INFO"))]
    print("\n".join(lines[:70]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--points", default="6,24", help="grid sizes, comma-separated")
    parser.add_argument("--cases", default="warm,process,hydra")
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 6 points (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one warm point")
    opts = parser.parse_args()
    reps, sizes = (2, [6]) if opts.quick else (opts.reps, [int(p) for p in opts.points.split(",")])
    cases = opts.cases.split(",")
    if any(c.startswith("hydra") for c in cases):
        hydra_python()
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        root = Path(tmp) / "proj"
        make_project(root)
        template = template_db(Path(tmp))
        times: dict[tuple[str, int], list[float]] = {(c, n): [] for c in cases for n in sizes}
        for rep in range(reps):
            order = cases if rep % 2 == 0 else cases[::-1]
            for n in sizes:
                for case in order:
                    times[case, n].append(run_case(case, n, root, template))
            print(
                f"rep {rep + 1}/{reps}: " + ", ".join(f"{c}/{n} {times[c, n][-1]:.1f} s" for c, n in times), flush=True
            )
        print(f"\n{reps} alternated repetitions, {STEPS} log_metric steps per point, phd_flow max_parallel {PARALLEL}")
        print(f"{'case':<12}" + "".join(f"{f'{n} points (median, min-max)':>34}" for n in sizes) + "   x hydra")
        medians = {key: statistics.median(values) for key, values in times.items()}
        for case in cases:
            row = f"{case:<12}"
            for n in sizes:
                values = times[case, n]
                row += f"{f'{medians[case, n]:.2f} s ({min(values):.2f}-{max(values):.2f})':>34}"
            peer = "hydra-slurm" if case.endswith("slurm") else "hydra"
            if peer in cases:
                row += "   " + " / ".join(f"{medians[case, n] / medians[peer, n]:.2f}" for n in sizes)
            print(row)
        if len(sizes) > 1:
            small, big = min(sizes), max(sizes)
            print(f"\nmarginal wall time per point ((T{big} - T{small}) / {big - small}):")
            for case in cases:
                per_point = (medians[case, big] - medians[case, small]) / (big - small)
                slots = 1 if case == "hydra" else PARALLEL
                print(f"  {case:<10} {per_point:.3f} s  (x{slots} slots = {per_point * slots:.3f} s per point)")
        if opts.profile:
            print("\ncProfile of one warm point (after the driver's warm-up):")
            profile_point(root, template)


if __name__ == "__main__":
    main()
