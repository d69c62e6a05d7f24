"""Metric logging: phd_flow's `self.log_metric` against MLflow's own ways, same sqlite store.

    python benchmarks/bench_metrics.py [--n 100000] [--plain 2000] [--reps 5]

Baselines: `mlflow.log_metric` (synchronous, the default), `mlflow.log_metric(...,
synchronous=False)` (MLflow's async queue) and `MlflowClient.log_batch` of 1,000 points. Each
repetition runs every contender once, in alternating order; printed are the median and the
spread (min-max) over the repetitions of (a) the time per call in the training loop and (b) the
time until every point is durable in MLflow, per point. The slow MLflow paths are timed on
fewer points (--plain) and compared per point.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
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


def _phd_flow(config: Config, n: int) -> tuple[float, float]:
    run = Loop({"n": n}, config=config)
    started = time.perf_counter()
    in_loop = run.run()
    durable = time.perf_counter() - started  # the run returns once every point is in MLflow
    from mlflow.tracking import MlflowClient

    history = MlflowClient(config.tracking_uri()).get_metric_history(run.record.data["mlflow"]["run_id"], "loss")
    steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert len(history) == n and steps == list(range(n)), (len(history), steps[:5])
    return in_loop / n, durable / n


def _mlflow(uri: str, n: int, how: str) -> tuple[float, float]:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench")
    with mlflow.start_run() as active:
        started = time.perf_counter()
        if how == "batch":
            client, batch = MlflowClient(uri), []
            for step in range(n):
                batch.append(Metric("loss", 1.0 / (step + 1), int(time.time() * 1000), step))
                if len(batch) == 1000:
                    client.log_batch(active.info.run_id, metrics=batch)
                    batch = []
            if batch:
                client.log_batch(active.info.run_id, metrics=batch)
        else:
            for step in range(n):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step, synchronous=how == "sync")
        in_loop = time.perf_counter() - started
        if how == "async":
            mlflow.flush_async_logging()
        durable = time.perf_counter() - started
    count = len(MlflowClient(uri).get_metric_history(active.info.run_id, "loss"))
    assert count == n, (how, count)
    return in_loop / n, durable / n


def _stats(values: list[float], scale: float, unit: str) -> str:
    return (
        f"{statistics.median(values) * scale:9.2f} {unit} (min {min(values) * scale:.2f}, "
        f"max {max(values) * scale:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000, help="points phd_flow and log_batch log")
    parser.add_argument("--plain", type=int, default=2000, help="points the per-call MLflow paths log")
    parser.add_argument("--reps", type=int, default=5, help="alternated repetitions (>= 5 for a median)")
    opts = parser.parse_args()
    contenders = {
        "phd_flow self.log_metric": ("ours", opts.n),
        "mlflow.log_metric": ("sync", opts.plain),
        "mlflow.log_metric(synchronous=False)": ("async", opts.plain),
        "MlflowClient.log_batch (1,000 a batch)": ("batch", opts.n),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = Config(local_path=root / "runs", project_root=root, mlflow=MlflowConfig(experiment="bench", wait=True))
        uri = config.tracking_uri()
        Loop({"n": 10}, config=config).run()  # create and migrate the DB outside the timing
        names = list(contenders)
        for rep in range(opts.reps):
            order = names if rep % 2 == 0 else names[::-1]  # alternate: no contender always goes first
            for name in order:
                how, n = contenders[name]
                results[name].append(_phd_flow(config, n) if how == "ours" else _mlflow(uri, n, how))
    print(f"{opts.reps} alternated repetitions; median (min, max) per point")
    print(f"{'':40s} {'in the loop':>36s}   {'until durable in MLflow':>36s}")
    for name, (_how, n) in contenders.items():
        loop = [r[0] for r in results[name]]
        durable = [r[1] for r in results[name]]
        print(f"{name + f' x{n}':40s} {_stats(loop, 1e6, 'us')}   {_stats(durable, 1e6, 'us')}")
    ours = statistics.median(r[0] for r in results["phd_flow self.log_metric"])
    ours_durable = statistics.median(r[1] for r in results["phd_flow self.log_metric"])
    for name in names[1:]:
        loop = statistics.median(r[0] for r in results[name])
        durable = statistics.median(r[1] for r in results[name])
        print(f"{name}: {loop / ours:.0f}x phd_flow's time in the loop, {durable / ours_durable:.1f}x until durable")
    print(f"goal: 100,000 calls < 1 s in the loop: {'met' if ours * 100_000 < 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
