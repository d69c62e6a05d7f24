"""Finding runs: local run directories, the remote's run prefixes, key prefixes.

Listing reads one small record per run and never every file:

* locally, one ``os.scandir`` of ``local_path`` and one ``run.json`` per run directory;
* remotely, one delimiter listing of the run prefixes, then one ``<key>/run.json`` per run,
  fetched in parallel, except for finished runs (completed, failed, killed) found in an index:
  a gzipped ``{key: record}`` kept in ``<local_path>/.phd_flow/remote_index/`` and shared
  through the remote as ``.phd_flow/runs_index.json.gz``, or the day shards every push files
  its run in (``.phd_flow/index/<day>.json.gz``, :mod:`phd_flow.runs.index`). The prefix
  listing is always fresh, so runs added from other machines appear and runs deleted remotely
  drop out; the indexes only save fetches. (A finished run resumed elsewhere:
  ``ls --remote --refresh``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow._io import atomic_write_bytes
from phd_flow.errors import CorruptRunError, InvalidKeyError, RunNotFoundError, StorageError
from phd_flow.run.record import FINISHED, RUN_FILE, RunRecord
from phd_flow.runs.index import (
    MAX_INDEX_BYTES,
    SHARDS,
    dump_index,
    entry_of,
    parse_index,
    read_index,
    shard_of,
    shard_path,
)

if TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.project import Project
    from phd_flow.storage.base import Remote

REMOTE_INDEX = ".phd_flow/remote_index"
SHARED_INDEX = ".phd_flow/runs_index.json.gz"
FETCH_WORKERS = 32


def local_run_dirs(local_path: Path) -> Iterator[Path]:
    """Every directory directly below ``local_path`` that holds a run.json, sorted by name."""
    for name in _subdirs(local_path):
        if os.path.exists(os.path.join(local_path, name, RUN_FILE)):
            yield local_path / name


def local_records(local_path: Path) -> Iterator[RunRecord | CorruptRunError]:
    """The run records below ``local_path``; unreadable ones are yielded as their error.

    One read per run directory (string paths: at 10,000 runs pathlib alone costs ~0.2 s);
    directories without a run.json (``datasets/`` ...) are skipped.
    """
    base = os.fspath(local_path)
    for name in _subdirs(local_path):
        path = os.path.join(base, name, RUN_FILE)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            error = CorruptRunError(f"{path} is unreadable ({exc.strerror or exc}).")
            error.run_name = name
            yield error
            continue
        try:
            yield RunRecord.from_bytes(local_path / name, raw, path)
        except CorruptRunError as exc:
            exc.run_name = name
            yield exc


def _subdirs(path: Path) -> list[str]:
    """Names of the non-hidden subdirectories (``d_type`` from scandir: no stat per entry)."""
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []


# --- remote -------------------------------------------------------------------------------------


def remote_records(config: Config, remote: Remote, refresh: bool = False) -> Iterator[RunRecord | CorruptRunError]:
    """The run records in the remote storage, in key order.

    The delimiter listing of run prefixes is always fresh, so it decides which runs exist.
    Records of finished runs come from the indexes: the local copy, else the shared object
    ``.phd_flow/runs_index.json.gz`` (which any machine's listing refreshes), else the day
    shards ``.phd_flow/index/<day>.json.gz`` that every push files its run in; every other
    run's run.json is fetched, in parallel. Prefixes without a run.json (``datasets/`` ...) are
    skipped. ``refresh`` ignores every index.
    """
    names, refused = remote_run_names(remote)
    for name, problem in refused:
        yield CorruptRunError(f"{remote.describe()}: skipped {name!r}, not a valid run key ({problem}).")
    local_index = _local_index_path(config, remote)
    index = {} if refresh else parse_index(local_index.read_bytes() if local_index.exists() else None)
    if not refresh and any(name not in index for name in names):
        index.update(read_index(remote, SHARED_INDEX))
    learned = 0  # records no shared index had: the listing shares its index
    if not refresh and any(name not in index for name in names):
        missing = [name for name in names if name not in index]
        found = _read_shards(remote, missing)
        index.update({name: found[name] for name in missing if name in found})
        learned = sum(name in found for name in missing)
    todo = [name for name in names if name not in index]
    fetched = _fetch_all(remote, todo)
    for name in names:
        if name in index:
            yield RunRecord(config.local_path / name, index[name])
            continue
        raw = fetched.get(name)
        if raw is None:
            continue
        if isinstance(raw, Exception):
            yield CorruptRunError(f"{remote.describe()}/{name}/{RUN_FILE}: {raw}")
            continue
        try:
            record = RunRecord.from_bytes(config.local_path / name, raw, f"{remote.describe()}/{name}/{RUN_FILE}")
        except CorruptRunError as exc:
            yield exc
            continue
        if record.status in FINISHED:
            index[name] = entry_of(record.data)
            learned += 1
        yield record
    _save_index(remote, local_index, {n: index[n] for n in names if n in index}, learned)


def _read_shards(remote: Remote, missing: list[str]) -> dict[str, dict[str, Any]]:
    """The entries of the day shards that could hold these run keys (one listing of the shard
    folder, then the shards of their days, in parallel); only keys filed in their own day count."""
    days = {shard_of(name) for name in missing} - {None}
    if not days:
        return {}
    try:
        present = {f.key for f in remote.list(SHARDS) if f.size <= MAX_INDEX_BYTES}
    except StorageError:
        return {}  # the shards only save time: without them the run.json are fetched
    wanted = sorted(day for day in days if day is not None and shard_path(day) in present)
    if not wanted:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    workers = min(FETCH_WORKERS, len(wanted), max(1, remote.max_workers))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phd_flow-ls") as pool:
        shards = pool.map(lambda day: read_index(remote, shard_path(day), day), wanted)
        return {name: entry for shard in shards for name, entry in shard.items()}


def read_remote_record(config: Config, remote: Remote, key: str) -> RunRecord | None:
    """The run.json of ``key`` in the remote, or None when the remote has no such run."""
    raw = remote.read_small(f"{key}/{RUN_FILE}")
    if raw is None:
        return None
    return RunRecord.from_bytes(config.local_path / key, raw, f"{remote.describe()}/{key}/{RUN_FILE}")


def remote_run_names(remote: Remote) -> tuple[list[str], list[tuple[str, str]]]:
    """The remote's run prefixes that are valid run keys (sorted), and the refused names with
    why; hidden names (``.phd_flow``) are neither."""
    from phd_flow.keys import remote_relpath

    names: list[str] = []
    refused: list[tuple[str, str]] = []
    for name in sorted(remote.list_dirs("")):
        try:
            if "/" in remote_relpath(name):
                raise InvalidKeyError("it contains '/'")
        except InvalidKeyError as exc:
            refused.append((name, str(exc)))
            continue
        if not name.startswith("."):
            names.append(name)
    return names, refused


def _fetch_all(remote: Remote, names: list[str]) -> dict[str, bytes | Exception | None]:
    def fetch(name: str) -> bytes | Exception | None:
        try:
            return remote.read_small(f"{name}/{RUN_FILE}")
        except StorageError as exc:
            return exc

    if not names:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    # as many threads as the backend's own transfers use (its client's connection pool is sized
    # for them; b2sdk and MLflow's artifact client are shared the same way by the sync engine)
    workers = min(FETCH_WORKERS, len(names), max(1, remote.max_workers))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phd_flow-ls") as pool:
        return dict(zip(names, pool.map(fetch, names), strict=True))


def _local_index_path(config: Config, remote: Remote) -> Path:
    """One local index per remote location, so switching buckets never mixes their runs."""
    remote_id = hashlib.sha256(remote.describe().encode()).hexdigest()[:16]
    return config.local_path / REMOTE_INDEX / f"{remote_id}.json.gz"


def _save_index(remote: Remote, local: Path, index: dict[str, dict[str, Any]], learned: int) -> None:
    """Write the local copy; share it in the remote when this listing learned something (from
    run.json or the day shards), so the next new machine reads one object."""
    raw = dump_index(index)
    try:
        atomic_write_bytes(local, raw)
    except OSError:
        return
    if learned:
        # read-only credentials: the listing still works, it just does not share its index
        with contextlib.suppress(StorageError):
            remote.write_bytes(SHARED_INDEX, raw)


# --- keys ---------------------------------------------------------------------------------------


def key_time(key: str) -> str:
    """The timestamp part of ``<Node>_<time>_<random>`` (sorts keys by start across nodes)."""
    parts = key.rsplit("_", 2)
    return parts[1] if len(parts) == 3 else key


def resolve_key(project: Project, prefix: str, remote: bool = False) -> str:
    """The one run key that equals or starts with ``prefix`` (like a git hash prefix).

    A prefix of the key's random suffix works too (``show 916y`` for ``..._916ykrf7``); a key
    matching both ways counts, so a planted run named after a suffix makes it ambiguous instead
    of winning. An exact key always wins; remote names not of the run-key form only by exact name.
    Looks in ``local_path`` first, then (with ``remote``) in the storage's run prefixes.
    Raises :class:`RunNotFoundError` listing candidates when there are none or several.
    """
    from phd_flow.keys import is_run_key, normalize

    config = project.config
    normalize(prefix)
    if "/" in prefix:  # <parent>/<child>: the parent by key or prefix, then the child in it
        parent_prefix, _, child_prefix = prefix.rpartition("/")
        parent = resolve_key(project, parent_prefix, remote)
        children = {path.rsplit("/", 1)[-1]: path for path in child_run_paths(config.local_path, parent)}
        if not children and remote and project.remote is not None:  # the parent only in storage
            children = remote_child_paths(config, project.remote, [parent])
        found = _matching(sorted(children), child_prefix) if child_prefix else []
        if len(found) == 1:
            return children[found[0]]
        raise RunNotFoundError(
            f"{prefix!r} matches {len(found)} child runs of {parent}"
            + (f": {', '.join(found[:10])}." if found else f" (its children: {', '.join(sorted(children)) or 'none'}).")
        )
    if (config.local_path / prefix / RUN_FILE).exists():
        return prefix
    local = [p.name for p in local_run_dirs(config.local_path)]
    candidates = _matching(local, prefix)
    searched = str(config.local_path)
    if not candidates:  # a child run of a pipeline (<parent>/<child key>), by its own key or prefix
        children = {path.rsplit("/", 1)[-1]: path for top in local for path in child_run_paths(config.local_path, top)}
        candidates = [children[name] for name in _matching(sorted(children), prefix)]
    if not candidates and remote:
        storage_remote = project.remote
        if storage_remote is not None:
            names = remote_run_names(storage_remote)[0]
            # an exact name wins; a prefix only picks among names of the run-key form
            candidates = [prefix] if prefix in names else _matching([n for n in names if is_run_key(n)], prefix)
            searched += f" or {storage_remote.describe()}"
            if not candidates:  # a child run only in storage, by its own key or prefix
                children = remote_child_paths(config, storage_remote)
                candidates = [children[name] for name in _matching(sorted(children), prefix)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        known = sorted(local, key=key_time)
        hint = f" Newest runs: {', '.join(known[-3:])}." if known else ""
        raise RunNotFoundError(
            f"No run key starts with {prefix!r} in {searched}.{hint} `ls` lists the runs"
            + ("" if remote else ", `ls --remote` also those in storage")
            + "."
        )
    shown = ", ".join(candidates[:10]) + (" ..." if len(candidates) > 10 else "")
    raise RunNotFoundError(f"{prefix!r} matches {len(candidates)} runs: {shown}. Give more characters of the key.")


def child_run_paths(local_path: Path, run_path: str) -> list[str]:
    """The runs nested in run ``run_path`` (children of a pipeline, and theirs), as paths
    relative to ``local_path``; only directories holding a run.json count."""
    found: list[str] = []
    for name in _subdirs(local_path / run_path):
        child = f"{run_path}/{name}"
        if os.path.exists(os.path.join(local_path, child, RUN_FILE)):
            found.append(child)
            found += child_run_paths(local_path, child)
    return found


def remote_child_paths(config: Config, remote: Remote, parents: list[str] | None = None) -> dict[str, str]:
    """``{child key: <parent>/<child key>}`` of the child runs in storage below ``parents`` (all
    runs when None), and theirs, found through the ``children`` each run.json lists."""
    from phd_flow.keys import is_run_key

    found: dict[str, str] = {}
    records: dict[str, dict[str, Any] | None] = {}
    if parents is None:  # the listing's records (an index entry written before "children": fetched)
        for item in remote_records(config, remote):
            if isinstance(item, RunRecord):
                records[item.run_dir.name] = item.data if "children" in item.data else None
    else:
        records = dict.fromkeys(parents)
    while records:
        unknown = [name for name, data in records.items() if data is None]
        for name, raw in _fetch_all(remote, unknown).items():
            try:
                read = RunRecord.from_bytes(config.local_path / name, raw, name).data if isinstance(raw, bytes) else {}
            except CorruptRunError:
                read = {}
            records[name] = read
        todo: dict[str, dict[str, Any] | None] = {}
        for name, known in records.items():
            for child in (known or {}).get("children") or []:
                path = str(child.get("path") or "") if isinstance(child, dict) else ""
                child_key = path.rsplit("/", 1)[-1]  # remote data: only a run key one level below counts
                if path == f"{name}/{child_key}" and is_run_key(child_key) and path not in todo:
                    found.setdefault(child_key, path)
                    todo[path] = None  # its own children are in its run.json
        records = todo
    return found


def _matching(keys: list[str], prefix: str) -> list[str]:
    """Keys starting with ``prefix``; failing that, keys whose random suffix starts with it."""
    found = [k for k in keys if k.startswith(prefix) or k.rsplit("_", 1)[-1].startswith(prefix)]
    return [prefix] if prefix in found else found  # both kinds of match together: ambiguous
