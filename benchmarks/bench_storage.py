"""Storage on a budget: bytes stored locally and in the remote for N runs of a 3-stage node
(load_data -> featurize -> train) where most runs load load_data from an earlier run, with
deduplication off (phd_flow before issue 19: every loaded stage copied and uploaded again) and on.

    python benchmarks/bench_storage.py [--runs 100] [--seeds 5] [--rows 2400]

The dataset is a ~38 KB csv. Run i uses seed ``i % seeds`` and its own learning rate; the first
run of each seed computes load_data, every later one has ``load_from = "latest"`` (the newest run
with the same inputs: itself often a loader, so sources chain). featurize and train are computed
by every run. The remote is a shared directory (``backend = "local"``); MLflow is off, so only
run directories count. Local bytes count every inode once (hardlinks are one file, like ``du``).

Modes (``$PHD_FLOW_DEDUP``): ``off`` is the "before"; ``auto`` is the default: remote dedup by
reference, locally a reflink or a read-only hardlink where read-only files stop this process, so
as root (which writes through read-only bits) it copies locally; ``hardlink`` forces links (what
``auto`` does for a normal user on a filesystem with hardlinks). Bytes are deterministic: one
repetition per mode; the wall time per run is the median over the N runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from phd_flow import Node, RunOptions, load_config, node

KB = 1024


@dataclasses.dataclass
class TrainArgs(node.Args):
    dataset: str
    seed: int = 0
    lr: float = 0.1


class Train3(Node[TrainArgs, float]):
    """load_data (sample the csv) -> featurize (standardise) -> train (a few epochs of SGD)."""

    def _run(self) -> float:
        with self.stage("load_data", depends_on=["dataset", "seed"]) as data:
            if not data.loaded:
                lines = Path(self.args.dataset).read_text().splitlines()
                (data.path / "raw.csv").write_text("\n".join(lines) + "\n")
            rows = [[float(v) for v in line.split(",")] for line in (data.path / "raw.csv").read_text().split()[1:]]
        with self.stage("featurize", depends_on=["load_data"]) as feats:
            means = [statistics.fmean(col) for col in zip(*rows, strict=True)]
            scaled = [[round(v - m, 4) for v, m in zip(row, means, strict=True)] for row in rows[: len(rows) // 2]]
            (feats.path / "features.csv").write_text("\n".join(",".join(map(str, r)) for r in scaled) + "\n")
        with self.stage("train", depends_on=["featurize", "lr"]) as train:
            w = 0.0
            for epoch in range(3):
                for *x, y in scaled[:200]:
                    w -= self.args.lr * 1e-4 * (w * x[0] - y) * x[0]
                (train.path / f"checkpoint_{epoch}.txt").write_text(f"{w}\n")
        return w


def make_dataset(path: Path, rows: int) -> None:
    path.write_text("a,b,c,y\n" + "".join(f"{i},{(i * 7) % 13}.25,{(i * i) % 101}.5,{i % 17}\n" for i in range(rows)))


def unique_bytes(root: Path) -> tuple[int, int]:
    """(bytes, files) below ``root``, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, len(seen)


def copies_of(root: Path, name: str) -> int:
    """Distinct stored copies (inodes) of files called ``name`` below ``root``."""
    return len({(p.stat().st_dev, p.stat().st_ino) for p in root.rglob(name) if p.is_file()})


def measure(mode: str, runs: int, seeds: int, rows: int) -> dict[str, Any]:
    os.environ["PHD_FLOW_DEDUP"] = mode
    with tempfile.TemporaryDirectory(prefix="bench_storage-") as tmp:
        root = Path(tmp)
        dataset = root / "data.csv"
        make_dataset(dataset, rows)
        (root / "config").mkdir()
        (root / "config" / "default.toml").write_text(
            f'local_path = "{root / "store"}"\n[storage]\nbackend = "local"\nremote = "{root / "remote"}"\n'
            "[mlflow]\nenabled = false\n"
        )
        config = load_config(root, root / "config" / "default.toml")
        seconds = []
        for i in range(runs):
            seed = i % seeds
            options = RunOptions(load={"load_data": "latest"}) if i >= seeds else RunOptions()
            started = time.perf_counter()
            Train3({"dataset": str(dataset), "seed": seed, "lr": 0.01 * (i + 1)}, config=config, options=options).run()
            seconds.append(time.perf_counter() - started)
        local, local_files = unique_bytes(root / "store")
        remote, remote_files = unique_bytes(root / "remote")
        return {
            "mode": mode,
            "dataset": dataset.stat().st_size,
            "local": local,
            "local_files": local_files,
            "remote": remote,
            "remote_files": remote_files,
            "raw_local": copies_of(root / "store", "raw.csv"),
            "raw_remote": copies_of(root / "remote", "raw.csv"),
            "seconds": statistics.median(seconds),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2400)
    args = parser.parse_args()
    from loguru import logger

    logger.remove()  # the runs' own log files are still written
    modes = ["off", "auto", "hardlink"]
    results = [measure(mode, args.runs, args.seeds, args.rows) for mode in modes]
    before = results[0]
    print(
        f"{args.runs} runs of load_data -> featurize -> train, dataset {before['dataset'] / KB:.0f} KB, "
        f"{args.seeds} seeds ({args.runs - args.seeds} runs load load_data from an earlier run)"
        + (", as root (auto copies locally)" if hasattr(os, "geteuid") and os.geteuid() == 0 else "")
    )
    print(
        f"{'PHD_FLOW_DEDUP':<15}{'local':>12}{'files':>7}{'raw.csv':>9}{'remote':>12}{'files':>7}{'raw.csv':>9}{'s/run':>8}"
    )
    for r in results:
        print(
            f"{r['mode']:<15}{r['local'] / KB:>9.0f} KB{r['local_files']:>7}{r['raw_local']:>9}"
            f"{r['remote'] / KB:>9.0f} KB{r['remote_files']:>7}{r['raw_remote']:>9}{r['seconds']:>8.2f}"
        )
    for r in results[1:]:
        print(
            f"ratio off/{r['mode']}: local {before['local'] / r['local']:.2f}x, "
            f"remote {before['remote'] / r['remote']:.2f}x"
        )


if __name__ == "__main__":
    main()
