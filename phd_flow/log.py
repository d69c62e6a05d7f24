"""Logging: loguru sinks per run (output.log + output.jsonl), stdlib logging, warnings and print capture.

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
from typing import Any, TextIO

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
#: The id of loguru's default stderr handler (0 at import; RunLogging re-adds it under a new id).
_DEFAULT_STDERR = {"id": 0}
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
    _memoize_lib_dirs()


def _memoize_lib_dirs() -> None:
    """loguru builds an exception formatter for every sink it adds, and each one expands every
    sysconfig install scheme to find the library folders (~10-30 ms per sink; a run adds 3).
    The answer only depends on ``sys.path``: computed once per ``sys.path``. A loguru without
    that private helper is left as it is."""
    from loguru import _better_exceptions

    formatter: Any = getattr(_better_exceptions, "ExceptionFormatter", None)
    compute = getattr(formatter, "_get_lib_dirs", None)
    if compute is None or getattr(compute, "memoized", False):
        return
    answers: dict[tuple[str, ...], list[str]] = {}

    def lib_dirs() -> list[str]:
        key = tuple(sys.path)
        if key not in answers:
            answers[key] = list(compute())
        return list(answers[key])

    lib_dirs.memoized = True  # type: ignore[attr-defined]
    formatter._get_lib_dirs = staticmethod(lib_dirs)


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


class SafeFile:
    """A log file sink that swallows ``OSError`` (a full disk): the run's log must not turn into
    loguru's "Logging error in Loguru Handler" tracebacks on stderr, one per log line.

    The first error is kept in :attr:`error` (the run reports it once); writing is tried again
    with every record, so the log goes on as soon as there is space again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: OSError | None = None
        self._file: TextIO | None = None
        try:
            # line-buffered, as loguru's own file sink: the log is complete on disk at every line
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            self.error = exc

    def write(self, message: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(message)
        except OSError as exc:
            self.error = self.error or exc
        except ValueError:  # written after close() (a record from a lingering thread)
            return

    def flush(self) -> None:
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as exc:
            self.error = self.error or exc
        except ValueError:
            return

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError as exc:
            self.error = self.error or exc


class Tee:
    """``sys.stdout``/``sys.stderr`` during a run: what Python code writes (``print``, tracebacks
    printed by libraries, progress bars) reaches the terminal as before and output.log as well.

    Whole lines only go to the file (a line written in pieces stays one line among loguru's);
    a carriage return starts the line again, so a progress bar leaves its last state, not every
    redraw. Writes by C code straight to file descriptor 1/2 are not seen (that would need a pipe
    and a reader thread for every run).
    """

    def __init__(self, stream: TextIO, sink: SafeFile) -> None:
        self._stream, self._sink = stream, sink
        self._pending = ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            self._sink.write("".join(redact_url(line.rsplit("\r", 1)[-1]) + "\n" for line in lines))
        return written

    def flush(self) -> None:
        self._stream.flush()

    def close_line(self) -> None:
        """Write an unfinished last line (the run ends)."""
        line = self._pending.rsplit("\r", 1)[-1]
        if line:
            self._sink.write(redact_url(line) + "\n")
        self._pending = ""

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, buffer, ...
        return getattr(self._stream, name)


class RunLogging:
    """Context manager: while active, every log record of this process reaches the run's files.

    That covers ``phd_flow.logger`` calls, stdlib ``logging`` from libraries (at INFO and above),
    Python warnings and what Python code writes to stdout and stderr (:class:`Tee`).
    """

    def __init__(self, text_log: Path, json_log: Path, level: str = "DEBUG") -> None:
        self.text_log, self.json_log = text_log, json_log
        self.level = level
        self._sinks: list[int] = []
        self._files: list[SafeFile] = []
        self._stderr: int | None = None  # the diagnose=False stand-in for loguru's default handler
        self._saved_root: tuple[list[logging.Handler], int] | None = None
        self._saved_showwarning = warnings.showwarning
        self._saved_streams: tuple[TextIO, TextIO] | None = None
        self._tees: list[Tee] = []

    def __enter__(self) -> RunLogging:
        _redact_everywhere()
        self._files = [SafeFile(self.text_log), SafeFile(self.json_log)]
        self._quiet_default_stderr()
        self._sinks = [
            # diagnose=False: tracebacks must not print local variables (they may hold secrets)
            logger.add(self._files[0], level=self.level, format=FILE_FORMAT, diagnose=False),
            logger.add(self._files[1], level=self.level, serialize=True, diagnose=False),
        ]
        root = logging.getLogger()
        self._saved_root = (list(root.handlers), root.level)
        root.handlers = [InterceptHandler()]
        root.setLevel(logging.INFO)
        self._saved_showwarning = warnings.showwarning
        warnings.showwarning = _show_warning
        if "mlflow" in sys.modules:
            repoint_mlflow_loggers()
        # after the loguru sinks: those hold the real streams, so log lines are not written twice
        self._saved_streams = (sys.stdout, sys.stderr)
        self._tees = [Tee(stream, self._files[0]) for stream in self._saved_streams]
        sys.stdout, sys.stderr = self._tees  # type: ignore[assignment]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for tee in self._tees:
            tee.close_line()
        if self._saved_streams is not None and (sys.stdout, sys.stderr) == tuple(self._tees):
            sys.stdout, sys.stderr = self._saved_streams  # (not if the user replaced them meanwhile)
        self._tees, self._saved_streams = [], None
        warnings.showwarning = self._saved_showwarning
        if self._saved_root is not None:
            root = logging.getLogger()
            root.handlers, level = self._saved_root
            root.setLevel(level)
        for sink in self._sinks:
            logger.remove(sink)
        self._sinks = []
        for file in self._files:
            file.close()
        self._files = []
        self._restore_default_stderr()

    @property
    def write_error(self) -> OSError | None:
        """The first error writing the run's log files (a full disk), or None."""
        return next((f.error for f in self._files if f.error is not None), None)

    def _quiet_default_stderr(self) -> None:
        """Swap loguru's default stderr handler, if still installed, for one with
        ``diagnose=False``: its tracebacks would print local variables (secrets) to stderr."""
        self._stderr = None
        try:
            logger.remove(_DEFAULT_STDERR["id"])
        except ValueError:  # removed or replaced by the user (or the CLI): theirs stays
            return
        self._stderr = logger.add(sys.stderr, diagnose=False)

    def _restore_default_stderr(self) -> None:
        if self._stderr is None:
            return
        try:
            logger.remove(self._stderr)
        except ValueError:  # the user removed it during the run: leave their setup alone
            return
        finally:
            self._stderr = None
        _DEFAULT_STDERR["id"] = logger.add(sys.stderr)  # loguru's defaults again


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    logger.opt(depth=2).warning(f"{filename}:{lineno}: {category.__name__}: {message}")
