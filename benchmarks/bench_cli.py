"""`nodes` and `run NODE --help` on a project whose modules are slow to import.

    python benchmarks/bench_cli.py [--reps 5] [--sleep 2.0]

Makes a throw-away project `bench_cli_project` with two node modules: `fit.py` imports pandas
and scikit-learn (as examples/my_project does), `slow.py` sleeps `--sleep` seconds on import
(a stand-in for torch & co). Then times, as fresh processes, alternated, `--reps` times each:

* `python -c pass` (the floor: the interpreter's start-up);
* `python -m bench_cli_project nodes` and `... run Fit --help` (read from the source);
* importing the node modules (`import bench_cli_project.fit, bench_cli_project.slow`): what
  `nodes` paid before issue 17, when it imported every module of the package;
* phd_flow's old listing, `find_nodes` (imports every module), for the same answer.

Prints medians (and spread) and the ratios. Goal (issue 17): `nodes` and `--help` under 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PACKAGE = "bench_cli_project"


def make_project(root: Path, sleep: float) -> None:
    package = root / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text('"""A project whose node modules are slow to import."""\n')
    (package / "__main__.py").write_text(f"import phd_flow\n\nphd_flow.run_main({PACKAGE!r})\n")
    (package / "fit.py").write_text(
        textwrap.dedent(
            """
            import dataclasses

            import pandas as pd
            import sklearn.linear_model

            from phd_flow import Node, node


            @dataclasses.dataclass
            class FitArgs(node.Args):
                dataset: str  # path to a csv file
                target: str  # the column to predict
                alpha: float = 0.1  # ridge penalty


            class Fit(Node[FitArgs, float]):
                '''Fit a ridge regression on a csv file.'''

                def _run(self) -> float:
                    df = pd.read_csv(self.args.dataset)
                    model = sklearn.linear_model.Ridge(alpha=self.args.alpha)
                    x = df.drop(columns=[self.args.target])
                    return float(model.fit(x, df[self.args.target]).score(x, df[self.args.target]))
            """
        )
    )
    (package / "slow.py").write_text(
        textwrap.dedent(
            f"""
            import dataclasses
            import time

            from phd_flow import Node, node

            time.sleep({sleep})  # a library that takes seconds to import


            @dataclasses.dataclass
            class TrainArgs(node.Args):
                epochs: int = 10  # passes over the data


            class Train(Node[TrainArgs, int]):
                '''Train for a while.'''

                def _run(self) -> int:
                    return self.args.epochs
            """
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds slow.py sleeps on import")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_cli-") as tmp:
        root = Path(tmp)
        make_project(root, options.sleep)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "nodes": [sys.executable, "-m", PACKAGE, "nodes"],
            "run Fit --help": [sys.executable, "-m", PACKAGE, "run", "Fit", "--help"],
            "run Train --help": [sys.executable, "-m", PACKAGE, "run", "Train", "--help"],
            "import the node modules": [sys.executable, "-c", f"import {PACKAGE}.fit, {PACKAGE}.slow"],
            "find_nodes (old nodes)": [
                sys.executable,
                "-c",
                f"from phd_flow.run.discovery import find_nodes; find_nodes({PACKAGE!r})",
            ],
        }
        for argv in cases.values():  # warm the file cache and the .pyc files once
            subprocess.run(argv, cwd=root, env=env, capture_output=True, check=True)
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        for rep in range(options.reps):
            names = list(cases) if rep % 2 == 0 else list(reversed(cases))
            for name in names:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                proc = subprocess.run(cases[name], cwd=root, env=env, capture_output=True, text=True, check=False)
                times[name].append(time.perf_counter() - started)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                assert proc.returncode == 0, (name, proc.stderr)
                if name == "nodes":
                    assert "Fit" in proc.stdout and "Train" in proc.stdout, proc.stdout
                if name == "run Fit --help":
                    assert "ridge penalty (default: 0.1)" in proc.stdout, proc.stdout
    medians = {name: statistics.median(values) for name, values in times.items()}
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    print(f"bench_cli: {options.reps} alternated reps, {machine}")
    print(f"  {'':<26} {'wall (median, min-max)':<26} CPU of the process (median)")
    for name, values in times.items():
        spread = f"({min(values):.3f}-{max(values):.3f})"
        print(f"  {name:<26} {medians[name]:6.3f} s {spread:<17} {statistics.median(cpu[name]):6.3f} s")
    floor, imported = medians["python -c pass"], medians["import the node modules"]
    for name in ("nodes", "run Fit --help", "run Train --help"):
        print(
            f"  {name}: {medians[name] - floor:.3f} s above `python -c pass`, "
            f"{imported / medians[name]:.1f}x faster than importing the node modules, "
            f"{medians['find_nodes (old nodes)'] / medians[name]:.1f}x faster than the old listing"
        )


if __name__ == "__main__":
    main()
