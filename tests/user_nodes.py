"""Nodes written the way the seeds' users write them (issue 15): frozen Args, fields named like
phd_flow's run options, a node that reads its args from a file."""

from __future__ import annotations

import dataclasses
from typing import Any

from phd_flow import node


@dataclasses.dataclass(frozen=True)
class FrozenArgs(node.Args):
    x: int = 1
    name: str = "a"


class Frozen(node.Node[FrozenArgs, int]):
    """Doubles x (frozen Args)."""

    def _run(self) -> int:
        return self.args.x * 2


class FrozenParent(node.Node[FrozenArgs, int]):
    """Requires Frozen with x + 1."""

    def _run(self) -> int:
        return self.require(Frozen, {"x": self.args.x + 1})


@dataclasses.dataclass
class RunOptionNamesArgs(node.Args):
    """Every name phd_flow's `run` uses for itself, as a field."""

    key: str = "k"
    load: str = "l"
    skip_log: bool = False
    cache: str = "c"
    no_cache: bool = False
    rerun: int = 0
    sweep: str = "s"
    args_file: str = "f"
    config: str = "cfg"
    seed: int = 0
    help: str = "h"
    verbose: bool = False


class Collide(node.Node[RunOptionNamesArgs, dict[str, Any]]):
    """Returns its args."""

    def _run(self) -> dict[str, Any]:
        return dataclasses.asdict(self.args)


@dataclasses.dataclass
class Inner:
    lr: float = 0.1
    layers: list[int] = dataclasses.field(default_factory=lambda: [1])


@dataclasses.dataclass(frozen=True)
class FileArgs(node.Args):
    dataset: str
    epochs: int = 1
    verbose: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


class FromFile(node.Node[FileArgs, dict[str, Any]]):
    """Returns its args."""

    def _run(self) -> dict[str, Any]:
        return dataclasses.asdict(self.args)
