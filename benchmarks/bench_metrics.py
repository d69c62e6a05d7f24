"""Metric logging: phd_flow's `self.log_metric` vs plain `mlflow.log_metric`, same sqlite store.

    python benchmarks/bench_metrics.py [--n 100000] [--plain 2000]

Prints the time the training loop spends in the calls, the time until every point is in MLflow,
and the per-call ratio. Plain mlflow.log_metric costs 5-10 ms a call on sqlite, so it is timed
on fewer calls (--plain) and compared per call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from phd_flow import Config, Node, node
from phd_flow.config import MlflowConfig


@dataclasses.dataclass
class LoopArgs(node.Args):
    n: int = 100_000


class Loop(Node[LoopArgs, float]):
    """Log n metrics; return the seconds spent in the calls."""

    def _run(self) -> float:
        start = time.perf_counter()
        for step in range(self.args.n):
            self.log_metric("loss", 1.0 / (step + 1), step=step)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--plain", type=int, default=2000)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = Config(local_path=root / "runs", project_root=root, mlflow=MlflowConfig(experiment="bench"))
        uri = config.tracking_uri()
        Loop({"n": 10}, config=config).run()  # create and migrate the DB outside the timing
        run = Loop({"n": opts.n}, config=config)
        started = time.perf_counter()
        in_loop = run.run()
        total = time.perf_counter() - started

        import mlflow
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        history = client.get_metric_history(run.record.data["mlflow"]["run_id"], "loss")
        steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
        assert len(history) == opts.n and steps == list(range(opts.n)), (len(history), steps[:5])

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bench")
        with mlflow.start_run():
            t0 = time.perf_counter()
            for step in range(opts.plain):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            plain = time.perf_counter() - t0
    ours_per_call = in_loop / opts.n
    plain_per_call = plain / opts.plain
    print(
        f"phd_flow  self.log_metric x{opts.n}: {in_loop:.3f} s in the loop "
        f"({ours_per_call * 1e6:.1f} us/call); whole run incl. flush to MLflow: {total:.1f} s; "
        f"all {len(history)} points in MLflow, in order"
    )
    print(f"mlflow    mlflow.log_metric x{opts.plain}: {plain:.3f} s ({plain_per_call * 1e3:.2f} ms/call)")
    print(
        f"ratio     plain / phd_flow per call: {plain_per_call / ours_per_call:.0f}x "
        f"(goal: 100,000 calls < 1 s in the loop: {'met' if in_loop * 100_000 / opts.n < 1 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
