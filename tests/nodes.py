"""Small nodes used by the tests (a real module, so pickling results works)."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import warnings

from phd_flow import Node, logger, node


@dataclasses.dataclass
class Optim:
    lr: float = 0.1  # learning rate
    momentum: float = 0.9


@dataclasses.dataclass
class AddArgs(node.Args):
    a: int  # first summand
    b: int = 2  # second summand
    optim: Optim = dataclasses.field(default_factory=Optim)


@dataclasses.dataclass
class AddResult:
    total: int


class Add(Node[AddArgs, AddResult]):
    """Add two numbers."""

    def _run(self) -> AddResult:
        self.logger.info(f"adding {self.args.a} and {self.args.b}")
        logging.getLogger("some.library").warning("stdlib says hi")
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # the test suite turns warnings into errors
            warnings.warn("a python warning", UserWarning, stacklevel=1)
        self.log_metric("total", self.args.a + self.args.b)
        return AddResult(self.args.a + self.args.b)


@dataclasses.dataclass
class FailArgs(node.Args):
    message: str = "boom"


class Fail(Node[FailArgs, int]):
    """Always raises."""

    def _run(self) -> int:
        logger.info("about to fail")
        raise ValueError(self.args.message)


class Unpicklable(Node[FailArgs, object]):
    """Returns something pickle refuses."""

    def _run(self) -> object:
        return threading.Lock()


@dataclasses.dataclass
class SleepArgs(node.Args):
    seconds: float = 60.0
    marker: str = ""  # a file to create once _run started


class Sleep(Node[SleepArgs, float]):
    """Sleeps (for signal tests)."""

    def _run(self) -> float:
        logger.info("sleeping")
        if self.args.marker:
            open(self.args.marker, "w").close()
        end = time.time() + self.args.seconds
        while time.time() < end:
            time.sleep(0.05)
        return self.args.seconds


class NoGenerics(Node):  # type: ignore[type-arg]
    """Declared without Node[Args, Result]."""

    def _run(self) -> int:
        return os.getpid()
