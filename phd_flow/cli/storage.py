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
    parser.add_argument(
        "--checksum",
        "--verify",
        action="store_true",
        help="re-hash every local file instead of trusting an unchanged size and mtime (like rsync "
        "--checksum): also sends same-size edits whose old mtime was set back; without KEY, "
        "re-checks every local run, synced or not",
    )
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
    from phd_flow.storage.engine import checksum_mode

    keys = list(args.keys)
    if args.checksum and not keys:
        keys = _own_run_keys(project)  # every run, not only those recorded behind
        if not keys:
            logger.info("Everything is synced.")
            return 0
    with checksum_mode(args.checksum):
        results = sync_runs(project, keys)
    failed = [key for key, ok in results.items() if not ok]
    if not results and not args.keys:
        logger.info("Everything is synced.")
    if failed:
        logger.error(f"{len(failed)} run(s) still not synced: {', '.join(failed)}")
        return 3
    return 0


def _own_run_keys(project: Project) -> list[str]:
    """The keys of the local runs made here (not those downloaded from the remote)."""
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.listing import local_records
    from phd_flow.storage.facade import DOWNLOADED

    local_path = project.config.local_path
    return [
        r.key
        for r in local_records(local_path)
        if isinstance(r, RunRecord) and not (local_path / DOWNLOADED / r.key).exists()
    ]


def _cmd_download(project: Project, args: argparse.Namespace) -> int:
    from phd_flow import keys
    from phd_flow.runs.listing import resolve_key

    storage = project.storage
    key = resolve_key(project, args.key, remote=True)
    target = f"{key}/{keys.normalize(args.subpath)}" if args.subpath else key
    report = storage.download_report(target)
    print(f"Downloaded {target} to {storage.path(target)}: {report}")
    return 0
