"""The indexes of finished runs kept in the remote: the day shards every push updates, and their
reading (size-capped, shape-checked: they are remote data written by anyone with write access).

A push that uploaded a finished run's final run.json files the run's index entry (the
:data:`INDEX_FIELDS` of run.json) in ``.phd_flow/index/<UTC day of its key>.json.gz``: GET the
shard, add or replace the entry, PUT it, re-read it and redo this a few times (with jitter) when
a concurrent pusher's PUT overwrote it. Object stores here have no conditional writes, so an
entry can still be lost; that only costs the listing one GET of the run's run.json. A failing
index write never fails the push: it is one debug line.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from phd_flow.errors import StorageError
from phd_flow.log import logger
from phd_flow.run.record import FINISHED, schema_problem

if TYPE_CHECKING:
    from phd_flow.storage.base import Remote

#: Folder of the day shards in the remote.
SHARDS = ".phd_flow/index"
#: An index is remote data: never inflated beyond this.
MAX_INDEX_BYTES = 64 * 1024 * 1024
#: Read-modify-write rounds of a shard before its pusher gives up (the listing then GETs the run).
SHARD_ATTEMPTS = 4

# The fields of run.json that listing needs; the indexes keep only these.
INDEX_FIELDS = (
    "key",
    "node",
    "status",
    "started_at",
    "ended_at",
    "heartbeat_at",
    "host",
    "pid",
    "args",
    "sync",
    "mlflow",
    "error",
    "sweep",
    "kind",
    "children",  # where child runs are found in storage (resolve_key)
    "metrics",
)

_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})T[0-9-]+(\.\d+)?Z")


def entry_of(data: dict[str, Any]) -> dict[str, Any]:
    """A run.json's index entry: the fields listing needs."""
    return {k: data[k] for k in INDEX_FIELDS if k in data}


def shard_of(key: str) -> str | None:
    """The shard holding run ``key``: the UTC day of its ``<Node>_<time>_<random>`` timestamp
    (``2026-01-01``), or None for a name not of that form (never indexed)."""
    parts = key.rsplit("_", 2)
    found = _DAY.fullmatch(parts[1]) if len(parts) == 3 and parts[0] and parts[2] else None
    return found.group(1) if found else None


def shard_path(shard: str) -> str:
    return f"{SHARDS}/{shard}.json.gz"


def parse_index(raw: bytes | None, shard: str | None = None) -> dict[str, dict[str, Any]]:
    """Parse an index (gzipped JSON ``{key: entry}``); anything unreadable is an empty index.

    Only entries that could be a finished run's record filed where they belong are kept: the
    entry's key is its name (when it has one), a shard holds only keys of its day, the status is
    finished and the shape passes :func:`schema_problem`.
    """
    if not raw:
        return {}
    try:
        inflate = zlib.decompressobj(wbits=31)  # gzip; never more than MAX_INDEX_BYTES in memory
        text = inflate.decompress(raw, MAX_INDEX_BYTES)
        if inflate.unconsumed_tail or len(text) >= MAX_INDEX_BYTES:
            return {}  # too big for an index: it only saves time, so it is ignored
        data = json.loads(text)
    except (zlib.error, ValueError, RecursionError, OverflowError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        name: entry
        for name, entry in data.items()
        if isinstance(entry, dict)
        and entry.get("key", name) == name
        and (shard is None or shard_of(name) == shard)
        and entry.get("status") in FINISHED
        and not schema_problem(entry)
    }


def dump_index(index: dict[str, dict[str, Any]]) -> bytes:
    return gzip.compress(json.dumps(index, separators=(",", ":")).encode(), compresslevel=5)


def read_index(remote: Remote, key: str, shard: str | None = None) -> dict[str, dict[str, Any]]:
    """The index object ``key`` in the remote, parsed; empty when absent or unreadable."""
    try:
        return parse_index(remote.read_small(key, MAX_INDEX_BYTES), shard)
    except StorageError:
        return {}  # an index only saves time: without it the run.json are fetched


def index_pushed(remote: Remote, records: Iterable[dict[str, Any]]) -> int:
    """File the entries of these pushed run records (run.json contents) in their day shards;
    the number filed. Records of runs not finished or not at the top of the remote are skipped.

    A push calls it with its one run; a batch is filed with one read-modify-write per shard.
    Never raises and never fails the caller: an entry not filed is one debug line.
    """
    by_shard: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for data in records:
        key = str(data.get("key") or "")
        shard = shard_of(key)
        if shard is not None and "/" not in key and data.get("status") in FINISHED:
            by_shard[shard][key] = entry_of(data)
    filed = 0
    for shard, entries in sorted(by_shard.items()):
        try:
            filed += _file(remote, shard, entries)
        except Exception as exc:  # the index only saves time; the run itself is pushed already
            logger.debug(f"Run index {shard_path(shard)} not updated ({type(exc).__name__}: {exc}).")
    return filed


def _file(remote: Remote, shard: str, entries: dict[str, dict[str, Any]]) -> int:
    """Read-modify-write one shard until it holds ``entries`` (or the attempts run out)."""
    path = shard_path(shard)

    def read() -> dict[str, dict[str, Any]]:
        # a failed read raises (never a write over a shard that could not be read); a damaged
        # or planted shard parses as empty and is replaced
        return parse_index(remote.read_small(path, MAX_INDEX_BYTES), shard)

    index = read()
    for attempt in range(SHARD_ATTEMPTS):
        if all(index.get(k) == v for k, v in entries.items()):
            return len(entries)
        if attempt:  # a concurrent pusher overwrote the shard: let it finish, then merge again
            time.sleep(random.uniform(0.05, 0.2 * attempt))
            index = read()
        remote.write_bytes(path, dump_index({**index, **entries}))
        index = read()
    kept = sum(index.get(k) == v for k, v in entries.items())
    logger.debug(f"Run index {path}: {len(entries) - kept} entries lost to concurrent pushes (listing reads them).")
    return kept
