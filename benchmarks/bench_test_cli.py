"""The tests' ``cli()`` helper: forked from the per-worker CLI fork server vs a new interpreter.

    PYTHONPATH=. python benchmarks/bench_test_cli.py [--reps 5]

Copies the example project (as the ``project`` fixture does) and times, alternated, ``--reps``
times each, ``cli(project, ...)`` forked (tests/cli_server.py) and with ``subprocess=True``:
``nodes``; ``run FitOLS`` with MLflow fed in the background (PHD_FLOW_WAIT_MLFLOW=false); the
same run waiting for MLflow (the tests' default). Prints medians (and spread) and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from reps import alternate, ratio, spread  # noqa: E402

from tests.conftest import EXAMPLES, cli, write_config  # noqa: E402

RUN = ("run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
CALLS = {
    "nodes": (("nodes",), {}),
    "run, mlflow in background": (RUN, {"PHD_FLOW_WAIT_MLFLOW": "false"}),
    "run, waiting for mlflow": (RUN, {"PHD_FLOW_WAIT_MLFLOW": "true"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    reps = parser.parse_args().reps
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "proj"
        shutil.copytree(EXAMPLES / "my_project", project / "my_project")
        shutil.copytree(EXAMPLES / "data", project / "data")
        write_config(project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "b"\n')
        cli(project, "nodes")  # start the fork server outside the timings
        cli(project, *RUN)  # and migrate the MLflow store
        for label, (args, env) in CALLS.items():

            def call(args: tuple[str, ...] = args, env: dict[str, str] = env, sub: bool = False) -> None:
                proc = cli(project, *args, env=env, subprocess=sub)
                assert proc.returncode == 0, proc.stderr

            times = alternate({"forked": call, "subprocess": lambda c=call: c(sub=True)}, reps)
            print(
                f"{label:28} forked {spread(times['forked'])}  subprocess {spread(times['subprocess'])}  "
                f"ratio {ratio(times['subprocess'], times['forked'])}"
            )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
