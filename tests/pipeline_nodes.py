"""A three-node pipeline for the tests: Prepare -> Train -> Evaluate."""

from __future__ import annotations

import dataclasses

from phd_flow import Node, node


@dataclasses.dataclass
class PrepareArgs(node.Args):
    size: int = 10


class Prepare(Node[PrepareArgs, list[float]]):
    """Make data."""

    def _run(self) -> list[float]:
        return [float(i) for i in range(self.args.size)]


@dataclasses.dataclass
class TrainArgs(node.Args):
    lr: float = 0.1
    size: int = 10
    fail: bool = False


@dataclasses.dataclass
class Model:
    weight: float


class Train(Node[TrainArgs, Model]):
    """Fit a one-parameter model."""

    def _run(self) -> Model:
        data = self.require(Prepare, PrepareArgs(size=self.args.size))
        if self.args.fail:
            raise RuntimeError("training diverged")
        for step in range(5):
            self.log_metric("loss", 1.0 / (step + 1), step=step)
        return Model(weight=self.args.lr * sum(data))


@dataclasses.dataclass
class EvaluateArgs(node.Args):
    lr: float = 0.1
    fail: bool = False


@dataclasses.dataclass
class Report:
    score: float


class Evaluate(Node[EvaluateArgs, Report]):
    """Train (or reuse) a model and score it."""

    def _run(self) -> Report:
        model = self.require(Train, TrainArgs(lr=self.args.lr, fail=self.args.fail))
        return Report(score=-model.weight)
