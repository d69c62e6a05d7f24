"""Finding runs: local run directories (and the remote's run prefixes), key prefixes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from phd_flow.errors import CorruptRunError, RunNotFoundError
from phd_flow.runs import RUN_FILE, RunRecord

if TYPE_CHECKING:
    from phd_flow.config import Config


def local_run_dirs(local_path: Path) -> Iterator[Path]:
    """Every directory directly below ``local_path`` that holds a run.json."""
    try:
        entries = list(os.scandir(local_path))
    except FileNotFoundError:
        return
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, RUN_FILE)):
            yield Path(entry.path)


def local_records(local_path: Path) -> Iterator[RunRecord | CorruptRunError]:
    """The run records below ``local_path``; unreadable ones are yielded as their error."""
    for run_dir in local_run_dirs(local_path):
        try:
            yield RunRecord.load(run_dir)
        except CorruptRunError as exc:
            yield exc


def resolve_key(config: Config, prefix: str, remote: bool = False) -> str:
    """The one run key that equals or starts with ``prefix`` (like a git hash prefix).

    Looks in ``local_path`` first, then (with ``remote``) in the storage's run prefixes.
    Raises :class:`RunNotFoundError` listing candidates when there are none or several.
    """
    from phd_flow.keys import normalize

    normalize(prefix)
    if "/" not in prefix and (config.local_path / prefix / RUN_FILE).exists():
        return prefix
    local = [p.name for p in local_run_dirs(config.local_path) if p.name.startswith(prefix)]
    candidates = sorted(set(local))
    if not candidates and remote:
        from phd_flow.storage import make_storage

        storage_remote = make_storage(config).remote
        if storage_remote is not None:
            candidates = [d for d in storage_remote.list_dirs("") if d.startswith(prefix)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        where = f"{config.local_path}" + (" or the remote storage" if remote else "")
        raise RunNotFoundError(f"No run key starts with {prefix!r} in {where}. `ls` lists the runs.")
    shown = ", ".join(candidates[:10]) + (" ..." if len(candidates) > 10 else "")
    raise RunNotFoundError(
        f"{prefix!r} matches {len(candidates)} runs: {shown}. Give more characters of the key."
    )
