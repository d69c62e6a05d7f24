"""Nodes for the sweep, SLURM and Optuna tests.

The sweep tests copy this file into the example project (``my_project/sweep_nodes.py``) so
that ``python -m my_project run`` and SLURM jobs find them like a user's nodes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

from phd_flow import Node, node


@dataclasses.dataclass
class ScaleArgs(node.Args):
    seed: int = 0  # an integer factor
    alpha: float = 1.0  # a float factor
    fail_seed: int = -1  # fail for this seed ...
    allow_file: str = ""  # ... unless this file exists (so that a resume can succeed)
    mode: Literal["fast", "slow"] = "fast"  # a field with choices
    verbose: bool = False


@dataclasses.dataclass
class ScaleResult:
    value: float


class Scale(Node[ScaleArgs, ScaleResult]):
    """Multiply seed and alpha; fails on demand."""

    def _run(self) -> ScaleResult:
        allowed = bool(self.args.allow_file) and Path(self.args.allow_file).exists()
        if self.args.seed == self.args.fail_seed and not allowed:
            raise RuntimeError(f"seed {self.args.seed} is set to fail")
        self.log_metric("value", self.args.seed * self.args.alpha)
        return ScaleResult(self.args.seed * self.args.alpha)


@dataclasses.dataclass
class NapArgs(node.Args):
    seconds: float = 0.0  # how long to sleep
    marker_dir: str = ""  # a file <marker_dir>/<key> is created once _run started


class Nap(Node[NapArgs, float]):
    """Sleep (for scancel tests)."""

    def _run(self) -> float:
        if self.args.marker_dir:
            (Path(self.args.marker_dir) / self.key).touch()
        end = time.time() + self.args.seconds
        while time.time() < end:
            time.sleep(0.05)
        return self.args.seconds


@dataclasses.dataclass
class StepsArgs(node.Args):
    steps: int = 3  # work items; state is checkpointed after each
    marker_dir: str = ""  # <marker_dir>/<key> is created once the first attempt checkpointed
    hold_seconds: float = 120.0  # the first attempt then waits this long (to be preempted)


@dataclasses.dataclass
class StepsResult:
    done: list[int]
    attempts: int


class Steps(Node[StepsArgs, StepsResult]):
    """Do numbered steps, checkpointing each; a requeued attempt continues where it stopped."""

    def _run(self) -> StepsResult:
        state_file = self.checkpoint_dir / "state.json"
        state = {"done": [], "attempts": 0}
        if self.resumed and state_file.exists():
            state = json.loads(state_file.read_text())
        state["attempts"] += 1
        for step in range(len(state["done"]), self.args.steps):
            state["done"].append(step)
            state_file.write_text(json.dumps(state))
            if state["attempts"] == 1 and step == 0:
                if self.args.marker_dir:
                    (Path(self.args.marker_dir) / self.key).touch()
                end = time.time() + self.args.hold_seconds
                while time.time() < end:
                    time.sleep(0.05)
        return StepsResult(state["done"], state["attempts"])


@dataclasses.dataclass
class QuadraticArgs(node.Args):
    x: float = 0.0
    y: float = 0.0


@dataclasses.dataclass
class QuadraticResult:
    score: float


class Quadratic(Node[QuadraticArgs, QuadraticResult]):
    """(x - 2)^2 + (y + 1)^2: the minimum 0 is at x=2, y=-1."""

    def _run(self) -> QuadraticResult:
        return QuadraticResult((self.args.x - 2) ** 2 + (self.args.y + 1) ** 2)
