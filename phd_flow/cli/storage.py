"""CLI verbs that move runs between local_path, the remote and MLflow: ``sync``, ``download``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from phd_flow.log import logger

if TYPE_CHECKING:
    from phd_flow.project import Project


def register_sync(commands: Any) -> None:
    parser = commands.add_parser(
        "sync",
        help="push runs that are not fully synced to storage and MLflow",
        description="Push every run whose files or MLflow record are not yet synced (or the given "
        "ones). Safe to repeat: only what is missing is sent.",
    )
    parser.add_argument("keys", nargs="*", metavar="KEY", help="run keys or unique prefixes (default: all)")
    parser.set_defaults(func=_cmd_sync)


def register_download(commands: Any) -> None:
    parser = commands.add_parser(
        "download",
        help="pull a run (or part of it) from storage",
        description="Download a run directory, or SUBPATH inside it, from the remote storage into "
        "local_path. Files are verified against the run's manifest.",
    )
    parser.add_argument("key", metavar="KEY", help="run key (or a unique prefix of one)")
    parser.add_argument("subpath", nargs="?", metavar="SUBPATH", help="a file or folder inside the run")
    parser.set_defaults(func=_cmd_download)


def _cmd_sync(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.runs.catchup import sync_runs

    results = sync_runs(project, args.keys)
    failed = [key for key, ok in results.items() if not ok]
    if not results and not args.keys:
        logger.info("Everything is synced.")
    if failed:
        logger.error(f"{len(failed)} run(s) still not synced: {', '.join(failed)}")
        return 3
    return 0


def _cmd_download(project: Project, args: argparse.Namespace) -> int:
    from phd_flow import keys
    from phd_flow.runs.listing import resolve_key

    storage = project.storage
    key = resolve_key(project, args.key, remote=True)
    target = f"{key}/{keys.normalize(args.subpath)}" if args.subpath else key
    report = storage.download_report(target)
    print(f"Downloaded {target} to {storage.path(target)}: {report}")
    return 0
