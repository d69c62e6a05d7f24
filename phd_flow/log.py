"""Logging: loguru sinks per run (output.log + output.jsonl), stdlib logging and warnings capture.

``from phd_flow import logger`` is loguru's logger. Nothing is configured at import time;
:class:`RunLogging` adds the run's sinks when a run starts and removes them when it ends, so two
runs in one process never mix their logs.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from loguru import logger

__all__ = ["FILE_FORMAT", "InterceptHandler", "RunLogging", "configure_cli_stderr", "logger", "redact_url"]

#: The seed's line format: ``time | LEVEL | module:function:line - message``.
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"
STDERR_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{name}</cyan>:<cyan>{line}</cyan> - <level>{message}</level>"
)
# Loggers that `import mlflow` takes over (own handler, propagate=False): we re-point them.
MLFLOW_LOGGERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey")
#: ``scheme://user:password@``: the password is what :func:`redact_url` hides.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*):(?P<password>[^\s/@]*(?:@[^\s/@]*)*)@")


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced: ``http://user:***@host``.

    Applied to every log record (see :func:`redact_record`), to the tracking URI stored in
    run.json and to error messages.
    """
    if "://" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:***@", text)


def redact_record(record: Any) -> None:
    """loguru patcher: passwords in URLs never reach a sink (stderr, output.log, output.jsonl)."""
    record["message"] = redact_url(record["message"])
    exception = record.get("exception")
    if exception is None or exception.value is None:
        return
    chain: list[BaseException] = []
    error: BaseException | None = exception.value
    while error is not None and len(chain) < 20:  # the traceback prints causes and contexts too
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(redact_url(str(error)) != str(error) for error in chain):  # it would show a password
        record["exception"] = None
        record["message"] += f" ({type(exception.value).__name__}: {redact_url(str(exception.value))})"


def _redact_everywhere() -> None:
    logger.configure(patcher=redact_record)


class InterceptHandler(logging.Handler):
    """Forward stdlib ``logging`` records to loguru (loguru's documented recipe)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def configure_cli_stderr(level: str = "INFO") -> None:
    """Replace loguru's default stderr sink with phd_flow's (CLI only; libraries keep theirs)."""
    logger.remove()
    _redact_everywhere()
    logger.add(sys.stderr, level=level, format=STDERR_FORMAT, colorize=None, diagnose=False)


def repoint_mlflow_loggers() -> None:
    """Undo what ``import mlflow`` does to its loggers so their records reach the run's logs."""
    for name in MLFLOW_LOGGERS:
        std = logging.getLogger(name)
        if any(isinstance(h, InterceptHandler) for h in std.handlers):
            continue
        std.handlers = [InterceptHandler()]
        std.propagate = False
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)


class RunLogging:
    """Context manager: while active, every log record of this process reaches the run's files.

    That covers ``phd_flow.logger`` calls, stdlib ``logging`` from libraries (at INFO and above)
    and Python warnings.
    """

    def __init__(self, text_log: Path, json_log: Path, level: str = "DEBUG") -> None:
        self.text_log, self.json_log = text_log, json_log
        self.level = level
        self._sinks: list[int] = []
        self._saved_root: tuple[list[logging.Handler], int] | None = None
        self._saved_showwarning = warnings.showwarning

    def __enter__(self) -> RunLogging:
        _redact_everywhere()
        self._sinks = [
            # diagnose=False: tracebacks must not print local variables (they may hold secrets)
            logger.add(self.text_log, level=self.level, format=FILE_FORMAT, encoding="utf-8", diagnose=False),
            logger.add(self.json_log, level=self.level, serialize=True, encoding="utf-8", diagnose=False),
        ]
        root = logging.getLogger()
        self._saved_root = (list(root.handlers), root.level)
        root.handlers = [InterceptHandler()]
        root.setLevel(logging.INFO)
        self._saved_showwarning = warnings.showwarning
        warnings.showwarning = _show_warning
        if "mlflow" in sys.modules:
            repoint_mlflow_loggers()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        warnings.showwarning = self._saved_showwarning
        if self._saved_root is not None:
            root = logging.getLogger()
            root.handlers, level = self._saved_root
            root.setLevel(level)
        for sink in self._sinks:
            logger.remove(sink)
        self._sinks = []


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    logger.opt(depth=2).warning(f"{filename}:{lineno}: {category.__name__}: {message}")
