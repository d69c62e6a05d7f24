"""CLI verb ``logs``: print a run's output.log (local, or read from the remote), or follow it live.

Lines are printed through :func:`phd_flow.cli.render.clean`, so a log from a bucket cannot drive
the terminal with escape sequences. ``-f`` follows a local run until it is no longer live (its
process holds the run lock, see :func:`phd_flow.run.record.is_live`), like ``tail -f`` that stops
by itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.errors import UserError
from phd_flow.run.record import OUTPUT_LOG

if TYPE_CHECKING:
    from phd_flow.project import Project

#: How often ``logs -f`` looks for new lines and whether the run is still live.
POLL_SECONDS = 0.2


def register_logs(commands: Any) -> None:
    parser = commands.add_parser(
        "logs",
        help="print a run's output.log (-f: follow it while the run is live)",
        description="Print a run's output.log: its log lines, print() output and warnings. "
        "A run only in the remote storage is read from there.",
    )
    parser.add_argument("key", metavar="KEY", help="run key or unique prefix (child runs too)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the run ends")
    parser.add_argument("-n", "--lines", type=int, default=None, help="only the last N lines")
    parser.set_defaults(func=_cmd_logs)


def _cmd_logs(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.runs.query import get_run, read_run_file

    run = get_run(project, args.key)
    if args.follow and run.where != "local":
        raise UserError(f"logs -f follows runs on this machine; {run.key} is only in the remote storage. Drop -f.")
    if run.where == "local" and args.follow:
        return _follow(run.run_dir, run.data, project.config.runs.stale_after_seconds, args.lines)
    data = read_run_file(project, run, OUTPUT_LOG)
    if data is None:
        raise UserError(f"{run.key} has no {OUTPUT_LOG} (it may have been deleted, or the run never started).")
    _print(data.decode("utf-8", errors="replace"), args.lines)
    return 0


def _print(text: str, last: int | None) -> None:
    from phd_flow.cli.render import clean

    lines = text.splitlines()
    for line in lines[-last:] if last else lines:
        print(clean(line))
    sys.stdout.flush()


def _follow(run_dir: Path, data: Any, stale_after: float, last: int | None) -> int:
    from phd_flow.run.record import RUN_FILE, RunRecord, is_live

    path, offset, pending = run_dir / OUTPUT_LOG, 0, b""
    first = True
    while True:
        live = is_live(run_dir, data, stale_after)
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            if lines:
                _print(b"\n".join(lines).decode("utf-8", errors="replace"), last if first else None)
                first = False
        if not live:
            if pending:
                _print(pending.decode("utf-8", errors="replace"), None)
            return 0
        time.sleep(POLL_SECONDS)
        if (run_dir / RUN_FILE).exists():
            data = RunRecord.load(run_dir).data
