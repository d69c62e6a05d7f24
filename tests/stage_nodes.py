"""Nodes with stages for tests/test_stages.py (copied into the example project for CLI tests).

``Prepare`` is the README's "Stages" example, verbatim.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from phd_flow import Node, node


@dataclasses.dataclass
class PrepareArgs(node.Args):
    dataset: str  # path to a csv file
    seed: int = 0  # random seed of the sample
    note: str = ""  # free text, not an input of any stage


class Prepare(Node[PrepareArgs, int]):
    """Sample a dataset once (stage load_data), summarise it (stage summary)."""

    def _run(self) -> int:
        with self.stage("load_data", depends_on=["dataset", "seed"]) as st:
            if st.loaded:  # files came from an earlier run
                train = pd.read_csv(st.path / "train.csv")
            else:
                train = pd.read_csv(self.args.dataset).sample(frac=0.5, random_state=self.args.seed)
                train.to_csv(st.path / "train.csv", index=False)
        with self.stage("summary", depends_on=["load_data"]) as summary:
            if not summary.loaded:
                train.describe().to_csv(summary.path / "describe.csv")
        with self.managed_artifact_dir("plots", stage="report") as plots:
            plots.get_path("note.txt").write_text(f"{self.args.note}\n")
        return len(train)


@dataclasses.dataclass
class BrokenArgs(node.Args):
    dataset: str = "unused.csv"


class Broken(Node[BrokenArgs, int]):
    """Opens stage load_data, then fails."""

    def _run(self) -> int:
        with self.stage("load_data") as st:
            (st.path / "train.csv").write_text("half done\n")
        raise RuntimeError("crashed after load_data")


@dataclasses.dataclass
class OuterArgs(node.Args):
    dataset: str  # path to a csv file


class Outer(Node[OuterArgs, int]):
    """A pipeline: requires Prepare (stages load_data, summary, report), then opens stage final."""

    def _run(self) -> int:
        rows = self.require(Prepare, PrepareArgs(dataset=self.args.dataset))
        with self.stage("final", depends_on=["dataset"]) as st:
            (st.path / "rows.txt").write_text(f"{rows}\n")
        return rows


@dataclasses.dataclass
class FlakyArgs(node.Args):
    counter: str  # a file that gets one line per computation of load_data
    crash_marker: str  # while this file exists, the run crashes after load_data (and removes it)


class Flaky(Node[FlakyArgs, int]):
    """Computes stage load_data, then crashes once (like a killed or requeued job)."""

    def _run(self) -> int:
        with self.stage("load_data", depends_on=["counter"]) as st:
            if not st.loaded:
                with open(self.args.counter, "a") as handle:
                    handle.write("computed\n")
                (st.path / "data.txt").write_text("expensive\n")
        marker = Path(self.args.crash_marker)
        if marker.exists():
            marker.unlink()
            raise RuntimeError("crashed after load_data")
        return len((st.path / "data.txt").read_text())
